"""torch.distributed.checkpoint (DCP) directories: ``.metadata`` plus the data files it names.

``.metadata`` is a pickle of dataclasses (read by the safe unpickler as stubs). Each tensor chunk or
non-tensor item is a small ``torch.save`` stream at (file, offset, length), read by the same readers
(through ``opts.read_child``). Chunks of sharded tensors are assembled into the full tensor; nested
dicts are rebuilt from the planner's key paths. Data files must resolve inside the directory.
Nothing from the directory is executed.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Any

from ...errors import CheckpointNotFoundError, CorruptCheckpointError, LimitExceededError, RemoteAuthError, \
    RemoteNotFoundError, UnsupportedFormatError
from ...storage.remote import filesystem, is_url, join, remote_errors
from ...storage.source import Source, confined_path
from ..unpickle.meta import DTYPE_SIZES, MetaDType, TensorMeta, meta_dtype
from ..unpickle.mode import Mode
from ..unpickle.stubs import Stub, stub_name
from .base import Checkpoint, ReadOptions, run_pickle

__all__ = ["read_dcp", "is_dcp_dir"]

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


def read_dcp(directory: str, opts: ReadOptions) -> Checkpoint:
    """Read a DCP checkpoint directory into a (nested) state dict."""
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
    where: dict[tuple[Any, tuple[int, ...]], dict[str, Any]] = {}
    for index, info in storage.items():
        ia = _attrs(index, "a storage index")
        fqn = ia.get("fqn")
        if not isinstance(fqn, str):
            raise CorruptCheckpointError(f"DCP metadata: storage index names {fqn!r:.60}, not a key")
        where[(fqn, _ints(ia.get("offset"), f"offset of {fqn}"))] = _attrs(info, "a storage record")
    flat: OrderedDict[str, Any] = OrderedDict()
    reader = _Files(directory, opts)
    try:
        for fqn, md in described.items():
            kind = stub_name(md) if isinstance(md, Stub) else type(md).__name__
            if kind.endswith("BytesStorageMetadata"):
                flat[fqn] = reader.item(where.get((fqn, ())), fqn)
            elif kind.endswith("TensorStorageMetadata"):
                flat[fqn] = _tensor(reader, fqn, _attrs(md, fqn), where, opts)
            else:
                raise UnsupportedFormatError(f"DCP entry {fqn!r:.100} of kind {kind:.100}")
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

    def item(self, info: dict[str, Any] | None, fqn: str) -> Any:
        src, offset, length = self.source(info, fqn)
        self.opts.trace.ranges.append((src.name, offset, length))
        assert self.opts.read_child is not None, "the opener passes the format dispatcher"
        with Source(src.read_at(offset, length), name=f"{src.name}[{fqn}]") as item:
            return self.opts.read_child(item, self.opts).tree

    def length(self, info: dict[str, Any] | None, fqn: str) -> int:
        return self.source(info, fqn)[2]

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _properties_dtype(props: Any, fqn: str) -> Any:
    """TensorProperties pickles its state as a tuple ``(dtype, layout, requires_grad, memory_format,
    pin_memory)`` (newer torch) or as a dict (older)."""
    attrs = _attrs(props, f"{fqn} properties")
    state = props.__dict__.get("stub_state")
    if not attrs and isinstance(state, tuple) and state:
        return state[0]
    return attrs.get("dtype")


def _dtype_name(dtype: Any, fqn: str) -> str:
    name = str(dtype).replace("torch.", "") if isinstance(dtype, MetaDType) or \
        type(dtype).__name__ == "dtype" and type(dtype).__module__ == "torch" else None
    if name not in DTYPE_SIZES:
        raise CorruptCheckpointError(f"DCP entry {fqn!r:.100} has dtype {dtype!r:.60}, not a tensor dtype")
    return name


def _tensor(reader: _Files, fqn: str, md: dict[str, Any], where: dict[tuple[Any, tuple[int, ...]], dict[str, Any]],
            opts: ReadOptions) -> Any:
    size = _ints(md.get("size"), f"size of {fqn}")
    dtype = _properties_dtype(md.get("properties"), fqn)
    name = _dtype_name(dtype, fqn)
    chunks = [_attrs(c, f"{fqn} chunk") for c in md.get("chunks") or []]
    placed = []
    for chunk in chunks:
        offsets, sizes = _ints(chunk.get("offsets"), f"{fqn} chunk offsets"), _ints(chunk.get("sizes"),
                                                                                     f"{fqn} chunk sizes")
        if len(offsets) != len(size) or len(sizes) != len(size) or any(
                o + s > n for o, s, n in zip(offsets, sizes, size)):
            raise CorruptCheckpointError(f"DCP chunk of {fqn!r:.100} at {offsets} does not fit {list(size)}")
        placed.append((offsets, sizes, where.get((fqn, offsets))))
    stored = sum(reader.length(info, fqn) for _, _, info in placed)
    nbytes = math.prod(size) * DTYPE_SIZES[name]
    if nbytes > stored + (1 << 16):  # the chunks' streams hold the data; a full tensor cannot be larger
        raise LimitExceededError(f"DCP entry {fqn!r:.100} declares {nbytes} bytes ({list(size)}) but its chunks "
                                 f"hold {stored}")
    if opts.meta:
        stride = tuple(math.prod(size[i + 1:]) for i in range(len(size)))
        if opts.mode is Mode.RECORD:  # scan runs the same streams load reads
            for _, _, info in placed:
                reader.item(info, fqn)
        return TensorMeta(size, stride, meta_dtype(name))
    if len(placed) == 1 and placed[0][1] == size:
        return reader.item(placed[0][2], fqn)
    import torch  # lazy: only building tensors needs torch

    full = torch.empty(size, dtype=dtype)
    for offsets, sizes, info in placed:
        part = reader.item(info, fqn)
        if not hasattr(part, "shape") or tuple(part.shape) != sizes or part.dtype != dtype:
            raise CorruptCheckpointError(f"DCP chunk of {fqn!r:.100} at {offsets} is not a {list(sizes)} tensor")
        full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))] = part
    return full


def _nest(flat: "OrderedDict[str, Any]", planner: dict[str, Any]) -> Any:
    """Rebuild nested dicts from the planner's key paths (``"model.w" -> ("model", "w")``)."""
    if not planner:
        return flat
    root: dict[str, Any] = {}
    for fqn, value in flat.items():
        path = planner.get(fqn)
        if not isinstance(path, tuple) or not path or not all(isinstance(p, (str, int)) for p in path):
            root[fqn] = value
            continue
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {}) if isinstance(node, dict) else node
        if isinstance(node, dict):
            node[path[-1]] = value
    return root
