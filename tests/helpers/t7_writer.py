"""Writes Lua Torch7 binary files (test data only): tables, numbers, strings, tensors, nn objects."""

from __future__ import annotations

import struct

import torch

_TYPES = {torch.float32: "Float", torch.float64: "Double", torch.int64: "Long", torch.uint8: "Byte"}


class Obj:
    def __init__(self, typename: str, data: dict) -> None:
        self.typename, self.data = typename, data


class Writer:
    def __init__(self) -> None:
        self.out = bytearray()
        self.index = 0
        self.refs: dict[int, int] = {}

    def i(self, v: int) -> None:
        self.out += struct.pack("<i", v)

    def q(self, v: int) -> None:
        self.out += struct.pack("<q", v)

    def s(self, text: str | bytes) -> None:
        raw = text.encode() if isinstance(text, str) else text
        self.i(len(raw))
        self.out += raw

    def ref(self, obj) -> bool:
        if id(obj) in self.refs:
            self.i(self.refs[id(obj)])
            return True
        self.index += 1
        self.refs[id(obj)] = self.index
        self.i(self.index)
        return False

    def tensor_body(self, kind: str, sizes, strides, numel: int, data: bytes) -> None:
        """A tensor after its index: type, sizes, strides, offset, then a new storage of ``numel`` elements."""
        self.s("V 1")
        self.s(f"torch.{kind}Tensor")
        self.i(len(sizes))
        for v in (*sizes, *strides):
            self.q(v)
        self.q(1)
        self.i(4)
        self.index += 1
        self.i(self.index)
        self.s("V 1")
        self.s(f"torch.{kind}Storage")
        self.q(numel)
        self.out += data

    def write(self, obj) -> None:
        if obj is None:
            self.i(0)
        elif isinstance(obj, bool):
            self.i(5)
            self.i(int(obj))
        elif isinstance(obj, (int, float)):
            self.i(1)
            self.out += struct.pack("<d", float(obj))
        elif isinstance(obj, str):
            self.i(2)
            self.s(obj)
        elif isinstance(obj, (dict, list)):
            self.i(3)
            if self.ref(obj):
                return
            items = list(obj.items()) if isinstance(obj, dict) else [(i + 1, v) for i, v in enumerate(obj)]
            self.i(len(items))
            for k, v in items:
                self.write(k)
                self.write(v)
        elif isinstance(obj, torch.Tensor):
            self.i(4)
            if self.ref(obj):
                return
            flat = obj.contiguous().reshape(-1)
            self.tensor_body(_TYPES[obj.dtype], obj.shape, obj.stride(), flat.numel(), flat.numpy().tobytes())
        elif isinstance(obj, Obj):
            self.i(4)
            if self.ref(obj):
                return
            self.s("V 1")
            self.s(obj.typename)
            self.write(obj.data)
        else:
            raise TypeError(type(obj))


def write_t7(obj, path) -> None:
    w = Writer()
    w.write(obj)
    with open(path, "wb") as fh:
        fh.write(bytes(w.out))
