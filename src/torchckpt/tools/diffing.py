"""``torchckpt.diff``: what differs between two checkpoints, key by key and value by value.

Prefix-aware: when two files differ only by a wrapper prefix (``module.``, ``_orig_mod.``, ``model.``),
that is one line, not hundreds of removed and added keys. By default (``values=True``) each pair of
tensors is compared one at a time (memory stays near the largest tensor): max absolute and relative
difference, NaN/Inf in either, and the list of layers that changed (what fine-tuning touched).
Plain values anywhere in the tree (``epoch``, ``lr``, a config, nested ones) are always compared.
``values=False`` reads structure only; the report then never calls the files equal
(:attr:`DiffReport.equal` is ``None``: not checked), it only says whether the structure matches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from ..fit.align import align_keys
from ..errors import WeightsNotFoundError
from ..fit.report import group_keys
from ..fit.select import select
from ..fit.tree import LEAF_TYPES, children_of, flatten, is_module_like, is_tensor_like, walk
from ..read.opener import open_checkpoint
from ..read.tensors import dtype_name, release, to_torch
from ..read.trust import Policy, resolve_policy
from ..storage.source import SourceLike
from ..read import Mode, TreeMeter
from ..text import summary
from .report.tensor_stats import collapse_expanded, flat_pieces

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
    shape_changes: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    dtype_changes: list[tuple[str, str, str]] = field(default_factory=list)
    renamed: str = ""  # "removing 'module.'" ...
    common: int = 0
    values_compared: bool = False
    changed: list[TensorDiff] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)
    plain_compared: int = 0  # plain (non-tensor) values found in both trees and compared
    plain_changed: list[tuple[str, Any, Any]] = field(default_factory=list)  # (path, A's value, B's value)
    plain_only_a: list[str] = field(default_factory=list)
    plain_only_b: list[str] = field(default_factory=list)

    @property
    def structure_equal(self) -> bool:
        """Same keys (up to a wrapper prefix: see :attr:`renamed`), shapes and dtypes, and the same plain values."""
        return not (self.only_a or self.only_b or self.shape_changes or self.dtype_changes or self.renamed
                    or self.plain_changed or self.plain_only_a or self.plain_only_b)

    @property
    def equal(self) -> bool | None:
        """``True`` only when everything was compared and nothing differs; ``False`` when something
        differs; ``None`` when the structure matches but tensor values were not compared (``values=False``)."""
        if not self.structure_equal or self.changed or self.nonfinite:
            return False
        return True if self.values_compared else None

    @property
    def compared(self) -> list[str]:
        """What this report checked: ``keys``, ``shapes``, ``dtypes``, ``plain values`` and (by default) ``tensor values``."""
        return ["keys", "shapes", "dtypes", "plain values"] + (["tensor values"] if self.values_compared else [])

    @property
    def changed_layers(self) -> list[str]:
        return sorted({k.rsplit(".", 1)[0] if "." in k else k for k in (d.key for d in self.changed)})

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "equal": self.equal, "structure_equal": self.structure_equal,
                "compared": self.compared, "renamed": self.renamed, "common": self.common,
                "only_a": self.only_a, "only_b": self.only_b,
                "shape_changes": [{"key": k, "a": a, "b": b} for k, a, b in self.shape_changes],
                "dtype_changes": [{"key": k, "a": a, "b": b} for k, a, b in self.dtype_changes],
                "values_compared": self.values_compared, "changed": [d.to_dict() for d in self.changed],
                "changed_layers": self.changed_layers, "nonfinite": self.nonfinite,
                "plain_values": {"compared": self.plain_compared, "only_a": self.plain_only_a,
                                 "only_b": self.plain_only_b,
                                 "changed": [{"key": k, "a": _plain(x), "b": _plain(y)}
                                             for k, x, y in self.plain_changed]}}

    def render(self) -> str:
        """The human report (``print(report)``): what differs, key by key, and by how much."""
        plain = f", {self.plain_compared} plain values" if self.plain_compared else ""
        if self.equal:
            return f"{self.a} and {self.b}: identical ({self.common} tensors{plain})"
        if self.equal is None:
            return (f"{self.a} and {self.b}: the same keys, shapes and dtypes ({self.common} tensors{plain}); "
                    "tensor values NOT compared (structure only)")
        lines = [f"{self.a} vs {self.b}: {self.common} tensors in common"]
        if self.renamed:
            lines.append(f"  names differ only by {self.renamed}")
        if self.only_a:
            lines.append(f"  only in A: {', '.join(group_keys(self.only_a, self.only_a))}")
        if self.only_b:
            lines.append(f"  only in B: {', '.join(group_keys(self.only_b, self.only_b))}")
        for k, a, b in self.shape_changes:
            lines.append(f"  shape  {k}: {a} -> {b}")
        for k, dtype_a, dtype_b in self.dtype_changes:
            lines.append(f"  dtype  {k}: {dtype_a} -> {dtype_b}")
        if self.values_compared and not self.changed:
            lines.append(f"  tensor values: equal in the {self.common} tensors compared")
        elif self.values_compared:
            lines.append(f"  values differ in {len(self.changed)} tensors; layers changed: "
                         f"{', '.join(self.changed_layers[:20])}")
            for d in sorted(self.changed, key=lambda d: -d.max_abs)[:15]:
                lines.append(f"    {d.key}: max |a-b| {d.max_abs:.3g}, relative {d.max_rel:.3g}")
        for k in self.nonfinite:
            lines.append(f"  NaN/Inf: {k}")
        if self.plain_only_a:
            lines.append(f"  values only in A: {', '.join(group_keys(self.plain_only_a, self.plain_only_a))}")
        if self.plain_only_b:
            lines.append(f"  values only in B: {', '.join(group_keys(self.plain_only_b, self.plain_only_b))}")
        for k, x, y in self.plain_changed[:30]:
            lines.append(f"  value  {k}: {_short(x)} -> {_short(y)}")
        if len(self.plain_changed) > 30:
            lines.append(f"  ... and {len(self.plain_changed) - 30} more plain values differ")
        if not self.values_compared:
            lines.append("  tensor values NOT compared (structure only)")
        return "\n".join(lines)

    __str__ = render


def _plain(value: Any) -> Any:
    """A plain value as JSON keeps it: numbers, strings, booleans and None as themselves, the rest as repr."""
    return value if isinstance(value, (str, int, float, bool)) or value is None else repr(value)


def _short(value: Any, limit: int = 80) -> str:
    return summary(value, limit)  # bounded, and escaped: the value came from a file


def _plain_values(obj: Any) -> dict[str, Any]:
    """Every plain value (number, string, bytes, bool, None) of a tree by dotted path; modules' internals
    and tensors are left out (tensors are compared on their own)."""
    return {path or "<root>": value for path, value, _ in walk(obj, descend=lambda _, v: not is_module_like(v))
            if isinstance(value, LEAF_TYPES) and not is_tensor_like(value) and children_of(value) is None}


def _same_plain(x: Any, y: Any) -> bool:
    if type(x) is not type(y):
        return False
    return bool(x == y) or (isinstance(x, float) and x != x and y != y)


def _compare_plain(report: DiffReport, a: Any, b: Any) -> None:
    pa, pb = _plain_values(a), _plain_values(b)
    report.plain_only_a = [k for k in pa if k not in pb]
    report.plain_only_b = [k for k in pb if k not in pa]
    common = [k for k in pa if k in pb]
    report.plain_compared = len(common)
    report.plain_changed = [(k, pa[k], pb[k]) for k in common if not _same_plain(pa[k], pb[k])]


def _tensors(obj: Any, key: str | None, meter: TreeMeter, name: str) -> dict[str, Any]:
    try:
        found: dict[str, Any] = {}
        for k, v in select(obj, key, meter=meter).state_dict.items():
            if is_tensor_like(v):
                found[k] = v
            else:  # a quantized layer's packed params hold its weight: compare the tensors inside them too
                found.update((f"{k}.{sub}", t) for sub, t in flatten(v, meter) if sub != "tensor")
        return found
    except WeightsNotFoundError as exc:
        if key is not None:
            raise exc.with_path(name)  # `--key` found in one file and not the other: say which
        return dict(flatten(obj, meter))  # no weights as such: compare every tensor in the tree


def diff(a: SourceLike, b: SourceLike, *, values: bool = True, key: str | None = None, atol: float = 0.0,
         progress: Callable[[int, int], None] | None = None, policy: Policy | None = None, trust: bool = False,
         allow: Iterable[str] | str | None = None, storage_options: Mapping[str, Any] | None = None) -> DiffReport:
    """Compare two checkpoints: keys, shapes, dtypes, plain values (epoch, lr, config) and tensor values.

    ``values=False`` compares structure and plain values only (no tensor data is read, no torch): the
    report's :attr:`~DiffReport.equal` is then ``None`` (not checked) unless something differs.

    With ``values`` each pair of tensors is streamed in chunks of at most :data:`CHUNK_BYTES` in its own
    dtype (upcast per chunk only where needed); a chunk whose bytes are equal costs one comparison.
    Memory stays bounded by the largest tensor pair, whatever the formats of ``a`` and ``b``.
    ``progress(done, total)`` is called after each tensor pair when comparing values.
    ``policy``/``trust``/``allow``: what the files' pickles may import, as in :func:`torchckpt.load`.
    ``storage_options``: for URL arguments (read by byte ranges).
    """
    if atol < 0 or atol != atol:
        raise ValueError(f"atol must be a number >= 0, not {atol!r}")
    mode, read_policy = (Mode.BUILD if values else Mode.STRUCTURE), resolve_policy(policy, trust, allow)
    # with values: zip and safetensors are mapped, legacy is streamed (each tensor read when compared)
    with open_checkpoint(a, mode, read_policy, lazy=True, storage_options=storage_options) as la, \
            open_checkpoint(b, mode, read_policy, lazy=True, storage_options=storage_options) as lb:
        sa, sb = la.reader, lb.reader
        assert sa is not None and sb is not None  # open_checkpoint keeps them open inside the with block
        ta, tb = _tensors(la.obj, key, la.tree_meter, sa.name), _tensors(lb.obj, key, lb.tree_meter, sb.name)
        report = DiffReport(sa.name, sb.name)
        _compare_plain(report, la.obj, lb.obj)
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
            elif dtype_name(va) != dtype_name(vb):
                report.dtype_changes.append((ka, dtype_name(va), dtype_name(vb)))
        if values:
            report.values_compared = True
            skip = {k for k, _, _ in report.shape_changes}
            for n, (ka, kb) in enumerate(mapping.items(), 1):
                if progress is not None:
                    progress(n, len(mapping))
                if ka in skip:
                    continue
                x, y = to_torch(ta[ka], sa), to_torch(tb[kb], sb)
                d = _compare(x, y, ka)
                release(sa, x)
                release(sb, y)
                if d.nonfinite_a or d.nonfinite_b:
                    report.nonfinite.append(f"{ka} (A: {d.nonfinite_a}, B: {d.nonfinite_b})")
                if d.max_abs > atol or (d.max_abs != d.max_abs):
                    report.changed.append(d)
    return report


CHUNK_BYTES = 16 << 20  # per operand and chunk, in the compute dtype


def _compute_dtype(x: Any, y: Any) -> Any:
    import torch

    if x.is_complex() or y.is_complex():
        return torch.complex128
    if x.is_floating_point() or y.is_floating_point():
        try:
            return torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
        except RuntimeError:  # float8 types do not promote
            return torch.float64
    if torch.uint64 in (x.dtype, y.dtype):
        return torch.float64  # beyond int64: exact up to 2^53, ordered beyond
    return torch.int64


def _native(t: Any) -> bool:
    """Whether torch's reductions (aminmax, isfinite, sub) take this dtype as it is."""
    return not (dtype_name(t).startswith("float8") or dtype_name(t) in ("uint16", "uint32", "uint64"))


def _pairs(x: Any, y: Any, step: int) -> Any:
    """Aligned flat pieces of two tensors of one shape, each at most ``step`` elements (views when both
    are contiguous; otherwise each piece alone is copied, so an expanded view never is whole)."""
    if x.is_contiguous() and y.is_contiguous():
        xf, yf = x.reshape(-1), y.reshape(-1)
        return ((xf[s:s + step], yf[s:s + step]) for s in range(0, xf.numel(), step))
    return zip(flat_pieces(x, step, by_shape=True), flat_pieces(y, step, by_shape=True))


def _compare(x: Any, y: Any, key: str) -> TensorDiff:
    """Max abs / relative difference and non-finite counts of two tensors of one shape, chunk by chunk.

    Memory stays one chunk per operand whatever the strides; two views expanded along the same
    dimensions (stride 0) are compared on their stored values alone."""
    import torch

    # quantized tensors: the values they stand for (a byte view of one crashes torch, and it has no arithmetic)
    x, y = (t.dequantize() if getattr(t, "is_quantized", False) else t for t in (x, y))
    if x.numel() == 0:
        return TensorDiff(key, 0.0, 0.0)
    zero_x = [d for d, (n, s) in enumerate(zip(x.shape, x.stride())) if s == 0 and n > 1]
    zero_y = [d for d, (n, s) in enumerate(zip(y.shape, y.stride())) if s == 0 and n > 1]
    if zero_x and zero_x == zero_y:
        (xs, repeats), (ys, _) = collapse_expanded(x), collapse_expanded(y)
        d = _compare(xs, ys, key)
        d.nonfinite_a, d.nonfinite_b = d.nonfinite_a * repeats, d.nonfinite_b * repeats
        return d
    ct = _compute_dtype(x, y)
    total = x.numel()
    step = max(1, CHUNK_BYTES // ct.itemsize)
    same_dtype = x.dtype == y.dtype
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(x.dtype.itemsize)
    buf = torch.empty(min(step, total), dtype=ct)
    max_abs, scale, bad_a, bad_b = 0.0, 0.0, 0, 0
    skipped: list[int] = []  # chunks found bitwise equal: their scale is needed only if others differ
    maybe_equal = same_dtype and bits is not None  # test chunks for bitwise equality until one differs
    native = _native(x) and _native(y)  # else each piece is cast to ct first (float8, uint16/32/64)
    for index, (xa, yb) in enumerate(_pairs(x, y, step)):
        if maybe_equal and torch.equal(xa.view(bits), yb.view(bits)):
            xa = xa if native else xa.to(ct)
            if ct.is_floating_point and not _all_finite(xa):
                bad = int((~torch.isfinite(xa)).sum())
                bad_a, bad_b = bad_a + bad, bad_b + bad
            skipped.append(index)
            continue
        maybe_equal = False
        if not native:
            xa, yb = xa.to(ct), yb.to(ct)
        out = buf[:xa.numel()]
        if xa.dtype == ct and yb.dtype == ct:
            torch.sub(xa, yb, out=out)
        else:  # upcast this chunk only
            out.copy_(xa)
            out.sub_(yb if yb.dtype not in (torch.bool, torch.uint16, torch.uint32, torch.uint64) else yb.to(ct))
        if ct.is_complex:
            chunk_max = float(torch.linalg.vector_norm(out, float("inf")))
        else:  # max |delta| in one fused pass (13x faster than vector_norm(inf)); NaN propagates, inf shows
            lo, hi = torch.aminmax(out)
            neg, pos = -float(lo), float(hi)
            chunk_max = neg if neg != neg or neg > pos else pos  # NaN stays NaN whichever side holds it
        if chunk_max == chunk_max and chunk_max != float("inf"):
            max_abs = max(max_abs, chunk_max)  # every delta finite: so is every value of both
            scale = max(scale, _abs_max(xa))
            continue
        na, nb, m, s = _nonfinite_chunk(xa.to(ct), yb.to(ct))
        bad_a, bad_b, max_abs, scale = bad_a + na, bad_b + nb, max(max_abs, m), max(scale, s)
    if max_abs and skipped:
        again = set(skipped)
        for index, (xa, _) in enumerate(_pairs(x, y, step)):
            if index in again:
                scale = max(scale, _abs_max(xa if native else xa.to(ct)))
    rel = max_abs / scale if scale else (0.0 if max_abs == 0 else float("inf"))
    return TensorDiff(key, max_abs, rel, bad_a, bad_b)


def _all_finite(t: Any) -> bool:
    import torch

    if t.is_complex():
        return bool(torch.isfinite(t).all())
    extremes = torch.aminmax(t)  # one fused pass; NaN propagates, +-inf shows as an extreme
    lo, hi = float(extremes.min), float(extremes.max)
    return lo == lo and hi == hi and abs(lo) != float("inf") and abs(hi) != float("inf")


def _abs_max(t: Any) -> float:
    """max |t| over finite values (plain max for integers)."""
    import torch

    if t.is_complex() or t.dtype == torch.bool:
        return float(t.abs().amax()) if not t.dtype == torch.bool else float(t.any())
    lo, hi = torch.aminmax(t)
    m = max(abs(float(lo)), abs(float(hi)))
    if m == m and m != float("inf"):
        return m
    finite = t[torch.isfinite(t)]
    return float(finite.abs().amax()) if finite.numel() else 0.0


def _nonfinite_chunk(xf: Any, yf: Any) -> tuple[int, int, float, float]:
    """The exact accounting for a chunk holding NaN/Inf: counts, max finite delta (inf when a
    non-finite value is not matched by the same one on the other side), max finite |x|."""
    import torch

    bad_a = int((~torch.isfinite(xf)).sum()) if xf.is_floating_point() or xf.is_complex() else 0
    bad_b = int((~torch.isfinite(yf)).sum()) if yf.is_floating_point() or yf.is_complex() else 0
    delta = (xf - yf).abs()
    finite = torch.isfinite(delta)
    same_nonfinite = (xf == yf) | (xf.isnan() & yf.isnan())
    if bool((~finite & ~same_nonfinite).any()):
        max_abs = float("inf")
    else:
        max_abs = float(delta[finite].max()) if bool(finite.any()) else 0.0
    return bad_a, bad_b, max_abs, _abs_max(xf)
