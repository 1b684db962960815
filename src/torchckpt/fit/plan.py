"""``load_into``'s plan as small typed records: what was asked, what was opened, and one step per model key.

:class:`LoadOptions` is the caller's request, :class:`Opened` what the source opened to, :class:`Step`
how one model key gets its value, and :class:`Plan` the steps plus what applying them and the report need.
Planning (``load_into._plan``) builds a :class:`Plan`; applying (``load_into._apply``) only reads one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

from ..read import TreeMeter
from ..transforms import Transform, TransformSpec
from .align import RenameSpec
from .report import LoadReport

__all__ = ["LoadOptions", "Opened", "Action", "Step", "Plan"]

Action = Literal["load", "reshape", "transform", "copy_overlap"]


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """What the caller of ``load_into`` asked for (validated: ``on_mismatch`` already defaulted)."""

    strict: bool
    key: str | None
    prefix: str | None
    rename: RenameSpec
    on_mismatch: str  # "error" | "skip" | "copy_overlap" | "adapt"
    dtype: str  # "model" | "error"
    map_location: Any
    dry_run: bool
    assign: bool
    mmap: bool = False
    transforms: TransformSpec = None


@dataclass(frozen=True, slots=True)
class Opened:
    """What ``source`` opened to: the object tree, how to name and describe it, and how to read its tensors."""

    tree: Any
    name: str  # the file, or "<module>" / "<in-memory checkpoint>"
    format: str
    notes: list[str]
    reader: Any  # the storage reader tensors are read through; None for an in-memory source
    saved_on: frozenset[str]  # devices other than cpu/meta the file's tensors were saved on
    meter: TreeMeter


@dataclass(frozen=True, slots=True)
class Step:
    """How one model key gets its value when the plan is applied.

    ``load``: ``value`` placed as it is (a tensor, a tensor still in the file, a :class:`~.adapt.Derived`
    recipe, or non-tensor extra state); ``reshape``: placed with the model's shape (only size-1 dims
    differ); ``transform``: ``transform`` run on it first; ``copy_overlap``: the overlapping slice copied
    into a clone of the model's tensor.
    """

    target: str  # the model key
    source: str  # the checkpoint key (after key transforms)
    action: Action
    value: Any
    transform: Transform | None = None


@dataclass(slots=True)
class Plan:
    """Every model key's :class:`Step`, the report so far, and what applying needs besides."""

    report: LoadReport
    steps: dict[str, Step]  # model key -> step, in the model's order
    mapping: dict[str, str]  # checkpoint key -> model key (the alignment)
    metadata: Mapping[str, Any]  # the state dict's ``_metadata`` (per-module versions), or empty
