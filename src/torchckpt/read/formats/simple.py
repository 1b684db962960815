"""safetensors, plain pickles (Caffe/Detectron ``.pkl`` weights) and numpy ``.npy``/``.npz``."""

from __future__ import annotations

import io
import math
import struct
import zipfile
from collections import OrderedDict
from typing import Any

from ...errors import CheckpointError, CorruptCheckpointError, TruncatedCheckpointError
from ...storage.source import Source
from ..sniff import DESCRIPTIONS, NUMPY, PICKLE, SAFETENSORS
from ..unpickle.meta import MetaStorage, TensorMeta, meta_dtype
from ..unpickle.mode import Mode
from ..unpickle.budget import Budget, TreeMeter
from .base import Check, Checkpoint, ReadOptions, parse_json, run_pickle
from .torch_zip import open_zip, read_member

__all__ = ["read_safetensors", "safetensors_header", "read_pickle", "read_numpy", "SAFETENSORS_DTYPES"]

SAFETENSORS_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "U16": ("uint16", 2), "U32": ("uint32", 4), "U64": ("uint64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1), "C64": ("complex64", 8),
}
MAX_HEADER = 100 << 20


def safetensors_header(src: Source) -> tuple[dict[str, Any], dict[str, str], int]:
    """Parse and validate the header: ``(entries, metadata, data_start)``. Reads no tensor data.

    ``entries`` maps names to ``{"dtype", "shape", "data_offsets"}`` in data order.
    """
    head = src.read_at(0, 8)
    if len(head) < 8:
        raise TruncatedCheckpointError("safetensors file shorter than its 8-byte header", actual_size=src.size)
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > src.size:
        raise TruncatedCheckpointError(f"safetensors header declares {n} bytes; the file has {src.size}",
                                       expected_size=8 + n, actual_size=src.size)
    header = parse_json(src.read_at(8, n), "safetensors header")
    if not isinstance(header, dict):
        raise CorruptCheckpointError("safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptCheckpointError("safetensors __metadata__ is not an object of strings",
                                     hint="The safetensors format allows only text values in __metadata__; "
                                          "the file was not written by a safetensors library.")
    data_size = src.size - 8 - n
    entries = []
    for name, e in header.items():
        try:
            dtype, shape, (begin, end) = e["dtype"], e["shape"], e["data_offsets"]
            itemsize = SAFETENSORS_DTYPES[dtype][1]
            ok = isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape) and \
                type(begin) is int and type(end) is int and 0 <= begin <= end <= data_size
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(f"safetensors entry {name!r} is malformed: {e!r:.200}") from None
        if ok and math.prod(d for d in shape if d) >= 1 << 63:  # torch (load) refuses what int64 cannot count:
            raise CorruptCheckpointError(  # so does this check, which scan and inspect run too
                f"safetensors entry {name!r:.200} has shape {str(shape)[:200]}: its element count does not fit "
                "in 64 bits", hint="The header is damaged or crafted; no tensor has that many elements.")
        if not ok or (end - begin) != math.prod(shape) * itemsize:
            if end > data_size:
                raise TruncatedCheckpointError(f"tensor {name!r} ends at data byte {end}; the data section has "
                                               f"{data_size}", expected_size=8 + n + end, actual_size=src.size)
            raise CorruptCheckpointError(f"safetensors entry {name!r} has inconsistent shape/offsets: {e!r:.200}")
        entries.append((begin, name, e))
    entries.sort(key=lambda t: (t[0], t[2]["data_offsets"][1]))
    expected = 0
    for begin, name, e in entries:  # the data section must be covered exactly, without gaps or overlaps
        if begin != expected:
            raise CorruptCheckpointError(f"safetensors data of {name!r} starts at {begin}, expected {expected} "
                                         "(gap or overlap)")
        expected = e["data_offsets"][1]
    if expected != data_size:
        raise CorruptCheckpointError(f"safetensors tensors cover {expected} bytes but the data section has "
                                     f"{data_size}")
    ordered = OrderedDict((name, e) for _, name, e in entries)
    return ordered, dict(metadata), 8 + n


def read_safetensors(src: Source, opts: ReadOptions) -> Checkpoint:
    entries, metadata, data_start = safetensors_header(src)
    loaded = Checkpoint(format=SAFETENSORS, description=DESCRIPTIONS[SAFETENSORS])
    loaded.details["metadata"] = metadata
    opts.trace.ranges.append((src.name, data_start, src.size - data_start))
    out: OrderedDict[str, Any] = OrderedDict()
    if opts.meta:
        for name, e in entries.items():
            shape = tuple(e["shape"])
            stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
            dtype = meta_dtype(SAFETENSORS_DTYPES[e["dtype"]][0])
            begin, end = e["data_offsets"]
            storage = MetaStorage(dtype, end - begin)
            storage.file_offset = data_start + begin  # so a structure-only read can still fetch each tensor
            out[name] = TensorMeta(shape, stride, dtype, 0, storage)
    else:
        _read_safetensors_data(src, opts, entries, data_start, out)
    _restore_aliases(out, metadata, loaded)
    loaded.tree = _restore_tree(out, metadata, loaded, opts.policy.budget, src.size)
    loaded.details["storage_bytes"] = src.size - data_start
    return loaded


def _read_safetensors_data(src: Source, opts: ReadOptions, entries: dict[str, Any], data_start: int,
                           out: dict[str, Any]) -> None:
    import torch  # lazy: structure-only reads never import torch

    # Our own mapping (or pread), not safe_open's: the Source owns the pages, so load_into can release
    # each tensor's pages once it is placed, and a copy is never made when the bytes can be viewed.
    mapped = src.can_map and opts.mmap is not False
    for name, e in entries.items():
        dtype_name, itemsize = SAFETENSORS_DTYPES[e["dtype"]]
        begin, end = e["data_offsets"]
        offset = data_start + begin
        if mapped and offset % itemsize == 0:
            storage = opts.mapped_storage(src, offset, end - begin)
        else:
            storage = src.read_into_storage(offset, end - begin)
        shape = tuple(e["shape"])
        out[name] = torch.empty(0, dtype=getattr(torch, dtype_name)).set_(
            storage, 0, shape, tuple(math.prod(shape[i + 1:]) for i in range(len(shape))))
    for name, t in out.items():
        moved = opts.relocator(t.untyped_storage(), "cpu")
        if moved.device != t.device:
            out[name] = torch.empty(0, dtype=t.dtype, device=moved.device).set_(
                moved, t.storage_offset(), t.shape, t.stride())


def _restore_aliases(out: "OrderedDict[str, Any]", metadata: dict[str, str], loaded: Checkpoint) -> None:
    """torchckpt stores a tied tensor once and records ``{"alias": "original"}`` under torchckpt.aliases."""
    raw = metadata.get("torchckpt.aliases")
    if not raw:
        return
    aliases = parse_json(raw, "torchckpt.aliases metadata")
    if not isinstance(aliases, dict):
        raise CorruptCheckpointError("torchckpt.aliases metadata is not a JSON object of names")
    restored = []
    for alias, original in aliases.items():
        if not isinstance(original, str):
            raise CorruptCheckpointError(f"torchckpt.aliases entry {alias!r:.60} is not a tensor name")
        if original in out:
            out[alias] = out[original]
            restored.append(alias)
    if restored:
        loaded.notes.append(f"restored {len(restored)} tied tensor(s) stored once: {', '.join(restored[:5])}")


def _restore_tree(tensors: "OrderedDict[str, Any]", metadata: dict[str, str], loaded: Checkpoint,
                  budget: Budget, file_size: int) -> Any:
    """Rebuild the nested tree torchckpt.convert recorded as JSON (tensors by dotted path)."""
    raw = metadata.get("torchckpt.tree")
    if not raw:
        return tensors
    skeleton = parse_json(raw, "torchckpt.tree metadata")
    meter = TreeMeter(budget, file_size)  # deep nesting times long names: every path built is charged

    def build(node: Any, path: str) -> Any:
        meter.visit(len(path))
        if isinstance(node, dict) and node == {"__tensor__": True}:
            return tensors.get(path or "tensor")
        if isinstance(node, dict):
            return {k: build(v, f"{path}.{k}" if path else k) for k, v in node.items()}
        if isinstance(node, list):
            return [build(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(node)]
        return node

    loaded.notes.append("nested structure restored from the torchckpt.tree metadata")
    return build(skeleton, "")


def read_pickle(src: Source, opts: ReadOptions) -> Checkpoint:
    loaded = Checkpoint(format=PICKLE, description=DESCRIPTIONS[PICKLE])
    buf = src.buffer()
    loaded.tree, u = run_pickle(opts, buf, src, None)
    loaded.details["python2"] = u.saw_binstring
    loaded.details["py2_nonascii"] = u.py2_strings
    if u.saw_binstring:
        loaded.evidence.append("written by Python 2 (str pickled as byte strings)")
    if u.pos < src.size:
        trailing = src.read_at(u.pos, 16)
        if trailing.strip(b"\x00\n ") and trailing[:1] in (b"\x80",):
            loaded.notes.append(f"the file holds more data after the first pickle (at byte {u.pos}); only the first "
                                "object was read")
        if opts.mode is Mode.RECORD:
            _check_trailing(src, buf, u.pos, opts)
    return loaded


def _check_trailing(src: Source, buf: Any, pos: int, opts: ReadOptions) -> None:
    """Record mode: what follows the pickle. Further pickles are run (the loader never reads them)."""
    while pos < src.size:
        rest = src.read_at(pos, 16)
        if not rest.strip(b"\x00\n\r\t "):
            return
        if rest[:4] == b"PK\x03\x04" or rest[:1] != b"\x80":
            what = "a zip archive (polyglot)" if rest[:2] == b"PK" else "non-pickle data"
            opts.trace.checks.append(Check(f"{src.size - pos} bytes of {what} after the pickle", None, pos))
            return
        opts.trace.checks.append(Check("another pickle after the first (the loader never reads it)", None, pos))
        try:
            _, u = run_pickle(opts, buf, src, f"<pickle at byte {pos}>", start=pos, loaded=False)
        except CheckpointError as exc:
            opts.trace.checks.append(Check(f"that pickle cannot be parsed to its end: {exc.reason}", None, pos))
            return
        pos = u.pos


def read_numpy(src: Source, opts: ReadOptions) -> Checkpoint:
    """``.npy`` and ``.npz``; an object array (whose data is a pickle) is built by the safe unpickler from
    the items it holds. npz members are inflated under the same bound as zip members (decompression bombs)."""
    loaded = Checkpoint(format=NUMPY, description=DESCRIPTIONS[NUMPY])
    try:
        if src.head(2) == b"PK":
            out: OrderedDict[str, Any] = OrderedDict()
            with open_zip(src) as zf:
                for info in zf.infolist():
                    name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                    out[name] = _npy(read_member(zf, info, src, opts), f"member {info.filename}", src, opts)
            loaded.tree = out
        else:
            loaded.tree = _npy(src.buffer(), "the file", src, opts)
    except (OSError, EOFError, zipfile.BadZipFile, NotImplementedError) as exc:
        raise TruncatedCheckpointError(f"numpy file cut short or damaged: {exc}") from None
    return loaded


def _npy(data: Any, what: str, src: Source, opts: ReadOptions) -> Any:
    """One .npy blob as a numpy array; an object array's pickle runs through the safe unpickler."""
    import numpy as np  # lazy: ~0.3 s that reading any other format (scan, inspect of safetensors) need not pay

    blob = bytes(data)
    try:
        return np.load(io.BytesIO(blob), allow_pickle=False)  # safe-door: pickles go to our VM below
    except ValueError as exc:
        if "pickle" in str(exc):
            return _npy_objects(np, blob, what, src, opts)
        raise CorruptCheckpointError(f"invalid numpy data in {what}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - numpy parses the header with ast/tokenize: any failure is bad data
        raise CorruptCheckpointError(f"invalid numpy header in {what} ({type(exc).__name__}: {exc})") from None


def _npy_objects(np: Any, blob: bytes, what: str, src: Source, opts: ReadOptions) -> Any:
    """An object array of a .npy: numpy's header parser for the header, then the pickle that follows it
    (``np.save`` with pickling allowed writes ``pickle.dump(array)``) through the one safe unpickler."""
    f = io.BytesIO(blob)
    try:
        version = np.lib.format.read_magic(f)  # numpy's own header parser (literal_eval), versions 1 and 2
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        shape, _, dtype = read_header[version](f)
    except Exception as exc:  # noqa: BLE001 - any failure of the header parser is bad data
        raise CorruptCheckpointError(f"invalid numpy header in {what} ({type(exc).__name__}: {exc})") from None
    value, _ = run_pickle(opts, blob, src, f"{what} (object array)", start=f.tell())
    if not isinstance(value, np.ndarray) or value.dtype != dtype or value.shape != tuple(shape):
        got = f"{value.dtype} {list(value.shape)}" if isinstance(value, np.ndarray) else type(value).__name__
        raise CorruptCheckpointError(f"{what}: the header declares a {dtype} array of shape {list(shape)}, its "
                                     f"pickle holds a {got}")
    return value
