"""torch.distributed.checkpoint (DCP) directories: ``.metadata`` plus the data files it names.

``.metadata`` is a pickle of dataclasses (read by the safe unpickler as stubs). Each tensor chunk or
non-tensor item is a small ``torch.save`` stream at (file, offset, length), read by the same readers
(through ``opts.read_child``). Chunks of sharded tensors are assembled into the full tensor; nested
dicts are rebuilt from the planner's key paths. Data files must resolve inside the directory.
Nothing from the directory is executed.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import OrderedDict
from contextlib import closing
from typing import Any

from ...errors import CheckpointNotFoundError, CorruptCheckpointError, LimitExceededError, RemoteAuthError, \
    RemoteNotFoundError, UnsupportedFormatError
from ...storage.remote import filesystem, is_url, join, remote_errors
from ...storage.source import Source, confined_path
from ...text import clip
from ..unpickle.meta import DTYPE_SIZES, MetaDType, MetaStorage, TensorMeta, contiguous_stride, dtype_name, meta_dtype
from ..unpickle.mode import Mode
from ..unpickle.stubs import Stub, stub_name
from .base import Checkpoint, ReadOptions, run_pickle
from .parallel import read_parts

__all__ = ["read_dcp", "is_dcp_dir", "DcpTensor"]

MAX_DIMS = 64


def is_dcp_dir(path: str, storage_options: dict[str, Any] | None = None) -> bool:
    """A directory (local, or a URL prefix) holding ``.metadata``."""
    if is_url(path):
        if "?" in path:  # a signed or query URL names one object
            return False
        try:
            fs, inner = filesystem(path, storage_options)
            with remote_errors(path, "list", storage_options):
                return bool(fs.isfile(join(inner, ".metadata")))
        except (RemoteAuthError, RemoteNotFoundError):
            return False  # opening it as a file gives the precise error (unreachable: raised once, here)
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata"))


def _attrs(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, Stub):
        raise CorruptCheckpointError(f"DCP metadata: {what} is a {type(obj).__name__}, not a record")
    return obj.stub_attributes()


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CorruptCheckpointError(f"DCP metadata: {what} is a {type(value).__name__}, not a mapping")
    return value


def _ints(value: Any, what: str) -> tuple[int, ...]:
    value = () if value is None else value
    if not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS or \
            not all(type(v) is int and 0 <= v < 1 << 62 for v in value):
        raise CorruptCheckpointError(f"DCP metadata: {what} is not a list of sizes: {value!r:.100}")
    return tuple(value)


def read_dcp(directory: str, opts: ReadOptions, lazy: bool = False) -> Checkpoint:
    """Read a DCP checkpoint directory into a (nested) state dict.

    ``lazy`` (build mode): tensors are :class:`DcpTensor` (shape and dtype, read on ``materialize()``
    or, for one rank's shard, ``read_region()``), so a caller streams them one at a time.
    """
    meta_path = join(directory, ".metadata")
    with Source(confined_path(directory, ".metadata", what="DCP metadata", checkpoint=directory), name=meta_path,
                storage_options=opts.storage_options) as src:
        metadata, _ = run_pickle(opts, src.buffer(), src, ".metadata")
    if not isinstance(metadata, Stub) or not stub_name(metadata).endswith(".Metadata"):
        raise CorruptCheckpointError(".metadata does not hold DCP Metadata", path=meta_path)
    attrs = metadata.stub_attributes()
    described = _mapping(attrs.get("state_dict_metadata"), "state_dict_metadata")
    storage = _mapping(attrs.get("storage_data"), "storage_data")
    planner = _mapping(attrs.get("planner_data"), "planner_data")
    where: dict[tuple[Any, tuple[Any, ...]], dict[str, Any]] = {}
    for index, info in storage.items():
        ia = _attrs(index, "a storage index")
        fqn = ia.get("fqn")
        if not isinstance(fqn, str):
            raise CorruptCheckpointError(f"DCP metadata: storage index names {fqn!r:.60}, not a key")
        where[(fqn, _ints(ia.get("offset"), f"offset of {clip(fqn, 100)}"))] = _attrs(info, "a storage record")
    reader = _Files(directory, opts)
    try:
        entries: list[tuple[str, Any, list[tuple[Any, Any]]]] = []  # (fqn, tensor or None, [(record, offsets)])
        for fqn, md in described.items():  # every entry and data file is checked before any data is read
            kind = stub_name(md) if isinstance(md, Stub) else type(md).__name__
            if kind.endswith("BytesStorageMetadata"):
                info = where.get((fqn, ()))
                reader.source(info, fqn)
                entries.append((fqn, None, [(info, None)]))
            elif kind.endswith("TensorStorageMetadata"):
                entries.append((fqn, *_tensor(reader, fqn, _attrs(md, fqn), where, opts)))
            else:
                raise UnsupportedFormatError(f"DCP entry {fqn!r:.100} of kind {kind:.100}")
        flat = _read_entries(reader, entries, opts, lazy)
    finally:
        reader.close()
    loaded = Checkpoint(tree=_nest(flat, planner), format="dcp", description="torch.distributed.checkpoint directory")
    loaded.evidence.append(f".metadata describing {len(described)} entries in "
                           f"{len({str(i.get('relative_path')) for i in where.values()})} data files")
    return loaded


class _Files:
    """The data files a DCP directory's metadata names, opened once each, confined to the directory."""

    def __init__(self, directory: str, opts: ReadOptions) -> None:
        self.directory, self.opts = directory, opts
        self.files: dict[str, Source] = {}
        self.counted: set[tuple[str, int, int]] = set()  # byte ranges a tensor's size was checked against

    def source(self, info: dict[str, Any] | None, fqn: str) -> tuple[Source, int, int]:
        if info is None:
            raise CorruptCheckpointError(f"DCP entry {fqn!r:.100} has no storage record")
        if info.get("transform_descriptors"):
            raise UnsupportedFormatError(f"DCP entry {fqn!r:.100} is stored with transforms "
                                         f"{info['transform_descriptors']!r:.100}")
        rel = info.get("relative_path")
        if not isinstance(rel, str):
            raise CorruptCheckpointError(f"DCP entry {fqn!r:.100} names data file {rel!r:.60}, not a path")
        if rel not in self.files:
            path = confined_path(self.directory, rel, what="DCP data file", checkpoint=self.directory)
            missing = CorruptCheckpointError(f"DCP data file {rel!r:.120} named by .metadata is missing")
            if not is_url(path) and not os.path.isfile(path):
                if os.path.exists(path):  # a directory, a FIFO, a device: never opened (a FIFO would block)
                    raise CorruptCheckpointError(f"DCP data file {rel!r:.120} named by .metadata is not a regular file")
                raise missing
            try:
                self.files[rel] = Source(path, name=join(self.directory, rel), storage_options=self.opts.storage_options)
            except CheckpointNotFoundError:
                raise missing from None
        src = self.files[rel]
        offset, length = info.get("offset"), info.get("length")
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0 \
                or offset + length > src.size:
            raise CorruptCheckpointError(f"DCP entry {fqn!r:.100}: bytes {offset!r:.30}..+{length!r:.30} outside "
                                         f"{rel} ({src.size} bytes)")
        return src, offset, length

    def item(self, info: dict[str, Any] | None, fqn: str, opts: ReadOptions | None = None) -> Any:
        """The value stored at ``info`` (a small ``torch.save`` stream), read with ``opts`` (default: the
        directory's), whose trace records the byte range."""
        opts = opts or self.opts
        src, offset, length = self.source(info, fqn)
        opts.trace.ranges.append((src.name, offset, length))
        assert opts.read_child is not None, "the opener passes the format dispatcher"
        with src.window(offset, length, name=f"{src.name}[{clip(fqn, 100)}]") as item:  # read in place: no copy of the item
            try:
                return opts.read_child(item, opts).tree
            except UnsupportedFormatError as exc:  # the file-level hint ("expected a PyTorch file") misleads here
                raise UnsupportedFormatError(
                    f"DCP entry {fqn!r:.100}: bytes {offset}..+{length} of {self.rel(info)} do not hold a torch.save "
                    f"stream ({exc.reason})", path=item.name,
                    hint="The .metadata does not match its data files (damaged, or files of different saves: copy "
                         "the whole folder again), or the folder uses a storage layout torchckpt cannot read yet "
                         "(load it with torch.distributed.checkpoint and save it again).") from None

    def rel(self, info: dict[str, Any] | None) -> str:
        """The data file of a storage record already checked by :meth:`source`."""
        assert info is not None
        return str(info["relative_path"])

    def stored(self, infos: list[dict[str, Any] | None], fqn: str) -> int:
        """Bytes of the data files that ``infos`` (the records of one tensor's chunks) name and no tensor checked
        before named: a range named twice (by two chunks, or two tensors) holds its bytes once, so it cannot
        back more than one place (4096 chunks naming one 1 MiB item declared a 4 GiB tensor)."""
        total = 0
        for info in infos:
            src, offset, length = self.source(info, fqn)
            if (src.name, offset, length) not in self.counted:
                self.counted.add((src.name, offset, length))
                total += length
        return total

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _dtype(props: Any, fqn: str) -> tuple[Any, str]:
    """The dtype recorded in ``TensorProperties`` and its name. Its state is a tuple ``(dtype, layout,
    requires_grad, memory_format, pin_memory)`` (newer torch) or a dict (older)."""
    attrs = _attrs(props, f"{clip(fqn, 100)} properties")
    state = props.__dict__.get("stub_state")
    dtype = state[0] if not attrs and isinstance(state, tuple) and state else attrs.get("dtype")
    name = dtype_name(dtype) if isinstance(dtype, MetaDType) or \
        type(dtype).__name__ == "dtype" and type(dtype).__module__ == "torch" else None
    if name not in DTYPE_SIZES:
        raise CorruptCheckpointError(f"DCP entry {fqn!r:.100} has dtype {dtype!r:.60}, not a tensor dtype")
    return dtype, name


def _tensor(reader: _Files, fqn: str, md: dict[str, Any], where: dict[tuple[Any, tuple[Any, ...]], dict[str, Any]],
            opts: ReadOptions) -> tuple[Any, list[tuple[Any, Any]]]:
    """The tensor ``fqn`` with the dtype and shape the metadata declares, not read yet (a :class:`DcpTensor`,
    or a TensorMeta for a structure-only read), and the storage records of its chunks with the chunks
    (``(offsets, sizes)``).

    The chunks must tile the tensor exactly (in bounds, pairwise disjoint, element counts adding up),
    and each chunk must have the declared dtype: nothing is cast and no element is left uninitialised.
    """
    size = _ints(md.get("size"), f"size of {clip(fqn, 100)}")
    dtype, name = _dtype(md.get("properties"), fqn)
    chunks = [_chunk(c, fqn, size) for c in md.get("chunks") or []]
    _check_tiling(fqn, size, chunks)
    infos = [where.get((fqn, offsets)) for offsets, _ in chunks]
    stored = reader.stored(infos, fqn)
    nbytes = math.prod(size) * DTYPE_SIZES[name]
    # the chunks' streams hold the data; a full tensor cannot be larger (a 64 KiB allowance per tensor with a
    # range of its own: none for one whose ranges other tensors named, or 64 KiB per entry of .metadata)
    if nbytes > stored + (1 << 16 if stored else 0):
        raise LimitExceededError(f"DCP entry {fqn!r:.100} declares {nbytes} bytes ({list(size)}) but its chunks "
                                 f"hold {stored}")
    records = list(zip(infos, chunks))
    if opts.meta:
        return TensorMeta(size, contiguous_stride(size), meta_dtype(name)), records
    return DcpTensor(reader.directory, fqn, size, dtype, chunks, where, opts), records


def _read_entries(reader: _Files, entries: list[tuple[str, Any, list[tuple[Any, Any]]]], opts: ReadOptions,
                  lazy: bool) -> "OrderedDict[str, Any]":
    """The values of the checked ``entries`` ``(fqn, tensor or None for a bytes item, [(storage record,
    chunk (offsets, sizes) or None)])``, read data file by data file (the files side by side on ``opts.workers`` threads,
    :func:`read_parts`), in the metadata's order.

    A tensor stored as one chunk is that chunk's tensor; one in several chunks is allocated once and
    each chunk is copied into its place by the thread that read it (the chunks tile it: checked).
    Lazy (build mode) and structure-only tensors read nothing, except that ``scan`` (record mode) runs
    every stream ``load`` reads.
    """
    build = [value for _, value, _ in entries if isinstance(value, DcpTensor)] if not lazy else []
    read_tensors = bool(build) or opts.mode is Mode.RECORD
    files: dict[str, list[tuple[str, Any, Any, Any]]] = {}  # data file -> (fqn, tensor, record, chunk)
    for fqn, value, records in entries:
        if value is None or read_tensors:
            for info, chunk in records:
                files.setdefault(reader.rel(info), []).append((fqn, value, info, chunk))
    flat: OrderedDict[str, Any] = OrderedDict((fqn, value) for fqn, value, _ in entries)
    whole = {t.fqn: t.allocate() for t in build}  # None: one chunk is the whole tensor

    def read_file(rel: str, part_opts: ReadOptions) -> list[tuple[str, Any]]:
        done: list[tuple[str, Any]] = []
        part_opts.budget_meter()  # made now: the options of each chunk below share it
        for fqn, tensor, info, chunk in files[rel]:
            target = whole.get(fqn) if isinstance(tensor, DcpTensor) and not lazy else None
            place = target[tuple(slice(o, o + n) for o, n in zip(*chunk))] if target is not None else None
            into = _into(place) if place is not None else None
            value = reader.item(info, fqn, part_opts if into is None else dataclasses.replace(part_opts, into=into))
            if tensor is None:
                done.append((fqn, value))
            elif isinstance(tensor, DcpTensor) and not lazy:
                part = tensor.check_chunk(value, chunk, rel)
                if place is None:
                    if chunk[1] == tuple(tensor.shape):  # the whole tensor; not an empty chunk beside it
                        done.append((fqn, part))
                else:  # chunks are disjoint: threads fill their own places
                    _fill(place, part)
            else:  # scan runs (and records) the streams load reads, and refuses the chunks load refuses
                _check_chunk(value, isinstance(value, TensorMeta), fqn, dtype_name(tensor), chunk, rel, reader.directory)
        return done

    with closing(read_parts(opts, list(files), read_file)) as results:  # closed on any error: the pool stops
        for values in results:
            flat.update(values)
    for fqn, target in whole.items():
        if target is not None:
            flat[fqn] = target
    return flat


def _into(place: Any) -> Any:
    """For ``ReadOptions.into``: the memory of ``place`` (a chunk's region of its whole tensor) for the first
    storage of exactly its size, when the region is one contiguous run; None otherwise (new memory)."""
    if not place.is_contiguous():
        return None
    nbytes = place.numel() * place.element_size()
    start = place.storage_offset() * place.element_size()
    free = [True]

    def into(size: int) -> Any:
        if size != nbytes or not free[0]:
            return None
        free[0] = False  # one storage only: a second one of the same size must not overwrite the first
        return place.untyped_storage()[start:start + nbytes]  # a view: reading into it fills the whole tensor

    return into


def _fill(place: Any, part: Any) -> None:
    """Copy the chunk ``part`` into ``place``, unless it was read there already (``ReadOptions.into``)."""
    if part.data_ptr() == place.data_ptr() and part.stride() == place.stride():
        return
    lo, size = part.untyped_storage().data_ptr(), part.untyped_storage().nbytes()
    if lo < place.data_ptr() + place.numel() * place.element_size() and place.data_ptr() < lo + size:
        part = part.clone()  # its storage was read into the place, in another layout: copy it out first
    place.copy_(part)


class DcpTensor(TensorMeta):
    """A tensor of a DCP directory, not read yet: shape and dtype, and where its chunks are."""

    __slots__ = ("directory", "fqn", "chunks", "where", "opts", "full_dtype")

    def __init__(self, directory: str, fqn: str, size: tuple[Any, ...], dtype: Any, chunks: list[tuple[tuple[Any, ...], tuple[Any, ...]]],
                 where: dict[tuple[Any, tuple[Any, ...]], dict[str, Any]], opts: ReadOptions) -> None:
        name = meta_dtype(dtype_name(dtype))
        super().__init__(size, contiguous_stride(size), name, storage=MetaStorage(name, math.prod(size) * name.itemsize))
        self.directory, self.fqn, self.chunks, self.where, self.opts = directory, fqn, chunks, where, opts
        self.full_dtype = dtype

    def materialize(self, source: Any = None, *, prefault: bool = False) -> Any:
        """The whole tensor (``source`` and ``prefault`` are unused: the chunks name their own files)."""
        return self.read_region(tuple(0 for _ in self.shape), tuple(self.shape))

    def read_region(self, offsets: tuple[Any, ...], sizes: tuple[Any, ...]) -> Any:
        """The sub-tensor ``[offsets : offsets + sizes]``, reading only the chunks that overlap it."""
        reader = _Files(self.directory, self.opts)
        try:
            return self.assemble(reader, tuple(offsets), tuple(sizes))
        finally:
            reader.close()

    def assemble(self, reader: _Files, offsets: tuple[Any, ...] | None = None, sizes: tuple[Any, ...] | None = None) -> Any:
        import torch  # lazy: only building tensors needs torch

        offsets = offsets if offsets is not None else tuple(0 for _ in self.shape)
        sizes = sizes if sizes is not None else tuple(self.shape)
        if len(offsets) != len(self.shape) or any(o < 0 or o + n > m for o, n, m in zip(offsets, sizes, self.shape)):
            raise ValueError(f"region {list(offsets)}+{list(sizes)} is outside {self.fqn} {list(self.shape)}")
        out = None
        for chunk_offsets, chunk_sizes in self.chunks:
            lo = [max(a, c) for a, c in zip(offsets, chunk_offsets)]
            hi = [min(a + n, c + m) for a, n, c, m in zip(offsets, sizes, chunk_offsets, chunk_sizes)]
            if any(h <= lo_ for lo_, h in zip(lo, hi)) and math.prod(sizes):
                continue
            if chunk_offsets == offsets and chunk_sizes == sizes:
                return self._part(reader, chunk_offsets, chunk_sizes)  # the region is exactly one chunk: no copy
            if out is None:
                out = torch.empty(sizes, dtype=self.full_dtype)
            place = out[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets))]
            if lo == list(chunk_offsets) and hi == [c + m for c, m in zip(chunk_offsets, chunk_sizes)]:
                _fill(place, self._part(reader, chunk_offsets, chunk_sizes, _into(place)))  # read into its place
            else:
                part = self._part(reader, chunk_offsets, chunk_sizes)
                place.copy_(part[tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, chunk_offsets))])
                del part
        return out if out is not None else torch.empty(sizes, dtype=self.full_dtype)

    def _part(self, reader: _Files, offsets: tuple[Any, ...], sizes: tuple[Any, ...], into: Any = None) -> Any:
        """The chunk at ``offsets``, checked; ``into``: where its storage may be read (``ReadOptions.into``)."""
        info = self.where.get((self.fqn, offsets))
        opts = None
        if into is not None:
            self.opts.budget_meter()  # made now: shared by the copy of the options
            opts = dataclasses.replace(self.opts, into=into)
        return self.check_chunk(reader.item(info, self.fqn, opts), (offsets, sizes), reader.rel(info))

    def check_chunk(self, part: Any, chunk: tuple[tuple[Any, ...], tuple[Any, ...]], rel: str) -> Any:
        """``part``, the value read for ``chunk`` ``(offsets, sizes)`` (in data file ``rel``), if it is a
        tensor of the declared dtype and the chunk's sizes."""
        import torch  # lazy: only building tensors needs torch

        _check_chunk(part, isinstance(part, torch.Tensor), self.fqn, dtype_name(self.full_dtype), chunk, rel,
                     self.directory)
        return part

    def allocate(self) -> Any:
        """The whole tensor, uninitialised, for its chunks to be copied into; None when one chunk is the
        whole tensor (then that chunk's tensor is the value: no copy)."""
        import torch  # lazy: only building tensors needs torch

        if any(o == tuple(0 for _ in self.shape) and s == tuple(self.shape) for o, s in self.chunks):
            return None
        return torch.empty(tuple(self.shape), dtype=self.full_dtype)


def _check_chunk(part: Any, is_tensor: bool, fqn: str, declared: str, chunk: tuple[tuple[Any, ...], tuple[Any, ...]],
                 rel: str, directory: str) -> None:
    """``part``, the value read for ``chunk`` ``(offsets, sizes)`` of ``fqn`` from data file ``rel`` (a tensor, or a
    TensorMeta in a structure-only read: scan refuses what load refuses), has the ``declared`` dtype and the sizes."""
    offsets, sizes = chunk
    if not is_tensor or dtype_name(part) != declared or tuple(part.shape) != tuple(sizes):
        got = f"{dtype_name(part)} {list(part.shape)}" if is_tensor else type(part).__name__
        raise CorruptCheckpointError(f"DCP chunk of {fqn!r:.100} at {list(offsets)} in {rel!r:.120} holds {got}, "
                                     f"the metadata declares {declared} {list(sizes)}", path=join(directory, rel))


def _chunk(chunk: Any, fqn: str, size: tuple[Any, ...]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    attrs = _attrs(chunk, f"{clip(fqn, 100)} chunk")
    offsets = _ints(attrs.get("offsets"), f"{clip(fqn, 100)} chunk offsets")
    sizes = _ints(attrs.get("sizes"), f"{clip(fqn, 100)} chunk sizes")
    if len(offsets) != len(size) or len(sizes) != len(size) or any(o + s > n for o, s, n in zip(offsets, sizes, size)):
        raise CorruptCheckpointError(f"DCP chunk of {fqn!r:.100} at {list(offsets)} size {list(sizes)} "
                                     f"does not fit {list(size)}")
    return offsets, sizes


def _check_tiling(fqn: str, size: tuple[Any, ...], chunks: list[tuple[tuple[Any, ...], tuple[Any, ...]]]) -> None:
    """Chunks in bounds (checked by :func:`_chunk`), pairwise disjoint, and covering every element.

    Disjointness by a sweep along the dimension with the most distinct chunk offsets: a chunk is compared
    only with the chunks whose range on that dimension it meets (one, for the row chunks of N ranks: N log N,
    not the N^2/2 pairs that took 1.1 s per tensor for 1024 ranks and 16 s for 4096). A layout that needs
    more than :data:`MAX_CHUNK_PAIRS` comparisons is refused rather than checked for minutes.
    """
    covered = sum(math.prod(s) for _, s in chunks)
    if covered != math.prod(size):
        raise CorruptCheckpointError(f"DCP chunks of {fqn!r:.100} cover {covered} of {math.prod(size)} elements")
    nonempty = [c for c in chunks if math.prod(c[1])]
    if len(nonempty) < 2 or not size:
        return
    axis = max(range(len(size)), key=lambda d: len({o[d] for o, _ in nonempty}))
    active: list[tuple[int, tuple[Any, ...], tuple[Any, ...]]] = []  # (end on axis, offsets, sizes)
    pairs = 0
    for oa, sa in sorted(nonempty, key=lambda c: c[0][axis]):
        active = [c for c in active if c[0] > oa[axis]]  # the chunks this one meets on the axis
        pairs += len(active)
        if pairs > MAX_CHUNK_PAIRS:
            raise LimitExceededError(f"DCP entry {fqn!r:.100}: its {len(nonempty)} chunks need more than "
                                     f"{MAX_CHUNK_PAIRS} comparisons to check that they do not overlap")
        for _, ob, sb in active:
            if all(a < b + m and b < a + n for a, n, b, m in zip(oa, sa, ob, sb)):
                raise CorruptCheckpointError(f"DCP chunks of {fqn!r:.100} at {list(ob)} and {list(oa)} overlap")
        active.append((oa[axis] + sa[axis], oa, sa))


MAX_CHUNK_PAIRS = 1 << 22  # ~4 s of Python; a grid of 4096 chunks (64 x 64) needs 64 x 4096


def _nest(flat: "OrderedDict[str, Any]", planner: dict[str, Any]) -> Any:
    """Rebuild the nested state from the planner's key paths, as DCP's ``unflatten_state_dict`` does.

    A string path element is a dict key and an int one a list index (DCP flattens lists that hold
    tensors or dicts, e.g. an optimizer's ``param_groups``); tuples are stored whole.
    """
    if not planner:
        return flat
    root: dict[str, Any] = {}
    lists: list[tuple[list[Any], str]] = []
    for fqn, value in flat.items():
        path = planner.get(fqn)
        if not isinstance(path, tuple) or not path or not isinstance(path[0], str) \
                or not all(isinstance(p, str) or (type(p) is int and 0 <= p < _MAX_INDEX) for p in path):
            root[fqn] = value
            continue
        node: Any = root
        for part, nxt in zip(path[:-1], path[1:]):
            node = _slot(node, part, [] if isinstance(nxt, int) else {}, fqn, lists)
        _slot(node, path[-1], value, fqn, lists, leaf=True)
    for seq, fqn in lists:
        if any(v is _HOLE for v in seq):
            raise CorruptCheckpointError(f"DCP planner data leaves a gap in the list holding {clip(fqn, 100)}")
    return root


_MAX_INDEX = 1 << 24
_HOLE = object()


def _slot(node: Any, key: Any, default: Any, fqn: str, lists: list[Any], leaf: bool = False) -> Any:
    if isinstance(node, dict) and isinstance(key, str):
        if leaf:
            node[key] = default
            return default
        current = node.setdefault(key, default)
    elif isinstance(node, list) and isinstance(key, int):
        if key >= len(node):
            if not node:
                lists.append((node, fqn))
            node.extend([_HOLE] * (key + 1 - len(node)))
        if leaf or node[key] is _HOLE:
            node[key] = default
        current = node[key]
    else:
        raise CorruptCheckpointError(f"DCP planner path of {clip(fqn, 100)} mixes list indices and keys at {key!r}")
    if not leaf and type(current) is not type(default):
        raise CorruptCheckpointError(f"DCP planner paths disagree about the container at {key!r} (in {clip(fqn, 100)})")
    return current
