"""The PyTorch zip format (``torch.save`` since 1.6) and TorchScript archives.

Layout: ``<prefix>/data.pkl`` (the object tree, storages as persistent ids), ``<prefix>/data/<key>``
(raw storage bytes, stored uncompressed and 64-byte aligned), ``byteorder``, ``version``.
Storages are mapped straight from the file when the source is a local path (zero copy,
``mmap=True``), otherwise copied once. TorchScript archives share the layout; their ``code/``
is never executed: modules come back as stubs and :func:`torchscript_state_dict` reads parameter
names from the declarations in ``code/`` as text.
"""

from __future__ import annotations

import re
import struct
import zipfile
from typing import Any

from ...errors import CheckpointError, CorruptCheckpointError, LimitExceededError, TruncatedCheckpointError, UnsupportedFormatError
from ...storage.source import Source
from ..unpickle.machine import Unpickler
from ..unpickle.meta import MetaStorage, meta_dtype
from ..unpickle.safe_globals import StorageType
from ..unpickle.stubs import Stub
from .base import Loaded, ReadOptions, StorageBudget, ascii_text

__all__ = ["read_torch_zip", "open_zip", "member_data_offset", "torchscript_declarations"]


def open_zip(src: Source) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(src.open())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as exc:
        raise TruncatedCheckpointError(
            f"zip archive without a readable central directory ({exc}); the file is {src.size} bytes",
            path=src.name, actual_size=src.size) from None


def member_data_offset(src: Source, info: zipfile.ZipInfo) -> int:
    """Absolute offset of a stored member's data (after its local header)."""
    header = src.read_at(info.header_offset, 30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise CorruptCheckpointError(f"local header of member {info.filename} is missing or damaged",
                                     path=src.name, member=info.filename, offset=info.header_offset)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


class _ZipStorages:
    """persistent_load for zip-format pickles: ('storage', type, key, location, numel)."""

    def __init__(self, src: Source, zf: zipfile.ZipFile, prefix: str, opts: ReadOptions, loaded: Loaded):
        self.src, self.zf, self.prefix, self.opts, self.loaded = src, zf, prefix, opts, loaded
        self.cache: dict[str, Any] = {}
        self.infos = {i.filename: i for i in zf.infolist()}
        self.locations: dict[str, int] = {}
        self.budget = StorageBudget(src.size)
        use_mmap = opts.mmap if opts.mmap is not None else True
        self.mapped = use_mmap and src.can_map and not opts.meta
        self.offsets: dict[str, tuple[int, int]] = {}  # key -> (file offset, nbytes) of mapped storages
        if opts.mmap and not src.can_map:
            loaded.notes.append("mmap=True needs a local file path; the storages were copied into memory")

    def __call__(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) < 5 or ascii_text(pid[0]) != "storage":
            raise CorruptCheckpointError(f"unexpected persistent id {pid!r:.100}")
        storage_type, key, location, numel = pid[1], ascii_text(pid[2]), ascii_text(pid[3]), pid[4]
        if not isinstance(storage_type, StorageType) or not isinstance(numel, int) or numel < 0 \
                or not isinstance(key, str) or not isinstance(location, str):
            raise CorruptCheckpointError(f"malformed storage reference {pid!r:.100}")
        cached = self.cache.get(key)
        if cached is not None:
            return self._retyped(cached, storage_type)
        nbytes = numel * storage_type.itemsize
        name = f"{self.prefix}/data/{key}"
        info = self.infos.get(name)
        if info is None:
            raise CorruptCheckpointError(f"the pickle refers to storage {key!r} but the archive has no member "
                                         f"{name}", member=name)
        if nbytes > info.file_size:
            raise TruncatedCheckpointError(f"storage {key!r} declares {nbytes} bytes but member {name} holds "
                                           f"{info.file_size}", member=name, expected_size=nbytes,
                                           actual_size=info.file_size)
        self.budget.charge(nbytes, key)
        self.locations[location] = self.locations.get(location, 0) + nbytes
        if self.opts.meta:
            storage: Any = MetaStorage(meta_dtype(storage_type.dtype_name), nbytes, location)
            if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1:
                storage.file_offset = member_data_offset(self.src, info)
        else:
            import torch

            untyped = self.opts.relocator(self._read(info, nbytes), location)
            storage = torch.storage.TypedStorage(wrap_storage=untyped, dtype=storage_type.dtype, _internal=True)
        self.cache[key] = storage
        return storage

    def _retyped(self, cached: Any, storage_type: StorageType) -> Any:
        if isinstance(cached, MetaStorage):
            if cached.dtype == storage_type.dtype_name:
                return cached
            return MetaStorage(meta_dtype(storage_type.dtype_name), cached.nbytes, cached.location)
        if cached.dtype == storage_type.dtype:
            return cached
        import torch

        return torch.storage.TypedStorage(wrap_storage=cached._untyped_storage, dtype=storage_type.dtype,
                                          _internal=True)

    def _read(self, info: zipfile.ZipInfo, nbytes: int) -> Any:
        if info.flag_bits & 0x1:
            raise UnsupportedFormatError(f"member {info.filename} is encrypted", member=info.filename)
        if info.compress_type != zipfile.ZIP_STORED:
            import torch

            data = bytearray(read_member(self.zf, info, self.src)[:nbytes])
            note = "some storages were compressed inside the zip (re-zipped file?); they were decompressed"
            if note not in self.loaded.notes:
                self.loaded.notes.append(note)
            return torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if data else torch.UntypedStorage(0)
        offset = member_data_offset(self.src, info)
        if offset + nbytes > self.src.size:
            raise TruncatedCheckpointError(f"member {info.filename} runs past the end of the file",
                                           member=info.filename, expected_size=offset + nbytes,
                                           actual_size=self.src.size)
        if self.mapped:
            self.offsets[info.filename] = (offset, nbytes)
            return self.src.mapped_storage(offset, nbytes)
        return self.src.read_into_storage(offset, nbytes)


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, src: Source) -> bytes:
    """A member's bytes; a compressed member may not inflate past a bound (decompression bombs)."""
    if info.flag_bits & 0x1:
        raise UnsupportedFormatError(f"member {info.filename} is encrypted", member=info.filename)
    limit = max(256 << 20, 8 * src.size) if info.compress_type != zipfile.ZIP_STORED else src.size
    if info.file_size > limit:
        raise LimitExceededError(f"member {info.filename} declares {info.file_size} bytes, more than this "
                                 f"{src.size}-byte file can plausibly hold (decompression bomb?)", member=info.filename)
    with zf.open(info) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise LimitExceededError(f"member {info.filename} inflates past {limit} bytes", member=info.filename)
    return data



def read_torch_zip(src: Source, opts: ReadOptions, prefix: str, *, torchscript: bool = False) -> Loaded:
    from ..sniff import DESCRIPTIONS, TORCH_ZIP, TORCHSCRIPT

    kind = TORCHSCRIPT if torchscript else TORCH_ZIP
    loaded = Loaded(obj=None, kind=kind, description=DESCRIPTIONS[kind])
    zf = open_zip(src)
    try:
        names = set(zf.namelist())
        byteorder = zf.read(f"{prefix}/byteorder").decode().strip() if f"{prefix}/byteorder" in names else "little"
        if byteorder != "little":
            raise UnsupportedFormatError(f"the checkpoint was written on a {byteorder}-endian machine",
                                         hint="Load it with torch.load on that machine and save it again.")
        if f"{prefix}/version" in names:
            loaded.details["archive_version"] = zf.read(f"{prefix}/version").decode(errors="replace").strip()
        storages = _ZipStorages(src, zf, prefix, opts, loaded)
        data_pkl = f"{prefix}/data.pkl"
        if data_pkl not in names:
            raise CorruptCheckpointError(f"the archive has no {data_pkl}", member=data_pkl)
        u = Unpickler(read_member(zf, zf.getinfo(data_pkl), src), policy=opts.policy, persistent_load=storages, member=data_pkl,
                      meta=opts.meta)
        loaded.obj = u.load()
        loaded.globals.extend(u.globals)
        if torchscript:
            loaded.details["declarations"] = torchscript_declarations(zf, prefix)
            if isinstance(loaded.obj, Stub):
                loaded.obj.__dict__["stub_declarations"] = loaded.details["declarations"]
            if f"{prefix}/constants.pkl" in names:
                cu = Unpickler(read_member(zf, zf.getinfo(f"{prefix}/constants.pkl"), src), policy=opts.policy,
                               persistent_load=storages,
                               member=f"{prefix}/constants.pkl", meta=opts.meta)
                loaded.details["constants"] = cu.load()
                loaded.globals.extend(cu.globals)
        loaded.details["locations"] = dict(storages.locations)
        loaded.details["mapped_ranges"] = list(storages.offsets.values())
        loaded.details["storage_bytes"] = storages.budget.total
        return loaded
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise CorruptCheckpointError(f"damaged zip archive or member: {exc}") from None
    except (zipfile.LargeZipFile, struct.error) as exc:
        raise LimitExceededError(f"zip archive beyond limits: {exc}") from None
    finally:
        zf.close()


_CLASS_RE = re.compile(r"^class (\w+)\(Module\):\n((?:  .*\n|\n)*)", re.M)
_LIST_RE = re.compile(r"^  (__parameters__|__buffers__) = \[(.*?)\]", re.M)


def torchscript_declarations(zf: zipfile.ZipFile, prefix: str) -> dict[str, dict[str, list[str]]]:
    """``{"__torch__.pkg.Class": {"__parameters__": [...], "__buffers__": [...]}}`` read as text."""
    out: dict[str, dict[str, list[str]]] = {}
    for info in zf.infolist():
        name = info.filename
        if not name.startswith(f"{prefix}/code/") or not name.endswith(".py") or info.file_size > 16 << 20:
            continue
        module = name[len(prefix) + len("/code/"):-3].replace("/", ".")
        text = zf.read(name).decode("utf-8", "replace")
        for m in _CLASS_RE.finditer(text):
            decl: dict[str, list[str]] = {}
            for lm in _LIST_RE.finditer(m.group(2)):
                decl[lm.group(1)] = re.findall(r'"([^"]*)"', lm.group(2))
            out[f"{module}.{m.group(1)}"] = decl
    return out
