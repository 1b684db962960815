"""``torchckpt.inspect``: what a checkpoint holds, without reading tensor data.

Tensors are materialised on the ``meta`` device (shape and dtype only), so time and memory do not
depend on the size of the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Collection, Iterable, Mapping, Sequence

from ..errors import CheckpointError
from ..read.load import read_checkpoint
from ..storage.source import SourceLike
from ..fit.select import find_state_dicts
from ..fit.tree import children_of, is_module_like, is_optimizer_state, is_tensor_like, state_dict_of, state_tensors, \
    walk
from ..read.tensors import dtype_name
from ..read.trust import Policy, resolve_policy
from ..read import Stub, TreeMeter, Verdict, stub_name
from ..text import clip, summary

__all__ = ["inspect", "InspectReport", "TensorInfo", "format_bytes"]

MAX_VALUES = 200  # non-tensor leaves listed
MAX_REPR = 120


@dataclass
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class InspectReport:
    """Everything ``torchckpt inspect`` shows. ``to_dict()`` is the ``--json`` document."""

    path: str
    format: str
    description: str
    evidence: list[str]
    file_size: int
    tensors: list[TensorInfo] = field(default_factory=list)
    values: list[tuple[str, str, str]] = field(default_factory=list)  # (path, type, repr)
    classes: list[tuple[str, str]] = field(default_factory=list)  # (dotted name, verdict)
    weights: list[tuple[str, str, int]] = field(default_factory=list)  # (path, source, tensors)
    locations: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    scalars: dict[str, int | float | bool] = field(default_factory=dict)  # plain numbers by path, typed (not in JSON)

    @property
    def total_parameters(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def stubbed_classes(self) -> list[str]:
        return [name for name, verdict in self.classes if verdict == Verdict.UNKNOWN.value]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "format": self.format, "description": self.description, "evidence": self.evidence,
            "file_size": self.file_size, "locations": self.locations, "notes": self.notes,
            "totals": {"tensors": len(self.tensors), "parameters": self.total_parameters, "bytes": self.total_bytes},
            "tensors": [{"key": t.key, "shape": list(t.shape), "dtype": t.dtype, "bytes": t.nbytes}
                        for t in self.tensors],
            "values": [{"path": p, "type": t, "value": v} for p, t, v in self.values],
            "classes": [{"name": n, "verdict": v, "stubbed": v == Verdict.UNKNOWN.value} for n, v in self.classes],
            "weights": [{"path": p, "source": s, "tensors": n} for p, s, n in self.weights],
            "metadata": self.metadata,
        }


    def render(self, max_tensors: int = 60) -> str:
        """The human report: format and evidence, values, tensors (the first ``max_tensors``), totals,
        where the weights are, referenced classes, metadata and notes."""
        lines = [f"{self.path}  {format_bytes(self.file_size) if self.file_size >= 0 else ''}".rstrip(),
                 f"format: {self.description}"]
        lines += [f"  - {e}" for e in self.evidence]
        if self.values:
            lines += ["values"] + _columns([("path", "type", "value")] + [(p, t, v) for p, t, v in self.values])
        if self.tensors:
            rows = [(t.key, "[" + ", ".join(map(str, t.shape)) + "]", t.dtype, format_bytes(t.nbytes))
                    for t in self.tensors[:max_tensors]]
            lines += ["tensors"] + _columns([("key", "shape", "dtype", "bytes")] + rows, right={3})
            if len(self.tensors) > max_tensors:
                lines.append(f"  ... {len(self.tensors) - max_tensors} more (see --json)")
        lines.append(f"totals: {len(self.tensors)} tensors, {self.total_parameters:,} parameters, "
                     f"{format_bytes(self.total_bytes)}")
        if self.weights:
            lines.append("weights: " + ", ".join(f"{p} ({s}, {n} tensors)" for p, s, n in self.weights))
        if self.classes:
            stubbed = self.stubbed_classes
            lines.append(f"classes: {len(self.classes)} referenced"
                         + (f", {len(stubbed)} stubbed (not imported):" if stubbed else ""))
            lines += [f"  - {name}" for name in stubbed]
        lines += [f"metadata {k}: {v[:200]}" for k, v in self.metadata.items()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = render


def format_bytes(n: int) -> str:
    """``1.5 MiB``: binary units, one decimal (bytes as a whole number)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _columns(rows: Sequence[tuple[str, ...]], right: Collection[int] = frozenset(), limit: int = 100) -> list[str]:
    """Rows as aligned text columns (indented two spaces); the first row is the header."""
    cut = [tuple(c if len(c) <= limit else c[:limit - 3] + "..." for c in row) for row in rows]
    widths = [max(len(r[i]) for r in cut) for i in range(len(cut[0]))]
    out = []
    for row in cut:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        out.append(("  " + "  ".join(cells)).rstrip())
    return out


def inspect(source: SourceLike, *, policy: Policy | None = None, trust: bool = False,
            allow: Iterable[str] | str | None = None,
            storage_options: Mapping[str, Any] | None = None) -> InspectReport:
    """Describe a checkpoint: format and evidence, tree values, tensors, totals, referenced classes.

    No tensor data is read (a remote file moves its header or zip directory only, with
    ``storage_options`` for its filesystem). ``policy``/``trust``/``allow`` as in :func:`torchckpt.load`.
    Raises the same errors as :func:`torchckpt.load`.
    """
    loaded = read_checkpoint(source, map_location="meta", policy=resolve_policy(policy, trust, allow), meta=True,
                             storage_options=storage_options)
    evidence = list(loaded.evidence)
    locations = loaded.details.get("locations") or {}
    devices = sorted(loc for loc in locations if loc != "cpu")
    if devices:
        evidence.append(f"storages saved on {', '.join(devices)}")
    report = InspectReport(path=loaded.name, format=loaded.kind, description=loaded.description, evidence=evidence,
                           file_size=loaded.size, locations=dict(locations), notes=list(loaded.notes),
                           metadata=dict(loaded.details.get("metadata") or {}))
    try:  # the tree walk finds what the reader could not know (a stub where a tensor belongs): name the file
        _collect(loaded.obj, report, loaded.tree_meter)
        report.weights = [(c.path or "<root>", c.source, len(c.state_dict))
                          for c in find_state_dicts(loaded.obj, meter=loaded.tree_meter)]
    except CheckpointError as exc:
        raise exc.with_path(loaded.name)
    seen: dict[str, str] = {}
    for ref in loaded.globals:
        seen.setdefault(ref.fullname, ref.verdict.value)
    report.classes = sorted(seen.items())
    return report


def _tensor_info(key: str, t: Any) -> TensorInfo:
    shape = tuple(int(s) for s in t.shape)
    return TensorInfo(key, shape, dtype_name(t), math.prod(shape) * t.dtype.itemsize)


def _collect(obj: Any, report: InspectReport, meter: TreeMeter) -> None:
    """Flatten the tree: tensors by dotted key, other leaves as (path, type, bounded summary).

    Every node (and every tensor of a module's state dict) is charged to ``meter``; a module shared
    under several paths is read once and listed under each."""
    module_states: dict[int, Any] = {}
    for path, value, _ in walk(obj, children=_children, max_depth=32, meter=meter):
        if is_tensor_like(value):
            report.tensors.append(_tensor_info(path or "<root>", value))
        elif is_module_like(value):
            if id(value) not in module_states:
                module_states[id(value)] = (value, list(state_tensors(state_dict_of(value, meter))))
            sd = module_states[id(value)][1]
            meter.visit(len(path), n=len(sd))
            for k, t in sd:
                report.tensors.append(_tensor_info(f"{path}.{k}" if path else k, t))
            if path and len(report.values) < MAX_VALUES:
                report.values.append((path, _type_name(value), summary(value, MAX_REPR)))
        elif is_optimizer_state(value):
            if len(report.values) < MAX_VALUES:
                report.values.append((path or "<root>", "optimizer state", _optimizer_summary(value)))
        elif isinstance(value, Stub):
            if path and len(report.values) < MAX_VALUES:
                report.values.append((path, _type_name(value), summary(value, MAX_REPR)))
        elif _children(value) is None and len(report.values) < MAX_VALUES:
            report.values.append((path or "<root>", _type_name(value), summary(value, MAX_REPR)))
            if isinstance(value, (int, float, bool)):
                report.scalars[path or "<root>"] = value


def _optimizer_summary(opt: dict[str, Any]) -> str:
    """Groups, params, learning rates and slot names of an optimizer state; what is odd is said, not raised."""
    groups: list[Any] = opt["param_groups"] if isinstance(opt.get("param_groups"), list) else []
    params, odd = 0, []
    for i, g in enumerate(groups[:10_000]):
        ps = g.get("params") if isinstance(g, dict) else None
        if isinstance(ps, (list, tuple)):
            params += len(ps)
        else:
            odd.append(f"group {i} params is {'missing' if ps is None else 'a ' + type(ps).__name__}")
    lrs = sorted({float(g["lr"]) for g in groups[:10_000]
                  if isinstance(g, dict) and isinstance(g.get("lr"), (int, float)) and not isinstance(g["lr"], bool)
                  and (not isinstance(g["lr"], int) or g["lr"].bit_length() < 1000)})
    state: dict[Any, Any] = opt["state"] if isinstance(opt.get("state"), dict) else {}
    slot_names: dict[str, None] = {}
    for v in list(state.values())[:10_000]:
        if isinstance(v, dict):
            for k in list(v)[:100]:
                slot_names.setdefault(k if isinstance(k, str) else summary(k, 40), None)
    slots = sorted(slot_names)
    lr = f", lr {', '.join(f'{x:g}' for x in lrs[:8])}" if lrs else ""
    text = (f"{len(groups)} param group(s), {params} params{lr}; state for {len(state)} params"
            + (f" ({', '.join(slots[:20])}{', ...' if len(slots) > 20 else ''})" if slots else ""))
    if odd:
        text += "; unusual: " + "; ".join(odd[:3]) + (f" (+{len(odd) - 3} more)" if len(odd) > 3 else "")
    return clip(text, 400)


def _children(value: Any) -> list[tuple[Any, Any]] | None:
    """What inspect opens: modules are summarised, optimizer state shows only its ``state``, lists and
    tuples without tensors or dicts inside are one value (a bounded summary)."""
    if is_module_like(value):
        return []
    if is_optimizer_state(value):
        return [("state", value["state"])]
    if isinstance(value, (list, tuple)) and not any(is_tensor_like(v) or isinstance(v, dict) or
                                                    (isinstance(v, (list, tuple)) and _has_structure(v))
                                                    for v in value[:10_000]):
        return None
    return children_of(value)


def _has_structure(value: Any) -> bool:
    """A tensor or a dict directly inside ``value`` (a list or tuple): worth opening in the listing."""
    return any(is_tensor_like(v) or isinstance(v, dict) for v in value[:10_000])


def _type_name(value: Any) -> str:
    if isinstance(value, Stub):
        return f"stub {stub_name(value)}"
    t = type(value)
    if t.__module__.startswith("torchckpt.") and isinstance(getattr(t, "display_type", None), str):
        return str(getattr(t, "display_type"))  # a structure-only stand-in (a dtype) shows the type load gives
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
