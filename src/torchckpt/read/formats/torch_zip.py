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
import zlib
from typing import Any, Callable

from ...errors import CheckpointError, CorruptCheckpointError, LimitExceededError, TruncatedCheckpointError, UnsupportedFormatError
from ...storage.source import Source
from ..unpickle.meta import MetaStorage
from ..unpickle.safe_globals import StorageType
from ..unpickle.stubs import Stub
from ..sniff import DESCRIPTIONS, TORCH_ZIP, TORCHSCRIPT
from ..unpickle.budget import Budget, Meter
from ..unpickle.mode import Mode
from .base import Check, Checkpoint, ReadOptions, StorageBudget, ascii_text, run_pickle

__all__ = ["read_torch_zip", "expected_zip_size", "open_zip", "member_data_offset", "read_member", "check_zip", "torchscript_declarations"]


def open_zip(src: Source) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(src.open())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error, NotImplementedError,
            OverflowError) as exc:
        raise TruncatedCheckpointError(
            f"zip archive without a readable central directory ({exc}); the file is {src.size} bytes",
            path=src.name, actual_size=src.size) from None


def _refuse_encrypted(info: zipfile.ZipInfo) -> None:
    if info.flag_bits & 0x1:
        raise UnsupportedFormatError(f"member {info.filename} is marked encrypted (zip flag bit 0)",
                                     hint="torch.save never encrypts: the archive was repacked or damaged.")


def member_data_offset(src: Source, info: zipfile.ZipInfo) -> int:
    """Absolute offset of a stored member's data (after its local header)."""
    header = src.read_at(info.header_offset, 30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise CorruptCheckpointError(f"local header of member {info.filename} is missing or damaged",
                                     path=src.name, member=info.filename, offset=info.header_offset)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return int(info.header_offset + 30 + name_len + extra_len)


class _ZipStorages:
    """persistent_load for zip-format pickles: ('storage', type, key, location, numel)."""

    def __init__(self, src: Source, zf: zipfile.ZipFile, prefix: str, opts: ReadOptions, loaded: Checkpoint,
                 folder: str = "data") -> None:
        self.src, self.zf, self.prefix, self.opts, self.loaded = src, zf, prefix, opts, loaded
        self.folder = folder
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
        name = f"{self.prefix}/{self.folder}/{key}"
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
            storage: Any = storage_type.meta(nbytes, location)
            _refuse_encrypted(info)
            if info.compress_type == zipfile.ZIP_STORED:
                storage.file_offset = self._stored_offset(info, nbytes)
            elif self.opts.mode is Mode.RECORD:  # load inflates it: so does scan, under the same bound
                read_member(self.zf, info, self.src, self.opts)
        else:
            storage = storage_type.wrap(self.opts.relocator(self._read(info, nbytes), location))
        self.cache[key] = storage
        return storage

    def _retyped(self, cached: Any, storage_type: StorageType) -> Any:
        if isinstance(cached, MetaStorage):
            if cached.dtype == storage_type.dtype_name:
                return cached
            return storage_type.meta(cached.nbytes, cached.location)
        if cached.dtype == storage_type.dtype:
            return cached
        return storage_type.wrap(cached._untyped_storage)

    def _stored_offset(self, info: zipfile.ZipInfo, nbytes: int) -> int:
        offset = member_data_offset(self.src, info)
        if offset + nbytes > self.src.size:
            raise TruncatedCheckpointError(f"member {info.filename} runs past the end of the file",
                                           member=info.filename, expected_size=offset + nbytes,
                                           actual_size=self.src.size)
        self.opts.trace.ranges.append((self.src.name, offset, nbytes))
        return offset

    def _read(self, info: zipfile.ZipInfo, nbytes: int) -> Any:
        _refuse_encrypted(info)
        if info.compress_type != zipfile.ZIP_STORED:
            import torch  # lazy: structure-only reads (inspect, scan) never import torch

            data = bytearray(read_member(self.zf, info, self.src, self.opts)[:nbytes])
            note = "some storages were compressed inside the zip (re-zipped file?); they were decompressed"
            if note not in self.loaded.notes:
                self.loaded.notes.append(note)
            return torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if data else torch.UntypedStorage(0)
        offset = self._stored_offset(info, nbytes)
        if self.mapped:
            self.offsets[info.filename] = (offset, nbytes)
            return self.opts.mapped_storage(self.src, offset, nbytes)
        target = self.opts.into(nbytes) if self.opts.into is not None else None
        if target is not None:  # read straight into its place (a DCP chunk inside its whole tensor)
            self.src.read_into(target, offset, nbytes)
            return target
        return self.src.read_into_storage(offset, nbytes)


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, src: Source, opts: ReadOptions | None = None) -> bytes:
    """A member's bytes; a compressed member may not inflate past a bound (decompression bombs)."""
    _refuse_encrypted(info)
    compressed = info.compress_type != zipfile.ZIP_STORED
    meter = (opts.budget_meter() if opts is not None else Meter(Budget())) if compressed else None
    limit = meter.inflate_room(src.size, src.name) if meter is not None else src.size
    if info.file_size > limit:
        if meter is not None:
            meter.inflate(info.file_size, info.filename, src.size, src.name)  # raises, naming the budget
        raise LimitExceededError(f"member {info.filename} declares {info.file_size} bytes, more than this "
                                 f"{src.size}-byte file can plausibly hold (decompression bomb?)", member=info.filename)
    try:
        with zf.open(info) as fh:
            data = fh.read(limit + 1)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError, RuntimeError,
            struct.error) as exc:  # zipfile's own errors for a damaged member: CRC, inflate, method, flags
        raise CorruptCheckpointError(f"member {info.filename} cannot be read ({type(exc).__name__}: {exc})",
                                     path=src.name, member=info.filename) from None
    if meter is not None:
        meter.inflate(len(data), info.filename, src.size, src.name)  # the budget of the whole file (issue 9)
    elif len(data) > limit:
        raise LimitExceededError(f"member {info.filename} inflates past {limit} bytes", member=info.filename)
    return data



def read_torch_zip(src: Source, opts: ReadOptions, prefix: str, *, torchscript: bool = False,
                   archive: zipfile.ZipFile | None = None) -> Checkpoint:
    """Read a PyTorch zip (or TorchScript) archive; ``archive``: its directory already parsed from ``src``
    (by sniff), closed here."""
    kind = TORCHSCRIPT if torchscript else TORCH_ZIP
    loaded = Checkpoint(format=kind, description=DESCRIPTIONS[kind])
    zf = archive if archive is not None else open_zip(src)
    try:
        if opts.mode is Mode.RECORD:
            check_zip(src, zf, opts, loaded_members=_loaded_members(prefix, torchscript))
        names = set(zf.namelist())
        byteorder = read_member(zf, zf.getinfo(f"{prefix}/byteorder"), src, opts).decode(errors="replace").strip() \
            if f"{prefix}/byteorder" in names else "little"
        if byteorder != "little":
            raise UnsupportedFormatError(f"the checkpoint was written on a {byteorder[:20]!r}-endian machine",
                                         hint="Load it with torch.load on that machine and save it again.")
        if f"{prefix}/version" in names:
            loaded.details["archive_version"] = read_member(zf, zf.getinfo(f"{prefix}/version"), src, opts).decode(
                errors="replace").strip()[:100]
        storages = _ZipStorages(src, zf, prefix, opts, loaded)
        data_pkl = f"{prefix}/data.pkl"
        constants_pkl = f"{prefix}/constants.pkl"
        if data_pkl not in names:
            raise CorruptCheckpointError(f"the archive has no {data_pkl}", member=data_pkl)
        loaded.tree, u = run_pickle(opts, read_member(zf, zf.getinfo(data_pkl), src, opts), src, data_pkl,
                                    persistent_load=storages)
        if torchscript:
            loaded.details["declarations"] = torchscript_declarations(zf, prefix, src, opts)
            if isinstance(loaded.tree, Stub):
                loaded.tree.__dict__["stub_declarations"] = loaded.details["declarations"]
            if constants_pkl in names:
                # TorchScript lite (.ptl) keeps the storages of constants.pkl under constants/
                cstorages = storages if not _has_dir(names, f"{prefix}/constants/") else \
                    _ZipStorages(src, zf, prefix, opts, loaded, folder="constants")
                loaded.details["constants"], _ = run_pickle(opts, read_member(zf, zf.getinfo(constants_pkl), src, opts),
                                                            src, constants_pkl, persistent_load=cstorages)
        loaded.details["locations"] = dict(storages.locations)
        loaded.details["mapped_ranges"] = list(storages.offsets.values())
        loaded.details["storage_bytes"] = storages.budget.total
        return loaded
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"damaged zip archive or member: {exc}") from None
    except (zipfile.LargeZipFile, struct.error) as exc:
        raise LimitExceededError(f"zip archive beyond limits: {exc}") from None
    finally:
        zf.close()


def _has_dir(names: set[str], folder: str) -> bool:
    return any(n.startswith(folder) for n in names)


def _loaded_members(prefix: str, torchscript: bool) -> Callable[[str], bool]:
    """Members whose pickles the reader runs (and their storages): everything else is not read."""
    def loaded(name: str) -> bool:
        return name in (f"{prefix}/data.pkl", f"{prefix}/constants.pkl") or name.startswith(
            (f"{prefix}/data/", f"{prefix}/constants/")) or (torchscript and name.endswith(".debug_pkl"))
    return loaded


_TORCHSCRIPT_EXTRAS = (".debug_pkl", "/traced_inputs.pkl", "/bytecode.pkl")  # written by torch.jit.save, never loaded
_OK_FLAGS = 0x0008 | 0x0800  # data descriptor, UTF-8 names: what torch writes


def check_zip(src: Source, zf: zipfile.ZipFile, opts: ReadOptions,
              loaded_members: Callable[[str], bool] = lambda name: False) -> None:
    """The container checks of a zip archive (record mode): tricks that make readers disagree about its
    content. Pickles in members the loader never reads are run in record mode so that scan reports them."""
    checks = opts.trace.checks
    infos = zf.infolist()
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        checks.append(Check("duplicate member names (which one a reader uses differs)"))
    first = min((i.header_offset for i in infos), default=0)
    if first > 0:
        checks.append(Check(f"{first} bytes before the first zip member (polyglot)", None, 0))
    pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) > 1:
        checks.append(Check(f"{len(pkls)} data.pkl members: {pkls[:5]}"))
    for info in infos:
        name = info.filename
        if info.flag_bits & ~_OK_FLAGS:
            checks.append(Check(f"unusual zip flags 0x{info.flag_bits:04x}"
                                + (" (encrypted)" if info.flag_bits & 1 else ""), name))
        header = src.read_at(info.header_offset, 30)
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            checks.append(Check("local header missing or damaged", name, info.header_offset))
            continue
        flags, method = struct.unpack("<HH", header[6:10])
        name_len = struct.unpack("<H", header[26:28])[0]
        local_name = src.read_at(info.header_offset + 30, name_len)
        if local_name.decode("utf-8", "replace") != name or method != info.compress_type or \
                (flags & ~0x0800) != (info.flag_bits & ~0x0800):
            checks.append(Check(f"local header disagrees with the central directory (local name "
                                f"{local_name[:60]!r}, method {method})", name, info.header_offset))
        if loaded_members(name) or "/data/" in name or "/traced_inputs/" in name or info.file_size == 0 \
                or info.flag_bits & 1:
            continue
        try:
            data = read_member(zf, info, src, opts)
        except CheckpointError as exc:
            checks.append(Check(f"member cannot be read: {exc.reason}", name))
            continue
        except (zipfile.BadZipFile, NotImplementedError, EOFError, OSError, ValueError) as exc:
            checks.append(Check(f"member cannot be read: {exc}", name))
            continue
        if name.endswith((".pkl", ".debug_pkl")) or (data[:1] == b"\x80" and len(data) > 1 and 1 <= data[1] <= 5):
            if not name.endswith(_TORCHSCRIPT_EXTRAS):
                checks.append(Check("pickle in a member the loader never reads (hidden payload?)", name))
            try:  # run for its globals; the storages it names are placeholders, never read
                run_pickle(opts, data, src, name, loaded=False, persistent_load=_placeholder_storage)
            except CheckpointError as exc:
                checks.append(Check(f"that pickle cannot be parsed to its end: {exc.reason}", name))
    end = _eocd_end(src)
    if end is not None and end < src.size:
        checks.append(Check(f"{src.size - end} bytes after the end of the zip archive", None, end))


def _placeholder_storage(pid: Any) -> MetaStorage:
    if not isinstance(pid, tuple) or len(pid) < 5 or not isinstance(pid[1], StorageType) or type(pid[4]) is not int \
            or not 0 <= pid[4] < 1 << 48:
        raise CorruptCheckpointError(f"unexpected persistent id {pid!r:.100}")
    return pid[1].meta(pid[4] * pid[1].itemsize)


def _eocd_end(src: Source) -> int | None:
    tail_len = min(src.size, 65_557)
    tail = src.read_at(src.size - tail_len, tail_len)
    i = tail.rfind(b"PK\x05\x06")
    if i < 0 or i + 22 > len(tail):
        return None
    (comment_len,) = struct.unpack("<H", tail[i + 20:i + 22])
    return int(src.size - tail_len + i + 22 + comment_len)


_CLASS_RE = re.compile(r"^class (\w+)\(Module\):\n((?:  .*\n|\n)*)", re.M)
_LIST_RE = re.compile(r"^  (__parameters__|__buffers__) = \[(.*?)\]", re.M)


def torchscript_declarations(zf: zipfile.ZipFile, prefix: str, src: Source,
                             opts: ReadOptions | None = None) -> dict[str, dict[str, list[str]]]:
    """``{"__torch__.pkg.Class": {"__parameters__": [...], "__buffers__": [...]}}`` read as text.

    Every member inflates under the one meter of this read (``opts``): the file's inflation budget
    covers ``code/`` too, not a fresh allowance per member."""
    out: dict[str, dict[str, list[str]]] = {}
    for info in zf.infolist():
        name = info.filename
        if not name.startswith(f"{prefix}/code/") or not name.endswith(".py") or info.file_size > 16 << 20:
            continue
        module = name[len(prefix) + len("/code/"):-3].replace("/", ".")
        text = read_member(zf, info, src, opts).decode("utf-8", "replace")
        for m in _CLASS_RE.finditer(text):
            decl: dict[str, list[str]] = {}
            for lm in _LIST_RE.finditer(m.group(2)):
                decl[lm.group(1)] = re.findall(r'"([^"]*)"', lm.group(2))
            out[f"{module}.{m.group(1)}"] = decl
    return out


_SCAN_CHUNK = 16 << 20
_MAX_MEMBERS = 100_000


def _descriptor_end(src: Source, start: int) -> tuple[int, int] | None:
    """``(data end, descriptor end)`` for member data starting at ``start``: the first ``PK\\x07\\x08``
    whose compressed size (32- or 64-bit) equals the bytes before it. None when the file ends first."""
    pos = start
    while pos < src.size:
        chunk = src.read_at(pos, _SCAN_CHUNK + 24)
        at = chunk.find(b"PK\x07\x08")
        while at != -1 and at < _SCAN_CHUNK:
            here = pos + at
            tail = chunk[at:at + 24]
            if len(tail) >= 16 and struct.unpack("<I", tail[8:12])[0] == here - start:
                return here, here + 16
            if len(tail) >= 24 and struct.unpack("<Q", tail[8:16])[0] == here - start:
                return here, here + 24
            at = chunk.find(b"PK\x07\x08", at + 1)
        pos += _SCAN_CHUNK
    return None


def _declared_storages(src: Source, start: int, end: int) -> dict[str, int] | None:
    """Storage key -> bytes, as the pickle ``[start, end)`` (a complete ``data.pkl``) declares them; run in
    structure mode under the default policy and budget (nothing is imported, no tensor data is read)."""
    declared: dict[str, int] = {}

    def record(pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 5 and isinstance(pid[1], StorageType) and isinstance(pid[4], int):
            declared[ascii_text(pid[2])] = pid[4] * pid[1].itemsize
            return pid[1].meta(pid[4] * pid[1].itemsize, ascii_text(pid[3]))
        raise CorruptCheckpointError(f"unexpected persistent id {pid!r:.100}")

    try:
        run_pickle(ReadOptions(mode=Mode.STRUCTURE), src.read_at(start, end - start), src, "data.pkl",
                   persistent_load=record)
    except (CheckpointError, ValueError):
        return None
    return declared


def expected_zip_size(src: Source) -> tuple[int | None, bool, str]:
    """For a zip archive without its central directory: ``(expected size, exact, what is missing)``.

    Walks the local member records from the start (each one's end found from its header or its data
    descriptor). When every member is complete, the expected size is where their data ends plus the
    central directory they need and the end records torch writes (zip64 locator and end record): exact
    for files written by ``torch.save``. When the file is cut inside a member, the storage sizes that the
    (complete) ``data.pkl`` declares give a lower bound. Local files and bytes only (a URL would be read
    whole); ``(None, False, ...)`` when nothing can be said.
    """
    if src.url is not None:
        return None, False, "the central directory is missing"
    offset, directory, members, done = 0, 0, 0, set()
    pickle_range: tuple[int, int] | None = None
    while offset + 30 <= src.size and members < _MAX_MEMBERS:
        header = src.read_at(offset, 30)
        if header[:4] != b"PK\x03\x04":
            break
        flags, compressed, name_len, extra_len = (struct.unpack("<H", header[6:8])[0],
                                                  struct.unpack("<I", header[18:22])[0],
                                                  *struct.unpack("<HH", header[26:30]))
        name = src.read_at(offset + 30, name_len).decode("utf-8", "replace")
        start = offset + 30 + name_len + extra_len
        ends = _descriptor_end(src, start) if flags & 0x8 else \
            ((start + compressed, start + compressed) if compressed != 0xFFFFFFFF else None)
        if ends is None or ends[1] > src.size:
            cut = f"the file is cut inside member {name!r} (its data starts at byte {start:,})"
            if pickle_range is None:
                return None, False, cut
            declared = _declared_storages(src, *pickle_range)
            prefix = name.split("/", 1)[0]
            missing = sum(n for key, n in (declared or {}).items() if f"{prefix}/data/{key}" not in done)
            if not declared:
                return None, False, cut
            later = sum(46 + (30 if f"{prefix}/data/{k}" != name else 0) + len(f"{prefix}/data/{k}".encode())
                        for k in declared if f"{prefix}/data/{k}" not in done)  # headers and directory entries
            return start + missing + later + directory + 56 + 20 + 22, False, cut
        if name.endswith("/data.pkl") and pickle_range is None:
            pickle_range = (start, ends[0])
        done.add(name)
        directory += 46 + name_len
        members += 1
        offset = ends[1]
    if not members or offset < src.size and src.read_at(offset, 4) != b"PK\x01\x02":
        return None, False, "the central directory is missing"
    return offset + directory + 56 + 20 + 22, True, f"the central directory of its {members} members is missing"
