"""Statistics of one tensor, computed in bounded chunks: mean, std, min, max, zeros, NaN/Inf, norm, histogram.

Every statistic is accumulated in float64 (torch's CPU accumulation type for float reductions) over
chunks of at most ``CHUNK`` elements, so the memory needed beyond the tensor itself is a few times
the chunk, whatever the tensor's size. Means and
variances of chunks are merged with Chan's parallel update, which keeps the result as accurate
as a single float64 pass. NaN and Inf are counted and left out of the other statistics.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from ...read.tensors import dtype_name

__all__ = ["TensorStats", "tensor_stats", "workspace", "relative_change", "CHUNK", "flat_pieces", "collapse_expanded"]

# quantized (qint8 ...), raw bits, sub-byte integers and packed float4: no per-element arithmetic
_NOT_NUMBERS = re.compile(r"^(q|bits|u?int[1-7]$|float4)")
CHUNK = 1 << 19  # elements per chunk: at most 4 MiB of temporaries (one float64 chunk)


@dataclass
class TensorStats:
    """What one tensor holds. ``std`` uses Bessel's correction, as ``torch.std`` does by default."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    numel: int
    finite: int = 0
    nan: int = 0
    inf: int = 0
    zeros: int = 0
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None
    norm: float = 0.0  # L2 norm of the finite values
    histogram: tuple[list[float], list[int]] | None = field(default=None, repr=False)  # (bin edges, counts)

    @property
    def zeros_fraction(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    @property
    def rms(self) -> float:
        return self.norm / math.sqrt(self.finite) if self.finite else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "histogram"}
        out["shape"] = list(self.shape)
        out["zeros_fraction"] = self.zeros_fraction
        if self.histogram is not None:
            out["histogram"] = {"edges": self.histogram[0], "counts": self.histogram[1]}
        return out


def flat_pieces(t: Any, chunk: int, by_shape: bool = False) -> Any:
    """``t`` in row-major order as flat pieces of at most ``chunk`` elements, never copying more.

    A contiguous tensor gives views of exactly ``chunk`` elements. Any other (a strided, overlapping
    or zero-stride view whose logical size may dwarf its storage) is cut along its leading dimensions
    by its shape alone, and only each piece is made contiguous: memory stays one chunk, and two
    tensors of one shape are cut at the same places (so they can be compared piece by piece; pass
    ``by_shape`` to cut a contiguous tensor that way too).
    """
    t = t.detach()
    if t.is_contiguous() and not by_shape:
        flat = t.reshape(-1)
        for start in range(0, flat.numel(), chunk):
            yield flat[start:start + chunk]
        return
    yield from _shape_pieces(t, chunk)


def _shape_pieces(t: Any, chunk: int) -> Any:
    if t.numel() <= chunk or t.dim() == 0:
        yield t.reshape(-1)
        return
    rows = t.shape[0]
    row = t.numel() // rows
    if row <= chunk:
        per = chunk // row
        for start in range(0, rows, per):
            yield t[start:start + per].reshape(-1)
    else:
        for i in range(rows):
            yield from _shape_pieces(t[i], chunk)


def collapse_expanded(t: Any) -> tuple[Any, int]:
    """``(t without its zero-stride dimensions, how many times each element repeats)``.

    A crafted ``expand`` (stride 0 over a long dimension) holds a few stored values repeated: every
    statistic of it is the statistic of the stored values, counted ``repeats`` times.
    """
    repeats = 1
    for dim, (size, stride) in enumerate(zip(t.shape, t.stride())):
        if stride == 0 and size > 1:
            repeats *= int(size)
            t = t.narrow(dim, 0, 1)
    return t, repeats


def _chunks(t: Any, chunk: int) -> Any:
    """Flat chunks of ``t`` in its own dtype (complex as interleaved real and imaginary parts)."""
    import torch

    for piece in flat_pieces(t, chunk if not t.dtype.is_complex else max(1, chunk // 2)):
        yield torch.view_as_real(piece).reshape(-1) if piece.dtype.is_complex else piece


def _flat_numel(t: Any) -> int:
    return int(t.numel()) * (2 if t.dtype.is_complex else 1)


def workspace(chunk: int = CHUNK) -> Any:
    """The scratch memory of :func:`tensor_stats` (one float64 chunk): pass it to every call to reuse it."""
    import torch

    return torch.empty(chunk, dtype=torch.float64)


def tensor_stats(key: str, t: Any, *, bins: int = 0, chunk: int = CHUNK, scratch: Any = None,
                 chunk_done: Callable[[Any], None] | None = None) -> TensorStats:
    """Statistics of ``t`` (any dtype, any device) in one pass, plus one more pass for a histogram of ``bins``.

    Each chunk is copied into a float64 scratch chunk once; its sum gives the chunk's mean (and, when not
    finite, says that the chunk holds NaN or Inf), the centred copy's dot product its sum of squares, so
    every element is visited a fixed, small number of times by vectorised kernels. ``scratch`` (from
    :func:`workspace` with the same ``chunk``) is reused instead of allocating one per call, so the
    memory beyond the tensor is exactly one chunk of float64 whatever the number of tensors.
    ``chunk_done(part)`` is called with each part of ``t`` once read (e.g. to drop its file pages).
    """
    import torch

    shape = tuple(int(s) for s in t.shape)
    stats = TensorStats(key, shape, dtype_name(t), t.numel() * t.element_size(), t.numel())
    if getattr(t, "is_quantized", False):  # the values it stands for (torch has no arithmetic on quantized ones)
        t = t.dequantize()
    if not _supported(t):
        return stats  # no arithmetic on this dtype (bits, sub-byte): shape and bytes only
    stored, repeats = collapse_expanded(t)
    if repeats > 1:  # the statistics of the stored values, each counted ``repeats`` times
        inner = tensor_stats(key, stored, bins=bins, chunk=chunk, scratch=scratch, chunk_done=chunk_done)
        return _repeated(stats, inner, repeats)
    count, mean, m2 = 0, 0.0, 0.0
    lo, hi = math.inf, -math.inf
    need = max(4, min(chunk, _flat_numel(t)))  # >= 4: a histogram's half chunk holds one complex value
    if scratch is None:
        scratch = workspace(need)
    elif scratch.numel() < need or scratch.dtype != torch.float64:
        raise ValueError(f"scratch must be a float64 tensor of at least {chunk} elements: use workspace(chunk)")
    for c in _chunks(t, chunk):
        v = scratch[:c.numel()].copy_(c)  # a private float64 copy: centred in place below
        stats.zeros += c.numel() - int(torch.count_nonzero(v))
        total_c = float(v.sum())
        if math.isfinite(total_c):  # the common case: min and max (exact in float64 for every source dtype
            c_lo, c_hi = torch.aminmax(v)  # but int64/uint64 beyond 2^53, which round)
        if chunk_done is not None:
            chunk_done(c)  # the chunk's own bytes are not touched again
        if not math.isfinite(total_c):  # NaN or Inf somewhere in the chunk: count them, keep the rest
            ok = torch.isfinite(v)
            n_ok = int(ok.sum())
            n_nan = int(torch.isnan(v).sum())
            stats.nan += n_nan
            stats.inf += v.numel() - n_ok - n_nan
            if n_ok == 0:
                continue
            v = v[ok]
            total_c = float(v.sum())
            c_lo, c_hi = torch.aminmax(v)
        n_ok = v.numel()
        lo, hi = min(lo, float(c_lo)), max(hi, float(c_hi))
        c_mean = total_c / n_ok
        v.sub_(c_mean)
        c_m2 = float(torch.dot(v, v))
        total = count + n_ok
        delta = c_mean - mean
        mean += delta * n_ok / total
        m2 += c_m2 + delta * delta * count * n_ok / total
        count = total
    stats.finite = count
    if count:
        stats.mean, stats.min, stats.max = mean, lo, hi
        stats.std = math.sqrt(m2 / (count - 1)) if count > 1 else float("nan")
        stats.norm = math.sqrt(max(0.0, m2 + count * mean * mean))
    if bins and count:
        stats.histogram = _histogram(t, bins, lo, hi, chunk, scratch, finite_only=bool(stats.nan or stats.inf),
                                     chunk_done=chunk_done)
    return stats


def _supported(t: Any) -> bool:
    """A dtype whose values can be read as numbers (not quantized, not raw bits)."""
    return not getattr(t, "is_quantized", False) and _NOT_NUMBERS.match(dtype_name(t)) is None


def _repeated(stats: TensorStats, inner: TensorStats, repeats: int) -> TensorStats:
    stats.finite, stats.nan, stats.inf, stats.zeros = (inner.finite * repeats, inner.nan * repeats,
                                                      inner.inf * repeats, inner.zeros * repeats)
    stats.mean, stats.min, stats.max = inner.mean, inner.min, inner.max
    if inner.finite and inner.std is not None:
        m2 = (inner.std ** 2 * (inner.finite - 1) if inner.finite > 1 else 0.0) * repeats
        stats.std = math.sqrt(m2 / (stats.finite - 1)) if stats.finite > 1 else float("nan")
        stats.norm = inner.norm * math.sqrt(repeats)
    if inner.histogram is not None:
        stats.histogram = (inner.histogram[0], [c * repeats for c in inner.histogram[1]])
    return stats


def _histogram(t: Any, bins: int, lo: float, hi: float, chunk: int, scratch: Any, finite_only: bool,
               chunk_done: Callable[[Any], None] | None) -> tuple[list[float], list[int]]:
    """Counts over ``bins`` equal bins from ``lo`` to ``hi`` (the last bin closed), as ``numpy.histogram``."""
    import torch

    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    scale = bins / (hi - lo)
    counts = torch.zeros(bins, dtype=torch.int64)
    half = max(2, min(chunk, _flat_numel(t)) // 2)  # the scratch holds half a chunk of values + their bins
    values, index = scratch[:half], scratch[half:2 * half].view(torch.int32)[:half]
    for c in _chunks(t, half):
        v = values[:c.numel()].copy_(c)
        if chunk_done is not None:
            chunk_done(c)
        if finite_only:
            v = v[torch.isfinite(v)]
        v.sub_(lo).mul_(scale).clamp_(0, bins - 1)
        bucket = index[:v.numel()].copy_(v)  # truncation is floor here: every value is >= 0
        counts += torch.bincount(bucket, minlength=bins)
    step = (hi - lo) / bins
    return [lo + i * step for i in range(bins + 1)], [int(x) for x in counts.tolist()]


def relative_change(a: Any, b: Any, *, chunk: int = CHUNK) -> tuple[float, float]:
    """``(‖a−b‖, ‖a‖)`` in float64 over chunks; NaN where either side is not finite."""
    import torch

    repeats = 1
    zero_a = [d for d, (n, s) in enumerate(zip(a.shape, a.stride())) if s == 0 and n > 1]
    if zero_a and zero_a == [d for d, (n, s) in enumerate(zip(b.shape, b.stride())) if s == 0 and n > 1]:
        (a, repeats), (b, _) = collapse_expanded(a), collapse_expanded(b)  # sums over stored values, repeated
    diff_sq, base_sq = 0.0, 0.0
    by_shape = not (a.is_contiguous() and b.is_contiguous())  # cut both alike, one chunk in memory
    for ca, cb in zip(flat_pieces(a, chunk, by_shape), flat_pieces(b, chunk, by_shape)):
        if ca.is_complex() or cb.is_complex():
            ca, cb = ca.to(torch.complex128), cb.to(torch.complex128)
            diff_sq += float(((ca - cb).abs() ** 2).sum())
            base_sq += float((ca.abs() ** 2).sum())
            continue
        ca, cb = ca.to(torch.float64), cb.to(torch.float64)
        diff_sq += float(((ca - cb) ** 2).sum())
        base_sq += float((ca * ca).sum())
    diff_sq, base_sq = diff_sq * repeats, base_sq * repeats
    if not (math.isfinite(diff_sq) and math.isfinite(base_sq)):
        return float("nan"), float("nan")
    return math.sqrt(diff_sq), math.sqrt(base_sq)
