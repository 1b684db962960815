"""Lua Torch7 binary files (``torch.save`` of the Lua era), read by a bounds-checked reader.

Records: an int32 type tag, then NIL(0), NUMBER(1, double), STRING(2, int32 length + bytes),
TABLE(3, reference index + pair count + pairs), TORCH object(4, reference index + "V <n>" + class name
+ class payload), BOOLEAN(5), FUNCTION(6/7/8: Lua bytecode + upvalues; recorded, never run).
Longs are 8 bytes. Shared and recursive references resolve to the same Python object.

``nn`` module trees map to PyTorch-style state dicts with :func:`t7_state_dict` (``0.weight``,
``1.running_mean`` ...), converting old BatchNorm ``running_std`` to ``running_var``.
"""

from __future__ import annotations

import builtins
import math
import struct
from collections import OrderedDict
from typing import Any

from ...errors import CorruptCheckpointError, LimitExceededError, TruncatedCheckpointError
from ...storage.source import Source
from ..sniff import DESCRIPTIONS, LUA_T7
from ..tensors import is_tensor_like
from ..unpickle.meta import MetaStorage, TensorMeta, check_view, meta_dtype
from .base import Checkpoint, ReadOptions

__all__ = ["read_t7", "T7Object", "LuaFunction", "LuaTable", "t7_state_dict"]

MAX_DEPTH = 200
_TENSOR_DTYPES = {"Double": "float64", "Float": "float32", "Half": "float16", "Byte": "uint8", "Char": "int8",
                  "Short": "int16", "Int": "int32", "Long": "int64", "Bool": "bool", "Cuda": "float32",
                  "CudaDouble": "float64", "CudaHalf": "float16", "CudaByte": "uint8", "CudaChar": "int8",
                  "CudaShort": "int16", "CudaInt": "int32", "CudaLong": "int64"}
_NP = {"float64": "<f8", "float32": "<f4", "float16": "<f2", "uint8": "u1", "int8": "i1", "int16": "<i2",
       "int32": "<i4", "int64": "<i8", "bool": "?"}


class LuaTable(dict[Any, Any]):
    """A Lua table: a dict that is hashable by identity (tables can be keys, even of themselves)."""

    __hash__ = object.__hash__  # type: ignore[assignment]  # dict sets it to None


class LuaFunction:
    """A serialized Lua function: its bytecode and upvalues, kept as data and never executed."""

    def __init__(self, bytecode: bytes, upvalues: Any) -> None:
        self.bytecode, self.upvalues = bytecode, upvalues

    def __repr__(self) -> str:
        return f"<Lua function, {len(self.bytecode)} bytes of bytecode (not executed)>"


class T7Object:
    """An object of a Torch7 class (``nn.Linear``, ``torch.class('Blah')`` ...): its type name and data."""

    def __init__(self, typename: str, version: int = 0) -> None:
        self.typename, self.version = typename, version
        self.data: Any = None

    def __getattr__(self, name: str) -> Any:
        data = self.__dict__.get("data")
        if isinstance(data, dict) and name in data:
            return data[name]
        raise AttributeError(name)

    def __getitem__(self, key: Any) -> Any:
        return self.data[key]

    def __repr__(self) -> str:
        return f"<t7 {self.typename}>"

    def state_dict(self) -> "OrderedDict[str, Any]":
        return t7_state_dict(self)


class _Reader:
    def __init__(self, src: Source, meta: bool) -> None:
        self.buf = src.buffer()
        self.size = src.size
        self.pos = 0
        self.meta = meta
        self.memo: dict[int, Any] = {}
        self.notes: list[str] = []

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise TruncatedCheckpointError(f"Torch7 record at byte {self.pos} needs {n} bytes, "
                                           f"{self.size - self.pos} left", offset=self.pos, actual_size=self.size)
        start = self.pos
        self.pos += n
        return bytes(self.buf[start:self.pos])

    def int(self) -> builtins.int:
        value: builtins.int = struct.unpack("<i", self.take(4))[0]
        return value

    def long(self) -> builtins.int:
        value: builtins.int = struct.unpack("<q", self.take(8))[0]
        return value

    def raw_string(self) -> bytes:
        return self.take(self.int())

    def read(self, depth: builtins.int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise LimitExceededError(f"Torch7 objects nested deeper than {MAX_DEPTH}", offset=self.pos)
        offset = self.pos
        tag = self.int()
        if tag == 0:
            return None
        if tag == 1:
            x = struct.unpack("<d", self.take(8))[0]
            return int(x) if x.is_integer() and abs(x) < 2**53 else x
        if tag == 2:
            return _text(self.raw_string())
        if tag == 5:
            return self.int() == 1
        if tag not in (3, 4, 6, 7, 8):
            raise CorruptCheckpointError(f"unknown Torch7 type tag {tag} at byte {offset}", offset=offset)
        index = self.int()
        if index in self.memo:
            return self.memo[index]
        if tag in (6, 7, 8):
            fn = LuaFunction(self.raw_string(), None)
            self.memo[index] = fn
            fn.upvalues = self.read(depth + 1)
            return fn
        if tag == 3:
            return self.table(index, depth)
        return self.torch_object(index, depth)

    def table(self, index: builtins.int, depth: builtins.int) -> Any:
        count = self.int()
        if count < 0 or count > (self.size - self.pos) // 8:
            raise CorruptCheckpointError(f"Torch7 table at byte {self.pos} declares {count} entries", offset=self.pos)
        table = LuaTable()
        self.memo[index] = table
        for _ in range(count):
            key = self.read(depth + 1)
            table[key] = self.read(depth + 1)
        return table

    def torch_object(self, index: builtins.int, depth: builtins.int) -> Any:
        version_text = _text(self.raw_string())
        version = 0
        if isinstance(version_text, str) and version_text.startswith("V "):
            version = int(float(version_text[2:] or 0))
            typename = _text(self.raw_string())
        else:
            typename = version_text
        typename = typename if isinstance(typename, str) else typename.decode("latin-1")
        kind, _, base = typename.partition(".")
        if kind == "torch" and base.endswith("Storage") and base[:-7] in _TENSOR_DTYPES:
            obj = self.storage(_TENSOR_DTYPES[base[:-7]])
        elif kind == "torch" and base.endswith("Tensor") and base[:-6] in _TENSOR_DTYPES:
            obj = self.tensor(_TENSOR_DTYPES[base[:-6]], depth)
        elif typename in ("tds.Vec", "tds.Hash"):
            obj = self.tds(typename, index, depth)
        else:
            obj = T7Object(typename, version)
            self.memo[index] = obj
            obj.data = self.read(depth + 1)
        self.memo[index] = obj
        return obj

    def storage(self, dtype: str) -> Any:
        count = self.long()
        item = int(_NP[dtype][-1]) if _NP[dtype][-1].isdigit() else 1
        if count < 0 or count * item > self.size - self.pos:
            raise TruncatedCheckpointError(f"Torch7 storage at byte {self.pos} declares {count} elements of "
                                           f"{item} bytes; {self.size - self.pos} bytes left", offset=self.pos,
                                           actual_size=self.size)
        start = self.pos
        self.pos += count * item
        return _Storage(dtype, count, start)

    def tensor(self, dtype: str, depth: builtins.int) -> Any:
        ndim = self.int()
        if not 0 <= ndim <= 64:
            raise CorruptCheckpointError(f"Torch7 tensor with {ndim} dimensions", offset=self.pos)
        sizes = [self.long() for _ in range(ndim)]
        strides = [self.long() for _ in range(ndim)]
        offset = self.long() - 1
        storage = self.read(depth + 1)
        if ndim == 0 or storage is None:
            return _empty(dtype, self.meta)
        if not isinstance(storage, _Storage):
            raise CorruptCheckpointError("Torch7 tensor without a storage")
        offset, size, stride = check_view(storage.count, offset, sizes, strides)
        if math.prod(size) >= 1 << 62:  # a zero-stride view can claim any size: torch's numel would overflow
            raise LimitExceededError(f"Torch7 tensor of size {list(size)} at byte {self.pos}", offset=self.pos)
        return storage.view(self, offset, size, stride)

    def tds(self, typename: str, index: builtins.int, depth: builtins.int) -> Any:
        count = self.int()
        if count < 0 or count > self.size - self.pos:
            raise CorruptCheckpointError(f"{typename} declares {count} entries", offset=self.pos)
        container: Any = [] if typename == "tds.Vec" else LuaTable()
        self.memo[index] = container
        self.read(depth + 1)  # the container's metatable record
        for _ in range(count):
            if typename == "tds.Vec":
                container.append(self.read(depth + 1))
            else:
                key = self.read(depth + 1)
                container[key] = self.read(depth + 1)
        return container


class _Storage:
    def __init__(self, dtype: str, count: int, file_offset: int) -> None:
        self.dtype, self.count, self.file_offset = dtype, count, file_offset
        self._array: Any = None

    def view(self, reader: _Reader, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> Any:
        if reader.meta:
            item = meta_dtype(self.dtype).itemsize
            storage = MetaStorage(meta_dtype(self.dtype), self.count * item)
            storage.file_offset = self.file_offset
            return TensorMeta(size, stride, meta_dtype(self.dtype), offset, storage)
        import numpy as np
        import torch

        if self._array is None:
            raw = bytearray(reader.buf[self.file_offset:self.file_offset + self.count * np.dtype(_NP[self.dtype]).itemsize])
            self._array = torch.from_numpy(np.frombuffer(raw, dtype=_NP[self.dtype]))
        return self._array.as_strided(size, stride, offset)


def _empty(dtype: str, meta: bool) -> Any:
    if meta:
        return TensorMeta((0,), (1,), meta_dtype(dtype))
    import torch

    return torch.empty(0, dtype=getattr(torch, dtype))


def _text(raw: bytes) -> Any:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def _listify(obj: Any, done: dict[int, Any], depth: int = 0) -> Any:
    """Tables keyed 1..n become lists (in place of the table everywhere it appears)."""
    if depth > MAX_DEPTH or id(obj) in done:
        return done.get(id(obj), obj)
    if isinstance(obj, LuaTable):
        done[id(obj)] = obj
        n = len(obj)
        if n and all(type(k) is int for k in obj) and set(obj) == set(range(1, n + 1)):
            lst: list[Any] = []
            done[id(obj)] = lst
            lst.extend(_listify(obj[i], done, depth + 1) for i in range(1, n + 1))
            return lst
        for k in list(obj):
            obj[k] = _listify(obj[k], done, depth + 1)
        return obj
    if isinstance(obj, T7Object):
        done[id(obj)] = obj
        obj.data = _listify(obj.data, done, depth + 1)
    elif isinstance(obj, list):
        done[id(obj)] = obj
        obj[:] = [_listify(v, done, depth + 1) for v in obj]
    elif isinstance(obj, LuaFunction):
        done[id(obj)] = obj
        obj.upvalues = _listify(obj.upvalues, done, depth + 1)
    return obj


def read_t7(src: Source, opts: ReadOptions) -> Checkpoint:
    reader = _Reader(src, opts.meta)
    obj = _listify(reader.read(), {})
    opts.trace.ranges.append((src.name, 0, reader.pos))
    loaded = Checkpoint(tree=obj, format=LUA_T7, description=DESCRIPTIONS[LUA_T7])
    if reader.pos < src.size:
        loaded.notes.append(f"{src.size - reader.pos} bytes after the Torch7 object were not read")
    return loaded


_PARAMS = ("weight", "bias")
_BUFFERS = ("running_mean", "running_var")


def t7_state_dict(obj: Any, notes: list[str] | None = None) -> "OrderedDict[str, Any]":
    """PyTorch-style state dict of a Lua ``nn`` module tree (containers index children from 0)."""
    out: OrderedDict[str, Any] = OrderedDict()
    _walk(obj, "", out, notes if notes is not None else [], set(), 0)
    return out


def _walk(module: Any, prefix: str, out: dict[str, Any], notes: list[str], seen: set[int], depth: int) -> None:
    if not isinstance(module, T7Object) or id(module) in seen or depth > MAX_DEPTH:
        return
    seen.add(id(module))
    data: Any = module.data if isinstance(module.data, dict) else {}
    for name in _PARAMS + _BUFFERS:
        value = data.get(name)
        if is_tensor_like(value) and value.numel():
            out[prefix + name] = value
    std = data.get("running_std")
    if is_tensor_like(std) and "running_var" not in data and std.numel():
        eps = data.get("eps", 1e-5)
        if type(eps) not in (int, float):
            raise CorruptCheckpointError(f"Torch7 module {prefix or '<root>'}: eps is {eps!r:.40}, not a number")
        if hasattr(std, "pow"):
            if not std.is_floating_point():
                raise CorruptCheckpointError(f"Torch7 module {prefix or '<root>'}: running_std is {std.dtype}, "
                                             "not floating point")
            out[prefix + "running_var"] = std.pow(-2) - eps
        else:
            out[prefix + "running_var"] = std
        notes.append(f"{prefix}running_var computed from the old running_std (var = 1/std^2 - eps)")
    children = data.get("modules")
    if isinstance(children, (list, dict)):
        items = enumerate(children) if isinstance(children, list) else sorted(
            ((k - 1, v) for k, v in children.items() if isinstance(k, int)))
        for i, child in items:
            _walk(child, f"{prefix}{i}.", out, notes, seen, depth + 1)
