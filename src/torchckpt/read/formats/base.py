"""Types shared by the format readers: how to read (:class:`ReadOptions`), what was read
(:class:`Checkpoint`), and the :class:`Trace` of every pickle stream, byte range and container check a
reader made on the way (what ``scan`` reports on)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from ...errors import CorruptCheckpointError, LimitExceededError
from ...storage.source import Source
from ..devices import Relocator
from ..unpickle.budget import Meter, TreeMeter
from ..unpickle.machine import GlobalRef, Unpickler
from ..unpickle.mode import Mode
from ..unpickle.policy import Policy

__all__ = ["ReadOptions", "Checkpoint", "Loaded", "Trace", "Stream", "Check", "StorageBudget", "ascii_text",
           "run_pickle"]


def ascii_text(value: Any) -> Any:
    """Persistent-id fields ("storage", keys, locations) may be bytes in Python 2 files."""
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


@dataclass
class Stream:
    """One pickle stream a reader ran through the VM."""

    source: str  # the file (or item) it is in
    member: str | None  # zip/tar member or stream name
    offset: int
    globals: list[GlobalRef]
    complete: bool = False  # ran to its STOP
    end: int | None = None
    loaded: bool = True  # False: a pickle the loader never reads, run only so that scan can report it


@dataclass
class Check:
    """A container layout a reader found odd (a trick scanners have been fooled by), whether or not
    the reader could go on. ``scan`` reports each as a finding."""

    message: str
    member: str | None = None
    offset: int | None = None


@dataclass
class Trace:
    """What a read touched: pickle streams, byte ranges ``(source, offset, length)``, failed checks."""

    streams: list[Stream] = field(default_factory=list)
    ranges: list[tuple[str, int, int]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    format: str | None = None  # what the outermost source was sniffed as

    @property
    def globals(self) -> list[GlobalRef]:
        return [g for s in self.streams if s.loaded for g in s.globals]


@dataclass
class ReadOptions:
    """How to read: the mode, where tensors go, whether to mmap, what pickles may import.

    ``read_child`` reads a nested source (a DCP item, a shard) with the same options; the opener
    passes the format dispatcher here so that container readers never import it.
    """

    relocator: Relocator = field(default_factory=Relocator)
    mmap: bool | None = None
    policy: Policy = field(default_factory=Policy)
    mode: Mode = Mode.BUILD
    trace: Trace = field(default_factory=Trace)
    read_child: Callable[[Source, "ReadOptions"], "Checkpoint"] | None = None
    storage_options: dict[str, Any] | None = None  # fsspec options for URLs (shards, DCP files beside them)
    meter: Meter | None = None  # the policy's budget, charged by every stream and member of this read
    workers: int | None = None  # threads reading the parts of a sharded checkpoint (None: parallel.default_workers)
    mapped: list[Source] = field(default_factory=list)  # every source a tensor of this read maps
    # where a storage read from a file goes instead of new memory: given its byte count, a CPU UntypedStorage
    # to read it into (a DCP chunk's place in its whole tensor) or None (new memory)
    into: Callable[[int], Any] | None = None

    def mapped_storage(self, src: Source, offset: int, nbytes: int) -> Any:
        """``src.mapped_storage(offset, nbytes)``, remembering ``src``: the opener hands every mapped source
        of the read (shards, a folder's files) to the reader, which can then release or copy their pages."""
        if not any(s is src for s in self.mapped):
            self.mapped.append(src)
        return src.mapped_storage(offset, nbytes)

    def budget_meter(self) -> Meter:
        """The one :class:`Meter` of this read (made from ``policy.budget`` on first use)."""
        if self.meter is None:
            self.meter = Meter(self.policy.budget)
        return self.meter

    @property
    def meta(self) -> bool:
        """Structure only: tensors are TensorMeta and no tensor data is read."""
        return self.mode.meta


def run_pickle(opts: ReadOptions, data: Any, src: Source, member: str | None, *, start: int = 0,
               end: int | None = None, persistent_load: Callable[[Any], Any] | None = None,
               loaded: bool = True, tensor_table: Callable[[int], Any] | None = None) -> tuple[Any, Unpickler]:
    """Run one pickle stream through the VM in ``opts.mode`` and record it in the trace."""
    u = Unpickler(data, policy=opts.policy, mode=opts.mode, persistent_load=persistent_load, start=start, end=end,
                  member=member, meter=opts.budget_meter(), tensor_table=tensor_table)
    stream = Stream(src.name, member, start, u.globals, loaded=loaded)
    opts.trace.streams.append(stream)
    obj = u.load()
    stream.complete, stream.end = True, u.pos
    return obj, u


@dataclass
class Checkpoint:
    """One opened checkpoint: what it is, why we think so, what was fixed, what it imports, the tree.

    ``reader`` is the open :class:`~torchckpt.storage.source.Source` the tree's lazy tensors
    (``TensorMeta`` with file offsets) are read from; it is valid inside the opener's ``with``.
    """

    tree: Any = field(default=None, repr=False)  # print(info) describes the read; it does not dump the tensors
    format: str = "unknown"
    description: str = ""
    evidence: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # every automatic fix, in words
    globals: list[GlobalRef] = field(default_factory=list, repr=False)
    details: dict[str, Any] = field(default_factory=dict)  # python2, locations, metadata, ...
    name: str = ""
    size: int = 0
    reader: Source | None = field(default=None, repr=False)
    trace: Trace = field(default_factory=Trace, repr=False)
    # what walking the tree may cost (the policy's ``Budget.visits``, at least one per byte of the file):
    # every front end's walks charge it, so sharing in the tree cannot make them exponential
    tree_meter: TreeMeter = field(default_factory=TreeMeter, repr=False)
    resources: list[Any] = field(default_factory=list, repr=False)  # closed (``close()``) when the opener's with ends

    # The names used before the opener was unified (front ends move to ``tree``/``format``).
    @property
    def obj(self) -> Any:
        return self.tree

    @obj.setter
    def obj(self, value: Any) -> None:
        self.tree = value

    @property
    def kind(self) -> str:
        return self.format


Loaded = Checkpoint


class StorageBudget:
    """Refuses storages whose declared sizes add up to more than the file can hold."""

    def __init__(self, file_size: int, what: str = "storages") -> None:
        self.file_size = file_size
        self.total = 0
        self.what = what

    def charge(self, nbytes: int, key: Any) -> None:
        if nbytes < 0:
            raise LimitExceededError(f"storage {key!r:.60} declares a negative size")
        self.total += nbytes
        if self.total > self.file_size:
            raise LimitExceededError(
                f"{self.what} declare {self.total} bytes of data but the file has only {self.file_size} bytes "
                f"(storage {key!r:.60})")


def parse_json(raw: bytes | str, what: str, digits: int = 4_300) -> Any:
    """JSON from a file (a safetensors header, an index, ``config.json``, metadata), or a typed error.

    Every way ``json.loads`` fails on hostile text becomes :class:`CorruptCheckpointError` naming
    ``what``: invalid UTF-8 or JSON, nesting deep enough to exhaust the recursion limit, and an
    integer literal longer than ``digits`` (the budget's limit; Python refuses to convert it anyway).
    """
    def bounded_int(text: str) -> int:
        if len(text.lstrip("-")) > digits:
            raise CorruptCheckpointError(f"{what} holds an integer with {len(text.lstrip('-'))} digits "
                                         f"(more than {digits}); no checkpoint needs one",
                                         hint="The file is damaged or crafted; `torchckpt scan FILE` reports on it.")
        return int(text)

    try:
        return json.loads(raw, parse_int=bounded_int)
    except CorruptCheckpointError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise CorruptCheckpointError(f"{what} is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})",
                                     hint="Download or write the file again.") from None
