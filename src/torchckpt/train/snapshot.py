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

The first async save of a Checkpointer has no buffers yet: every one would be fresh memory, which costs a
page fault per 4 KiB page when first written (on a VM that gives freed memory back to its host, a host
fault: 6-13 us each), and the first async save took 1.4-2.7x a synchronous save, its blocking part 0.3x
(512 MiB). Such a snapshot (:attr:`Copies.write_through`: CPU tensors only, no kept buffer fits) is not
copied: the Checkpointer writes the file on the caller's thread, as a synchronous save does, and the page
cache holds the state of the moment; only the durable part (fsync, rename, sidecar) runs in the writer's
thread. The walk still lays out the buffers (allocated, not touched), and :class:`~.warming.Warming` maps their pages
in a thread of its own while the writer makes the file durable (fsync waits for the disk, a core is free),
so the next save copies into warm memory; a save, ``close()`` or the exit cancels it, nobody waits for it.
Measured at 512 MiB (bench_save, this 2-core VM): the first save + wait 0.97x of ``torch.save`` + fsync,
blocking 0.57x of a sync save; a second save right after ``wait()`` blocks 0.12x (warming after the
durable part instead, in the writer's thread, left it 0.31x: the warming had not started).

CUDA tensors go to pinned buffers with asynchronous copies; one event per device tells the writer when
they have landed. Other devices and tensor kinds (quantized, sparse, conjugate views) are copied by torch.
"""

from __future__ import annotations

import copy as _copy
import copyreg
import ctypes
import threading
from typing import Any, Callable

from ..storage import interrupts

__all__ = ["cpu_snapshot", "start_snapshot", "Copies", "SnapshotInterrupted"]

_memmove = ctypes.memmove  # a foreign call: the GIL is released while it copies
_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})
_ATOMIC = frozenset({complex, range, type})  # immutable: kept as they are, like _PLAIN (a frozenset may hold
# objects of the caller's classes: deep-copied)


def _new_buffer(nbytes: int) -> Any:
    """A CPU storage of ``nbytes`` in ordinary pages.

    Not ``madvise(MADV_HUGEPAGE)``: with the kernel's default THP defrag setting (``madvise``) such a
    region is filled by synchronous memory compaction, and on a machine whose memory is full of page
    cache (a training machine that has been writing checkpoints) that made the first async snapshot
    5-6x slower: 512 MiB in 4 MiB buffers took 7.6-9.2 s instead of 1.3-1.6 s (bench/bench_save.py, issue 27).
    """
    import torch

    return torch.UntypedStorage(nbytes)


_NEWOBJ = (getattr(copyreg, "__newobj__"), getattr(copyreg, "__newobj_ex__"))  # pickle's "new instance, then state"
_PROTOCOL = 2  # torch.save's pickle protocol (torch.serialization.DEFAULT_PROTOCOL)


def _reduce(value: Any) -> Any:
    """What pickle calls to save ``value`` (copyreg's table first, then ``__reduce_ex__``)."""
    registered = copyreg.dispatch_table.get(type(value))
    return registered(value) if registered is not None else value.__reduce_ex__(_PROTOCOL)


def _new(func: Any, args: Any) -> Any:
    """``cls.__new__`` as a ``__newobj__`` / ``__newobj_ex__`` reduce value names it (what pickle.load calls)."""
    if func is _NEWOBJ[0]:
        return args[0].__new__(args[0], *args[1:])
    cls, more, kwargs = args
    return cls.__new__(cls, *more, **kwargs)


def _build(made: Any, state: Any, listed: Any, pairs: Any) -> None:
    """Give ``made`` its state and items as ``pickle.load`` does (BUILD, APPENDS, SETITEMS) for a class with no
    ``__setstate__`` (one with it, or with a state setter, is kept as its reduce value: see :func:`_rebuilds`)."""
    if state is not None:
        slots = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
        if state:
            made.__dict__.update(state)
        for name, item in (slots or {}).items():
            setattr(made, name, item)
    for item in listed or ():
        made.append(item)
    for key, item in pairs or ():
        made[key] = item


def _rebuilds(value: Any, args: Any, setter: Any) -> bool:
    """Whether an object pickled as ``__newobj__`` is rebuilt (a new instance holding the copied state): only when
    no code of its class would run (no ``__setstate__``, no state setter; pickle itself never calls them when it
    saves) and ``__newobj__`` names its own class (else pickle refuses it, and so must the async save)."""
    return setter is None and getattr(type(value), "__setstate__", None) is None and isinstance(args, tuple) \
        and bool(args) and args[0] is value.__class__


class _Reduced:
    """An object of the caller's class as pickle took it at ``save()`` time: its reduce value, with arguments
    and state copied like the rest of the snapshot. The writer's pickler writes exactly that value."""

    __slots__ = ("size", "reduced", "cls")

    def __init__(self, size: int, cls: Any = None) -> None:
        self.size = size
        self.reduced: tuple[Any, ...] = ()
        self.cls = cls  # for a __newobj__ value: the original's class

    @property  # type: ignore[misc]
    def __class__(self) -> Any:  # pickle writes a __newobj__ value only for an object of its class
        return self.cls if self.cls is not None else _Reduced

    def __reduce_ex__(self, protocol: Any) -> Any:
        func, args, state, items, pairs, setter = self.reduced
        # list and dict items are iterators in a reduce value: fresh ones on every call
        full = (func, args, state, None if items is None else iter(items), None if pairs is None else iter(pairs), setter)
        return full[:self.size]

    def __repr__(self) -> str:
        return f"<snapshot of a {getattr(self.reduced[0], '__qualname__', 'reduced')} object>"


class SnapshotInterrupted(Exception):
    """The caller's copy of an async snapshot was interrupted (e.g. Ctrl-C in ``save()``): nothing is written."""


class Copies:
    """The CPU storage copies of a snapshot, in chunks: made by :meth:`run` on the caller's thread and by
    the writer's thread while it waits for them (:meth:`wait`), both at once."""

    CHUNK = 4 << 20

    def __init__(self, jobs: list[tuple[int, int, int]]) -> None:
        self._jobs = jobs  # (destination, source, nbytes)
        # chunks of at most CHUNK bytes: a large storage in several, consecutive small ones together (one
        # lock round trip per chunk, not per storage: a state of 100k tiny tensors would pay it 100k times)
        self._chunks: list[list[tuple[int, int, int, int]]] = []  # [(job, destination, source, nbytes)]
        self._left = [0] * len(jobs)  # chunks holding a piece of each job not yet copied
        filled = self.CHUNK
        for i, (dst, src, nbytes) in enumerate(jobs):
            for at in range(0, nbytes, self.CHUNK):
                piece = min(self.CHUNK, nbytes - at)
                if filled + piece > self.CHUNK:
                    self._chunks.append([])
                    filled = 0
                self._chunks[-1].append((i, dst + at, src + at, piece))
                filled += piece
                self._left[i] += 1
        self._taken = 0  # chunks handed out
        self._done = 0  # jobs complete, counted from the first
        self._aborted = False
        self._cond = threading.Condition()
        # what start_snapshot found: the buffers it made (not yet touched: see write_through), how many kept
        # ones it reused, whether a tensor lives on a device
        self.fresh: list[Any] = []
        self.reused = 0
        self.elsewhere = False

    @property
    def write_through(self) -> bool:
        """Whether the file itself can serve as this snapshot: every tensor is in CPU memory and none of the
        kept buffers fitted (a Checkpointer's first async save). Then the save writes the file on the
        caller's thread (into the page cache) and copies nothing: the buffers stay untouched until
        :class:`~.warming.Warming` maps them, off the caller's thread, for the next save."""
        return bool(self.fresh) and not self.reused and not self.elsewhere

    def __len__(self) -> int:
        return len(self._jobs)

    def _copy_one(self) -> bool:
        """Copy the next chunk nobody took (call with the lock held; released while copying)."""
        if self._taken >= len(self._chunks) or self._aborted:
            return False
        chunk = self._chunks[self._taken]
        self._taken += 1
        self._cond.release()
        try:
            for _, dst, src, nbytes in chunk:
                _memmove(dst, src, nbytes)  # releases the GIL: both threads copy at once
        finally:
            self._cond.acquire()
        for job, *_ in chunk:
            self._left[job] -= 1
        while self._done < len(self._jobs) and not self._left[self._done]:
            self._done += 1
        self._cond.notify_all()
        return True

    def run(self) -> None:
        """Copy every storage (caller's thread); returns when the snapshot is complete. Interrupted, the
        writer is told to give up, and the interruption is re-raised.

        Ctrl-C stops the copy between two chunks (:mod:`~torchckpt.storage.interrupts`), never while this
        thread releases or takes the lock or waits on the condition (where CPython can leave it unowned)."""
        with interrupts.deferred() as section:
            try:
                with self._cond:
                    while self._copy_one():
                        section.poll()
                    while self._done < len(self._jobs):  # a chunk the writer took is still being copied
                        section.poll()
                        self._cond.wait(interrupts.SLICE if section.active else None)
            except BaseException:
                self.abort()
                raise

    def abort(self) -> bool:
        """The snapshot will not be completed: writers waiting for it give up (:class:`SnapshotInterrupted`).
        False when it was already complete (then a writer may be writing it, and it stays valid)."""
        with interrupts.deferred(), self._cond:
            if self._done >= len(self._jobs):
                return False
            self._aborted = True
            self._cond.notify_all()
            return True

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

    Containers (dicts, lists, tuples and their subclasses: OrderedDict, defaultdict, namedtuple) are
    rebuilt, shared ones stay shared; numpy arrays, sets and bytearrays are copied. An object of another
    class (an argparse.Namespace, a dataclass, a config object) is taken as pickle takes it, here on the
    caller's thread, so that a change made after ``save()`` returns never reaches the file: its
    ``__reduce_ex__`` is called now and, when that names the class's plain constructor (``__newobj__``:
    most classes) and no code of the class would run, a new instance gets a copy of its state (sharing the
    tensors and containers copied before it), as ``pickle.load`` would build it; otherwise (a
    ``__setstate__``, a ``__new__`` that needs arguments, another reconstructor) its reduce value is kept,
    with arguments and state copied, and the writer pickles exactly that (no reconstructor, ``__new__`` or
    ``__setstate__`` of the class runs: a sync save runs none either). An object that pickle could not
    take is kept as it is: the writer's pickling raises the error, as a synchronous save would.
    Storages are copied into ``buffers`` (keyed by the place in ``obj`` of the first tensor that uses
    them) when a buffer of the right size exists, and new buffers are put there. The caller guarantees
    that no write is still reading the buffers.

    For CUDA tensors one event per device is appended to ``ready`` (the writer waits for it; later work
    on the same stream is ordered after the copies); without ``ready`` the copies are waited for here.
    The CPU storages are not copied yet: ``Copies.run()`` copies them (the snapshot is complete when it
    returns), in the order in which they first appear in ``obj``.
    """
    import torch  # lazy: torchckpt does not import torch until tensors are involved

    # id(tensor, container or other value) -> its copy; also copy.deepcopy's memo, so that an object deep-copied
    # below shares the tensors and containers copied before it (and they share what it copied)
    memo: dict[int, Any] = {}
    alive: list[Any] = []  # values made during the walk whose ids are memo keys (see the reduce branch)
    storages: dict[tuple[int, int], Any] = {}  # (data_ptr, size) of a source CPU storage -> its buffer
    devices: set[Any] = set()
    jobs: list[tuple[int, int, int]] = []

    claimed: set[int] = set()  # ids of the buffers this snapshot copies into
    fresh: list[Any] = []  # CPU storage buffers made for this snapshot (none of the kept ones fitted)
    reused = 0  # kept buffers this snapshot copies into
    elsewhere = False  # a tensor on a device (CUDA ...): copied to CPU by torch

    def reuse(where: str, fits: Callable[[Any], bool]) -> tuple[str, Any]:
        """The buffer kept under ``where`` (or a free variant of the name) if it fits and this snapshot has not
        used it yet: two places can spell one name ({"a.b": x} and {"a": {"b": y}}; {0: x} and {"0": y})."""
        name, n = where, 0
        while True:
            buf = buffers.get(name)
            if buf is None or (id(buf) not in claimed and fits(buf)):
                break
            if id(buf) not in claimed:  # the wrong size: replaced below
                buf = None
                break
            n += 1
            name = f"{where}#{n}"
        if buf is not None:
            claimed.add(id(buf))
        return name, buf

    def keep(name: str, buf: Any) -> Any:
        buffers[name] = buf
        claimed.add(id(buf))
        return buf

    def tensor(src: Any, where: str) -> Any:
        nonlocal reused, elsewhere
        if src.device.type == "cpu" and type(src) is torch.Tensor and src.layout == torch.strided \
                and not (src.is_quantized or src.is_conj() or src.is_neg()):
            storage = src.untyped_storage()
            nbytes, ptr = storage.nbytes(), storage.data_ptr()
            if nbytes == 0:
                return torch.empty_strided(src.size(), src.stride(), dtype=src.dtype)
            buf = storages.get((ptr, nbytes))
            if buf is None:
                buf = buffers.get(where)
                if isinstance(buf, torch.UntypedStorage) and buf.nbytes() == nbytes and id(buf) not in claimed:
                    claimed.add(id(buf))  # the common case, without building a test (100k tiny tensors)
                    reused += 1
                else:
                    name, buf = reuse(where, lambda b: isinstance(b, torch.UntypedStorage) and b.nbytes() == nbytes)
                    if buf is None:
                        buf = keep(name, _new_buffer(nbytes))
                        fresh.append(buf)
                    else:
                        reused += 1
                jobs.append((buf.data_ptr(), ptr, nbytes))
                storages[ptr, nbytes] = buf
            return torch.empty(0, dtype=src.dtype).set_(buf, src.storage_offset(), src.size(), src.stride())
        if src.device.type == "meta":  # no data to copy (and .to("cpu") cannot): its shape, as torch.save keeps it
            return torch.empty_strided(src.size(), src.stride(), dtype=src.dtype, device="meta")
        if src.is_cuda:
            devices.add(src.device)
        elsewhere = elsewhere or src.device.type != "cpu"
        name, buf = reuse(where, lambda b: isinstance(b, torch.Tensor) and b.shape == src.shape and b.dtype == src.dtype
                          and src.is_contiguous() and (b.is_pinned() or not src.is_cuda))
        if buf is not None:
            reused += 1
            return buf.copy_(src, non_blocking=src.is_cuda)
        if src.is_cuda:
            buf = keep(name, torch.empty(src.shape, dtype=src.dtype, pin_memory=True))
            return buf.copy_(src, non_blocking=True)
        return keep(name, src.to("cpu", copy=True))

    def copy(value: Any, where: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = id(value)
            if key not in memo:
                copied = tensor(value.detach(), where)
                if type(value) is torch.nn.Parameter:  # a module's own parameters (a module in ``extra``)
                    copied = torch.nn.Parameter(copied, requires_grad=value.requires_grad)
                memo[key] = copied
            return memo[key]
        if id(value) in memo:  # shared (or cyclic) containers stay shared, as pickle keeps them
            return memo[id(value)]
        # plain values are kept without building their place's name (the RNG state holds 625 ints)
        if isinstance(value, dict):
            out: Any = {} if type(value) is dict else _copy.copy(value)  # keeps an OrderedDict's order, a defaultdict's factory
            if type(value) is not dict and not all(type(k) in _PLAIN for k in value):
                out.clear()  # refilled in order below, with copied keys
            memo[id(value)] = out
            for i, (k, v) in enumerate(value.items()):
                if type(k) in _PLAIN:
                    out[k] = v if type(v) in _PLAIN else copy(v, f"{where}.{k}")
                else:  # a tensor or an object as a key (an optimizer's state): copied, shared with its other places
                    name = f"{where}.<{i}>"  # as pickle keeps it (str() of a tensor would format its values)
                    out[copy(k, f"{name}.key")] = v if type(v) in _PLAIN else copy(v, name)
            return out
        if isinstance(value, list):
            out = [] if type(value) is list else _copy.copy(value)
            memo[id(value)] = out
            out[:] = [v if type(v) in _PLAIN else copy(v, f"{where}[{i}]") for i, v in enumerate(value)]
            return out
        make: Any = getattr(type(value), "_make", None) if isinstance(value, tuple) else None  # a namedtuple's
        if isinstance(value, tuple) and (_PLAIN.issuperset(map(type, value)) or type(value) is tuple or make):
            if _PLAIN.issuperset(map(type, value)):  # immutable all the way down: nothing to copy
                return value
            items = [v if type(v) in _PLAIN else copy(v, f"{where}[{i}]") for i, v in enumerate(value)]
            built = make(items) if make is not None else tuple(items)
            memo[id(value)] = built
            return built
        # (another tuple subclass, whose __new__ may take the elements as arguments, is taken as pickle takes it)
        # mutable data (a numpy array, a set, a bytearray, an object of the caller's class) may change after
        # save() returns: copied now, as pickle would have seen it now
        if type(value) in _PLAIN or type(value) in _ATOMIC or isinstance(value, type):
            return value
        made: Any
        if type(value) is bytearray or type(value) is set and _PLAIN.issuperset(map(type, value)):
            made = type(value)(value)  # (a set of objects of the caller's classes is taken as pickle takes it)
        elif type(value).__name__ == "ndarray" and type(value).__module__ == "numpy":
            made = value.copy()
        elif isinstance(value, (torch.UntypedStorage, torch.TypedStorage)):
            return value  # pickled by torch as a storage record (rare outside tensors): kept as it is
        else:
            try:
                reduced = _reduce(value)
            except Exception:  # noqa: BLE001 - pickle cannot take it either: the writer raises that error
                return value
            if isinstance(reduced, str) or not isinstance(reduced, tuple) or not 2 <= len(reduced) <= 6:
                return value  # pickled by its global name (a function, a singleton) or refused later by pickle
            func, args, state, listed, pairs, setter = (*reduced, None, None, None, None)[:6]
            listed = None if listed is None else list(listed)
            pairs = None if pairs is None else list(pairs)
            # the memo is keyed by id(): what __reduce_ex__ made (its tuples, a __getstate__ dict, items) must
            # outlive the snapshot, or a later temporary could reuse an id and be taken for it
            alive.append((reduced, listed, pairs))
            try:
                # a plain class is rebuilt as pickle.load would (cls.__new__, then the state); otherwise the writer
                # pickles this reduce value, and its reconstructor is never called
                rebuild = func in _NEWOBJ and _rebuilds(value, args, setter)
                if not rebuild:
                    made = memo[id(value)] = _Reduced(len(reduced), value.__class__ if func in _NEWOBJ else None)
                args = copy(args, f"{where}.args")
                if rebuild:  # before its state (cycles)
                    try:
                        made = memo[id(value)] = _new(func, args)
                    except Exception:  # noqa: BLE001 - a __new__ needing arguments pickle does not give: kept as reduced
                        made = memo[id(value)] = _Reduced(len(reduced), value.__class__)
                state = copy(state, f"{where}.state")
                listed = None if listed is None else [copy(v, f"{where}[{i}]") for i, v in enumerate(listed)]
                pairs = None if pairs is None else [(k, copy(v, f"{where}.{k}")) for k, v in pairs]
                if isinstance(made, _Reduced):
                    made.reduced = (func, args, state, listed, pairs, setter)
                else:
                    _build(made, state, listed, pairs)
            except Exception:  # noqa: BLE001 - pickled as it is, later (an error then is the save's error)
                memo[id(value)] = value
                return value
        memo[id(value)] = made
        return made

    out = copy(obj, "")
    for device in devices:
        event = torch.cuda.current_stream(device).record_event()
        if ready is None:
            event.synchronize()
        else:
            ready.append(event)
    copies = Copies(jobs)
    copies.fresh, copies.reused, copies.elsewhere = fresh, reused, elsewhere
    return out, copies
