"""``torchckpt.inspect``: what a checkpoint holds, without reading tensor data.

Tensors are materialised on the ``meta`` device (shape and dtype only), so time and memory do not
depend on the size of the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ..read.load import read_checkpoint
from ..storage.remote import is_url
from ..storage.source import SourceLike
from ..fit.tree import find_state_dicts, is_module_like, is_tensor_like, state_dict_of
from ..read.unpickle.policy import Verdict
from ..read.unpickle.stubs import Stub, stub_name

__all__ = ["inspect", "InspectReport", "TensorInfo"]

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


def inspect(source: SourceLike, *, trust: bool = False, allow: Iterable[str] | str | None = None,
            storage_options: Mapping[str, Any] | None = None) -> InspectReport:
    """Describe a checkpoint: format and evidence, tree values, tensors, totals, referenced classes.

    No tensor data is read (a remote file moves its header or zip directory only). Raises the same
    errors as :func:`torchckpt.load`.
    """
    loaded = read_checkpoint(source, map_location="meta", trust=trust, allow=allow, meta=True,
                             storage_options=storage_options)
    name = source if isinstance(source, str) else getattr(source, "name", "<bytes>")
    size = loaded.size if is_url(source) else _size_of(source)
    evidence = list(loaded.evidence)
    locations = loaded.details.get("locations") or {}
    devices = sorted(loc for loc in locations if loc != "cpu")
    if devices:
        evidence.append(f"storages saved on {', '.join(devices)}")
    report = InspectReport(path=str(name), format=loaded.kind, description=loaded.description, evidence=evidence,
                           file_size=size, locations=dict(locations), notes=list(loaded.notes),
                           metadata=dict(loaded.details.get("metadata") or {}))
    _collect(loaded.obj, report)
    seen: dict[str, str] = {}
    for ref in loaded.globals:
        seen.setdefault(ref.fullname, ref.verdict.value)
    report.classes = sorted(seen.items())
    report.weights = [(c.path or "<root>", c.source, len(c.state_dict)) for c in find_state_dicts(loaded.obj)]
    return report


def _size_of(source: Any) -> int:
    import os

    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source)
    if isinstance(source, (str, os.PathLike)) and os.path.exists(source):
        return os.path.getsize(source)
    return -1


def _tensor_info(key: str, t: Any) -> TensorInfo:
    shape = tuple(int(s) for s in t.shape)
    dtype = str(t.dtype).replace("torch.", "")
    itemsize = t.dtype.itemsize
    return TensorInfo(key, shape, dtype, math.prod(shape) * itemsize)


def _collect(obj: Any, report: InspectReport) -> None:
    """Flatten the tree: tensors by dotted key, other leaves as (path, type, repr)."""
    stack: list[tuple[str, Any, int]] = [("", obj, 0)]
    seen: set[int] = set()
    while stack:
        path, value, depth = stack.pop()
        if is_tensor_like(value):
            report.tensors.append(_tensor_info(path or "<root>", value))
            continue
        if depth > 32 or (not isinstance(value, (str, int, float, bool)) and id(value) in seen):
            continue
        seen.add(id(value))
        if is_module_like(value):
            for k, t in state_dict_of(value).items():
                report.tensors.append(_tensor_info(f"{path}.{k}" if path else k, t))
            if path:
                report.values.append((path, _type_name(value), repr(value)))
            continue
        if isinstance(value, dict) and "param_groups" in value and "state" in value:
            report.values.append((path or "<root>", "optimizer state", _optimizer_summary(value)))
            stack.append((f"{path}.state" if path else "state", value["state"], depth + 1))
            continue
        children = _children(value)
        if children is None:
            if len(report.values) < MAX_VALUES:
                report.values.append((path or "<root>", _type_name(value), _short_repr(value)))
            continue
        if isinstance(value, Stub) and path:
            report.values.append((path, _type_name(value), repr(value)))
        for key, child in reversed(children):
            stack.append((f"{path}.{key}" if path else str(key), child, depth + 1))


def _optimizer_summary(opt: dict) -> str:
    groups = opt.get("param_groups") if isinstance(opt.get("param_groups"), list) else []
    params = sum(len(g.get("params", [])) for g in groups if isinstance(g, dict))
    lrs = sorted({g.get("lr") for g in groups if isinstance(g, dict) and isinstance(g.get("lr"), (int, float))})
    state = opt.get("state") if isinstance(opt.get("state"), dict) else {}
    slots = sorted({k for v in state.values() if isinstance(v, dict) for k in v})
    lr = f", lr {', '.join(f'{x:g}' for x in lrs)}" if lrs else ""
    return (f"{len(groups)} param group(s), {params} params{lr}; state for {len(state)} params"
            + (f" ({', '.join(map(str, slots))})" if slots else ""))


def _children(value: Any) -> list[tuple[Any, Any]] | None:
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, (list, tuple)) and any(is_tensor_like(v) or isinstance(v, (dict, list)) for v in value):
        return list(enumerate(value))
    if isinstance(value, Stub):
        out = list(value.stub_attributes().items()) + list((value.stub_items or {}).items())
        return out + list(enumerate(value.stub_list or []))
    if hasattr(value, "__dict__") and type(value).__module__ in ("argparse", "types"):
        return list(vars(value).items())
    return None


def _type_name(value: Any) -> str:
    if isinstance(value, Stub):
        return f"stub {stub_name(value)}"
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # noqa: BLE001 - a repr must never break inspect
        text = f"<unprintable {type(value).__name__}: {exc}>"
    return text if len(text) <= MAX_REPR else text[:MAX_REPR - 3] + "..."
