"""The :class:`~torchckpt.train.store.Store` of sharded checkpoints: ``ckpt-<step>.dcp`` directories in a
local (or shared) directory, written by every rank through torch.distributed.checkpoint and committed
by rank 0 (the mechanics are :mod:`.distributed`).

It shares its directory, and so its writer lock, with the :class:`~torchckpt.train.local_store.LocalStore`
of the same Checkpointer: the one lock covers both kinds of checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from . import distributed
from .local_store import DirectoryLock
from .store import Entry
from .training import TrainingState

__all__ = ["DcpStore"]


class DcpStore:
    """Sharded checkpoints in ``directory`` (one ``ckpt-<step>.dcp`` directory each)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._saver: distributed.DcpSaver | None = None  # keeps the async stager and process group warm

    def lock(self) -> DirectoryLock:
        return DirectoryLock(self.directory)

    @staticmethod
    def wanted_for(model: Any) -> bool:
        """A process group is initialised, or ``model`` holds DTensors: its checkpoints must be sharded."""
        return distributed.in_use(model)

    def path_for(self, step: int) -> str:
        return distributed.dcp_path(self.directory, step)

    def entries(self) -> list[Entry]:
        return [dataclasses.replace(e, store=self) for e in distributed.entries(self.directory)]

    @staticmethod
    def capture(step: int, epoch: int | None, **objects: Any) -> dict[str, Any]:
        """What each rank writes: its shards of ``objects`` (model, optimizer, ...), RNG states included."""
        state: dict[str, Any] = distributed.capture_dcp(**objects, info={"step": step, "epoch": epoch})
        return state

    def save(self, step: int, state: dict[str, Any], *, epoch: int | None, metrics: Mapping[str, Any] | None,
             async_save: bool) -> tuple[str, Callable[[], None] | None]:
        """Every rank writes its shards (``state`` from :meth:`capture`); rank 0 commits. Returns (path,
        finish): ``finish`` is None when the checkpoint is committed already, else it completes and commits
        it (blocking)."""
        self._saver = self._saver or distributed.DcpSaver(self.directory)
        return self._saver.save(step, state, distributed.base_meta(step, epoch, metrics), async_save=async_save)

    def delete(self, path: str) -> None:
        distributed.remove(path)

    def reclaim(self) -> list[str]:
        return distributed.reclaim(self.directory)

    def remove_temp_files(self) -> list[str]:
        return []  # an unfinished save is one directory: reclaim removes it whole

    def resume(self, entry: Entry, *, map_location: Any = None, **objects: Any) -> TrainingState:
        """Load into the objects' current sharding (``map_location`` is not used: DCP loads onto the
        objects' own devices)."""
        state: TrainingState = distributed.resume_dcp(entry.path, entry.meta or {}, **objects)
        return state

    def close(self) -> None:
        if self._saver is not None:
            self._saver.close()
