"""numpy dtypes, arrays, scalars and random generators, made once from validated descriptions.

numpy pickles a dtype as ``dtype(desc)`` followed by BUILD(state) and an array as
``_reconstruct(ndarray)`` followed by BUILD((shape, dtype, fortran, raw bytes)). The real
``__setstate__`` of either would let a later BUILD change a dtype an array already uses (turning
bytes into object pointers) or resize a buffer. Here BUILD never mutates: each finisher validates the
whole state and makes a *new* value with numpy's public constructors, which the VM puts in place of the
placeholder. An object dtype never reads bytes: it is refused in structured and subarray fields, scalars
and byte buffers, and an object array (``np.array([a, b], dtype=object)``, a pickled list of weight
arrays) is built only from the items its pickle holds (a list, as numpy writes it), each of them a value the
VM already validated, within the budget. Every byte buffer must hold exactly shape x itemsize bytes. ``matrix`` and ``recarray`` stay those subclasses;
``memmap`` becomes a plain in-memory array (no file is opened).
"""

from __future__ import annotations

import math
from typing import Any

from ...errors import CorruptCheckpointError, UnsafeCheckpointError
from .keys import graph_depth
from .meta import check_int
from .stubs import Stub

__all__ = ["np_dtype", "finish_dtype", "np_reconstruct", "finish_array", "np_scalar", "np_frombuffer",
           "random_ctor", "finish_random", "ARRAY_SUBTYPES", "NUMPY_ARRAY_TYPES"]

MAX_ITEMSIZE = 1 << 31
MAX_DIMS = 64
MAX_FIELDS = 4096
ARRAY_SUBTYPES = ("numpy.ndarray", "numpy.matrix", "numpy.matrixlib.defmatrix.matrix", "numpy.recarray",
                  "numpy.rec.recarray", "numpy.core.records.recarray", "numpy._core.records.recarray",
                  "numpy.memmap", "numpy.core.memmap.memmap", "numpy._core.memmap.memmap")
NUMPY_ARRAY_TYPES = frozenset(ARRAY_SUBTYPES)


def _np() -> Any:
    import numpy

    return numpy


def _bad(message: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(message)


def _plain_object(dtype: Any) -> bool:
    """``dtype('O')`` itself: an array of it is built from pickled items, never from bytes."""
    return bool(dtype.kind == "O" and dtype.fields is None and dtype.subdtype is None)


def _no_object(dtype: Any) -> Any:
    if dtype.hasobject:
        raise UnsafeCheckpointError(f"numpy dtype {dtype} holds Python objects: its bytes would be read as "
                                    "pointers, so it is never built from a checkpoint",
                                    global_name="numpy.dtype")
    if dtype.itemsize > MAX_ITEMSIZE:
        raise _bad(f"numpy dtype with an item size of {dtype.itemsize} bytes")
    return dtype


# --------------------------------------------------------------------------- dtypes
def np_dtype(u: Any, obj: Any, align: Any = False, copy: Any = False) -> Any:
    """``numpy.dtype(desc, align, copy)`` as pickled: a simple dtype from its type string."""
    np = _np()
    target = getattr(obj, "target", None)
    if target is not None and isinstance(target, type) and issubclass(target, np.generic):
        if target is np.object_:
            return np.dtype(object)
        return _no_object(np.dtype(target))
    if isinstance(obj, bytes):
        obj = obj.decode("latin-1")
    if not isinstance(obj, str) or len(obj) > 64 or not obj.replace("[", "").replace("]", "").isalnum() \
            and obj[:1] not in "<>|=":
        raise _bad(f"numpy dtype {obj!r:.80}")
    try:
        new = np.dtype(obj, align=bool(align))
    except (TypeError, ValueError) as exc:
        raise _bad(f"numpy dtype {obj!r}: {exc}") from None
    return new if _plain_object(new) else _no_object(new)


def finish_dtype(u: Any, old: Any, state: Any) -> Any:
    """The dtype ``old`` becomes under BUILD(state): a new dtype, validated; ``old`` is untouched."""
    np = _np()
    if not isinstance(state, tuple) or len(state) not in (8, 9) or not isinstance(state[0], int):
        raise _bad(f"malformed numpy dtype state {state!r:.120}")
    byteorder, subdescr, names, fields, elsize = state[1], state[2], state[3], state[4], state[5]
    is_record = old.type is np.record
    if names is not None:
        if not isinstance(names, tuple) or not isinstance(fields, dict) or len(names) > MAX_FIELDS:
            raise _bad("malformed numpy structured dtype state")
        u.meter.step(len(names))
        spec: dict[str, list[Any]] = {"names": [], "formats": [], "offsets": [], "titles": []}
        for name in names:
            entry = fields.get(name) if isinstance(name, str) else None
            if not isinstance(entry, tuple) or len(entry) not in (2, 3) or not isinstance(entry[0], np.dtype):
                raise _bad(f"numpy structured dtype field {name!r:.60}")
            spec["names"].append(name)
            spec["formats"].append(_no_object(entry[0]))
            u.consume(entry[0])
            spec["offsets"].append(check_int(entry[1], "numpy field offset"))
            spec["titles"].append(entry[2] if len(entry) == 3 and isinstance(entry[2], str) else None)
        if not any(spec["titles"]):
            del spec["titles"]
        itemsize = check_int(elsize, "numpy item size")
        if not 0 <= itemsize <= MAX_ITEMSIZE or any(o < 0 or o > itemsize for o in spec["offsets"]):
            raise _bad(f"numpy structured dtype with item size {itemsize} and offsets {spec['offsets'][:8]}")
        spec["itemsize"] = itemsize  # type: ignore[assignment]
        try:
            new = np.dtype(spec, align=bool(state[7] & 0x80) if isinstance(state[7], int) else False)
        except (TypeError, ValueError) as exc:
            raise _bad(f"numpy structured dtype: {exc}") from None
        if is_record:
            new = np.dtype((np.record, new))
        return _no_object(new)
    if subdescr is not None:
        if not isinstance(subdescr, tuple) or len(subdescr) != 2 or not isinstance(subdescr[0], np.dtype):
            raise _bad("malformed numpy subarray dtype state")
        shape = subdescr[1] if isinstance(subdescr[1], tuple) else (subdescr[1],)
        shape = tuple(check_int(s, "numpy subarray dimension") for s in shape)
        if len(shape) > MAX_DIMS or any(s < 0 for s in shape) or \
                math.prod(shape) * subdescr[0].itemsize > MAX_ITEMSIZE:
            raise _bad(f"numpy subarray dtype of shape {shape}")
        u.consume(subdescr[0])
        return _no_object(np.dtype((_no_object(subdescr[0]), shape)))
    new = old
    if old.kind in "Mm" and len(state) == 9 and isinstance(state[8], tuple) and len(state[8]) == 2 \
            and isinstance(state[8][1], tuple) and len(state[8][1]) >= 2:
        unit, count = state[8][1][0], state[8][1][1]
        unit = unit.decode("ascii", "replace") if isinstance(unit, bytes) else unit
        if not isinstance(unit, str) or not unit.isalpha() or len(unit) > 8:
            raise _bad(f"numpy datetime unit {unit!r:.40}")
        try:
            new = np.dtype(f"{old.char}8[{check_int(count, 'datetime unit count')}{unit}]")
        except (TypeError, ValueError) as exc:
            raise _bad(f"numpy datetime dtype: {exc}") from None
    if isinstance(elsize, int) and elsize > 0 and old.kind in "USV" and elsize != new.itemsize:
        raise _bad(f"numpy dtype {old} with a stated item size of {elsize}")
    if byteorder in ("<", ">") and new.byteorder != "|":
        new = new.newbyteorder(byteorder)
    elif byteorder not in ("<", ">", "|", "="):
        raise _bad(f"numpy dtype byte order {byteorder!r:.20}")
    return new if _plain_object(new) else _no_object(new)


# --------------------------------------------------------------------------- arrays
def np_reconstruct(u: Any, subtype: Any, shape: Any = (0,), dtype: Any = b"b") -> Any:
    """``numpy.core.multiarray._reconstruct(subtype, ...)``: an empty array until BUILD fills it."""
    np = _np()
    if isinstance(subtype, type) and issubclass(subtype, Stub):
        return subtype(shape, dtype)
    name = getattr(subtype, "name", None)
    if name not in NUMPY_ARRAY_TYPES:
        raise _bad(f"numpy array reconstructed as {subtype!r:.80}")
    empty = np.empty((0,), np.int8)
    return _as_subtype(empty, name)


def _as_subtype(arr: Any, name: str) -> Any:
    np = _np()
    if "matrix" in name:
        if arr.ndim > 2:
            raise _bad(f"numpy matrix with {arr.ndim} dimensions")
        return arr.view(np.matrix)
    if "recarray" in name:
        return arr.view(np.recarray)
    return arr  # ndarray, and memmap: an in-memory array, never a mapped file


def finish_array(u: Any, old: Any, state: Any) -> Any:
    """The array ``old`` becomes under BUILD((version, shape, dtype, fortran, raw)): a new array."""
    np = _np()
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise _bad("malformed numpy array state")
    shape, dtype, fortran, raw = state[-4], state[-3], state[-2], state[-1]
    if not isinstance(dtype, np.dtype):
        raise _bad(f"numpy array with dtype {type(dtype).__name__}")
    if not (_plain_object(dtype) and isinstance(raw, list)):
        _no_object(dtype)
    u.consume(dtype)
    if not isinstance(shape, (tuple, list)) or len(shape) > MAX_DIMS:
        raise _bad("numpy array shape must be a tuple of at most 64 dimensions")
    shape = tuple(check_int(s, "array dimension") for s in shape)
    if any(s < 0 for s in shape):
        raise _bad(f"numpy array shape {shape}")
    count = math.prod(shape)
    if isinstance(raw, list):
        return _object_array(u, old, shape, bool(fortran), raw)
    if isinstance(raw, str):  # Python 2 data read as text: its code points are the bytes
        if len(raw) > count * dtype.itemsize:
            raise _bad(f"numpy array of shape {shape} and dtype {dtype} with {len(raw)} characters of data")
        raw = raw.encode("latin-1")
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != count * dtype.itemsize:
        size = len(raw) if isinstance(raw, (bytes, bytearray)) else type(raw).__name__
        raise _bad(f"numpy array of shape {shape} and dtype {dtype} needs {count * dtype.itemsize} bytes, "
                   f"the pickle holds {size}")
    u.meter.materialise(len(raw) + 112, "numpy arrays")
    if count == 0 or dtype.itemsize == 0:
        u.meter.step(count)
        arr = np.zeros(shape, dtype)
    else:
        arr = np.frombuffer(bytearray(raw), dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return _as_subtype(arr, _subtype_name(old))


def _object_array(u: Any, old: Any, shape: tuple[int, ...], fortran: bool, items: list[Any]) -> Any:
    """An object array from the items its pickle holds (numpy pickles ``arr.tolist()``-like flat items)."""
    np = _np()
    if len(items) != math.prod(shape):
        raise _bad(f"numpy object array of shape {list(shape)} with {len(items)} items")
    u.meter.step(len(items))
    u.meter.materialise(8 * len(items) + 112, "numpy object arrays")
    graph_depth(u.meter, items, u._leaf_types())  # the items join the tree: the same depth bound
    arr = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        arr[i] = item
    arr = arr.reshape(shape)  # numpy pickles the items in C order whatever the layout
    return _as_subtype(np.asfortranarray(arr) if fortran else arr, _subtype_name(old))


def _subtype_name(arr: Any) -> str:
    np = _np()
    if isinstance(arr, np.matrix):
        return "numpy.matrix"
    if isinstance(arr, np.recarray):
        return "numpy.recarray"
    return "numpy.ndarray"


def np_scalar(u: Any, dtype: Any, data: Any = None) -> Any:
    np = _np()
    if not isinstance(dtype, np.dtype):
        raise _bad(f"numpy scalar with dtype {type(dtype).__name__}")
    _no_object(dtype)
    u.consume(dtype)
    if isinstance(data, str):
        data = data.encode("latin-1")
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise _bad(f"numpy scalar of dtype {dtype} with {len(data) if isinstance(data, bytes) else '?'} bytes")
    u.meter.materialise(len(data) + 32, "numpy scalars")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]


def np_frombuffer(u: Any, buf: Any, dtype: Any, shape: Any, order: Any = "C") -> Any:
    np = _np()
    if not isinstance(buf, (bytes, bytearray)) or not isinstance(dtype, np.dtype):
        raise _bad("numpy buffer array with invalid arguments")
    return finish_array(u, np.empty(0), (tuple(shape) if isinstance(shape, (tuple, list)) else shape, dtype,
                                         order == "F", buf))


# --------------------------------------------------------------------------- random generators
_BIT_GENERATORS = ("MT19937", "PCG64", "PCG64DXSM", "Philox", "SFC64")


def _bit_generator_name(arg: Any) -> str:
    name = arg if isinstance(arg, str) else getattr(arg, "_stub_qualname", None) or getattr(arg, "name", None)
    if isinstance(name, str):
        name = name.rsplit(".", 1)[-1]
    if name not in _BIT_GENERATORS:
        raise _bad(f"numpy bit generator {arg!r:.60}")
    return name


def random_ctor(kind: str) -> Any:
    """``numpy.random._pickle.__<kind>_ctor``: a fresh generator, its state set by BUILD."""
    def ctor(u: Any, *args: Any) -> Any:
        np = _np()
        if kind == "bit_generator":
            return getattr(np.random, _bit_generator_name(args[0] if args else "MT19937"))()
        bitgen = args[0] if args else "MT19937"
        if not isinstance(bitgen, np.random.BitGenerator):
            bitgen = getattr(np.random, _bit_generator_name(bitgen))()
        return np.random.Generator(bitgen) if kind == "generator" else np.random.RandomState(bitgen)
    return ctor


def _plain_state(u: Any, value: Any, depth: int = 0) -> None:
    np = _np()
    u.meter.depth(depth, "numpy random state")
    if isinstance(value, dict):
        u.meter.step(len(value))
        for k, v in value.items():
            if not isinstance(k, str):
                raise _bad("numpy random state keys must be strings")
            _plain_state(u, v, depth + 1)
    elif isinstance(value, (tuple, list)):
        u.meter.step(len(value))
        for v in value:
            _plain_state(u, v, depth + 1)
    elif not isinstance(value, (int, float, str, bool, type(None), np.ndarray, np.generic)):
        raise _bad(f"numpy random state holds a {type(value).__name__}")


def finish_random(u: Any, old: Any, state: Any) -> Any:
    """BUILD on a generator made by :func:`random_ctor`: a new one, set through numpy's public setters."""
    np = _np()
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
        state = state[0]  # (bit generator state, seed sequence): the seed sequence is not needed to resume
    _plain_state(u, state)
    try:
        if isinstance(old, np.random.BitGenerator):
            new = type(old)()
            new.state = state
        elif isinstance(old, np.random.RandomState):
            new = np.random.RandomState(type(old._bit_generator)())
            new.set_state(state)
        else:
            raise _bad(f"BUILD on a {type(old).__name__}")
    except (TypeError, ValueError, KeyError) as exc:
        raise _bad(f"numpy random state: {exc}") from None
    return new
