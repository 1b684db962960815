"""``torchckpt.diff``: what differs between two checkpoints, key by key and (optionally) value by value.

Prefix-aware: when two files differ only by a wrapper prefix (``module.``, ``_orig_mod.``, ``model.``),
that is one line, not hundreds of removed and added keys. With ``values=True`` each pair of tensors
is compared one at a time (memory stays near the largest tensor): max absolute and relative
difference, NaN/Inf in either, and the list of layers that changed (what fine-tuning touched).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..fit.align import align_keys
from ..errors import AmbiguousCheckpointError
from ..fit.report import group_keys
from ..fit.tree import find_state_dicts, is_tensor_like
from ..read.unpickle.meta import TensorMeta

__all__ = ["diff", "DiffReport"]


@dataclass
class TensorDiff:
    key: str
    max_abs: float
    max_rel: float
    nonfinite_a: int = 0
    nonfinite_b: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DiffReport:
    a: str
    b: str
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    shape_changes: list[tuple[str, list, list]] = field(default_factory=list)
    dtype_changes: list[tuple[str, str, str]] = field(default_factory=list)
    renamed: str = ""  # "removing 'module.'" ...
    common: int = 0
    values_compared: bool = False
    changed: list[TensorDiff] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not (self.only_a or self.only_b or self.shape_changes or self.dtype_changes or self.changed
                    or self.renamed or self.nonfinite)

    @property
    def changed_layers(self) -> list[str]:
        return sorted({k.rsplit(".", 1)[0] if "." in k else k for k in (d.key for d in self.changed)})

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "equal": self.equal, "renamed": self.renamed, "common": self.common,
                "only_a": self.only_a, "only_b": self.only_b,
                "shape_changes": [{"key": k, "a": a, "b": b} for k, a, b in self.shape_changes],
                "dtype_changes": [{"key": k, "a": a, "b": b} for k, a, b in self.dtype_changes],
                "values_compared": self.values_compared, "changed": [d.to_dict() for d in self.changed],
                "changed_layers": self.changed_layers, "nonfinite": self.nonfinite}

    def __str__(self) -> str:
        if self.equal:
            what = "identical tensors" if self.values_compared else "the same keys, shapes and dtypes"
            return f"{self.a} and {self.b}: {what} ({self.common} tensors)"
        lines = [f"{self.a} vs {self.b}: {self.common} tensors in common"]
        if self.renamed:
            lines.append(f"  names differ only by {self.renamed}")
        if self.only_a:
            lines.append(f"  only in A: {', '.join(group_keys(self.only_a, self.only_a))}")
        if self.only_b:
            lines.append(f"  only in B: {', '.join(group_keys(self.only_b, self.only_b))}")
        for k, a, b in self.shape_changes:
            lines.append(f"  shape  {k}: {a} -> {b}")
        for k, a, b in self.dtype_changes:
            lines.append(f"  dtype  {k}: {a} -> {b}")
        if self.values_compared:
            lines.append(f"  values differ in {len(self.changed)} tensors; layers changed: "
                         f"{', '.join(self.changed_layers[:20]) or 'none'}")
            for d in sorted(self.changed, key=lambda d: -d.max_abs)[:15]:
                lines.append(f"    {d.key}: max |a-b| {d.max_abs:.3g}, relative {d.max_rel:.3g}")
        for k in self.nonfinite:
            lines.append(f"  NaN/Inf: {k}")
        return "\n".join(lines)


def _tensors(obj: Any, key: str | None) -> dict[str, Any]:
    if key is not None:
        from ..fit.load_into import _lookup
        from ..fit.tree import state_dict_of

        return dict(state_dict_of(_lookup(obj, key)))
    found = find_state_dicts(obj)
    if len(found) == 1:
        return dict(found[0].state_dict)
    if len(found) > 1:
        raise AmbiguousCheckpointError(f"{len(found)} sets of weights: {', '.join(c.path or '<root>' for c in found)}",
                                       candidates=[c.path for c in found], hint="Choose one with key=...")
    from .convert import _flatten

    return dict(_flatten(obj))


def _dtype(t: Any) -> str:
    return str(t.dtype).replace("torch.", "")


def diff(a: Any, b: Any, *, values: bool = False, key: str | None = None, atol: float = 0.0,
         progress: Any = None, storage_options: Any = None) -> DiffReport:
    """Compare two checkpoints. Without ``values`` only structure is read (no tensor data, no torch).

    ``progress(done, total)`` is called after each tensor pair when comparing values.
    """
    from ..read.formats import ReadOptions, read
    from ..storage.source import Source

    with Source(a, storage_options=storage_options) as sa, Source(b, storage_options=storage_options) as sb:
        la = read(sa, ReadOptions(meta=True))
        lb = read(sb, ReadOptions(meta=True))
        ta, tb = _tensors(la.obj, key), _tensors(lb.obj, key)
        report = DiffReport(sa.name, sb.name)
        shapes_a = {k: tuple(v.shape) for k, v in ta.items() if is_tensor_like(v)}
        shapes_b = {k: tuple(v.shape) for k, v in tb.items() if is_tensor_like(v)}
        alignment = align_keys(shapes_a, shapes_b)
        mapping = alignment.mapping
        if len(mapping) < len(set(shapes_a) & set(shapes_b)):  # shape changes: fall back to exact names
            mapping = {k: k for k in shapes_a if k in shapes_b}
        else:
            report.renamed = alignment.description
        names_b = set(mapping.values())
        report.only_a = [k for k in shapes_a if k not in mapping and k not in shapes_b]
        report.only_b = [k for k in shapes_b if k not in names_b and k not in shapes_a]
        for k in shapes_a:
            if k not in mapping and k in shapes_b:
                mapping[k] = k
        report.common = len(mapping)
        for ka, kb in mapping.items():
            va, vb = ta[ka], tb[kb]
            if tuple(va.shape) != tuple(vb.shape):
                report.shape_changes.append((ka, list(va.shape), list(vb.shape)))
            elif _dtype(va) != _dtype(vb):
                report.dtype_changes.append((ka, _dtype(va), _dtype(vb)))
        if values:
            report.values_compared = True
            skip = {k for k, _, _ in report.shape_changes}
            for n, (ka, kb) in enumerate(mapping.items(), 1):
                if progress is not None:
                    progress(n, len(mapping))
                if ka in skip:
                    continue
                d = _compare(_real(ta[ka], sa), _real(tb[kb], sb), ka, atol)
                if d.nonfinite_a or d.nonfinite_b:
                    report.nonfinite.append(f"{ka} (A: {d.nonfinite_a}, B: {d.nonfinite_b})")
                if d.max_abs > atol or (d.max_abs != d.max_abs):
                    report.changed.append(d)
    return report


def _real(t: Any, src: Any) -> Any:
    import numpy as np
    import torch

    if isinstance(t, TensorMeta):
        return t.materialize(src)
    if isinstance(t, np.ndarray):
        return torch.from_numpy(t)
    return t


def _compare(x: Any, y: Any, key: str, atol: float) -> TensorDiff:
    import torch

    xf = x.detach().to(torch.float64) if x.is_floating_point() or y.is_floating_point() else x.detach().to(torch.int64)
    yf = y.detach().to(xf.dtype)
    bad_a = int((~torch.isfinite(xf)).sum()) if xf.is_floating_point() else 0
    bad_b = int((~torch.isfinite(yf)).sum()) if yf.is_floating_point() else 0
    if xf.numel() == 0:
        return TensorDiff(key, 0.0, 0.0, bad_a, bad_b)
    delta = (xf - yf).abs()
    finite = torch.isfinite(delta) if delta.is_floating_point() else torch.ones_like(delta, dtype=torch.bool)
    same_nonfinite = (xf == yf) | (xf.isnan() & yf.isnan()) if xf.is_floating_point() else (xf == yf)
    if bool((~finite & ~same_nonfinite).any()):
        max_abs = float("inf")
    else:
        max_abs = float(delta[finite].max()) if bool(finite.any()) else 0.0
    scale = float(xf.abs()[torch.isfinite(xf.abs())].max()) if xf.is_floating_point() and bool(
        torch.isfinite(xf).any()) else float(xf.abs().max())
    return TensorDiff(key, max_abs, max_abs / scale if scale else (0.0 if max_abs == 0 else float("inf")), bad_a, bad_b)
