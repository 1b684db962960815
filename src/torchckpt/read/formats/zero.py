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

A load (:class:`RankCopies`) fills the full tensors rank by rank: each rank's pieces are read with
``pread`` from its file straight into their places (no mapped page touched, no intermediate tensor), on a
pool of threads, while the next rank file is being parsed.

The plan and its checks are those DeepSpeed's own ``zero_to_fp32`` applies, so the result is the
same, bit for bit; nothing here imports DeepSpeed.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ...errors import CheckpointError, CorruptCheckpointError
from ...storage.source import Source, confined_path
from .base import ReadOptions
from .parallel import workers_for

__all__ = ["Piece", "ParamPlan", "plan_stage2", "plan_stage3", "gather", "RankCopies", "files_size"]


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


Planner = Callable[[Sequence[dict[str, tuple[int, ...]]], Sequence[Sequence[int]]], list[ParamPlan]]


def _by_rank(plans: Sequence[ParamPlan], world: int) -> list[list[tuple[int, Piece]]]:
    """The pieces of every rank, with the index of the parameter each goes to, in plan order."""
    ranks: list[list[tuple[int, Piece]]] = [[] for _ in range(world)]
    for i, plan in enumerate(plans):
        for p in plan.pieces:
            ranks[p.rank].append((i, p))
    return ranks


@dataclass
class _Rank:
    parts: list[Any]  # the rank's flat fp32 slice of each group (views of its mapped file)
    source: Source
    pieces: list[tuple[int, Piece]] | None = None  # what was copied (submitted), if anything yet
    job: Future[None] | None = None


class RankCopies:
    """The trainable parameters of a ZeRO step folder, filled rank by rank as the ranks' optimizer files are
    parsed (``begin`` after rank 0's, ``add`` after each one's, ``finish`` once the real plan is known).

    Each rank's pieces are read from its file with ``pread`` straight into their places in the full tensors,
    on ``workers_for(opts, world)`` threads (one: in the calling thread), so copies overlap the parsing of the
    next file (the GIL is released while reading). Copies start early from the plan that assumes every rank's
    slices have rank 0's sizes (DeepSpeed's layout; a stage-2 last rank is shorter and waits for ``finish``);
    ``finish`` plans from the real sizes with every check, and copies again any rank whose pieces differ from
    what was copied, so the result depends only on the real plan.
    """

    def __init__(self, opts: ReadOptions, world: int, room: int) -> None:
        self.world = world
        self.room = room  # bytes of the ranks' optimizer files: fp32 slices they could hold, at most
        self.workers = workers_for(opts, world)
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="torchckpt-zero") if self.workers > 1 else None
        self.ranks: dict[int, _Rank] = {}
        self.outs: list[Any] | None = None
        self.arrays: list[Any] | None = None
        self.guess: list[list[tuple[int, Piece]]] | None = None
        self.sizes0: list[int] | None = None

    def begin(self, planner: Planner, shapes: Sequence[dict[str, tuple[int, ...]]], sizes0: list[int]) -> None:
        """Rank 0 is parsed: plan as if every rank's slices had its sizes (nothing copied if that fails)."""
        try:
            plans = planner(shapes, [sizes0] * self.world)
        except CorruptCheckpointError:
            return  # the real plan decides, once every rank is parsed
        if 4 * sum(plan.numel for plan in plans) > self.room:
            # the guess is rank 0's sizes times the number of rank files: a large rank 0 beside many tiny files
            # must not allocate more than the files could hold (the real plan, from real slices, is bounded)
            return
        self.sizes0, self.guess = sizes0, _by_rank(plans, self.world)
        self._allocate(plans)

    def add(self, rank: int, parts: list[Any], sizes: list[int], source: Source) -> None:
        """Rank ``rank``'s optimizer file is parsed: copy its pieces now if the early plan holds for it."""
        entry = self.ranks[rank] = _Rank(parts, source)
        if self.guess is not None and sizes == self.sizes0 and self._problem(entry, self.guess[rank]) is None:
            self._submit(rank, self.guess[rank])

    def finish(self, plans: Sequence[ParamPlan], parts: Sequence[list[Any]], sources: Sequence[Source]) -> list[Any]:
        """Every rank parsed and ``plans`` made from the real sizes (``parts[rank][group]``: the slices, of the
        files ``sources``): the parameters, every piece copied."""
        real = _by_rank(plans, self.world)
        for r in range(self.world):
            if r not in self.ranks:
                self.ranks[r] = _Rank(list(parts[r]), sources[r])
        if self.outs is None:
            self._allocate(plans)
        again = [r for r in range(self.world) if self.ranks[r].pieces != real[r]]
        if any(self.ranks[r].job is not None for r in again):
            self._wait()  # a rank copied from the wrong plan: nothing may still be writing where it is copied again
        for r in again:
            problem = self._problem(self.ranks[r], real[r])
            if problem is not None:
                raise CorruptCheckpointError(problem, path=self.ranks[r].source.name)
            self._submit(r, real[r])
        self._wait()
        assert self.outs is not None
        return [out.view(plan.shape) for out, plan in zip(self.outs, plans)]

    def close(self) -> None:
        """Stop the pool: copies not started are cancelled, running ones waited for (an error or Ctrl-C)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def _allocate(self, plans: Sequence[ParamPlan]) -> None:
        import torch  # lazy: only building tensors needs torch

        self.outs = [torch.empty(plan.numel, dtype=torch.float32) for plan in plans]
        self.arrays = [out.numpy() for out in self.outs]  # where the copies write (numpy slices: cheap views)

    def _problem(self, entry: _Rank, pieces: list[tuple[int, Piece]]) -> str | None:
        """What is wrong with copying ``pieces`` from the rank's slices (each must lie inside a float32 slice)."""
        import torch  # lazy: only building tensors needs torch

        for i, p in pieces:
            part = entry.parts[p.group]
            if p.start + p.length > part.numel() or part.dtype != torch.float32:
                return (f"ZeRO partition of rank {p.rank}, group {p.group} has {part.numel()} {part.dtype} elements; "
                        f"parameter {i} needs up to {p.start + p.length} torch.float32")
        return None

    def _submit(self, rank: int, pieces: list[tuple[int, Piece]]) -> None:
        entry = self.ranks[rank]
        entry.pieces = pieces
        if self.pool is None:
            self._copy(entry, pieces)
        else:
            entry.job = self.pool.submit(self._copy, entry, pieces)

    def _wait(self) -> None:
        for entry in self.ranks.values():
            if entry.job is not None:
                entry.job.result()  # a failed copy raises here, typed and naming its file

    def _copy(self, entry: _Rank, pieces: list[tuple[int, Piece]]) -> None:
        """Read the rank's pieces into their places: one ``preadv`` per run of pieces that follow each other in
        the file (all of a group's, except around a stage-3 parameter's padding)."""
        assert self.arrays is not None
        offsets = [entry.source.mapped_offset(part) for part in entry.parts]
        runs: list[tuple[int, list[Any]]] = []  # (file offset, the destinations of the bytes from there on)
        end = -1
        try:
            for i, p in pieces:
                dst, offset = self.arrays[i][p.out:p.out + p.length], offsets[p.group]
                if offset is None:  # not a view of the file (a compressed member, a strided view): copy it
                    dst[:] = entry.parts[p.group].detach()[p.start:p.start + p.length].numpy()
                    continue
                start = offset + p.start * 4
                if start == end:
                    runs[-1][1].append(dst)
                else:
                    runs.append((start, [dst]))
                end = start + p.length * 4
            for start, views in runs:
                entry.source.read_into_views(start, views)
        except CheckpointError as exc:
            raise exc.with_path(entry.source.name)
        except OSError as exc:
            raise CorruptCheckpointError(f"reading the fp32 partition of rank {pieces[0][1].rank} failed: "
                                         f"{exc.strerror or exc}", path=entry.source.name) from None


def files_size(directory: str, names: Sequence[str]) -> int:
    """The bytes of the files ``names`` in ``directory`` together; 0 if one cannot be measured."""
    try:
        return sum(os.stat(confined_path(directory, name, what="file", checkpoint=directory)).st_size
                   for name in names)
    except (OSError, CheckpointError):
        return 0
