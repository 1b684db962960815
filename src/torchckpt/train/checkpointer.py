"""``Checkpointer``: a directory of training checkpoints with retention, best/latest, and safe resume.

State is always read from disk: a checkpoint exists once its sidecar ``<name>.meta.json`` (the commit
marker, written last) exists and matches its data file. A new process finds everything; a crash
at any moment leaves only complete checkpoints under final names (plus temp files that the next
Checkpointer removes). Old checkpoints are deleted only after the new one is committed.

Retention is a set of tiny pure policies (:class:`KeepLast`, :class:`KeepBest`, :class:`KeepEvery`):
each one names the steps it wants kept, and a checkpoint survives if any policy keeps it.
"""

from __future__ import annotations

import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol

from ..storage.atomic import clean_temp_files, fsync_dir
from ..errors import CheckpointError, CheckpointNotFoundError, CheckpointWriteError
from . import distributed
from .training import META_SUFFIX, TrainingState, capture, read_meta, resume, verify, write_payload

__all__ = ["Checkpointer", "CheckpointInfo", "KeepLast", "KeepBest", "KeepEvery", "RetentionPolicy"]


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint. Usable wherever a path is (``torchckpt.load(ckpt.latest())``)."""

    step: int
    path: str
    metrics: Mapping[str, Any]
    meta: Mapping[str, Any]

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path


class RetentionPolicy(Protocol):
    def keep(self, checkpoints: list[CheckpointInfo]) -> set[int]:
        """Steps to keep among ``checkpoints`` (sorted by step)."""


@dataclass(frozen=True)
class KeepLast:
    n: int

    def keep(self, checkpoints: list[CheckpointInfo]) -> set[int]:
        return {c.step for c in checkpoints[-self.n:]} if self.n > 0 else set()


@dataclass(frozen=True)
class KeepBest:
    n: int
    monitor: str
    mode: str = "min"

    def keep(self, checkpoints: list[CheckpointInfo]) -> set[int]:
        scored = [c for c in checkpoints if isinstance(c.metrics.get(self.monitor), (int, float))]
        scored.sort(key=lambda c: c.metrics[self.monitor], reverse=self.mode == "max")
        return {c.step for c in scored[: self.n]}


@dataclass(frozen=True)
class KeepEvery:
    every_n_steps: int

    def keep(self, checkpoints: list[CheckpointInfo]) -> set[int]:
        return {c.step for c in checkpoints if c.step % self.every_n_steps == 0}


class Checkpointer:
    """Save, list and resume training checkpoints in ``directory``.

    Args:
        keep_last: newest checkpoints always kept.
        keep_best, monitor, mode: also keep the ``keep_best`` best by ``metrics[monitor]``.
        every_n_steps: ``save`` writes only when ``step % every_n_steps == 0`` (or ``force=True``).
        keep_every_n_steps: also keep every checkpoint whose step is a multiple of this.
        async_save: ``save`` copies the state to CPU memory and returns; writing happens in one
            background thread (never two writes at once). Errors surface on the next ``save``,
            on ``wait()`` or on ``close()``.
        weights_format: ``"pt"`` or ``"safetensors"`` for the model weights.
        policies: extra :class:`RetentionPolicy` objects.
    """

    NAME = re.compile(r"^ckpt-(\d+)\.pt$")

    def __init__(self, directory: str, *, keep_last: int | None = 3, keep_best: int | None = None,
                 monitor: str | None = None, mode: str = "min", every_n_steps: int | None = None,
                 keep_every_n_steps: int | None = None, async_save: bool = False, weights_format: str = "pt",
                 policies: Iterable[RetentionPolicy] = ()) -> None:
        if keep_best and not monitor:
            raise ValueError("keep_best needs monitor='metric name'")
        if mode not in ("min", "max"):
            raise ValueError("mode must be 'min' or 'max'")
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
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
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchckpt-save") if async_save else None
        self._pending: Future | None = None
        self._buffers: dict[str, Any] = {}  # async snapshot buffers, reused across saves
        self._lock = threading.Lock()
        self._dcp: distributed.DcpSaver | None = None  # sharded saves (process group or DTensor model)
        self.removed_temp = clean_temp_files(self.directory, is_ours=lambda n: n.startswith(".ckpt-"))

    # ------------------------------------------------------------------ listing (from disk)
    def path_for(self, step: int) -> str:
        return os.path.join(self.directory, f"ckpt-{step:010d}.pt")

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints (sidecar present and consistent with the file size), oldest first."""
        out = []
        for name in os.listdir(self.directory):
            m = self.NAME.match(name)
            if not m:
                found = distributed.committed(self.directory, name)  # a sharded checkpoint directory
                if found:
                    out.append(CheckpointInfo(found[0], found[1], found[2].get("metrics") or {}, found[2]))
                continue
            path = os.path.join(self.directory, name)
            meta = read_meta(path)
            if meta is None:
                continue
            try:
                if os.path.getsize(path) != meta.get("size"):
                    continue
            except OSError:
                continue
            out.append(CheckpointInfo(int(m.group(1)), path, meta.get("metrics") or {}, meta))
        out.sort(key=lambda c: c.step)
        return out

    def latest(self) -> CheckpointInfo | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def best(self) -> CheckpointInfo | None:
        if not self.monitor:
            raise ValueError("best() needs Checkpointer(..., monitor='metric name')")
        kept = KeepBest(1, self.monitor, self.mode).keep(self.checkpoints())
        return next((c for c in self.checkpoints() if c.step in kept), None)

    # ------------------------------------------------------------------ saving
    def save(self, step: int, *, force: bool = False, model: Any = None, optimizer: Any = None, scheduler: Any = None,
             scaler: Any = None, epoch: int | None = None, metrics: Mapping[str, Any] | None = None,
             extra: Any = None, stateful: Mapping[str, Any] | None = None) -> str | None:
        """Save the state for ``step``; returns the path (None when ``every_n_steps`` skips this step).

        With ``async_save`` the path is returned before the file is written; call ``wait()`` to be sure.
        """
        if self.every_n_steps and step % self.every_n_steps and not force:
            return None
        self._raise_pending()
        if distributed.in_use(model):
            return self._save_sharded(step, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                      epoch=epoch, metrics=metrics, extra=extra, stateful=stateful)
        payload = capture(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, epoch=epoch,
                          step=step, metrics=metrics, extra=extra, stateful=stateful)
        path = self.path_for(step)
        if self._executor is None:
            self._commit(path, payload)
            return path
        ready: list[Any] = []
        snapshot = _to_cpu_copy(payload, self._buffers, ready)
        with self._lock:
            self._pending = self._executor.submit(self._commit, path, snapshot, ready)
        return path

    def _save_sharded(self, step: int, *, epoch: int | None, metrics: Mapping[str, Any] | None,
                      **objects: Any) -> str:
        """Through torch.distributed.checkpoint: each rank writes its shards, rank 0 commits (see distributed.py)."""
        self._dcp = self._dcp or distributed.DcpSaver(self.directory)
        state = distributed.capture_dcp(**objects, info={"step": step, "epoch": epoch})
        path, finish = self._dcp.save(step, state, distributed.base_meta(step, epoch, metrics),
                                      async_save=self._executor is not None)
        if finish is None:
            self._apply_retention()
            return path
        with self._lock:
            self._pending = self._executor.submit(lambda: (finish(), self._apply_retention()))  # type: ignore
        return path

    def _commit(self, path: str, payload: dict[str, Any], ready: Iterable[Any] = ()) -> None:
        for event in ready:  # device-to-host copies of an async snapshot, still in flight when save() returned
            event.synchronize()
        write_payload(path, payload, self.weights_format)
        self._apply_retention()

    def _apply_retention(self) -> None:
        found = self.checkpoints()
        if not self.policies or not found or not distributed.is_committer():
            return
        keep: set[int] = {found[-1].step}
        for policy in self.policies:
            keep |= policy.keep(found)
        for c in found:
            if c.step not in keep:
                self._delete(c.path)
        fsync_dir(self.directory)

    @staticmethod
    def _delete(path: str) -> None:
        # The sidecar goes first: without it the data file is no longer a checkpoint.
        if os.path.isdir(path):
            distributed.remove(path)
            return
        for victim in (path + META_SUFFIX, path, path + ".safetensors"):
            try:
                os.remove(victim)
            except FileNotFoundError:
                pass

    def wait(self) -> None:
        """Block until the background save (if any) is written; re-raise its error."""
        self._raise_pending(block=True)

    def _raise_pending(self, block: bool = True) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result() if block else None
        except CheckpointError:
            raise
        except OSError as exc:
            raise CheckpointWriteError(f"background save failed: {exc}", path=self.directory) from exc

    def close(self) -> None:
        """Finish pending writes and stop the background thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            if self._dcp is not None:
                self._dcp.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ resuming
    def resume(self, *, model: Any, optimizer: Any = None, scheduler: Any = None, scaler: Any = None,
               stateful: Mapping[str, Any] | None = None, map_location: Any = None, restore_rng: bool = True,
               strict: bool = True) -> TrainingState:
        """Resume from the newest complete checkpoint; a corrupt one is skipped, and the state says so."""
        self._raise_pending()
        found = self.checkpoints()
        if not found:
            raise CheckpointNotFoundError("no complete checkpoint in this directory", path=self.directory,
                                          hint="Start training from scratch, or point at another directory.")
        skipped: list[str] = []
        for info in reversed(found):
            try:
                if os.path.isdir(info.path):
                    state = distributed.resume_dcp(info.path, info.meta, model=model, optimizer=optimizer,
                                                   scheduler=scheduler, scaler=scaler, stateful=stateful,
                                                   restore_rng=restore_rng, strict=strict)
                else:
                    verify(info.path, info.meta)
                    state = resume(info.path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                   stateful=stateful, map_location=map_location, restore_rng=restore_rng,
                                   strict=strict)
            except CheckpointError as exc:
                if not isinstance(exc, (CheckpointWriteError,)) and _is_damage(exc):
                    skipped.append(f"{os.path.basename(info.path)} ({exc.reason})")
                    continue
                raise
            if skipped:
                state.notes.append(f"skipped damaged checkpoint(s): {'; '.join(skipped)}; "
                                   f"resumed from {os.path.basename(info.path)}")
            return state
        raise CheckpointNotFoundError(f"every checkpoint is damaged: {'; '.join(skipped)}", path=self.directory)


def _is_damage(exc: CheckpointError) -> bool:
    from ..errors import CorruptCheckpointError, UnsupportedFormatError

    return isinstance(exc, (CorruptCheckpointError, UnsupportedFormatError))


def _to_cpu_copy(obj: Any, buffers: dict[str, Any], ready: list[Any] | None = None) -> Any:
    """Deep copy with every tensor copied to CPU memory (the blocking part of an async save).

    Tensors are copied into ``buffers`` (keyed by their place in the payload) when a buffer of the
    same shape and dtype exists: warm memory copies about twice as fast as fresh allocations. The
    caller guarantees that no write is still reading the buffers.

    CUDA tensors go to pinned buffers with asynchronous copies; one event per device is appended to
    ``ready`` (the writer waits for it; later work on the same stream is ordered after the copies).
    Without ``ready`` the copies are waited for here.
    """
    import torch

    memo: dict[int, Any] = {}

    def copy(value: Any, where: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = id(value)
            if key not in memo:
                buf = buffers.get(where)
                src = value.detach()
                if src.is_cuda:
                    devices.add(src.device)
                if buf is not None and buf.shape == src.shape and buf.dtype == src.dtype and src.is_contiguous() \
                        and (buf.is_pinned() or not src.is_cuda):
                    memo[key] = buf.copy_(src, non_blocking=src.is_cuda)
                elif src.is_cuda:
                    buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
                    memo[key] = buffers[where] = buf.copy_(src, non_blocking=True)
                else:
                    memo[key] = buffers[where] = src.to("cpu", copy=True)
            return memo[key]
        if isinstance(value, dict):
            items = ((k, copy(v, f"{where}.{k}")) for k, v in value.items())
            return {k: v for k, v in items} if type(value) is dict else type(value)(items)
        if isinstance(value, list):
            return [copy(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return tuple(copy(v, f"{where}[{i}]") for i, v in enumerate(value))
        return value

    devices: set[Any] = set()
    out = copy(obj, "")
    for device in devices:
        event = torch.cuda.current_stream(device).record_event()
        if ready is None:
            event.synchronize()
        else:
            ready.append(event)
    return out
