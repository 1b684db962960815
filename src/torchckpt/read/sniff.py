"""Decide a file's format from its content, never from its extension.

:func:`sniff` looks at the first bytes (and, for zip archives, the member names in the central
directory) and returns a :class:`Sniffed` with the evidence. Files that are not checkpoints at all
(git-lfs pointers, HTML error pages, JSON, archives) are recognised so that the caller can say
what happened instead of "invalid load key".
"""

from __future__ import annotations

import re
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Any

from ..storage.source import Source

__all__ = ["Sniffed", "sniff", "LEGACY_MAGIC", "LEGACY_MAGIC_PICKLE"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_MAGIC_PICKLE = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."

# Format kinds.
TORCH_ZIP = "torch-zip"
TORCHSCRIPT = "torchscript"
TORCH_LEGACY = "torch-legacy"
TORCH_TAR = "torch-tar"
SAFETENSORS = "safetensors"
PICKLE = "pickle"
NUMPY = "numpy"
LUA_T7 = "lua-t7"
DCP_SHARD = "dcp-shard"  # one data file of a torch.distributed.checkpoint folder: refused alone

DESCRIPTIONS = {
    TORCH_ZIP: "PyTorch zip format (torch >= 1.6)",
    TORCHSCRIPT: "TorchScript archive",
    TORCH_LEGACY: "PyTorch legacy stream format (torch 0.4 - 1.5)",
    TORCH_TAR: "PyTorch legacy tar format (torch < 0.4)",
    SAFETENSORS: "safetensors",
    "sharded": "sharded checkpoint index",
    PICKLE: "plain Python pickle",
    NUMPY: "numpy .npy/.npz",
    LUA_T7: "Lua Torch7 binary file",
}


@dataclass
class Sniffed:
    kind: str
    evidence: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    # a PyTorch zip's directory as sniff parsed it, for the reader to take (:meth:`take_archive`): parsed once
    archive: zipfile.ZipFile | None = field(default=None, repr=False, compare=False)

    def take_archive(self) -> zipfile.ZipFile | None:
        """The open archive sniff parsed, now the caller's to close (None when there is none, or it was taken)."""
        archive, self.archive = self.archive, None
        return archive

    @property
    def description(self) -> str:
        return DESCRIPTIONS.get(self.kind, self.kind)


_PICKLE_FIRST_OPS = set(b"(}]cN)KJMIFSUVXG\x8c\x80")


def sniff(src: Source) -> Sniffed:
    """Identify the format of ``src``. Never raises for unknown content: kind ``"unknown"``."""
    size = src.size
    head = src.head(4096)
    if size == 0:
        return Sniffed("empty", ["the file is 0 bytes long"])
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _sniff_zip(src)
    if head.startswith(LEGACY_MAGIC_PICKLE):
        return Sniffed(TORCH_LEGACY, ["starts with the pickled PyTorch magic number 0x1950a86a20f9469cfc6c"])
    if len(head) >= 262 and head[257:262] == b"ustar":
        return _sniff_tar(src)
    st = _sniff_safetensors(head, size)
    if st is not None:
        return st
    if head.startswith(b"\x93NUMPY"):
        return Sniffed(NUMPY, ["numpy .npy magic"])
    text = _sniff_text(head)
    if text is not None:
        return text
    for magic, kind, why in _OTHER_MAGIC:
        if head.startswith(magic):
            return Sniffed(kind, [why])
    t7 = _sniff_t7(head)
    if t7 is not None:
        return t7
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        if _legacy_with_other_protocol(head):
            return Sniffed(TORCH_LEGACY, [f"a protocol {head[1]} pickle of the PyTorch magic number"])
        return Sniffed(PICKLE, [f"pickle protocol {head[1]} header"])
    if head[:1] and head[0] in _PICKLE_FIRST_OPS:
        return Sniffed(PICKLE, ["starts like a protocol 0/1 pickle"])
    return Sniffed("unknown", [f"first bytes {head[:16].hex(' ')}"])


def _legacy_with_other_protocol(head: bytes) -> bool:
    # pickle(MAGIC_NUMBER, protocol=N): look for the 10 little-endian bytes of the number
    return LEGACY_MAGIC.to_bytes(10, "little") in head[:32]


def _sniff_zip(src: Source) -> Sniffed:
    try:
        zf = zipfile.ZipFile(src.open())  # on the source's own file: nothing to close but the archive
        names = zf.namelist()
        first = min((i.header_offset for i in zf.infolist()), default=0)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error, NotImplementedError,
            UnicodeDecodeError, OverflowError) as exc:  # ValueError covers UnicodeDecodeError of member names
        return Sniffed("bad-zip", [f"starts like a zip archive but its directory is unreadable ({exc})"],
                       {"size": src.size})
    sniffed = _zip_kind(src, names, first)
    if sniffed.kind in (TORCH_ZIP, TORCHSCRIPT):
        sniffed.archive = zf
    else:
        zf.close()
    return sniffed


def _zip_kind(src: Source, names: list[str], first: int) -> Sniffed:
    # an archive right after another whole one (its end record just before): the layout of a DCP shard
    if first >= 22 and src.read_at(0, 4) == b"PK\x03\x04" and src.read_at(first - 22, 4) == b"PK\x05\x06":
        return Sniffed(DCP_SHARD, [f"zip archives back to back (the last starts at byte {first}): the layout of "
                                   "a torch.distributed.checkpoint shard (__0_0.distcp)"], {"size": src.size})
    tops = {n.split("/", 1)[0] for n in names if "/" in n}
    pkls = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    details: dict[str, Any] = {"members": len(names)}
    jsons = [n for n in names if n.count("/") == 1 and n.endswith("/model.json")]
    if not pkls and len(jsons) == 1:  # TorchScript of torch < 1.2: model.json + tensors/N
        details.update(prefix=jsons[0].split("/")[0], model_json=True)
        return Sniffed(TORCHSCRIPT, [f"zip archive with {jsons[0]} (TorchScript, torch < 1.2)"], details)
    if any("/code/" in n for n in names) or any(n.endswith("/constants.pkl") for n in names):
        prefix = pkls[0].split("/")[0] if pkls else next(iter(tops), "")
        details["prefix"] = prefix
        return Sniffed(TORCHSCRIPT, ["zip archive with code/ and constants.pkl (torch.jit.save)"], details)
    if len(pkls) == 1:
        details["prefix"] = pkls[0].split("/")[0]
        return Sniffed(TORCH_ZIP, [f"zip archive with {pkls[0]}"], details)
    if len(pkls) > 1:
        details["candidates"] = pkls
        return Sniffed("ambiguous-zip", [f"zip archive with {len(pkls)} data.pkl members"], details)
    if names and all(n.endswith(".npy") for n in names):
        return Sniffed(NUMPY, ["zip archive of .npy members (numpy .npz)"], details)
    if any(n == ".metadata" or n.endswith("/.metadata") for n in names):
        return Sniffed("dcp", ["torch.distributed.checkpoint metadata"], details)
    details["names"] = names[:10]
    return Sniffed("zip", ["a zip archive without data.pkl"], details)


def _sniff_tar(src: Source) -> Sniffed:
    import tarfile

    try:
        with tarfile.open(fileobj=src.open(), mode="r:") as tf:
            names = tf.getnames()
    except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
        return Sniffed("tar", [f"tar archive that cannot be read ({exc})"])
    if {"pickle", "storages", "tensors"} <= set(names):
        return Sniffed(TORCH_TAR, ["tar archive with pickle, storages and tensors members"], {"members": names})
    return Sniffed("tar", ["a tar archive that is not a PyTorch checkpoint"], {"names": names[:10]})


def _sniff_safetensors(head: bytes, size: int) -> Sniffed | None:
    if len(head) < 10:
        return None
    (n,) = struct.unpack("<Q", head[:8])
    if n < 2 or head[8:9] != b"{":
        return None
    if n > size - 8:  # a cut-off download: only a JSON key right after the length says safetensors
        if head[8:10] != b'{"' or n >= 1 << 32:
            return None
        return Sniffed(SAFETENSORS, [f"8-byte header length {n} followed by a JSON object, but the file ends "
                                     f"after {size} bytes"], {"header_size": n})
    return Sniffed(SAFETENSORS, [f"8-byte header length {n} followed by a JSON object"], {"header_size": n})


_OTHER_MAGIC = [
    (b"\x1f\x8b", "gzip", "gzip magic bytes"),
    (b"7z\xbc\xaf\x27\x1c", "7z", "7-Zip magic bytes"),
    (b"BZh", "bzip2", "bzip2 magic bytes"),
    (b"\xfd7zXZ\x00", "xz", "xz magic bytes"),
    (b"\x89HDF\r\n\x1a\n", "hdf5", "HDF5 magic bytes (Keras .h5?)"),
    (b"\x08\x01\x12", "protobuf", "looks like a protobuf (ONNX or TensorFlow?)"),
    (b"GGUF", "gguf", "GGUF magic bytes (llama.cpp)"),
]


def _sniff_text(head: bytes) -> Sniffed | None:
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if stripped.startswith(b"version https://git-lfs.github.com/spec/"):
        m = re.search(rb"size (\d+)", stripped)
        return Sniffed("git-lfs", ["git-lfs pointer text"], {"lfs_size": int(m.group(1)) if m else None})
    low = stripped[:512].lower()
    if low.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")) or b"<html" in low[:200]:
        m = re.search(rb"<title>(.*?)</title>", stripped, re.I | re.S)
        title = m.group(1).decode("utf-8", "replace").strip()[:120] if m else None
        return Sniffed("html", ["HTML text"], {"title": title})
    if stripped[:1] in (b"{", b"[") and _is_text(head):
        return Sniffed("json", ["JSON text"])
    return None


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in head


def _sniff_t7(head: bytes) -> Sniffed | None:
    # Binary Torch7: int32 type tag (3 = table, 4 = torch object), then an int32 reference index.
    if len(head) < 12:
        return None
    tag, index = struct.unpack("<ii", head[:8])
    strlen = struct.unpack("<i", head[8:12])[0]
    text = head[12:12 + strlen] if 0 < strlen <= 200 else b""
    if tag == 4 and index >= 1 and text and (text.startswith(b"V ") or re.fullmatch(rb"[A-Za-z_][\w.]*", text)):
        m = re.search(rb"(torch|nn|cudnn|tds)\.[A-Za-z0-9_.]+", head[:200])
        cls = m.group(0).decode() if m else "a torch class"
        return Sniffed(LUA_T7, [f"Torch7 object record (class {cls})"], {"class": cls})
    if tag == 3 and index >= 1 and 0 <= struct.unpack("<i", head[8:12])[0] < 1 << 24:
        return Sniffed(LUA_T7, ["Torch7 table record"])
    if tag in (6, 7, 8) and index >= 1 and 0 < struct.unpack("<i", head[8:12])[0] < 1 << 26 \
            and head[12:14] == b"\x1bL":
        return Sniffed(LUA_T7, ["Torch7 serialized Lua function (bytecode is never executed)"])
    if tag in (1, 2, 5) and index >= 0 and len(head) < 64 and head[:4] != b"\x80\x02":
        return Sniffed(LUA_T7, ["Torch7 scalar record"])
    return None
