"""Writing safetensors: the one writer, used by training saves (``weights_format="safetensors"``) and
``convert``. The reader is :func:`.simple.read_safetensors`; both use one dtype table.

The layout: an 8-byte little-endian header length, the JSON header (``__metadata__`` first, then every
tensor's dtype, shape and data offsets, padded with spaces to a multiple of 8), then the tensors'
bytes in header order. Tensors that share memory (tied weights) are stored once; the other names are
recorded in the metadata as ``torchckpt.aliases`` (``{"alias": "stored name"}``) and the reader
restores them. Tensors are streamed one at a time, so memory stays near the largest tensor.
torch is imported only when tensor bytes are written.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterable, Mapping

from ..unpickle.meta import TensorMeta, dtype_name
from .simple import SAFETENSORS_DTYPES

__all__ = ["write_safetensors", "tensor_bytes", "tensor_identity", "Written", "CODES"]

CODES = {name: code for code, (name, _) in SAFETENSORS_DTYPES.items()}  # "float16" -> "F16"
_ITEMSIZE = {name: size for name, size in SAFETENSORS_DTYPES.values()}


@dataclass
class Written:
    """What :func:`write_safetensors` wrote: the file's size and the tied names stored once."""

    size: int
    aliases: dict[str, str] = field(default_factory=dict)


def tensor_identity(t: Any) -> tuple[Any, ...]:
    """Two names with the same identity hold the same elements (a tied tensor)."""
    if isinstance(t, TensorMeta):
        return (id(t.storage), t.storage_offset, tuple(t.shape), tuple(t.stride), str(t.dtype))
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), str(t.dtype))


def _refuse(name: str, dtype: str) -> Exception:
    return ValueError(f"tensor {name} has dtype {dtype}, which safetensors cannot store")


def tensor_bytes(value: Any) -> memoryview:
    """A torch tensor's bytes on the CPU, in safetensors order (dense, row-major)."""
    import torch  # lazy: only writing tensor data needs it

    t = value.detach().to("cpu").contiguous()
    data = t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)
    return memoryview(data.numpy())


def split_tied(tensors: Iterable[tuple[str, Any]]) -> tuple[list[tuple[str, Any]], dict[str, str]]:
    """``(stored, aliases)``: the first name of each distinct tensor in order, and every later name of an
    already stored tensor (tied weights) as ``{alias: stored name}``; safetensors stores each tensor once."""
    first: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    stored: list[tuple[str, Any]] = []
    for name, t in tensors:
        ident = tensor_identity(t)
        if ident in first:
            aliases[name] = first[ident]
        else:
            first[ident] = name
            stored.append((name, t))
    return stored, aliases


def write_safetensors(fh: IO[bytes], tensors: Iterable[tuple[str, Any]], metadata: Mapping[str, str], *,
                      dtype_of: Callable[[str, Any], str] | None = None,
                      write_tensor: Callable[[str, Any], int] | None = None,
                      on_bytes: Callable[[Any], None] | None = None,
                      progress: Callable[[int, int], None] | None = None,
                      refuse: Callable[[str, str], Exception] = _refuse) -> Written:
    """Stream ``tensors`` (``(name, tensor)`` pairs, torch tensors or :class:`TensorMeta`) to ``fh``.

    Args:
        metadata: the ``__metadata__`` strings (``torchckpt.aliases`` is added when tensors are tied).
        dtype_of: the dtype name a tensor is written as (default: its own); a converter that casts says so.
        write_tensor: writes one tensor's bytes to ``fh`` and returns how many (default: :func:`tensor_bytes`);
            a converter copies file ranges or casts here.
        on_bytes: sees every chunk written by the default writer (a running digest), header included.
        progress: ``progress(done, total)`` data bytes after each tensor.
        refuse: the error for a dtype safetensors cannot store.
    """
    stored, aliases = split_tied(tensors)
    entries: dict[str, Any] = {}
    order: list[tuple[str, Any]] = []
    offset = 0
    for name, t in stored:
        dtype = dtype_of(name, t) if dtype_of is not None else dtype_name(t.dtype)
        if dtype not in CODES:
            raise refuse(name, dtype)
        nbytes = t.numel() * _ITEMSIZE[dtype]
        entries[name] = {"dtype": CODES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        order.append((name, t))
    meta = dict(metadata)
    if aliases:
        meta["torchckpt.aliases"] = json.dumps(aliases)
    raw = json.dumps({"__metadata__": meta, **entries}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    for chunk in (struct.pack("<Q", len(raw)), raw):
        if on_bytes is not None:
            on_bytes(chunk)
        fh.write(chunk)
    done = 0
    for name, t in order:
        if write_tensor is not None:
            done += write_tensor(name, t)
        else:
            data = tensor_bytes(t)
            if on_bytes is not None:
                on_bytes(data)  # hashlib releases the GIL for large buffers
            fh.write(data)
            done += data.nbytes
            del data
        if progress is not None:
            progress(done, offset)
    return Written(8 + len(raw) + offset, aliases)
