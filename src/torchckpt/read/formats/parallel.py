"""Reading the parts of one checkpoint (the shards an index lists, the data files of a DCP directory, the
files of a DeepSpeed universal folder) with a bounded pool of threads.

Reading a part is mostly ``pread`` into tensor storages (or a ranged download), which releases the
GIL, so parts read side by side use every core (and overlap remote latency). Each part is read with
its own :class:`Trace` and budget :class:`Meter`; as the parts complete, in order, their traces are
appended to the read's trace and their work is charged to the read's meter, so the trace is the one
a sequential read makes and the one :class:`Budget` still bounds the whole read (a part in flight is
bounded by its own meter). An error from a part is raised as it is (typed, naming the part's file);
the parts not yet started are cancelled. A part that goes over the budget (alone, or with the parts
before it) is read again on the read's own meter, so the error is the one a sequential read raises.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Generator, Iterator, Sequence, TypeVar

from ...errors import LimitExceededError

from ..unpickle.budget import Meter
from .base import ReadOptions, Trace

__all__ = ["read_parts", "default_workers", "MAX_WORKERS", "collector_paused"]

T = TypeVar("T")
R = TypeVar("R")

MAX_WORKERS = 8


def default_workers() -> int:
    """Threads when the caller does not say: one per core, at most :data:`MAX_WORKERS`."""
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1))


def workers_for(opts: ReadOptions, parts: int) -> int:
    """The pool size for ``parts`` parts: ``opts.workers`` (default: :func:`default_workers`; a structure-only
    read, which reads no tensor data and is pure Python, uses one thread), never more than the parts."""
    wanted = opts.workers if opts.workers is not None else (1 if opts.meta else default_workers())
    return max(1, min(wanted, parts))


def read_parts(opts: ReadOptions, parts: Sequence[T], read_one: Callable[[T, ReadOptions], R]) -> Generator[R, None, None]:
    """``read_one(part, part_opts)`` for every part, results in the order of ``parts``.

    With one worker the parts are read one after another with ``opts`` itself. Otherwise each runs on
    the pool with a copy of ``opts`` that has its own trace and meter, merged into ``opts`` when its
    turn comes. A generator: results are produced as they are consumed, and closing it early (or an
    error) cancels the parts not yet started and waits for those running. Consume it in
    ``with contextlib.closing(read_parts(...))``: an exception in the caller's loop (Ctrl-C) does not close
    a generator, and its pool would go on reading every part while the traceback lives.
    """
    workers = workers_for(opts, len(parts))
    if workers == 1:
        for part in parts:
            yield read_one(part, opts)
        return
    meter = opts.budget_meter()

    def run(part: T, part_opts: ReadOptions) -> R:
        return read_one(part, part_opts)

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="torchckpt-read")
    try:
        jobs: list[tuple[Future[R], ReadOptions]] = []
        for part in parts:
            part_opts = dataclasses.replace(opts, trace=Trace(), meter=Meter(meter.budget))
            jobs.append((pool.submit(run, part, part_opts), part_opts))
        for part, (future, part_opts) in zip(parts, jobs):
            assert part_opts.meter is not None
            try:
                result = future.result()
            except LimitExceededError:
                result = _OVER
            except BaseException:  # what a failed part read is recorded too (scan reports it)
                _merge_trace(opts.trace, part_opts.trace)
                raise
            if result is _OVER or not _fits(meter, part_opts.meter):
                # over the one budget, alone or with the parts before it: read again on the read's own meter,
                # which stops it where a sequential read stops, with the same error (its item, its numbers)
                yield read_one(part, opts)
                continue
            _merge_trace(opts.trace, part_opts.trace)
            meter.absorb(part_opts.meter)  # the whole read stays within the one budget
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_OVER: Any = object()  # a part that went over the budget on its own


def _fits(meter: Meter, part: Meter) -> bool:
    """Whether ``meter`` can absorb ``part`` within its budget (neither is changed)."""
    trial = copy.copy(meter)
    trial.inflated = dict(meter.inflated)
    try:
        trial.absorb(part)
    except LimitExceededError:
        return False
    return True


def _merge_trace(trace: Trace, done: Trace) -> None:
    trace.streams.extend(done.streams)
    trace.ranges.extend(done.ranges)
    trace.checks.extend(done.checks)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused (if it runs) while parsing many pickles: their objects
    trigger full collections, each a walk over every object of the process (70-85 ms with torch imported,
    measured in a DeepSpeed load of 16 rank files) holding the GIL, which the pool's threads need between
    their reads. What the parse frees is freed by reference counting; cycles wait for the next collection."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
