"""Types shared by the format readers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..devices import Relocator
from ..unpickle.machine import GlobalRef
from ..unpickle.policy import Policy

__all__ = ["ReadOptions", "Loaded", "StorageBudget", "ascii_text"]


def ascii_text(value: Any) -> Any:
    """Persistent-id fields ("storage", keys, locations) may be bytes in Python 2 files."""
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


@dataclass
class ReadOptions:
    """How to read: where tensors go, whether to mmap, what pickles may import.

    ``meta=True`` reads structure only: tensors are created on the ``meta`` device and no tensor
    data is read (``inspect``).
    """

    relocator: Relocator = field(default_factory=Relocator)
    mmap: bool | None = None
    policy: Policy = field(default_factory=Policy)
    meta: bool = False
    storage_options: dict[str, Any] | None = None  # fsspec options for URLs (shards, DCP files beside them)


@dataclass
class Loaded:
    """The result of reading one file."""

    obj: Any
    kind: str
    description: str
    evidence: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # every automatic fix, in words
    globals: list[GlobalRef] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # python2, locations, metadata, ...


class StorageBudget:
    """Refuses storages whose declared sizes add up to more than the file can hold."""

    def __init__(self, file_size: int, what: str = "storages") -> None:
        self.file_size = file_size
        self.total = 0
        self.what = what

    def charge(self, nbytes: int, key: Any) -> None:
        from ...errors import LimitExceededError

        if nbytes < 0:
            raise LimitExceededError(f"storage {key!r} declares a negative size")
        self.total += nbytes
        if self.total > self.file_size:
            raise LimitExceededError(
                f"{self.what} declare {self.total} bytes of data but the file has only {self.file_size} bytes "
                f"(storage {key!r})")
