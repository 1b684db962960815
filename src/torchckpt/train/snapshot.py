"""The blocking part of an async save: a copy of the state as it is when ``save()`` is called.

Only the copy runs on the caller's thread; everything else (pickling, writing, hashing, the commit,
retention) runs in the writer's thread. The copy is made storage by storage, exactly the bytes that
``torch.save`` writes: tensors that share a storage (tied weights, views) still share one in the
snapshot and in the file, as they would in a synchronous save. Each CPU storage is copied with one
``memmove`` into a buffer kept from the previous save (warm memory copies about twice as fast as fresh
allocations; fresh ones are ordinary pages, see :func:`_new_buffer`). ``memmove`` releases the GIL and does not go through torch's intra-op thread pool: waking
that pool from sleep costs tens of milliseconds on a busy machine, far more than copying a few MiB.

For an async save the writer's thread helps with the copy (:func:`start_snapshot`): the CPU storages
are copied in chunks that the caller's thread and the writer's thread take in turn, both at once (the
copy releases the GIL), and the writer starts writing when the snapshot is complete. ``save()`` returns
when the copies are done, as before, sooner when a core is free. The write does not start before: an
earlier design wrote each storage as soon as it was copied, and on a 2-core machine the write competing
for memory bandwidth made the blocking part twice as long for a few percent off the total.

CUDA tensors go to pinned buffers with asynchronous copies; one event per device tells the writer when
they have landed. Other devices and tensor kinds (quantized, sparse, conjugate views) are copied by torch.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

__all__ = ["cpu_snapshot", "start_snapshot", "Copies", "SnapshotInterrupted"]

_memmove = ctypes.memmove  # a foreign call: the GIL is released while it copies
_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})


def _new_buffer(nbytes: int) -> Any:
    """A CPU storage of ``nbytes`` in ordinary pages.

    Not ``madvise(MADV_HUGEPAGE)``: with the kernel's default THP defrag setting (``madvise``) such a
    region is filled by synchronous memory compaction, and on a machine whose memory is full of page
    cache (a training machine that has been writing checkpoints) that made the first async snapshot
    5-6x slower: 512 MiB in 4 MiB buffers took 7.6-9.2 s instead of 1.3-1.6 s (bench/bench_save.py, issue 27).
    """
    import torch

    return torch.UntypedStorage(nbytes)


class SnapshotInterrupted(Exception):
    """The caller's copy of an async snapshot was interrupted (e.g. Ctrl-C in ``save()``): nothing is written."""


class Copies:
    """The CPU storage copies of a snapshot, in chunks: made by :meth:`run` on the caller's thread and by
    the writer's thread while it waits for them (:meth:`wait`), both at once."""

    CHUNK = 4 << 20

    def __init__(self, jobs: list[tuple[int, int, int]]) -> None:
        self._jobs = jobs  # (destination, source, nbytes)
        self._chunks = [(i, dst + at, src + at, min(self.CHUNK, nbytes - at))
                        for i, (dst, src, nbytes) in enumerate(jobs) for at in range(0, nbytes, self.CHUNK)]
        self._left = [0] * len(jobs)  # chunks of each job not yet copied
        for i, *_ in self._chunks:
            self._left[i] += 1
        self._taken = 0  # chunks handed out
        self._done = 0  # jobs complete, counted from the first
        self._aborted = False
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return len(self._jobs)

    def _copy_one(self) -> bool:
        """Copy the next chunk nobody took (call with the lock held; released while copying)."""
        if self._taken >= len(self._chunks) or self._aborted:
            return False
        job, dst, src, nbytes = self._chunks[self._taken]
        self._taken += 1
        self._cond.release()
        try:
            _memmove(dst, src, nbytes)  # releases the GIL: both threads copy at once
        finally:
            self._cond.acquire()
        self._left[job] -= 1
        while self._done < len(self._jobs) and not self._left[self._done]:
            self._done += 1
        self._cond.notify_all()
        return True

    def run(self) -> None:
        """Copy every storage (caller's thread); returns when the snapshot is complete. Interrupted, the
        writer is told to give up, and the interruption is re-raised."""
        try:
            with self._cond:
                while self._copy_one():
                    pass
                while self._done < len(self._jobs):  # a chunk the writer took is still being copied
                    self._cond.wait()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """The snapshot will not be completed: writers waiting for it give up (:class:`SnapshotInterrupted`)."""
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def wait(self, count: int | None = None) -> bool:
        """Until the first ``count`` copies (all by default) are done, copying chunks meanwhile; False when
        the copying was interrupted."""
        count = len(self._jobs) if count is None else min(count, len(self._jobs))
        with self._cond:
            while self._done < count and not self._aborted:
                if not self._copy_one():
                    self._cond.wait()
            return not self._aborted

    def wait_all(self) -> None:
        if not self.wait():
            raise SnapshotInterrupted("the snapshot was interrupted before it was complete")


def cpu_snapshot(obj: Any, buffers: dict[str, Any], ready: list[Any] | None = None) -> Any:
    """Deep copy of ``obj`` with every tensor's data copied to CPU memory (see :func:`start_snapshot`)."""
    out, copies = start_snapshot(obj, buffers, ready)
    copies.run()
    return out


def start_snapshot(obj: Any, buffers: dict[str, Any], ready: list[Any] | None = None) -> tuple[Any, Copies]:
    """Deep copy of ``obj`` with every tensor's data copied to CPU memory (the blocking part of an async save).

    Containers (dict, OrderedDict, list, tuple) are rebuilt, other values are kept as they are.
    Storages are copied into ``buffers`` (keyed by the place in ``obj`` of the first tensor that uses
    them) when a buffer of the right size exists, and new buffers are put there. The caller guarantees
    that no write is still reading the buffers.

    For CUDA tensors one event per device is appended to ``ready`` (the writer waits for it; later work
    on the same stream is ordered after the copies); without ``ready`` the copies are waited for here.
    The CPU storages are not copied yet: ``Copies.run()`` copies them (the snapshot is complete when it
    returns), in the order in which they first appear in ``obj``.
    """
    import torch  # lazy: torchckpt does not import torch until tensors are involved

    memo: dict[int, Any] = {}  # id(tensor) -> its copy
    storages: dict[tuple[int, int], Any] = {}  # (data_ptr, size) of a source CPU storage -> its buffer
    devices: set[Any] = set()
    jobs: list[tuple[int, int, int]] = []

    def tensor(src: Any, where: str) -> Any:
        if src.device.type == "cpu" and type(src) is torch.Tensor and src.layout == torch.strided \
                and not (src.is_quantized or src.is_conj() or src.is_neg()):
            storage = src.untyped_storage()
            nbytes, ptr = storage.nbytes(), storage.data_ptr()
            if nbytes == 0:
                return torch.empty_strided(src.size(), src.stride(), dtype=src.dtype)
            buf = storages.get((ptr, nbytes))
            if buf is None:
                buf = buffers.get(where)
                if not isinstance(buf, torch.UntypedStorage) or buf.nbytes() != nbytes:
                    buf = buffers[where] = _new_buffer(nbytes)
                jobs.append((buf.data_ptr(), ptr, nbytes))
                storages[ptr, nbytes] = buf
            return torch.empty(0, dtype=src.dtype).set_(buf, src.storage_offset(), src.size(), src.stride())
        buf = buffers.get(where)
        if src.is_cuda:
            devices.add(src.device)
        if isinstance(buf, torch.Tensor) and buf.shape == src.shape and buf.dtype == src.dtype \
                and src.is_contiguous() and (buf.is_pinned() or not src.is_cuda):
            return buf.copy_(src, non_blocking=src.is_cuda)
        if src.is_cuda:
            buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            buffers[where] = buf.copy_(src, non_blocking=True)
            return buf
        buffers[where] = copied = src.to("cpu", copy=True)
        return copied

    def copy(value: Any, where: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = id(value)
            if key not in memo:
                memo[key] = tensor(value.detach(), where)
            return memo[key]
        # plain values are kept without building their place's name (the RNG state holds 625 ints)
        if isinstance(value, dict):
            items = ((k, v if type(v) in _PLAIN else copy(v, f"{where}.{k}")) for k, v in value.items())
            return {k: v for k, v in items} if type(value) is dict else type(value)(items)
        if isinstance(value, list):
            return [v if type(v) in _PLAIN else copy(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, tuple):
            if _PLAIN.issuperset(map(type, value)):  # immutable all the way down: nothing to copy
                return value
            return tuple(v if type(v) in _PLAIN else copy(v, f"{where}[{i}]") for i, v in enumerate(value))
        return value

    out = copy(obj, "")
    for device in devices:
        event = torch.cuda.current_stream(device).record_event()
        if ready is None:
            event.synchronize()
        else:
            ready.append(event)
    return out, Copies(jobs)
