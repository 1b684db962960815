"""Which checkpoints of a directory retention keeps: a set of tiny pure policies (:class:`KeepLast`,
:class:`KeepBest`, :class:`KeepEvery`), each naming the steps it wants kept; a checkpoint survives if any
policy keeps it (applied by :class:`~torchckpt.train.checkpointer.Checkpointer` after each commit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

from .store import Entry

__all__ = ["CheckpointInfo", "RetentionPolicy", "KeepLast", "KeepBest", "KeepEvery", "info_of"]


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


def info_of(entry: Entry) -> CheckpointInfo:
    return CheckpointInfo(entry.step, entry.path, (entry.meta or {}).get("metrics") or {}, entry.meta or {})


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
