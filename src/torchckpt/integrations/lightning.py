"""Lightning: ``TorchckptIO``, a ``CheckpointIO`` plugin that saves and loads through torchckpt.

    trainer = lightning.Trainer(plugins=[TorchckptIO(async_save=True)], callbacks=[ModelCheckpoint(...)])

- **Loading** goes through :func:`torchckpt.load`: no code from the file runs, whatever
  ``weights_only`` Lightning asks for (classes outside the allowlist become inert stubs).
  A checkpoint whose sidecar (``<file>.meta.json``) does not match its content is refused.
- **Saving** is atomic and durable (temp file, fsync, rename, fsync of the directory), followed by
  the sidecar with a content digest, as :func:`torchckpt.save` does.
- **async_save=True** copies the tensors to CPU memory on the training thread and writes in one
  background thread (one write at a time; removals are queued behind the writes). The first save,
  with CPU tensors only, has no buffers to copy into: it writes the file on the training thread, as
  a sync save does, and only makes it durable (fsync, rename, sidecar) in the background, while the
  buffers for the next save are prepared (as a :class:`~torchckpt.Checkpointer` does). A failed write
  is raised on the next save, on load, or at the end of ``fit``; if the program ends first, its
  typed error is printed to stderr and the exit status becomes 1 (:mod:`torchckpt.train.exit_guard`).
- **Retention** stays with Lightning's ``ModelCheckpoint`` (``save_top_k``, ``every_n_train_steps``);
  removing a checkpoint removes its sidecar too.
- **Resuming from a torchckpt training checkpoint** (written by :func:`torchckpt.save` or a
  :class:`~torchckpt.Checkpointer` in a plain PyTorch loop): ``trainer.fit(module, ckpt_path=path)``
  restores the weights, optimizers, schedulers, epoch and global step. See :func:`to_lightning`.

Lightning is an optional dependency: ``pip install "torchckpt[lightning]"``.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Mapping

from ..errors import CheckpointWriteError, ResumeError
from ..storage import interrupts
from ..train import exit_guard
from ..train.restore import load_payload
from ..train.snapshot import Copies, start_snapshot
from ..train.training import FORMAT, StagedPayload, discard, verify, write_payload
from ..train.warming import Warming, start_warming

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError("torchckpt.integrations.lightning needs Lightning: pip install 'torchckpt[lightning]'") from None

__all__ = ["TorchckptIO", "to_lightning"]

# The layout of Lightning < 1.6 (epoch and global_step at the top level, no loop state): Lightning's
# own migrations (lightning.pytorch.utilities.migration) turn it into the current layout.
_PRE_LOOPS_VERSION = "1.5.0"


class TorchckptIO(CheckpointIO):
    """Lightning ``CheckpointIO`` that saves atomically and durably and loads without running code.

    Args:
        async_save: write in a background thread; the training loop only waits for a copy of the
            tensors into CPU memory.
        prefix: when resuming from a torchckpt training checkpoint whose model is a sub-module of
            the LightningModule (``self.net = net``), the prefix to put before its keys (``"net."``).
    """

    def __init__(self, *, async_save: bool = False, prefix: str = "") -> None:
        self.async_save = async_save
        self.prefix = prefix
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[Any] | None = None
        self._buffers: dict[str, Any] = {}
        self._warming: Warming | None = None

    # ------------------------------------------------------------------ saving
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically and durably, then its sidecar."""
        if storage_options is not None:
            raise TypeError("TorchckptIO.save_checkpoint takes no storage_options: it writes local files")
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if not self.async_save:
            write_payload(path, checkpoint)
            return
        self._wait()  # one write at a time: the buffers of the previous snapshot are free again
        self._cool()  # a save is coming: the warming stops (it never changes the buffers)
        snapshot, copies = start_snapshot(checkpoint, self._buffers)
        if copies.write_through:
            self._write_through(path, checkpoint, copies)
            return
        try:
            with interrupts.deferred():  # Ctrl-C waits until the write is handed over and tracked
                self._pending = self._pool().submit(_write_when_copied, copies, path, snapshot)
                exit_guard.track(self._pending, f"the background save of {path}", _typed)
            copies.run()  # the writer's thread copies chunks too
        except BaseException:  # interrupted: the writer gives up and publishes nothing of it
            with interrupts.deferred():
                if copies.abort():  # else the snapshot was complete: it is written, and reported like any save
                    exit_guard.settled(self._pending)
                    self._pending = None
                    self._buffers = {}  # the abandoned writer may still be copying a chunk into these
            raise

    def _write_through(self, path: str, checkpoint: dict[str, Any], copies: Copies) -> None:
        """The first save (only fresh buffers): the file is its snapshot (see Checkpointer._write_through).
        Written here under temp names, as a sync save writes it (Ctrl-C or a full disk raise here and leave
        nothing); the background thread makes it durable and visible, and reports its failure as any write."""
        staged = StagedPayload(path)
        owned = True  # this call removes what it staged if it fails (until the hand-off)
        try:
            staged.write(checkpoint)  # Ctrl-C stops the writing
            with interrupts.deferred():  # a Ctrl-C from here on comes after the hand-off: the write commits
                self._pending = self._pool().submit(_publish, staged)
                exit_guard.track(self._pending, f"the background save of {path}", _typed)
                owned = False
        except BaseException:
            if owned:
                staged.abort()
            raise
        with interrupts.deferred():  # the warming started is the one cancelled next
            self._warming = start_warming(copies.fresh)

    def _cool(self) -> None:
        warm, self._warming = self._warming, None
        if warm is not None:
            warm.cancel()

    def remove_checkpoint(self, path: Any) -> None:
        """Remove a checkpoint and its sidecar (queued behind pending writes with ``async_save``)."""
        path = os.fspath(path)
        if self.async_save and self._pending is not None:
            with interrupts.deferred():
                previous = self._pending
                self._pending = self._pool().submit(_remove_after, previous, path)
                exit_guard.settled(previous)  # the removal waits for it and carries its outcome
                exit_guard.track(self._pending, f"the background save before removing {path}", _typed)
            return
        discard(path)

    # ------------------------------------------------------------------ loading
    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a Lightning checkpoint, or a torchckpt training checkpoint converted to Lightning's layout.

        ``weights_only`` is accepted for Lightning's sake: torchckpt never runs code from the file either way.
        """
        self._wait()
        path = os.fspath(path)
        verify(path)
        payload = load_payload(path, map_location)
        if payload.get("format") == FORMAT:
            return to_lightning(payload, prefix=self.prefix, path=path)
        if "pytorch-lightning_version" not in payload:
            keys = ", ".join(map(str, list(payload)[:12]))
            raise ResumeError(f"neither a Lightning checkpoint nor a torchckpt training checkpoint (keys: {keys})",
                              path=path, hint="To load only the weights, use torchckpt.load_into(module, path) "
                                              "before trainer.fit(module) without ckpt_path.")
        return payload

    # ------------------------------------------------------------------ background writes
    def teardown(self) -> None:
        """Finish pending writes (raising their error) and stop the background thread."""
        self._cool()  # buffers nobody will use: the warming stops (not waited for)
        try:
            self._wait()
        finally:
            if self._executor is not None and self._pending is None:  # else interrupted (Ctrl-C) while a
                with interrupts.deferred():  # write goes on: teardown() again, or the program's end, waits for it
                    self._executor.shutdown(wait=True)
                    self._executor = None

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            with interrupts.deferred():  # the thread starts here, whole (see Checkpointer.__init__)
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchckpt-lightning-save")
                self._executor.submit(int).result()
        return self._executor

    def _wait(self) -> None:
        pending = self._pending
        if pending is None:
            return
        error: Exception | None = None
        try:  # interrupted here (Ctrl-C), the write stays pending: waited for and reported later
            interrupts.result(pending)
        except Exception as exc:  # noqa: BLE001 - its outcome reached the caller: raised below
            error = exc
        with interrupts.deferred():  # a Ctrl-C here comes after the outcome (a failure is the interrupt's context)
            self._pending = None
            exit_guard.settled(pending)
            if isinstance(error, OSError):
                typed = _typed(error)
                if typed is not error:
                    raise typed from error
            if error is not None:
                raise error


def _typed(exc: BaseException) -> BaseException:
    """A background write's failure as the caller sees it."""
    if isinstance(exc, OSError) and not isinstance(exc, CheckpointWriteError):
        return CheckpointWriteError(f"background save failed: {exc}")
    return exc


def _write_when_copied(copies: Copies, path: str, snapshot: dict[str, Any]) -> None:
    copies.wait_all()  # helps the caller copy; SnapshotInterrupted (nothing written) if the save was interrupted
    write_payload(path, snapshot)


def _publish(staged: StagedPayload) -> None:
    try:
        staged.publish()
    finally:
        staged.abort()  # (nothing once published; on a failure its files are removed already)


def _remove_after(previous: Future[Any], path: str) -> None:
    previous.result()  # a failed write is reported, and the older checkpoint is kept
    discard(path)


def to_lightning(payload: Mapping[str, Any], *, prefix: str = "", path: str | None = None) -> dict[str, Any]:
    """A torchckpt training checkpoint (as :func:`torchckpt.load` returns it) in Lightning's layout.

    Weights become ``state_dict`` (keys prefixed with ``prefix``), optimizers ``optimizer_states``,
    schedulers ``lr_schedulers``; ``epoch`` and ``step`` become Lightning's epoch and global step.
    The epoch restarts from its first batch. RNG states, the scaler and ``stateful`` objects are not
    restored by Lightning.
    """
    from lightning.pytorch.utilities.migration.utils import migrate_checkpoint

    weights = payload.get("model")
    if not isinstance(weights, Mapping):
        raise ResumeError("the torchckpt checkpoint holds no model weights", path=path,
                          hint="Save with torchckpt.save(path, model=..., optimizer=..., step=...).")
    checkpoint: dict[str, Any] = {
        "pytorch-lightning_version": _PRE_LOOPS_VERSION,
        "epoch": int(payload.get("epoch") or 0),
        "global_step": int(payload.get("step") or 0),
        "state_dict": {f"{prefix}{k}": v for k, v in weights.items()},
        "lr_schedulers": _as_list(payload.get("scheduler")),
        "callbacks": {},
    }
    if payload.get("optimizer") is not None:
        checkpoint["optimizer_states"] = _as_list(payload["optimizer"])
    migrated, _ = migrate_checkpoint(checkpoint)
    return migrated


def _as_list(state: Any) -> list[Any]:
    if state is None:
        return []
    if isinstance(state, list):
        return state
    if isinstance(state, Mapping) and not ("state" in state or "param_groups" in state or "last_epoch" in state):
        return list(state.values())  # several named optimizers/schedulers, in the order they were given
    return [state]
