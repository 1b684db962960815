"""Statistics of one tensor, computed in bounded chunks: mean, std, min, max, zeros, NaN/Inf, norm, histogram.

Every statistic is accumulated in float64 (torch's CPU accumulation type for float reductions) over
chunks of at most ``CHUNK`` elements, so the memory needed beyond the tensor itself is a few times
the chunk, whatever the tensor's size. Means and
variances of chunks are merged with Chan's parallel update, which keeps the result as accurate
as a single float64 pass. NaN and Inf are counted and left out of the other statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..read.tensors import dtype_name

__all__ = ["TensorStats", "tensor_stats", "relative_change", "CHUNK"]

CHUNK = 1 << 20  # elements per chunk: at most 8 MiB of temporaries


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


def _chunks(t: Any, chunk: int, exact: bool = False) -> Any:
    """Flat chunks of ``t`` as float32 or float64. Reductions on them accumulate in float64 on the CPU
    (torch's accumulation type for float), so only half types and integers need converting;
    ``exact`` converts everything to float64 for elementwise arithmetic."""
    import torch

    flat = t.detach().reshape(-1)  # a view for contiguous tensors; strided views are copied once
    if flat.dtype.is_complex:
        flat = torch.view_as_real(flat).reshape(-1)
    keep = flat.dtype == torch.float64 or (flat.dtype == torch.float32 and not exact)
    target = torch.float32 if flat.dtype in (torch.float16, torch.bfloat16) and not exact else torch.float64
    for start in range(0, flat.numel(), chunk):
        part = flat[start:start + chunk]
        yield part if keep else part.to(target)


def tensor_stats(key: str, t: Any, *, bins: int = 0, chunk: int = CHUNK) -> TensorStats:
    """Statistics of ``t`` (any dtype, any device) in one pass, plus one more pass for a histogram of ``bins``."""
    import torch

    shape = tuple(int(s) for s in t.shape)
    stats = TensorStats(key, shape, dtype_name(t), t.numel() * t.element_size(), t.numel())
    count, mean, m2 = 0, 0.0, 0.0
    lo, hi = math.inf, -math.inf
    for c in _chunks(t, chunk):
        stats.zeros += c.numel() - int(torch.count_nonzero(c))
        c_var, c_mean = torch.var_mean(c, correction=0)
        if math.isfinite(float(c_mean)) and math.isfinite(float(c_var)):
            n_ok, v = c.numel(), c  # the common case: no NaN/Inf, no second look at the chunk
        else:
            ok = torch.isfinite(c)
            n_ok = int(ok.sum())
            n_nan = int(torch.isnan(c).sum())
            stats.nan += n_nan
            stats.inf += c.numel() - n_ok - n_nan
            if n_ok == 0:
                continue
            v = c[ok]
            c_var, c_mean = torch.var_mean(v, correction=0)
        c_lo, c_hi = torch.aminmax(v)
        lo, hi = min(lo, float(c_lo)), max(hi, float(c_hi))
        c_mean_f, c_m2 = float(c_mean), float(c_var) * n_ok
        total = count + n_ok
        delta = c_mean_f - mean
        mean += delta * n_ok / total
        m2 += c_m2 + delta * delta * count * n_ok / total
        count = total
    stats.finite = count
    if count:
        stats.mean, stats.min, stats.max = mean, lo, hi
        stats.std = math.sqrt(m2 / (count - 1)) if count > 1 else float("nan")
        stats.norm = math.sqrt(max(0.0, m2 + count * mean * mean))
    if bins and count:
        stats.histogram = _histogram(t, bins, lo, hi, chunk)
    return stats


def _histogram(t: Any, bins: int, lo: float, hi: float, chunk: int) -> tuple[list[float], list[int]]:
    import torch

    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    counts = torch.zeros(bins, dtype=torch.float64)
    for c in _chunks(t, chunk):
        if not bool(torch.isfinite(c).all()):
            c = c[torch.isfinite(c)]
        counts += torch.histc(c, bins=bins, min=lo, max=hi).to(torch.float64)
    step = (hi - lo) / bins
    return [lo + i * step for i in range(bins + 1)], [int(x) for x in counts.tolist()]


def relative_change(a: Any, b: Any, *, chunk: int = CHUNK) -> tuple[float, float]:
    """``(‖a−b‖, ‖a‖)`` in float64 over chunks; NaN where either side is not finite."""
    import torch

    diff_sq, base_sq = 0.0, 0.0
    for ca, cb in zip(_chunks(a, chunk, exact=True), _chunks(b, chunk, exact=True)):
        diff_sq += float(((ca - cb) ** 2).sum())
        base_sq += float((ca * ca).sum())
    if not (math.isfinite(diff_sq) and math.isfinite(base_sq)):
        return float("nan"), float("nan")
    return math.sqrt(diff_sq), math.sqrt(base_sq)
