"""The arithmetic of DeepSpeed ZeRO partitions: where each element of each parameter lives.

ZeRO flattens the trainable parameters of each optimizer parameter group into one vector and gives
each data-parallel rank a slice of it; the files hold those slices (and the Adam moments aligned with
them). This module plans, from the slices' sizes alone, which pieces of which rank's slice make up
each parameter, and then copies one parameter at a time, so consolidating never needs more memory
than the output tensor (the slices are mapped from the files and their pages given back after use).

* stages 1 and 2: a group's vector is the ranks' slices one after the other (padding at the very
  end, which DeepSpeed strips from the file); parameters lie in it in ``param_shapes`` order.
* stage 3: every parameter is split on its own into ``ceil(numel / world)`` elements per rank
  (padded); a rank's groups, one after the other, hold its pieces of the parameters in order.

The plan and its checks are those DeepSpeed's own ``zero_to_fp32`` applies, so the result is the
same, bit for bit; nothing here imports DeepSpeed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ...errors import CorruptCheckpointError

__all__ = ["Piece", "ParamPlan", "plan_stage2", "plan_stage3", "gather"]


@dataclass(frozen=True)
class Piece:
    """``length`` elements of rank ``rank``'s group ``group`` slice from ``start`` go to ``out`` in the parameter."""

    rank: int
    group: int
    start: int
    length: int
    out: int


@dataclass(frozen=True)
class ParamPlan:
    name: str
    shape: tuple[int, ...]
    group: int
    pieces: tuple[Piece, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _spans(bounds: Sequence[int], start: int, length: int) -> list[tuple[int, int, int]]:
    """``(index, start_in_part, length)`` for ``[start, start+length)`` of parts laid end to end; ``bounds``
    holds the parts' start offsets followed by the total."""
    spans: list[tuple[int, int, int]] = []
    pos, end = start, start + length
    for i in range(len(bounds) - 1):
        lo, hi = bounds[i], bounds[i + 1]
        if pos < hi and pos < end and hi > lo:
            take = min(end, hi) - pos
            spans.append((i, pos - lo, take))
            pos += take
        if pos >= end:
            break
    if pos < end:
        raise CorruptCheckpointError(f"the ZeRO partitions hold {bounds[-1]} elements, fewer than the "
                                     f"{end} the parameter shapes need")
    return spans


def _offsets(sizes: Sequence[int]) -> list[int]:
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    return bounds


def plan_stage2(param_shapes: Sequence[dict[str, tuple[int, ...]]], sizes: Sequence[Sequence[int]]) -> list[ParamPlan]:
    """Stages 1/2. ``sizes[rank][group]``: elements of each rank's slice of each group."""
    world = len(sizes)
    plans: list[ParamPlan] = []
    for g, shapes in enumerate(param_shapes):
        bounds = _offsets([sizes[r][g] for r in range(world)])
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            pieces, out = [], 0
            for rank, start, length in _spans(bounds, offset, numel) if numel else []:
                pieces.append(Piece(rank, g, start, length, out))
                out += length
            plans.append(ParamPlan(name, tuple(shape), g, tuple(pieces)))
            offset += numel
        align = 2 * world  # DeepSpeed pads each group to a multiple of 2 * world size; the padding may differ
        if align * math.ceil(offset / align) != align * math.ceil(bounds[-1] / align):
            raise CorruptCheckpointError(f"ZeRO group {g}: its parameters take {offset} elements but the {world} "
                                         f"partitions hold {bounds[-1]}")
    return plans


def plan_stage3(param_shapes: Sequence[dict[str, tuple[int, ...]]], sizes: Sequence[Sequence[int]]) -> list[ParamPlan]:
    """Stage 3. Every rank's groups must have the sizes of rank 0's."""
    world = len(sizes)
    if any(list(s) != list(sizes[0]) for s in sizes):
        raise CorruptCheckpointError(f"ZeRO-3 partitions differ in size between ranks: {[list(s) for s in sizes]}")
    bounds = _offsets(sizes[0])
    plans: list[ParamPlan] = []
    offset = 0
    for g, shapes in enumerate(param_shapes):
        for name, shape in shapes.items():
            numel = math.prod(shape)
            per_rank = math.ceil(numel / world)
            pieces = []
            if numel:
                for rank in range(world):
                    out = rank * per_rank
                    want = min(per_rank, numel - out)
                    if want <= 0:
                        break
                    for group, start, length in _spans(bounds, offset, want):
                        pieces.append(Piece(rank, group, start, length, out))
                        out += length
            plans.append(ParamPlan(name, tuple(shape), g, tuple(pieces)))
            offset += per_rank
    if offset != bounds[-1]:
        raise CorruptCheckpointError(f"ZeRO-3: the parameters take {offset} elements of each rank's partition, "
                                     f"which holds {bounds[-1]}")
    return plans


def gather(plan: ParamPlan, slices: Callable[[int, int], Any], dtype: Any,
           release: Callable[[int, Any], None] | None = None) -> Any:
    """One parameter as a new contiguous tensor: ``slices(rank, group)`` gives a rank's flat slice of a group;
    ``release(rank, view)`` is told of each part once it is copied (to drop its file pages)."""
    import torch  # lazy: only building tensors needs torch

    out = torch.empty(plan.numel, dtype=dtype)
    # numpy copies on one thread: these copies fault in fresh output pages and mapped file pages, which
    # torch's multi-threaded copy_ does several times slower (5x measured on 2 cores)
    flat = out.numpy() if dtype in (torch.float32, torch.float64, torch.float16) else None
    for p in plan.pieces:
        part = slices(p.rank, p.group)
        if p.start + p.length > part.numel() or part.dtype != dtype:
            raise CorruptCheckpointError(f"ZeRO partition of rank {p.rank}, group {p.group} has {part.numel()} "
                                         f"{part.dtype} elements; {plan.name} needs up to {p.start + p.length} "
                                         f"{dtype}")
        view = part.detach()[p.start:p.start + p.length]
        if flat is not None:
            flat[p.out:p.out + p.length] = view.numpy()
        else:
            out[p.out:p.out + p.length].copy_(view)
        if release is not None:
            release(p.rank, view)
    return out.view(plan.shape)
