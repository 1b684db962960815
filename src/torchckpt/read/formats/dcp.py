"""torch.distributed.checkpoint (DCP) directories: ``.metadata`` plus ``*.distcp`` data files.

``.metadata`` is a pickle of dataclasses (read by the safe unpickler as stubs). Each tensor chunk or
non-tensor item is a small ``torch.save`` stream at (file, offset, length), read by the same readers.
Chunks of sharded tensors are assembled into the full tensor; nested dicts are rebuilt from the
planner's key paths. Nothing from the directory is executed.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

from ...errors import CorruptCheckpointError, UnsupportedFormatError
from ...storage.source import Source
from ..unpickle.machine import Unpickler
from ..unpickle.meta import MetaStorage, TensorMeta, meta_dtype
from ..unpickle.stubs import Stub, stub_name
from .base import Loaded, ReadOptions

__all__ = ["read_dcp", "is_dcp_dir"]


def is_dcp_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata"))


def _attrs(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, Stub):
        raise CorruptCheckpointError(f"DCP metadata: {what} is a {type(obj).__name__}, not a record")
    return obj.stub_attributes()


def read_dcp(directory: str, opts: ReadOptions, lazy: bool = False) -> Loaded:
    """Read a DCP checkpoint directory into a (nested) state dict.

    ``lazy``: tensors are :class:`DcpTensor` (shape and dtype, read on ``materialize()`` or, for one
    rank's shard, ``read_region()``), so a caller streams them one at a time.
    """
    meta_path = os.path.join(directory, ".metadata")
    with Source(meta_path) as src:
        u = Unpickler(src.buffer(), policy=opts.policy, member=".metadata", meta=opts.meta)
        metadata = u.load()
    if not isinstance(metadata, Stub) or not stub_name(metadata).endswith(".Metadata"):
        raise CorruptCheckpointError(".metadata does not hold DCP Metadata", path=meta_path)
    attrs = metadata.stub_attributes()
    described = attrs.get("state_dict_metadata") or {}
    storage = attrs.get("storage_data") or {}
    planner = attrs.get("planner_data") or {}
    where: dict[tuple[str, tuple], dict[str, Any]] = {}
    for index, info in storage.items():
        ia = _attrs(index, "a storage index")
        where[(ia.get("fqn"), tuple(ia.get("offset") or ()))] = _attrs(info, "a storage record")
    flat: OrderedDict[str, Any] = OrderedDict()
    files: dict[str, Source] = {}
    try:
        for fqn, md in described.items():
            kind = stub_name(md) if isinstance(md, Stub) else type(md).__name__
            if kind.endswith("BytesStorageMetadata"):
                flat[fqn] = _item(directory, files, where.get((fqn, ())), opts, fqn)
            elif kind.endswith("TensorStorageMetadata"):
                flat[fqn] = _tensor(directory, files, fqn, _attrs(md, fqn), where, opts, lazy)
            else:
                raise UnsupportedFormatError(f"DCP entry {fqn} of kind {kind}")
    finally:
        for f in files.values():
            f.close()
    loaded = Loaded(obj=_nest(flat, planner), kind="dcp", description="torch.distributed.checkpoint directory")
    loaded.evidence.append(f".metadata describing {len(described)} entries in "
                           f"{len({i.get('relative_path') for i in where.values()})} data files")
    loaded.globals.extend(u.globals)
    return loaded


def _source(directory: str, files: dict[str, Source], info: dict[str, Any] | None, fqn: str) -> tuple[Source, int, int]:
    if info is None:
        raise CorruptCheckpointError(f"DCP entry {fqn} has no storage record")
    if info.get("transform_descriptors"):
        raise UnsupportedFormatError(f"DCP entry {fqn} is stored with transforms {info['transform_descriptors']}")
    rel = info.get("relative_path")
    if not isinstance(rel, str) or os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
        raise CorruptCheckpointError(f"DCP entry {fqn} points outside its directory: {rel!r}")
    if rel not in files:
        files[rel] = Source(os.path.join(directory, rel))
    src = files[rel]
    offset, length = info.get("offset"), info.get("length")
    if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0 \
            or offset + length > src.size:
        raise CorruptCheckpointError(f"DCP entry {fqn}: bytes {offset}..{offset}+{length} outside {rel} "
                                     f"({src.size} bytes)")
    return src, offset, length


def _item(directory: str, files: dict[str, Source], info: dict[str, Any] | None, opts: ReadOptions, fqn: str) -> Any:
    from . import read

    src, offset, length = _source(directory, files, info, fqn)
    with Source(src.read_at(offset, length), name=f"{src.name}[{fqn}]") as item:
        return read(item, ReadOptions(relocator=opts.relocator, policy=opts.policy, meta=opts.meta)).obj


def _tensor(directory: str, files: dict[str, Source], fqn: str, md: dict[str, Any],
            where: dict[tuple[str, tuple], dict[str, Any]], opts: ReadOptions, lazy: bool = False) -> Any:
    """The full tensor ``fqn`` with the dtype and shape the metadata declares (or a lazy :class:`DcpTensor`).

    The chunks must tile the tensor exactly (in bounds, pairwise disjoint, element counts adding up),
    and each chunk must have the declared dtype: nothing is cast and no element is left uninitialised.
    """
    size = md.get("size")
    if not isinstance(size, (tuple, list)) or not all(isinstance(n, int) and n >= 0 for n in size):
        raise CorruptCheckpointError(f"DCP entry {fqn} has an invalid size {size!r}")
    size = tuple(size)
    dtype = _dtype(md.get("properties"), fqn, opts.meta)
    chunks = [_chunk(c, fqn, size) for c in md.get("chunks") or []]
    _check_tiling(fqn, size, chunks)
    if opts.meta:
        stride = tuple(int(_prod(size[i + 1:])) for i in range(len(size)))
        return TensorMeta(size, stride, dtype)
    lazy_tensor = DcpTensor(directory, fqn, size, dtype, chunks, where, opts)
    return lazy_tensor if lazy else lazy_tensor.assemble(files)


class DcpTensor(TensorMeta):
    """A tensor of a DCP directory, not read yet: shape and dtype, and where its chunks are."""

    __slots__ = ("directory", "fqn", "chunks", "where", "opts", "full_dtype")

    def __init__(self, directory: str, fqn: str, size: tuple, dtype: Any, chunks: list[tuple[tuple, tuple]],
                 where: dict[tuple[str, tuple], dict[str, Any]], opts: ReadOptions) -> None:
        name = meta_dtype(str(dtype).replace("torch.", ""))
        stride = tuple(int(_prod(size[i + 1:])) for i in range(len(size)))
        super().__init__(size, stride, name, storage=MetaStorage(name, _prod(size) * name.itemsize))
        self.directory, self.fqn, self.chunks, self.where, self.opts = directory, fqn, chunks, where, opts
        self.full_dtype = dtype

    def materialize(self, source: Any = None) -> Any:
        """The whole tensor (``source`` is unused: the chunks name their own files)."""
        return self.read_region(tuple(0 for _ in self.shape), tuple(self.shape))

    def read_region(self, offsets: tuple, sizes: tuple) -> Any:
        """The sub-tensor ``[offsets : offsets + sizes]``, reading only the chunks that overlap it."""
        files: dict[str, Source] = {}
        try:
            return self.assemble(files, tuple(offsets), tuple(sizes))
        finally:
            for f in files.values():
                f.close()

    def assemble(self, files: dict[str, Source], offsets: tuple | None = None, sizes: tuple | None = None) -> Any:
        import torch

        offsets = offsets if offsets is not None else tuple(0 for _ in self.shape)
        sizes = sizes if sizes is not None else tuple(self.shape)
        if len(offsets) != len(self.shape) or any(o < 0 or o + n > m for o, n, m in zip(offsets, sizes, self.shape)):
            raise ValueError(f"region {list(offsets)}+{list(sizes)} is outside {self.fqn} {list(self.shape)}")
        out = None
        for chunk_offsets, chunk_sizes in self.chunks:
            lo = [max(a, c) for a, c in zip(offsets, chunk_offsets)]
            hi = [min(a + n, c + m) for a, n, c, m in zip(offsets, sizes, chunk_offsets, chunk_sizes)]
            if any(h <= lo_ for lo_, h in zip(lo, hi)) and _prod(sizes):
                continue
            part = _part(self.directory, files, self.fqn, (chunk_offsets, chunk_sizes), self.full_dtype, self.where,
                         self.opts)
            if chunk_offsets == offsets and chunk_sizes == sizes:
                return part  # the region is exactly one chunk: no copy
            if out is None:
                out = torch.empty(sizes, dtype=self.full_dtype)
            out[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets))] = \
                part[tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, chunk_offsets))]
            del part
        return out if out is not None else torch.empty(sizes, dtype=self.full_dtype)


def _dtype(properties: Any, fqn: str, meta: bool) -> Any:
    """The dtype recorded in ``TensorProperties`` (a tuple state since torch 2.3, a dict before)."""
    state = properties.__dict__.get("stub_state") if isinstance(properties, Stub) else None
    dtype = state[0] if isinstance(state, tuple) and state else _attrs(properties, f"{fqn} properties").get("dtype")
    if meta:
        from ..unpickle.meta import MetaDType

        ok = isinstance(dtype, MetaDType)
    else:
        import torch

        ok = isinstance(dtype, torch.dtype)
    if not ok:
        raise CorruptCheckpointError(f"DCP entry {fqn} declares no valid dtype ({dtype!r})")
    return dtype


def _chunk(chunk: Any, fqn: str, size: tuple) -> tuple[tuple, tuple]:
    attrs = _attrs(chunk, f"{fqn} chunk")
    offsets, sizes = attrs.get("offsets"), attrs.get("sizes")
    if not isinstance(offsets, (tuple, list)) or not isinstance(sizes, (tuple, list)) \
            or len(offsets) != len(size) or len(sizes) != len(size) \
            or not all(isinstance(v, int) for v in (*offsets, *sizes)) \
            or any(o < 0 or s < 0 or o + s > n for o, s, n in zip(offsets, sizes, size)):
        raise CorruptCheckpointError(f"DCP chunk of {fqn} at {offsets!r} size {sizes!r} does not fit {list(size)}")
    return tuple(offsets), tuple(sizes)


def _check_tiling(fqn: str, size: tuple, chunks: list[tuple[tuple, tuple]]) -> None:
    """Chunks in bounds (checked by :func:`_chunk`), pairwise disjoint, and covering every element."""
    covered = sum(_prod(s) for _, s in chunks)
    if covered != _prod(size):
        raise CorruptCheckpointError(f"DCP chunks of {fqn} cover {covered} of {_prod(size)} elements")
    nonempty = [c for c in chunks if _prod(c[1])]
    for i, (oa, sa) in enumerate(nonempty):
        for ob, sb in nonempty[i + 1:]:
            if all(a < b + m and b < a + n for a, n, b, m in zip(oa, sa, ob, sb)):
                raise CorruptCheckpointError(f"DCP chunks of {fqn} at {list(oa)} and {list(ob)} overlap")


def _part(directory: str, files: dict[str, Source], fqn: str, chunk: tuple[tuple, tuple], dtype: Any,
          where: dict[tuple[str, tuple], dict[str, Any]], opts: ReadOptions) -> Any:
    import torch

    offsets, sizes = chunk
    part = _item(directory, files, where.get((fqn, offsets)), opts, fqn)
    if not isinstance(part, torch.Tensor) or part.dtype != dtype or tuple(part.shape) != sizes:
        got = f"{part.dtype} {list(part.shape)}" if isinstance(part, torch.Tensor) else type(part).__name__
        raise CorruptCheckpointError(f"DCP chunk of {fqn} at {list(offsets)} holds {got}, "
                                     f"the metadata declares {dtype} {list(sizes)}")
    return part


def _prod(values: tuple) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _nest(flat: "OrderedDict[str, Any]", planner: dict[str, Any]) -> Any:
    """Rebuild the nested state from the planner's key paths, as DCP's ``unflatten_state_dict`` does.

    A string path element is a dict key and an int one a list index (DCP flattens lists that hold
    tensors or dicts, e.g. an optimizer's ``param_groups``); tuples are stored whole.
    """
    if not planner:
        return flat
    root: dict[str, Any] = {}
    lists: list[tuple[list, str]] = []
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
            raise CorruptCheckpointError(f"DCP planner data leaves a gap in the list holding {fqn}")
    return root


_MAX_INDEX = 1 << 24
_HOLE = object()


def _slot(node: Any, key: Any, default: Any, fqn: str, lists: list, leaf: bool = False) -> Any:
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
        raise CorruptCheckpointError(f"DCP planner path of {fqn} mixes list indices and keys at {key!r}")
    if not leaf and type(current) is not type(default):
        raise CorruptCheckpointError(f"DCP planner paths disagree about the container at {key!r} (in {fqn})")
    return current
