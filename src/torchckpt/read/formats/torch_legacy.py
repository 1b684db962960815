"""The PyTorch legacy formats: the stream format (torch 0.4 - 1.5, ``_use_new_zipfile_serialization=False``)
and the older tar format, including files written by Python 2.

Stream layout, every pickle read by the one safe unpickler:
``pickle(MAGIC) pickle(1001) pickle(sys_info) pickle(obj) pickle(storage keys)`` then, for each key,
an int64 element count and the raw bytes. Storages are allocated where ``map_location`` sends them
while the object pickle is read (sizes checked against the file first), then filled from the file.
"""

from __future__ import annotations

import struct
import tarfile
from typing import Any, Callable

from ...errors import CheckpointError, CorruptCheckpointError, TruncatedCheckpointError, UnsupportedFormatError
from ...storage.source import Source
from ..sniff import DESCRIPTIONS, LEGACY_MAGIC, TORCH_LEGACY, TORCH_TAR
from ..unpickle import meta
from ..unpickle.meta import MetaStorage
from ..unpickle.safe_globals import StorageType
from ..unpickle.torch_rebuild import rebuild_tensor
from ..unpickle.mode import Mode
from .base import Check, Checkpoint, ReadOptions, StorageBudget, ascii_text, run_pickle

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
                root = storage_type.meta(nbytes, location)
            else:
                import torch  # lazy: structure-only reads (inspect, scan) never import torch

                root = storage_type.wrap(self.opts.relocator(torch.UntypedStorage(nbytes), location))
            self.roots[root_key] = root
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3):
            raise CorruptCheckpointError(f"malformed storage view {view!r:.100}")
        view_key, offset, view_size = ascii_text(view[0]), view[1], view[2]
        if view_key not in self.views:
            self.views[view_key] = _storage_view(root, offset, view_size, item, f"{view!r:.100}")
        return self.views[view_key]



def read_torch_legacy(src: Source, opts: ReadOptions) -> Checkpoint:
    loaded = Checkpoint(format=TORCH_LEGACY, description=DESCRIPTIONS[TORCH_LEGACY])
    buf = src.buffer()
    pos = 0
    headers = []
    py2 = False
    for what in ("magic number", "protocol version", "system info"):
        header, u = run_pickle(opts, buf, src, f"<{what} pickle>", start=pos)
        headers.append(header)
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
    obj, u = run_pickle(opts, buf, src, "<object pickle>", start=pos, persistent_load=storages)
    py2 = py2 or u.saw_binstring
    keys, k = run_pickle(opts, buf, src, "<storage keys pickle>", start=u.pos)
    if not isinstance(keys, list):
        raise CorruptCheckpointError("the storage key list is not a list")
    end = _fill_storages(src, storages, [ascii_text(key) for key in keys], k.pos, opts)
    if end < src.size and opts.mode is Mode.RECORD:
        appended = " (a zip archive is appended: polyglot)" if src.read_at(end, 4) == b"PK\x03\x04" or \
            b"PK\x05\x06" in src.read_at(max(end, src.size - 65_557), 65_557) else ""
        opts.trace.checks.append(Check(f"{src.size - end} bytes after the end of the checkpoint data{appended}",
                                       None, end))
    if opts.mmap and not opts.meta:
        loaded.notes.append("mmap=True has no effect on the legacy format: its tensors were read into memory")
    loaded.obj = obj
    loaded.details.update(python2=py2, py2_nonascii=u.py2_strings, locations=dict(storages.locations),
                          storage_bytes=storages.budget.total, sys_info=sys_info)
    if py2:
        loaded.evidence.append("written by Python 2 (str pickled as byte strings)")
    return loaded


def _fill_storages(src: Source, storages: _LegacyStorages, keys: list[str], pos: int, opts: ReadOptions) -> int:
    """Read (or, structure only, locate) every storage's data; returns the offset after the last one."""
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
        opts.trace.ranges.append((src.name, start, nbytes))
        if opts.meta:
            storages.roots[key].file_offset = start
        else:
            src.read_into(storages.roots[key]._untyped_storage, start, nbytes)
        pos = start + nbytes
    return pos


def _expected_end(storages: _LegacyStorages, keys: list[str], pos: int) -> int:
    total = pos
    for key in keys:
        itemsize, numel = storages.declared.get(key, (0, 0))
        total += 8 + numel * itemsize
    return total


def read_torch_tar(src: Source, opts: ReadOptions) -> Checkpoint:
    """The tar format of the earliest PyTorch releases: members sys_info, pickle, storages, tensors.

    ``storages``: a pickled count, then per storage a pickled ``(key, location, type)``, an int64 element
    count and the raw bytes, then a pickled list of views. ``tensors``: a pickled count, then per tensor
    a pickled ``(key, storage id, type)``, ndim, sizes, strides and offset. Every record is read.
    """
    loaded = Checkpoint(format=TORCH_TAR, description=DESCRIPTIONS[TORCH_TAR])
    rebuild = meta.rebuild_tensor if opts.meta else rebuild_tensor
    with tarfile.open(fileobj=src.open(), mode="r:") as tf:
        def member(name: str) -> tuple[bytes, int]:
            try:
                info = tf.getmember(name)
            except KeyError:
                raise CorruptCheckpointError(f"the tar archive has no member {name}") from None
            if not info.isfile() or info.size > src.size:
                raise CorruptCheckpointError(f"tar member {name} is not a regular file of plausible size")
            fh = tf.extractfile(info)
            assert fh is not None
            return fh.read(), info.offset_data

        if opts.mode is Mode.RECORD:
            _check_tar(src, tf, opts)
        budget = StorageBudget(src.size)
        objects: dict[Any, Any] = {}
        data, base = member("storages")
        count, pos = _count(opts, data, src, "storages")
        for _ in range(count):
            record, pos = _record(opts, data, src, "storages", pos, "storage record",
                                  lambda r: isinstance(r[2], StorageType))
            key, location, storage_type = record
            (numel,) = struct.unpack("<q", _slice(data, pos, 8, "storage size"))
            nbytes = numel * storage_type.itemsize
            budget.charge(nbytes, key)
            _slice(data, pos + 8, nbytes, f"storage {key!r:.40}")
            opts.trace.ranges.append((src.name, base + pos + 8, nbytes))
            objects[key] = _tar_storage(data, pos + 8, nbytes, storage_type, ascii_text(location), opts,
                                        base + pos + 8)
            pos += 8 + nbytes
        views, u = run_pickle(opts, data, src, "storages", start=pos)
        for view in views if isinstance(views, list) else _malformed("storage view list", views):
            if not (isinstance(view, tuple) and len(view) == 4) or view[1] not in objects:
                raise CorruptCheckpointError(f"malformed storage view {view!r:.100}")
            target, root, offset, numel = view
            objects[target] = _storage_view(objects[root], offset, numel, objects[root].dtype.itemsize,
                                            f"{offset}+{numel}")
        tdata, _ = member("tensors")
        ntensors, pos = _count(opts, tdata, src, "tensors")
        for _ in range(ntensors):
            record, pos = _record(opts, tdata, src, "tensors", pos, "tensor record", lambda r: r[1] in objects)
            key, storage_id, _type = record
            (ndim,) = struct.unpack("<i", _slice(tdata, pos, 4, "tensor ndim"))
            if not 0 <= ndim <= 64:
                raise CorruptCheckpointError(f"tensor {key!r:.40} has {ndim} dimensions")
            pos += 8
            dims = struct.unpack(f"<{2 * ndim + 1}q", _slice(tdata, pos, 16 * ndim + 8, "tensor shape"))
            pos += 16 * ndim + 8
            objects[key] = rebuild(objects[storage_id], dims[-1], dims[:ndim], dims[ndim:2 * ndim])

        def persistent_load(saved_id: Any) -> Any:
            if isinstance(saved_id, tuple):
                return saved_id[0]
            try:
                return objects[int(saved_id)]
            except (KeyError, ValueError, TypeError):
                raise CorruptCheckpointError(f"unknown persistent id {saved_id!r:.60}") from None

        loaded.tree, u = run_pickle(opts, member("pickle")[0], src, "pickle", persistent_load=persistent_load)
        loaded.details["python2"] = u.saw_binstring
    return loaded


def _count(opts: ReadOptions, data: bytes, src: Source, name: str) -> tuple[int, int]:
    """The pickled record count a tar member starts with, and the offset after it."""
    count, u = run_pickle(opts, data, src, name)
    if not isinstance(count, int) or not 0 <= count <= len(data):
        raise CorruptCheckpointError(f"tar member {name} does not start with a count")
    return count, u.pos


def _record(opts: ReadOptions, data: bytes, src: Source, name: str, pos: int, what: str,
            valid: Callable[[tuple[Any, ...]], bool]) -> tuple[tuple[Any, ...], int]:
    """One pickled 3-tuple record of a tar member at ``pos`` (checked by ``valid``), and the offset after it."""
    record, u = run_pickle(opts, data, src, name, start=pos)
    if not (isinstance(record, tuple) and len(record) == 3 and valid(record)):
        raise CorruptCheckpointError(f"malformed {what} {record!r:.100}")
    return record, u.pos


def _malformed(what: str, value: Any) -> list[Any]:
    raise CorruptCheckpointError(f"malformed {what} {value!r:.100}")


def _slice(data: bytes, pos: int, n: int, what: str) -> bytes:
    if n < 0 or pos + n > len(data):
        raise TruncatedCheckpointError(f"{what} at byte {pos} needs {n} bytes; the member has {len(data) - pos}")
    return data[pos:pos + n]


def _tar_storage(data: bytes, pos: int, nbytes: int, storage_type: StorageType, location: str, opts: ReadOptions,
                 file_offset: int) -> Any:
    if opts.meta:
        storage = storage_type.meta(nbytes, location if isinstance(location, str) else "cpu")
        storage.file_offset = file_offset
        return storage
    import torch  # lazy: structure-only reads (inspect, scan) never import torch

    raw = data[pos:pos + nbytes]
    untyped = torch.frombuffer(bytearray(raw), dtype=torch.uint8).untyped_storage() if nbytes else \
        torch.UntypedStorage(0)
    return storage_type.wrap(opts.relocator(untyped, location))


def _storage_view(root: Any, offset: Any, numel: Any, item: int, label: str) -> Any:
    """``numel`` elements of ``item`` bytes from element ``offset`` of ``root`` (a storage, or its
    ``MetaStorage``), checked to lie inside it; ``label`` names the view in the error."""
    capacity = (root.nbytes if isinstance(root, MetaStorage) else root._untyped_storage.nbytes()) // item
    if not (isinstance(offset, int) and isinstance(numel, int) and 0 <= offset and 0 <= numel
            and offset + numel <= capacity):
        raise CorruptCheckpointError(f"storage view {label} lies outside its storage of {capacity} elements")
    if isinstance(root, MetaStorage):
        return MetaStorage(root.dtype, numel * item, root.location, root, offset * item)
    import torch  # lazy: structure-only reads (inspect, scan) never import torch

    return torch.storage.TypedStorage(wrap_storage=root._untyped_storage[offset * item:(offset + numel) * item],
                                      dtype=root.dtype, _internal=True)


_TAR_MEMBERS = ("sys_info", "pickle", "storages", "tensors")


def _check_tar(src: Source, tf: tarfile.TarFile, opts: ReadOptions) -> None:
    """Record-mode checks: members the loader never reads that hold pickles."""
    for info in tf.getmembers():
        if info.name in _TAR_MEMBERS or not info.isfile() or info.size > src.size:
            continue
        fh = tf.extractfile(info)
        data = fh.read() if fh is not None else b""
        if data[:1] == b"\x80":
            opts.trace.checks.append(Check("pickle in an unexpected tar member (hidden payload?)", info.name))
            try:
                run_pickle(opts, data, src, info.name, loaded=False)
            except CheckpointError as exc:
                opts.trace.checks.append(Check(f"that pickle cannot be parsed to its end: {exc.reason}", info.name))
