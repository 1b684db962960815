"""``torchckpt.scan``: list every global every pickle in a file imports, and every container trick.

Scanners have been bypassed because they parsed files differently from the loader. ``scan`` runs
the *same* pickle VM and policy as ``load``, in record mode (nothing is constructed or called), over
every pickle stream of every container, and treats whatever it cannot parse as a finding, never a skip.

Findings: a dangerous global (blocklist), a pickle that cannot be parsed to its end, a container trick
(compressed/encrypted/flag-odd zip members, local header vs central directory disagreement, bytes
before or after the archive, pickles in members the loader never reads, compressed wrappers).
Classes that would merely be stubbed are listed; they are findings only with ``strict=True``.
"""

from __future__ import annotations

import os
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from ..errors import CheckpointError
from ..read.sniff import LEGACY_MAGIC_PICKLE, NUMPY, PICKLE, SAFETENSORS, TORCH_LEGACY, TORCH_TAR, TORCH_ZIP, TORCHSCRIPT, \
    Sniffed, sniff
from ..storage.remote import is_url, remote_listing
from ..storage.source import Source
from ..read.unpickle.machine import GlobalRef, Unpickler
from ..read.unpickle.policy import Policy, Verdict

__all__ = ["scan", "ScanReport", "FileScan", "Finding"]

_SCAN_POLICY = Policy(construct=False)
_OK_FLAGS = 0x0008 | 0x0800  # data descriptor, UTF-8 names: what torch writes


@dataclass
class Finding:
    kind: str  # "dangerous-global" | "unparsable-pickle" | "container" | "stubbed-class" (strict)
    message: str
    member: str | None = None
    offset: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "member": self.member, "offset": self.offset}


@dataclass
class FileScan:
    path: str
    format: str = "unknown"
    status: str = "clean"  # "clean" | "findings" | "unreadable" | "skipped" (not a checkpoint, met in a walk)
    streams: list[dict[str, Any]] = field(default_factory=list)  # member, offset, globals, complete
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None

    @property
    def globals(self) -> list[GlobalRef]:
        return [g for s in self.streams for g in s["globals"]]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "status": self.status, "error": self.error,
                "findings": [f.to_dict() for f in self.findings],
                "streams": [{"member": s["member"], "offset": s["offset"], "complete": s["complete"],
                             "globals": [{"name": g.fullname, "verdict": g.verdict.value, "offset": g.offset}
                                         for g in s["globals"]]} for s in self.streams]}


@dataclass
class ScanReport:
    files: list[FileScan]

    @property
    def exit_code(self) -> int:
        if any(f.status == "findings" for f in self.files):
            return 1
        if any(f.status == "unreadable" for f in self.files):
            return 3
        return 0

    @property
    def clean(self) -> bool:
        return self.exit_code == 0

    def to_dict(self) -> dict[str, Any]:
        return {"exit_code": self.exit_code, "files": [f.to_dict() for f in self.files]}


def scan(paths: str | os.PathLike | Iterable[str | os.PathLike], *, recursive: bool = False,
         strict: bool = False, progress: Callable[[int, int], None] | None = None,
         storage_options: Mapping[str, Any] | None = None) -> ScanReport:
    """Scan files (directories with ``recursive=True``) without executing anything from them.

    Paths may be URLs (``storage_options`` for their filesystem); a URL prefix is a directory.
    ``progress(done, total)`` is called after each file.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    todo: list[tuple[str, bool]] = []  # (path, named explicitly)
    files: list[FileScan] = []
    for p in paths:
        p = os.fspath(p)
        if is_url(p):
            try:
                listed = remote_listing(p, storage_options) if recursive else None
            except CheckpointError as exc:
                files.append(FileScan(p, status="unreadable", error=str(exc.reason)))
                continue
            if listed:
                todo.extend((url, False) for url in listed)
            else:
                todo.append((p, True))
        elif os.path.isdir(p):
            if not recursive:
                files.append(FileScan(p, status="unreadable", error="is a directory (use recursive=True)"))
                continue
            for root, dirs, names in os.walk(p):
                dirs.sort()
                todo.extend((os.path.join(root, name), False) for name in sorted(names))
        else:
            todo.append((p, True))
    for i, (path, explicit) in enumerate(todo, 1):
        files.append(scan_file(path, strict=strict, explicit=explicit, storage_options=storage_options))
        if progress is not None:
            progress(i, len(todo))
    return ScanReport(files)


def scan_file(path: str, *, strict: bool = False, explicit: bool = True,
              storage_options: Mapping[str, Any] | None = None) -> FileScan:
    """Scan one file. Files met while walking a directory that are not checkpoints at all (JSON,
    text, HTML) are ``skipped``; named explicitly, they are ``unreadable``."""
    from ..errors import NotACheckpointError

    result = FileScan(path)
    try:
        with Source(path, storage_options=storage_options) as src:
            sniffed = sniff(src)
            result.format = sniffed.kind
            _scan_container(src, sniffed, result)
    except CheckpointError as exc:
        not_checkpoint = isinstance(exc, NotACheckpointError) or result.format == "unknown"
        result.status = "skipped" if not_checkpoint and not explicit else "unreadable"
        result.error = exc.reason
        return result
    except (OSError, ValueError, EOFError, IndexError, KeyError, TypeError, OverflowError, struct.error,
            zipfile.BadZipFile) as exc:
        result.status, result.error = "unreadable", f"{type(exc).__name__}: {exc}"
        return result
    for g in result.globals:
        if g.verdict is Verdict.DANGEROUS:
            result.findings.append(Finding("dangerous-global", f"imports {g.fullname}, which can run code",
                                           g.member, g.offset))
        elif strict and g.verdict is Verdict.UNKNOWN:
            result.findings.append(Finding("stubbed-class", f"imports {g.fullname} (not on the allowlist)",
                                           g.member, g.offset))
    if result.findings:
        result.status = "findings"
    elif result.status != "unreadable" and result.error:
        result.status = "unreadable"
    return result


def _scan_stream(data: Any, result: FileScan, member: str | None, start: int = 0, end: int | None = None) -> int:
    """Record one pickle stream; returns the offset after it (or the end if it broke)."""
    u = Unpickler(data, policy=_SCAN_POLICY, record_only=True, start=start, end=end, member=member)
    stream = {"member": member, "offset": start, "globals": u.globals, "complete": True}
    result.streams.append(stream)
    try:
        u.load()
    except CheckpointError as exc:
        stream["complete"] = False
        where = getattr(exc, "offset", None)
        result.findings.append(Finding("unparsable-pickle", f"the pickle cannot be parsed to its end: {exc.reason}",
                                       member, where))
        return len(data) if end is None else end
    return u.pos


def _scan_container(src: Source, sniffed: Sniffed, result: FileScan) -> None:
    kind = sniffed.kind
    if src.path is not None and src.path.endswith(".distcp") and \
            os.path.isfile(os.path.join(os.path.dirname(src.path), ".metadata")):
        _scan_distcp(src, result)
        return
    if kind in (TORCH_ZIP, TORCHSCRIPT, "zip", "ambiguous-zip", "bad-zip"):
        _scan_zip(src, result)
    elif kind == TORCH_LEGACY:
        _scan_legacy(src, result)
    elif kind == PICKLE:
        _scan_pickles(src.buffer(), result, None)
    elif kind == TORCH_TAR:
        _scan_tar(src, result)
    elif kind == NUMPY:
        _scan_numpy(src, result)
    elif kind in ("gzip", "7z", "bzip2", "xz"):
        result.findings.append(Finding("container", f"{kind}-compressed wrapper: its contents cannot be checked "
                                                    "without unpacking (torch.load does not unpack it either)"))
    elif kind in (SAFETENSORS, "lua-t7"):
        if kind == SAFETENSORS:
            from ..read.formats.simple import safetensors_header

            safetensors_header(src)
    else:
        from ..read.formats import diagnose

        raise diagnose(src, sniffed)
    if kind not in ("zip", TORCH_ZIP, TORCHSCRIPT) and src.size > 22:
        tail = src.read_at(max(0, src.size - 65_557), 65_557)
        if b"PK\x05\x06" in tail and kind != NUMPY:
            result.findings.append(Finding("container", "a zip archive is appended to the file (polyglot)"))


def _scan_distcp(src: Source, result: FileScan) -> None:
    """A DCP data file is a run of torch.save streams at the ranges .metadata records: scan each one."""
    from ..read.formats.dcp import _attrs
    from ..read.unpickle.stubs import Stub

    assert src.path is not None
    name = os.path.basename(src.path)
    meta = os.path.join(os.path.dirname(src.path), ".metadata")
    try:
        with Source(meta) as msrc:
            metadata = Unpickler(msrc.buffer(), policy=Policy(), meta=True).load()
        storage = metadata.stub_attributes().get("storage_data") if isinstance(metadata, Stub) else None
        ranges = sorted((info["offset"], info["length"], _attrs(index, "index").get("fqn"))
                        for index, info in ((i, _attrs(v, "record")) for i, v in (storage or {}).items())
                        if info.get("relative_path") == name)
    except (CheckpointError, KeyError, TypeError, AttributeError) as exc:
        result.findings.append(Finding("container", f"its .metadata cannot describe it ({exc}); scanned as a "
                                                    "single archive"))
        _scan_zip(src, result)
        return
    covered = 0
    for offset, length, fqn in ranges:
        if not (isinstance(offset, int) and isinstance(length, int)) or offset + length > src.size or offset < 0:
            result.findings.append(Finding("container", f"item {fqn} lies outside the file", None, offset))
            continue
        with Source(src.read_at(offset, length), name=f"{name}[{fqn}]") as item:
            sub = FileScan(item.name)
            _scan_container(item, sniff(item), sub)
            for stream in sub.streams:
                stream["member"] = f"{fqn}: {stream['member']}"
            result.streams.extend(sub.streams)
            result.findings.extend(Finding(f.kind, f.message, f"{fqn}: {f.member}", f.offset) for f in sub.findings)
        covered += length
    if covered < src.size:
        result.findings.append(Finding("container", f"{src.size - covered} bytes are not described by .metadata"))


def _scan_pickles(data: Any, result: FileScan, member: str | None) -> None:
    pos, end = 0, len(data)
    while pos < end:
        pos = _scan_stream(data, result, member, pos)
        rest = bytes(data[pos:pos + 16])
        if not rest.strip(b"\x00\n\r\t "):
            break
        if rest[:1] != b"\x80":
            result.findings.append(Finding("container", f"{end - pos} bytes of non-pickle data after the pickle",
                                           member, pos))
            break


def _scan_legacy(src: Source, result: FileScan) -> None:
    buf = src.buffer()
    pos = 0
    for what in ("magic number", "protocol version", "system info", "object", "storage keys"):
        if pos >= src.size:
            result.findings.append(Finding("unparsable-pickle", f"the file ends before the {what} pickle",
                                           None, pos))
            return
        before = len(result.findings)
        pos = _scan_stream(buf, result, f"<{what} pickle>", pos)
        if len(result.findings) > before:
            return


def _local_header(src: Source, info: zipfile.ZipInfo) -> tuple[int, int, int, bytes] | None:
    header = src.read_at(info.header_offset, 30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        return None
    flags, method = struct.unpack("<HH", header[6:10])
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    name = src.read_at(info.header_offset + 30, name_len)
    return flags, method, info.header_offset + 30 + name_len + extra_len, name


def _scan_zip(src: Source, result: FileScan) -> None:
    try:
        zf = zipfile.ZipFile(src.open())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as exc:
        raise CheckpointError(f"damaged zip archive ({exc})") from None
    with zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            result.findings.append(Finding("container", "duplicate member names (which one a reader uses differs)"))
        first = min((i.header_offset for i in infos), default=0)
        if first > 0:
            result.findings.append(Finding("container", f"{first} bytes before the first zip member (polyglot)",
                                           None, 0))
            if src.head(2)[:1] == b"\x80" or src.head(len(LEGACY_MAGIC_PICKLE)) == LEGACY_MAGIC_PICKLE:
                _scan_pickles(src.read_at(0, first), result, "<bytes before the zip>")
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        for info in infos:
            name = info.filename
            if info.flag_bits & ~_OK_FLAGS:
                result.findings.append(Finding("container", f"unusual zip flags 0x{info.flag_bits:04x}"
                                               + (" (encrypted)" if info.flag_bits & 1 else ""), name))
            torchscript_text = "/code/" in name or name.endswith(".debug_pkl")  # torch.jit.save compresses these
            if info.compress_type != zipfile.ZIP_STORED and not torchscript_text:
                result.findings.append(Finding("container", f"compressed member (method {info.compress_type}); "
                                                            "torch.save never compresses", name))
            local = _local_header(src, info)
            if local is None:
                result.findings.append(Finding("container", "local header missing or damaged", name,
                                               info.header_offset))
                continue
            flags, method, data_offset, local_name = local
            if local_name.decode("utf-8", "replace") != name or method != info.compress_type or \
                    (flags & ~0x0800) != (info.flag_bits & ~0x0800):
                result.findings.append(Finding("container", "local header disagrees with the central directory "
                                               f"(local name {local_name[:60]!r}, method {method})", name,
                                               info.header_offset))
            is_storage = "/data/" in name and not name.endswith(".pkl")
            if is_storage or info.file_size == 0 or info.flag_bits & 1:
                continue
            if info.file_size > src.size * 20 + (1 << 20):
                result.findings.append(Finding("container", f"member declares {info.file_size} bytes "
                                                            "(decompression bomb?)", name))
                continue
            try:
                data = zf.read(info)
            except (zipfile.BadZipFile, NotImplementedError, EOFError, OSError) as exc:
                result.findings.append(Finding("container", f"member cannot be read: {exc}", name))
                continue
            looks_pickle = data[:1] == b"\x80" and len(data) > 1 and 1 <= data[1] <= 5
            if name.endswith((".pkl", ".debug_pkl")) or looks_pickle:
                if not (name in pkls or name.endswith(("/constants.pkl", ".debug_pkl", "/traced_inputs.pkl"))):
                    result.findings.append(Finding("container", "pickle in a member the loader never reads "
                                                                "(hidden payload?)", name))
                _scan_pickles(data, result, name)
        if len(pkls) > 1:
            result.findings.append(Finding("container", f"{len(pkls)} data.pkl members: {pkls}"))
        end_of_archive = _eocd_end(src)
        if end_of_archive is not None and end_of_archive < src.size:
            result.findings.append(Finding("container", f"{src.size - end_of_archive} bytes after the end of the "
                                                        "zip archive", None, end_of_archive))


def _eocd_end(src: Source) -> int | None:
    tail_len = min(src.size, 65_557)
    tail = src.read_at(src.size - tail_len, tail_len)
    i = tail.rfind(b"PK\x05\x06")
    if i < 0 or i + 22 > len(tail):
        return None
    (comment_len,) = struct.unpack("<H", tail[i + 20:i + 22])
    return src.size - tail_len + i + 22 + comment_len


def _scan_tar(src: Source, result: FileScan) -> None:
    import tarfile

    with tarfile.open(fileobj=src.open(), mode="r:") as tf:
        for info in tf.getmembers():
            if not info.isfile():
                continue
            fh = tf.extractfile(info)
            data = fh.read() if fh is not None else b""
            if info.name in ("pickle", "sys_info"):
                _scan_pickles(data, result, info.name)
            elif info.name in ("storages", "tensors"):
                _scan_stream(data, result, info.name)  # the count; records follow with raw data between
            elif data[:1] == b"\x80":
                result.findings.append(Finding("container", "pickle in an unexpected tar member", info.name))
                _scan_pickles(data, result, info.name)


def _scan_numpy(src: Source, result: FileScan) -> None:
    import io

    data = bytes(src.buffer())
    blobs: list[tuple[str | None, bytes]] = []
    if data.startswith(b"PK"):
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            blobs = [(n, zf.read(n)) for n in zf.namelist()]
    else:
        blobs = [(None, data)]
    for name, blob in blobs:
        if not blob.startswith(b"\x93NUMPY") or len(blob) < 12:
            continue
        major = blob[6]
        hlen_size = 2 if major == 1 else 4
        (hlen,) = struct.unpack("<H" if hlen_size == 2 else "<I", blob[8:8 + hlen_size])
        header = blob[8 + hlen_size:8 + hlen_size + hlen]
        if b"'|O'" in header or b'"|O"' in header:
            start = 8 + hlen_size + hlen
            result.findings.append(Finding("container", "object array: its data is a pickle", name, start))
            _scan_pickles(blob[start:], result, name)
