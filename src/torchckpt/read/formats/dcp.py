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

from ...errors import CorruptCheckpointError, RemoteAuthError, RemoteNotFoundError, UnsupportedFormatError
from ...storage.remote import filesystem, is_url, join, remote_errors
from ...storage.source import Source
from ..unpickle.machine import Unpickler
from ..unpickle.stubs import Stub, stub_name
from .base import Loaded, ReadOptions

__all__ = ["read_dcp", "is_dcp_dir"]


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


def read_dcp(directory: str, opts: ReadOptions) -> Loaded:
    """Read a DCP checkpoint directory into a (nested) state dict."""
    meta_path = join(directory, ".metadata")
    with Source(meta_path, storage_options=opts.storage_options) as src:
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
                flat[fqn] = _tensor(directory, files, fqn, _attrs(md, fqn), where, opts)
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


def _source(directory: str, files: dict[str, Source], info: dict[str, Any] | None, fqn: str,
            storage_options: dict[str, Any] | None = None) -> tuple[Source, int, int]:
    if info is None:
        raise CorruptCheckpointError(f"DCP entry {fqn} has no storage record")
    if info.get("transform_descriptors"):
        raise UnsupportedFormatError(f"DCP entry {fqn} is stored with transforms {info['transform_descriptors']}")
    rel = info.get("relative_path")
    if not isinstance(rel, str) or os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
        raise CorruptCheckpointError(f"DCP entry {fqn} points outside its directory: {rel!r}")
    if rel not in files:
        files[rel] = Source(join(directory, rel), storage_options=storage_options)
    src = files[rel]
    offset, length = info.get("offset"), info.get("length")
    if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0 \
            or offset + length > src.size:
        raise CorruptCheckpointError(f"DCP entry {fqn}: bytes {offset}..{offset}+{length} outside {rel} "
                                     f"({src.size} bytes)")
    return src, offset, length


def _item(directory: str, files: dict[str, Source], info: dict[str, Any] | None, opts: ReadOptions, fqn: str) -> Any:
    from . import read

    src, offset, length = _source(directory, files, info, fqn, opts.storage_options)
    with Source(src.read_at(offset, length), name=f"{src.name}[{fqn}]") as item:
        return read(item, ReadOptions(relocator=opts.relocator, policy=opts.policy, meta=opts.meta)).obj


def _tensor(directory: str, files: dict[str, Source], fqn: str, md: dict[str, Any],
            where: dict[tuple[str, tuple], dict[str, Any]], opts: ReadOptions) -> Any:
    size = tuple(md.get("size") or ())
    dtype = _attrs(md.get("properties"), f"{fqn} properties").get("dtype")
    if opts.meta:
        from ..unpickle.meta import TensorMeta, meta_dtype

        stride = tuple(int(_prod(size[i + 1:])) for i in range(len(size)))
        return TensorMeta(size, stride, meta_dtype(str(dtype).replace("torch.", "")))
    import torch

    chunks = [_attrs(c, f"{fqn} chunk") for c in md.get("chunks") or []]
    if len(chunks) == 1 and tuple(chunks[0].get("sizes") or ()) == size:
        return _item(directory, files, where.get((fqn, tuple(chunks[0].get("offsets") or ()))), opts, fqn)
    full = torch.empty(size, dtype=dtype)
    for chunk in chunks:
        offsets, sizes = tuple(chunk.get("offsets") or ()), tuple(chunk.get("sizes") or ())
        part = _item(directory, files, where.get((fqn, offsets)), opts, fqn)
        if tuple(part.shape) != sizes or len(offsets) != len(size) or any(
                o < 0 or o + s > n for o, s, n in zip(offsets, sizes, size)):
            raise CorruptCheckpointError(f"DCP chunk of {fqn} at {offsets} does not fit {list(size)}")
        full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))] = part
    return full


def _prod(values: tuple) -> int:
    out = 1
    for v in values:
        out *= v
    return out


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
