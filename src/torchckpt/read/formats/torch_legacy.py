"""The PyTorch legacy formats: the stream format (torch 0.4 - 1.5, ``_use_new_zipfile_serialization=False``)
and the older tar format, including files written by Python 2.

Stream layout, every pickle read by the one safe unpickler:
``pickle(MAGIC) pickle(1001) pickle(sys_info) pickle(obj) pickle(storage keys)`` then, for each key,
an int64 element count and the raw bytes. Storages are allocated where ``map_location`` sends them
while the object pickle is read (sizes checked against the file first), then filled from the file.
"""

from __future__ import annotations

import struct
from typing import Any

from ...errors import CorruptCheckpointError, TruncatedCheckpointError, UnsupportedFormatError
from ...storage.source import Source
from ..unpickle.machine import Unpickler
from ..unpickle.meta import MetaStorage, meta_dtype
from ..sniff import LEGACY_MAGIC
from ..unpickle.safe_globals import StorageType
from .base import Loaded, ReadOptions, StorageBudget, ascii_text

__all__ = ["read_torch_legacy", "read_torch_tar"]

PROTOCOL_VERSION = 1001


class _LegacyStorages:
    """persistent_load for legacy pickles: ('storage', type, key, location, numel, view) and ('module', ...)."""

    def __init__(self, size: int, opts: ReadOptions) -> None:
        self.opts = opts
        self.roots: dict[str, Any] = {}  # key -> (TypedStorage on its final device)
        self.views: dict[str, Any] = {}
        self.declared: dict[str, tuple[int, int]] = {}  # key -> (itemsize, numel)
        self.locations: dict[str, int] = {}
        self.budget = StorageBudget(size)

    def __call__(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise CorruptCheckpointError(f"unexpected persistent id {pid!r:.100}")
        typename = ascii_text(pid[0])
        if typename == "module":  # whole-model pickles of torch < 1.0 record the class and its source
            return pid[1] if len(pid) > 1 else None
        if typename != "storage" or len(pid) < 6:
            raise CorruptCheckpointError(f"unexpected persistent id {pid!r:.100}")
        storage_type, root_key, location, numel, view = pid[1], ascii_text(pid[2]), ascii_text(pid[3]), pid[4], pid[5]
        if not isinstance(storage_type, StorageType) or not isinstance(numel, int) or numel < 0 \
                or not isinstance(location, str):
            raise CorruptCheckpointError(f"malformed storage reference {pid!r:.100}")
        item = storage_type.itemsize
        root = self.roots.get(root_key)
        if root is None:
            nbytes = numel * item
            self.budget.charge(nbytes, root_key)
            self.declared[root_key] = (item, numel)
            self.locations[location] = self.locations.get(location, 0) + nbytes
            if self.opts.meta:
                root = MetaStorage(meta_dtype(storage_type.dtype_name), nbytes, location)
            else:
                import torch

                untyped = self.opts.relocator(torch.UntypedStorage(nbytes), location)
                root = torch.storage.TypedStorage(wrap_storage=untyped, dtype=storage_type.dtype, _internal=True)
            self.roots[root_key] = root
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3):
            raise CorruptCheckpointError(f"malformed storage view {view!r:.100}")
        view_key, offset, view_size = ascii_text(view[0]), view[1], view[2]
        if view_key not in self.views:
            root_bytes = root.nbytes if isinstance(root, MetaStorage) else root._untyped_storage.nbytes()
            capacity = root_bytes // item
            if not (isinstance(offset, int) and isinstance(view_size, int) and 0 <= offset
                    and 0 <= view_size and offset + view_size <= capacity):
                raise CorruptCheckpointError(f"storage view {view!r:.100} lies outside its storage of "
                                             f"{capacity} elements")
            if isinstance(root, MetaStorage):
                self.views[view_key] = MetaStorage(root.dtype, view_size * item, root.location, root, offset * item)
            else:
                import torch

                self.views[view_key] = torch.storage.TypedStorage(
                    wrap_storage=root._untyped_storage[offset * item:(offset + view_size) * item],
                    dtype=root.dtype, _internal=True)
        return self.views[view_key]



def read_torch_legacy(src: Source, opts: ReadOptions) -> Loaded:
    from ..sniff import DESCRIPTIONS, TORCH_LEGACY

    loaded = Loaded(obj=None, kind=TORCH_LEGACY, description=DESCRIPTIONS[TORCH_LEGACY])
    buf = src.buffer()
    pos = 0
    headers = []
    py2 = False
    for what in ("magic number", "protocol version", "system info"):
        u = Unpickler(buf, policy=opts.policy, start=pos, member=f"<{what} pickle>")
        headers.append(u.load())
        loaded.globals.extend(u.globals)
        py2 = py2 or u.saw_binstring
        pos = u.pos
    magic, protocol, sys_info = headers
    if magic != LEGACY_MAGIC:
        raise CorruptCheckpointError("the first pickle is not the PyTorch magic number")
    if protocol != PROTOCOL_VERSION:
        raise UnsupportedFormatError(f"legacy protocol version {protocol!r} (expected {PROTOCOL_VERSION})")
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise UnsupportedFormatError("the checkpoint was written on a big-endian machine",
                                     hint="Load it with torch.load on that machine and save it again.")
    storages = _LegacyStorages(src.size, opts)
    u = Unpickler(buf, policy=opts.policy, persistent_load=storages, start=pos, member="<object pickle>",
                  meta=opts.meta)
    obj = u.load()
    loaded.globals.extend(u.globals)
    py2 = py2 or u.saw_binstring
    k = Unpickler(buf, policy=opts.policy, start=u.pos, member="<storage keys pickle>")
    keys = k.load()
    loaded.globals.extend(k.globals)
    if not isinstance(keys, list):
        raise CorruptCheckpointError("the storage key list is not a list")
    _fill_storages(src, storages, [ascii_text(key) for key in keys], k.pos, opts)
    if opts.mmap and not opts.meta:
        loaded.notes.append("mmap=True has no effect on the legacy format: its tensors were read into memory")
    loaded.obj = obj
    loaded.details.update(python2=py2, py2_nonascii=u.py2_strings, locations=dict(storages.locations),
                          storage_bytes=storages.budget.total, sys_info=sys_info)
    if py2:
        loaded.evidence.append("written by Python 2 (str pickled as byte strings)")
    return loaded


def _fill_storages(src: Source, storages: _LegacyStorages, keys: list[str], pos: int, opts: ReadOptions) -> None:
    size = src.size
    for index, key in enumerate(keys):
        if key not in storages.declared:
            raise CorruptCheckpointError(f"storage {key!r} is listed but never used by the pickle")
        itemsize, numel = storages.declared[key]
        header = src.read_at(pos, 8)
        if len(header) < 8:
            raise TruncatedCheckpointError(
                f"the file ends at byte {size} before the data of storage {key!r}",
                expected_size=_expected_end(storages, keys[index:], pos), actual_size=size)
        (count,) = struct.unpack("<q", header)
        if count != numel:
            raise CorruptCheckpointError(f"storage {key!r}: the pickle declares {numel} elements, the data "
                                         f"section {count}", offset=pos)
        nbytes = numel * itemsize
        start = pos + 8
        if start + nbytes > size:
            raise TruncatedCheckpointError(
                f"storage {key!r} needs bytes {start}..{start + nbytes} but the file has {size}",
                expected_size=_expected_end(storages, keys[index:], pos), actual_size=size, offset=start)
        if opts.meta:
            storages.roots[key].file_offset = start
        else:
            src.read_into(storages.roots[key]._untyped_storage, start, nbytes)
        pos = start + nbytes


def _expected_end(storages: _LegacyStorages, keys: list[str], pos: int) -> int:
    total = pos
    for key in keys:
        itemsize, numel = storages.declared.get(key, (0, 0))
        total += 8 + numel * itemsize
    return total


def read_torch_tar(src: Source, opts: ReadOptions) -> Loaded:
    """The tar format of the earliest PyTorch releases: members sys_info, pickle, storages, tensors."""
    import tarfile

    import torch

    from ..sniff import DESCRIPTIONS, TORCH_TAR

    loaded = Loaded(obj=None, kind=TORCH_TAR, description=DESCRIPTIONS[TORCH_TAR])
    with tarfile.open(fileobj=src.open(), mode="r:") as tf:
        def member(name: str) -> bytes:
            info = tf.getmember(name)
            if not info.isfile() or info.size > src.size:
                raise CorruptCheckpointError(f"tar member {name} is not a regular file of plausible size")
            fh = tf.extractfile(info)
            assert fh is not None
            return fh.read()

        budget = StorageBudget(src.size)
        objects: dict[Any, Any] = {}
        data = member("storages")
        u = Unpickler(data, policy=opts.policy, member="storages")
        count = u.load()
        pos = u.pos
        if not isinstance(count, int) or count < 0:
            raise CorruptCheckpointError("tar member storages does not start with a count")
        for _ in range(count):
            u = Unpickler(data, policy=opts.policy, start=pos, member="storages")
            key, location, storage_type = u.load()
            pos = u.pos
            if not isinstance(storage_type, StorageType):
                raise CorruptCheckpointError(f"storage {key!r} has type {storage_type!r}")
            (numel,) = struct.unpack("<q", data[pos:pos + 8])
            nbytes = numel * storage_type.itemsize
            budget.charge(nbytes, key)
            raw = data[pos + 8:pos + 8 + nbytes]
            if len(raw) != nbytes:
                raise TruncatedCheckpointError(f"storage {key!r} is cut short", expected_size=nbytes,
                                               actual_size=len(raw))
            pos += 8 + nbytes
            untyped = torch.frombuffer(bytearray(raw), dtype=torch.uint8).untyped_storage() if nbytes else \
                torch.UntypedStorage(0)
            untyped = opts.relocator(untyped, ascii_text(location))
            objects[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=storage_type.dtype, _internal=True)
        u = Unpickler(data, policy=opts.policy, start=pos, member="storages")
        for target, root, offset, numel in u.load():
            root_storage = objects[root]
            item = root_storage.dtype.itemsize
            objects[target] = torch.storage.TypedStorage(
                wrap_storage=root_storage._untyped_storage[offset * item:(offset + numel) * item],
                dtype=root_storage.dtype, _internal=True)
        tdata = member("tensors")
        u = Unpickler(tdata, policy=opts.policy, member="tensors")
        ntensors = u.load()
        pos = u.pos
        from ..unpickle.safe_globals import rebuild_tensor

        for _ in range(ntensors):
            u = Unpickler(tdata, policy=opts.policy, start=pos, member="tensors")
            key, storage_id, _type = u.load()
            pos = u.pos
            (ndim,) = struct.unpack("<i", tdata[pos:pos + 4])
            pos += 8
            sizes = struct.unpack(f"<{ndim}q", tdata[pos:pos + 8 * ndim])
            strides = struct.unpack(f"<{ndim}q", tdata[pos + 8 * ndim:pos + 16 * ndim])
            (offset,) = struct.unpack("<q", tdata[pos + 16 * ndim:pos + 16 * ndim + 8])
            pos += 16 * ndim + 8
            objects[key] = rebuild_tensor(objects[storage_id], offset, sizes, strides)

        def persistent_load(saved_id: Any) -> Any:
            if isinstance(saved_id, tuple):
                return saved_id[0]
            try:
                return objects[int(saved_id)]
            except (KeyError, ValueError, TypeError):
                raise CorruptCheckpointError(f"unknown persistent id {saved_id!r:.60}") from None

        u = Unpickler(member("pickle"), policy=opts.policy, persistent_load=persistent_load, member="pickle")
        loaded.obj = u.load()
        loaded.globals.extend(u.globals)
        loaded.details["python2"] = u.saw_binstring
    return loaded

