"""A tiny pickle assembler for hand-built streams (attacks, odd opcodes). Nothing here unpickles."""

from __future__ import annotations

import io
import pickle
import struct
import zipfile

PROTO2 = b"\x80\x02"
PROTO4 = b"\x80\x04"
MARK, STOP, TUPLE, REDUCE, BUILD, NONE = b"(", b".", b"t", b"R", b"b", b"N"
EMPTY_DICT, EMPTY_TUPLE, SETITEM, SETITEMS = b"}", b")", b"s", b"u"
TUPLE1, TUPLE2, TUPLE3, NEWOBJ, OBJ, MEMOIZE, STACK_GLOBAL = b"\x85", b"\x86", b"\x87", b"\x81", b"o", b"\x94", b"\x93"


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def s(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def b(data: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(data)) + data


def i(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def call(func: bytes, *args: bytes) -> bytes:
    """func(*args) via REDUCE."""
    return func + MARK + b"".join(args) + TUPLE + REDUCE


def wrap_in_dict(value: bytes, key: str = "state_dict") -> bytes:
    """A full protocol-2 pickle of {key: value}."""
    return PROTO2 + EMPTY_DICT + s(key) + value + SETITEM + STOP


def torch_zip(data_pkl: bytes, extra: dict[str, bytes] | None = None, prefix: str = "archive") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", data_pkl)
        zf.writestr(f"{prefix}/byteorder", "little")
        zf.writestr(f"{prefix}/version", "3\n")
        for name, data in (extra or {}).items():
            zf.writestr(f"{prefix}/{name}", data)
    return buf.getvalue()


MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
PROTOCOL = pickle.dumps(1001, protocol=2)
SYS_INFO = pickle.dumps({"protocol_version": 1001, "little_endian": True,
                         "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)
EMPTY_KEYS = pickle.dumps([], protocol=2)


def legacy(main: bytes, *, magic: bytes = MAGIC, sys_info: bytes = SYS_INFO) -> bytes:
    return magic + PROTOCOL + sys_info + main + EMPTY_KEYS
