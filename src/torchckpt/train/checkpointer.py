"""``Checkpointer``: a directory of training checkpoints with retention, best/latest, and safe resume.

State is always read from disk: a checkpoint exists once its sidecar ``<name>.meta.json`` (the commit
marker, written last) exists and matches its data file. A new process finds everything; a crash
at any moment leaves only complete checkpoints under final names, and the leftovers of a killed
save or retention pass are reclaimed by the next writer (the protocol is :mod:`.store`). One
writer per directory: a second one, in any process, gets a clear error. Old checkpoints are
deleted only after the new one is committed, and only checkpoints this protocol wrote.

Retention is a set of tiny pure policies (:mod:`.retention`). :func:`torchckpt.resume` (any checkpoint,
not only a directory of them) is in :mod:`.resume`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from ..read import deepspeed_kind
from ..errors import (CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, ResumeError,
                      UnsupportedFormatError)
from ..storage.atomic import os_error_in, write_error
from ..storage import files, interrupts
from ..storage.remote import StorageOptions, is_url
from . import distributed, exit_guard
from .dcp_store import DcpStore
from .fsspec_store import FsspecStore
from .local_store import LocalStore
from .retention import CheckpointInfo, KeepBest, KeepEvery, KeepLast, RetentionPolicy, info_of
from .snapshot import Copies, start_snapshot
from .warming import Warming, start_warming
from .store import NAME, Entry, FileStore, Staging, Store
from .training import TrainingState, capture

if TYPE_CHECKING:  # names for type checkers only: fit/ is imported when a resume runs
    from ..fit.align import RenameSpec
    from ..transforms import TransformSpec

__all__ = ["Checkpointer", "CheckpointInfo", "KeepLast", "KeepBest", "KeepEvery", "RetentionPolicy",
           "SkippedCheckpointWarning", "RetentionWarning", "stores_for", "adapting_options"]


class SkippedCheckpointWarning(UserWarning):
    """A damaged or incomplete checkpoint was skipped while resuming (the previous one was used)."""


class RetentionWarning(UserWarning):
    """A checkpoint was saved, but an old one that retention would remove could not be removed."""

def stores_for(directory: str, storage_options: StorageOptions | None = None) -> tuple[FileStore, DcpStore | None]:
    """The stores of a Checkpointer directory: its file store (a local directory or a URL prefix) and, on a
    local directory, the sharded (DCP) checkpoints beside it."""
    if is_url(directory):
        return FsspecStore(directory, storage_options), None
    return LocalStore(directory), DcpStore(directory)


class Checkpointer:
    """Save, list and resume training checkpoints in ``directory``.

    Args:
        keep_last: newest checkpoints always kept.
        keep_best, monitor, mode: also keep the ``keep_best`` best by ``metrics[monitor]``.
        every_n_steps: ``save`` writes only when ``step % every_n_steps == 0`` (or ``force=True``).
        keep_every_n_steps: also keep every checkpoint whose step is a multiple of this.
        async_save: ``save`` captures the state (RNGs included) and copies it to CPU memory, then
            returns; writing happens in one background thread (never two writes at once). Everything
            is taken then: tensors copied into reused buffers, objects of your own classes in ``extra`` as
            pickle takes them (their ``__reduce_ex__`` runs in ``save()``; see :mod:`.snapshot`). The
            first save of a local directory with CPU tensors only has no buffers to reuse: it writes the
            file in ``save()`` (about half a synchronous save) and only makes it durable (fsync, rename,
            sidecar) in the background; its buffers are prepared in the background for the next save.
            Errors of the background part surface on the next ``save``, on ``wait()`` or on ``close()``
            (a failure to write the file itself raises from ``save()``, as in a synchronous save). Use a ``with`` block or call
            ``close()``: if the program ends first, torchckpt waits for the write (at most
            ``TORCHCKPT_EXIT_TIMEOUT`` s, default 600), prints a failure's typed error to stderr and
            makes the exit status 1 (see :mod:`torchckpt.train.exit_guard`).
        weights_format: ``"pt"`` or ``"safetensors"`` for the model weights.
        policies: extra :class:`RetentionPolicy` objects.
        storage_options: options for the fsspec filesystem when ``directory`` is a URL
            (``s3://bucket/run``): uploads are published whole, the sidecar last (see :mod:`.fsspec_store`).

    The first ``save`` takes the directory's writer lock and holds it until :meth:`close` (or the
    process ends); listing and resuming need no lock.
    """

    NAME = NAME

    def __init__(self, directory: str, *, keep_last: int | None = 3, keep_best: int | None = None,
                 monitor: str | None = None, mode: str = "min", every_n_steps: int | None = None,
                 keep_every_n_steps: int | None = None, async_save: bool = False, weights_format: str = "pt",
                 policies: Iterable[RetentionPolicy] = (), storage_options: StorageOptions | None = None) -> None:
        if keep_best and not monitor:
            raise ValueError("keep_best needs monitor='metric name'")
        if mode not in ("min", "max"):
            raise ValueError("mode must be 'min' or 'max'")
        self.directory = os.fspath(directory)
        self.storage_options = storage_options
        # where checkpoints live: one file store (a local directory or a URL prefix) and, on a local
        # directory, sharded ones beside it; the Checkpointer speaks to them only through store.Store
        self._store, self._sharded = stores_for(self.directory, storage_options)
        self._stores: list[Store] = [self._store] + ([self._sharded] if self._sharded is not None else [])
        try:
            if self._sharded is not None:  # local
                os.makedirs(self.directory, exist_ok=True)
        except OSError as exc:
            raise write_error(self.directory, exc) from None
        self.monitor, self.mode = monitor, mode
        self.every_n_steps = every_n_steps
        self.weights_format = weights_format
        self.policies: list[RetentionPolicy] = list(policies)
        if keep_last:
            self.policies.append(KeepLast(keep_last))
        if keep_best:
            self.policies.append(KeepBest(keep_best, monitor or "", mode))
        if keep_every_n_steps:
            self.policies.append(KeepEvery(keep_every_n_steps))
        self._executor: ThreadPoolExecutor | None = None
        self._stopped = False  # close() stopped the writer's thread: the next save starts a new one
        if async_save:
            self._start_writer()
        self._pending: Future[Any] | None = None
        self._buffers: dict[str, Any] = {}  # async snapshot buffers, reused across saves
        self._warming: Warming | None = None  # their pages being mapped in the background (see _write_through)
        self._lock = threading.Lock()
        self._writer = self._store.lock()
        self.removed_temp: list[str] = []
        self.reclaimed: list[str] = []
        if distributed.is_committer():  # nobody writes: finish what killed writers left
            with interrupts.deferred():
                if self._writer.try_acquire():
                    try:
                        self._tidy()
                    finally:
                        self._writer.release()

    def _start_writer(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchckpt-save")
        self._stopped = False
        with interrupts.deferred():  # its thread starts now, not inside a save's hand-off, with Ctrl-C deferred
            self._executor.submit(int).result()  # (one that lands in Thread.start() can leave a thread that never ends)

    def _tidy(self) -> None:
        self.removed_temp = [name for s in self._stores for name in s.remove_temp_files()]
        self.reclaimed = [name for s in self._stores for name in s.reclaim()]

    # ------------------------------------------------------------------ listing (from disk)
    def path_for(self, step: int) -> str:
        return self._store.path_for(step)

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints (sidecar present and consistent with the file size), oldest first."""
        return [info_of(e) for e in self._entries() if e.problem is None]

    def _entries(self) -> list[Entry]:
        """Checkpoint files and (local) sharded DCP checkpoint directories, oldest first."""
        return sorted((e for s in self._stores for e in s.entries()), key=lambda e: e.step)

    def latest(self) -> CheckpointInfo | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def best(self) -> CheckpointInfo | None:
        if not self.monitor:
            raise ValueError("best() needs Checkpointer(..., monitor='metric name')")
        found = self.checkpoints()
        kept = KeepBest(1, self.monitor, self.mode).keep(found)
        return next((c for c in found if c.step in kept), None)

    # ------------------------------------------------------------------ saving
    def save(self, step: int, *, force: bool = False, model: Any = None, optimizer: Any = None, scheduler: Any = None,
             scaler: Any = None, epoch: int | None = None, metrics: Mapping[str, Any] | None = None,
             extra: Any = None, stateful: Mapping[str, Any] | None = None) -> str | None:
        """Save the state for ``step``; returns the path (None when ``every_n_steps`` skips this step).

        With ``async_save`` the path is returned before the file is written; call ``wait()`` to be sure.
        Raises CheckpointWriteError when another process writes checkpoints in this directory.
        """
        if self.every_n_steps and step % self.every_n_steps and not force:
            return None
        sharded = DcpStore.wanted_for(model)
        if sharded and self._sharded is None:
            raise NotImplementedError(f"{self.directory}: sharded (torch.distributed) checkpoints are written to a "
                                      "local or shared file system only; give the Checkpointer a path, not a URL")
        # Everything (RNG states included) is captured now, before waiting for the previous background
        # write: that thread may draw from the global RNGs meanwhile (botocore's retry jitter uses `random`).
        if sharded:
            state = DcpStore.capture(step, epoch, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                     extra=extra, stateful=stateful)
        else:
            payload = capture(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, epoch=epoch,
                              step=step, metrics=metrics, extra=extra, stateful=stateful)
        self._raise_pending()
        if self._stopped:  # saving again after close(), as a synchronous Checkpointer can (it raised RuntimeError
            self._start_writer()  # 'cannot schedule new futures' after writing the file, and kept the directory locked)
        if not self._writer.held and distributed.is_committer():  # one lock per run: rank 0 holds it
            with interrupts.deferred():  # Ctrl-C waits for the lock's bookkeeping (see storage/interrupts.py)
                self._writer.acquire()
                self._tidy()
        if sharded:
            return self._save_sharded(step, state, epoch=epoch, metrics=metrics)
        path = self.path_for(step)
        if self._executor is None:
            self._commit(path, payload)
            return path
        self._cool()  # a save is coming: the warming stops (its last piece may overlap the copy: it never changes them)
        ready: list[Any] = []
        local = isinstance(self._store, LocalStore)
        if local and not self._buffers:  # the first save: decided before any object's __reduce_ex__ runs (once,
            try:  # in the write, as in a sync save)
                laid = start_snapshot(payload, self._buffers, layout=True)[1]
            except BaseException:
                self._buffers = {}  # laid out, never touched: the next save is a first one again
                raise
            if laid.write_through:
                self._write_through(path, payload, laid)
                return path
        snapshot, copies = start_snapshot(payload, self._buffers, ready)
        if copies.write_through and not copies.objects and local:  # (every kept buffer the wrong size)
            self._write_through(path, payload, copies)
            return path
        try:
            self._submit(f"the background save of {path}", self._commit, path, snapshot, ready, copies)
            copies.run()  # the writer's thread copies chunks too (see train/snapshot.py)
        except BaseException:  # interrupted (Ctrl-C): the writer gives up and publishes nothing of it
            with interrupts.deferred():
                if copies.abort():  # else the snapshot was complete: it is written, and reported like any save
                    with self._lock:
                        abandoned, self._pending = self._pending, None
                    exit_guard.settled(abandoned)
                    self._buffers = {}  # the abandoned writer may still be copying a chunk into these
            raise
        return path

    def _write_through(self, path: str, payload: dict[str, Any], copies: Copies) -> None:
        """An async save whose snapshot would go into fresh memory only (the first one): the file is its snapshot.

        The files are written here, on the caller's thread, exactly as a synchronous save writes them (same
        bytes, temp names, digest, sidecar; Ctrl-C or a full disk raise here and leave nothing), so the page
        cache holds the state of the moment and nothing is copied; the writer's thread makes them durable and
        visible (fsync, rename, sidecar last, marker, retention), reported like any background write. Fresh
        snapshot buffers cost a page fault per page (a host fault on a VM with free page reporting: the first
        async save took 1.4-2.7x a sync save); their pages are mapped meanwhile in a thread of their own
        (:class:`~.warming.Warming`, while the writer waits for the disk), for the next save, which copies into
        them as usual."""

        try:
            self._write(path, payload, lambda staged: self._submit(f"the background save of {path}", self._publish,
                                                                    path, staged))
        except BaseException:  # nothing written (Ctrl-C, a full disk, an object pickle refuses): its buffers were
            with interrupts.deferred():  # never touched nor warmed; kept, the next save would copy into cold memory
                fresh = {id(b) for b in copies.fresh}  # instead of writing through
                self._buffers = {name: b for name, b in self._buffers.items() if id(b) not in fresh}
            raise
        self._warm(copies.fresh)

    def _warm(self, buffers: list[Any]) -> None:
        """Map the pages of ``buffers`` in a thread of its own; nobody waits for it (a save or close() cancels it, the
        exit too, see :func:`~.warming.start_warming`)."""
        with interrupts.deferred():  # the warming started is the one cancelled next
            self._warming = start_warming(buffers)

    def _cool(self) -> None:
        warm, self._warming = self._warming, None
        if warm is not None:
            warm.cancel()

    def _submit(self, what: str, fn: Any, *args: Any) -> None:
        """Start a background write; it is reported at exit if nobody waits for it (see exit_guard)."""
        assert self._executor is not None
        with interrupts.deferred(), self._lock:  # submit() takes the executor's locks: Ctrl-C waits
            self._pending = self._executor.submit(fn, *args)
            exit_guard.track(self._pending, what, self._typed)

    def _save_sharded(self, step: int, state: dict[str, Any], *, epoch: int | None,
                      metrics: Mapping[str, Any] | None) -> str:
        """Through torch.distributed.checkpoint: each rank writes its shards, rank 0 commits (see distributed.py)."""
        assert self._sharded is not None  # save() sends only local directories here
        path, finish = self._sharded.save(step, state, epoch=epoch, metrics=metrics,
                                          async_save=self._executor is not None)
        if finish is None:
            with interrupts.deferred():
                self._after_commit(path, "apply retention", self._apply_retention)
            return path
        done = finish

        def finish_and_keep() -> None:
            done()
            self._after_commit(path, "apply retention", self._apply_retention)

        self._submit(f"the background save of {path}", finish_and_keep)
        return path

    def _commit(self, path: str, payload: dict[str, Any], ready: Iterable[Any] = (), copies: Copies | None = None) -> None:
        """Write and publish the checkpoint at ``path``: on the caller's thread for a sync save, in the writer's
        thread for an async one (after its snapshot is complete)."""
        for event in ready:  # device-to-host copies of an async snapshot, still in flight when save() returned
            event.synchronize()
        if copies is not None:
            copies.wait_all()  # helps the caller copy; SnapshotInterrupted (nothing written) if save() was interrupted
        self._write(path, payload)

    def _write(self, path: str, payload: dict[str, Any], hand_off: Callable[[Staging], None] | None = None) -> None:
        """A save's two phases (:class:`~.store.Staging`): its intent marker and files under temp names, then the
        commit, or (``hand_off``, a write-through) the staged files handed to the writer's thread, which commits
        them. If anything fails before the commit or the hand-off (Ctrl-C included), nothing of it stays."""
        staged: Staging | None = None
        owned = True  # this call removes what it staged if it fails (until the hand-off)
        try:
            with interrupts.deferred():  # (on the caller's thread in a synchronous save; see storage/interrupts.py)
                try:
                    self._store.begin(path)
                except OSError as exc:
                    raise write_error(path, exc) from None
                staged = self._store.stage(path)
            staged.write(payload, self.weights_format)  # Ctrl-C stops the writing, not its commit
            if hand_off is None:
                self._publish(path, staged)
            else:
                with interrupts.deferred():  # a Ctrl-C from here on comes after the hand-off: the write commits
                    hand_off(staged)
                    owned = False
        except BaseException:
            if owned:
                self._abandon(path, staged)
            raise

    def _publish(self, path: str, staged: Staging) -> None:
        """Commit what ``staged`` holds (fsync, rename, sidecar last), then drop the marker and apply retention."""
        try:
            staged.publish()  # (deferred: a Ctrl-C waits for the commit or its undoing)
        except BaseException:
            self._abandon(path, staged)
            raise
        # Committed: what fails from here on is housekeeping, a warning, never a failed save.
        with interrupts.deferred():
            self._after_commit(path, "remove its .uncommitted marker", lambda: self._store.end(path))
            self._after_commit(path, "apply retention", self._apply_retention)

    def _abandon(self, path: str, staged: Staging | None) -> None:
        """Remove what a save staged, then its marker (it will not be committed)."""
        with interrupts.deferred():
            if staged is not None:
                with contextlib.suppress(Exception):
                    staged.abort()
            with contextlib.suppress(Exception):  # the write's own error is the one to report
                self._store.end(path)  # a marker left is reclaimed by the next writer

    @staticmethod
    def _after_commit(path: str, what: str, step: Any) -> None:
        try:
            step()
        except (OSError, CheckpointError) as exc:
            why = exc.reason if isinstance(exc, CheckpointError) else f"{exc.strerror or exc}"
            warnings.warn(f"torchckpt: saved {path}, but could not {what} ({why}); the checkpoint is committed, "
                          "and the next save or resume tidies up", RetentionWarning, stacklevel=3)

    def _apply_retention(self) -> None:
        committed = [e for e in self._entries() if e.problem is None]
        found = [info_of(e) for e in committed]
        if not self.policies or not found or not distributed.is_committer():
            return
        keep: set[int] = {found[-1].step}
        for policy in self.policies:
            keep |= policy.keep(found)
        for e, c in zip(committed, found):
            if c.step not in keep:
                try:
                    (e.store or self._store).delete(e.path)
                except (OSError, CheckpointError) as exc:  # housekeeping: the new checkpoint is committed
                    why = exc.reason if isinstance(exc, CheckpointError) else f"{exc.strerror or exc}"
                    warnings.warn(f"torchckpt: saved {os.path.basename(found[-1].path)}, but could not remove the "
                                  f"old {os.path.basename(c.path)} ({why}); it stays, and the next save tries "
                                  "again", RetentionWarning, stacklevel=4)

    def wait(self) -> None:
        """Block until the background save (if any) is written; re-raise its error."""
        self._raise_pending(block=True)

    def _raise_pending(self, block: bool = True) -> None:
        with self._lock:
            pending = self._pending
        if pending is None:
            return
        error: Exception | None = None
        try:  # interrupted here (Ctrl-C), the write stays pending: the next save still waits for it, and
            interrupts.result(pending) if block else None  # its failure is still reported
        except Exception as exc:  # noqa: BLE001 - a file-system failure deep inside a serializer
            error = exc
        with interrupts.deferred():  # a Ctrl-C here comes after the outcome (a failure is the interrupt's context)
            with self._lock:
                if self._pending is pending:
                    self._pending = None
            exit_guard.settled(pending)
            if error is not None:
                typed = self._typed(error)
                if typed is error:
                    raise error
                raise typed from None

    def _typed(self, exc: BaseException) -> BaseException:
        """The error a background write's exception is reported as (a write error when the file system failed)."""
        if isinstance(exc, CheckpointError):
            return exc
        cause = os_error_in(exc) if isinstance(exc, Exception) else None
        return exc if cause is None else write_error(self.directory, cause)

    def close(self) -> None:
        """Finish pending writes, stop the background thread and release the directory.

        Interrupted (Ctrl-C) while it waits for a background write, that write goes on and keeps the
        directory: call ``close()`` again, or let the program end (it waits for the write, see
        :mod:`~torchckpt.train.exit_guard`)."""
        self._cool()  # buffers nobody will use: the warming stops (not waited for)
        try:
            self.wait()
        finally:
            if self._pending is None:  # else still being written: joining the thread would not stop at Ctrl-C
                with interrupts.deferred():  # the thread is idle: stopping it and dropping the lock are quick
                    if self._executor is not None:
                        self._executor.shutdown(wait=True)
                        self._stopped = True
                    if self._sharded is not None:
                        self._sharded.close()
                    self._writer.release()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ resuming
    def resume(self, *, model: Any, optimizer: Any = None, scheduler: Any = None, scaler: Any = None,
               stateful: Mapping[str, Any] | None = None, map_location: Any = None, restore_rng: bool = True,
               strict: bool = True, rename: RenameSpec = None, prefix: str | None = None,
               transforms: TransformSpec = None) -> TrainingState:
        """Resume from the newest complete checkpoint (``rename``/``prefix``/``transforms``: see :func:`resume`).

        A damaged newer one (truncated, sidecar missing or unreadable, failing its digest or CRCs) is
        skipped with a :class:`SkippedCheckpointWarning`, and ``state.notes`` names each file skipped
        and why. A checkpoint that does not fit the given objects raises (no fallback).
        """
        self._raise_pending()
        found = self._entries()
        skipped: list[str] = [f"removed the leftovers of an unfinished save: {name}" for name in self.reclaimed]
        for entry in reversed(found):
            name = os.path.basename(entry.path)
            if entry.problem is not None:
                if not entry.unfinished:  # a save in progress elsewhere is not damage
                    self._skip(skipped, name, entry.problem)
                continue
            kwargs = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, stateful=stateful,
                          map_location=map_location, restore_rng=restore_rng, strict=strict,
                          **adapting_options(rename, prefix, transforms, entry.path))
            try:  # verified first; a URL's file downloaded once; a sharded one resharded into the objects' layout
                state = (entry.store or self._store).resume(entry, **kwargs)
            except (CorruptCheckpointError, UnsupportedFormatError, CheckpointNotFoundError) as exc:
                self._skip(skipped, name, exc.reason)
                continue
            state.notes.extend(skipped)
            if skipped:
                state.notes.append(f"resumed from {name}")
            return state
        if skipped:
            raise CheckpointNotFoundError(f"no usable checkpoint: {'; '.join(skipped)}", path=self.directory,
                                          hint="Start training from scratch, or point at another directory.")
        raise CheckpointNotFoundError("no complete checkpoint in this directory", path=self.directory,
                                      hint="Start training from scratch, or point at another directory.")

    @staticmethod
    def _skip(skipped: list[str], name: str, why: str) -> None:
        note = f"skipped {name}: {why}"
        skipped.append(note)
        warnings.warn(f"torchckpt: {note}; falling back to the previous checkpoint", SkippedCheckpointWarning,
                      stacklevel=3)


def adapting_options(rename: RenameSpec, prefix: str | None, transforms: TransformSpec, path: str) -> dict[str, Any]:
    """resume's load_into options, only when given (sharded DCP checkpoints restore through torch's DCP)."""
    given = {k: v for k, v in (("rename", rename), ("prefix", prefix), ("transforms", transforms)) if v is not None}
    if given and os.path.isdir(path) and (distributed.is_dcp(path) or deepspeed_kind(path)):
        raise ResumeError(f"{', '.join(given)}= is not supported for a sharded (DCP or DeepSpeed) checkpoint",
                          path=path,
                          hint="Convert it to one file first (torchckpt.convert), then resume from that file.")
    return given
