"""What allowlisted globals become, and how the unpickler builds objects safely.

Each allowlisted name maps to a small reimplementation that validates its arguments before doing
anything: a tensor view must lie inside its storage, a numpy buffer must match its shape, ``bytes``
accepts data but never a size, container constructors accept materialised containers but never
iterators or ranges. Anything a pickle could use to make us allocate or loop far beyond the size of
the file is rejected here. torch and numpy are imported only when a pickle actually needs them.
"""

from __future__ import annotations

import builtins
import collections
import importlib
import math
from typing import Any, Callable

from .meta import TensorMeta, check_int
from .policy import ALLOWLIST, Policy, Verdict, canonical_global
from .stubs import Stub, stub_class
from .torch_rebuild import (MAX_DIMS, _bad, _Marker, get_layout, rebuild_device_tensor_from_numpy,
                            rebuild_from_type, rebuild_from_type_v2, rebuild_meta_tensor_no_storage,
                            rebuild_parameter, rebuild_parameter_with_state, rebuild_tensor, rebuild_tensor_v2,
                            rebuild_tensor_v3, torch_version, legacy_parameter, legacy_variable)

__all__ = ["StorageType", "resolve", "new_object", "build", "extend", "set_items", "add_items"]



class StorageType:
    """Stands for ``torch.FloatStorage`` & co. in persistent ids; carries the element dtype."""

    __slots__ = ("name", "dtype_name", "itemsize")

    def __init__(self, name: str, dtype_name: str) -> None:
        from .meta import DTYPE_SIZES

        self.name = name
        self.dtype_name = dtype_name
        self.itemsize = DTYPE_SIZES[dtype_name]

    @property
    def dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype_name)

    def __repr__(self) -> str:
        return f"StorageType({self.name})"


def _fail(what: str, value: Any) -> Any:
    raise _bad(f"expected a {what}, got {type(value).__name__}")


# --------------------------------------------------------------------------- numpy
def _np() -> Any:
    import numpy

    return numpy


def np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
    np = _np()
    if isinstance(subtype, type) and issubclass(subtype, Stub):
        return subtype(shape, dtype)
    if not (isinstance(subtype, _Marker) and subtype.target is np.ndarray):
        raise _bad(f"numpy array reconstructed as {subtype!r}")
    return np.ndarray.__new__(np.ndarray, (0,), np.dtype("b"))


def _validate_ndarray_state(state: Any) -> Any:
    np = _np()
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise _bad("malformed numpy array state")
    shape, dtype, raw = state[-4], state[-3], state[-1]
    if not isinstance(dtype, np.dtype):
        raise _bad(f"numpy array with dtype {dtype!r}")
    shape = tuple(check_int(s, "array dimension") for s in shape)
    if len(shape) > MAX_DIMS or any(s < 0 for s in shape):
        raise _bad(f"numpy array shape {shape}")
    count = math.prod(shape)
    if dtype.hasobject:
        if not isinstance(raw, list) or len(raw) != count:
            raise _bad(f"object array of shape {shape} with {len(raw) if isinstance(raw, list) else '?'} items")
        return state
    if isinstance(raw, str):  # Python 2 data read as text: its code points are the bytes
        raw = raw.encode("latin-1")
        state = state[:-1] + (raw,)
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != count * dtype.itemsize:
        size = len(raw) if isinstance(raw, (bytes, bytearray)) else "?"
        raise _bad(f"numpy array of shape {shape} and dtype {dtype} needs {count * dtype.itemsize} bytes, "
                   f"the pickle holds {size}")
    return state


def np_scalar(dtype: Any, data: Any = None) -> Any:
    np = _np()
    if not isinstance(dtype, np.dtype):
        raise _bad(f"numpy scalar with dtype {dtype!r}")
    if dtype.hasobject:
        return data
    if isinstance(data, str):
        data = data.encode("latin-1")
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise _bad(f"numpy scalar of dtype {dtype} with {len(data) if isinstance(data, bytes) else '?'} bytes")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]


def np_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any = "C") -> Any:
    np = _np()
    if not isinstance(buf, (bytes, bytearray)) or not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise _bad("numpy buffer array with invalid arguments")
    shape = tuple(check_int(s, "array dimension") for s in shape)
    arr = np.frombuffer(bytearray(buf), dtype=dtype)
    return arr.reshape(shape, order="F" if order == "F" else "C")


def np_dtype(obj: Any, align: Any = False, copy: Any = False) -> Any:
    np = _np()
    if isinstance(obj, bytes):
        obj = obj.decode("latin-1")
    if not isinstance(obj, str) or len(obj) > 64:
        raise _bad(f"numpy dtype {obj!r}")
    return np.dtype(obj, align=bool(align), copy=bool(copy))


def _np_random(name: str) -> Callable[..., Any]:
    def ctor(*args: Any) -> Any:
        if not all(isinstance(a, (str, type(None))) or isinstance(a, type) or hasattr(a, "state") for a in args):
            raise _bad(f"numpy random generator rebuilt from {args!r}")
        module = importlib.import_module("numpy.random._pickle")
        return getattr(module, name)(*args)
    return ctor


# --------------------------------------------------------------------------- stdlib
_MATERIAL = (list, tuple, dict, set, frozenset, str, bytes, bytearray)


def _material(args: tuple[Any, ...], what: str, max_args: int = 1) -> None:
    if len(args) > max_args or any(not isinstance(a, _MATERIAL) for a in args[:1]):
        raise _bad(f"{what}() called with {', '.join(type(a).__name__ for a in args)}: only materialised "
                   "data is accepted")


def codecs_encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise _bad(f"_codecs.encode({type(obj).__name__}, {encoding!r})")
    return obj.encode(encoding)


def _bytes_like(kind: type) -> Callable[..., Any]:
    def make(*args: Any) -> Any:
        if not args:
            return kind()
        if len(args) == 2 and isinstance(args[0], str):
            return kind(codecs_encode(args[0], args[1]))
        if len(args) == 1 and isinstance(args[0], (bytes, bytearray, list, tuple)):
            return kind(args[0])
        raise _bad(f"{kind.__name__}() called with {', '.join(type(a).__name__ for a in args)}")
    return make


def _container(kind: type) -> Callable[..., Any]:
    def make(*args: Any) -> Any:
        _material(args, kind.__name__, max_args=2 if kind is collections.deque else 1)
        return kind(*args)
    return make


def ordered_dict_factory(*args: Any) -> Any:
    _material(args, "OrderedDict")
    return collections.OrderedDict(*args)


def defaultdict_factory(default_factory: Any = None, *args: Any) -> Any:
    if default_factory is not None and not (isinstance(default_factory, type) and issubclass(default_factory, Stub)) \
            and default_factory not in (list, dict, set, int, float, str, tuple, collections.OrderedDict):
        default_factory = None
    _material(args, "defaultdict")
    return collections.defaultdict(default_factory, *args)


def copyreg_reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    if isinstance(cls, type) and issubclass(cls, Stub):
        obj = cls()
        if state is not None:
            obj.__dict__["stub_args"] = (state,)
        return obj
    if not isinstance(cls, type):
        raise _bad(f"copyreg._reconstructor of {cls!r}")
    if base is object:
        return object.__new__(cls)
    if base in (dict, list, set, int, float, str, bytes, tuple) and issubclass(cls, base):
        _material((state,) if state is not None else (), base.__name__)
        return base.__new__(cls, state) if state is not None else base.__new__(cls)
    raise _bad(f"copyreg._reconstructor({cls!r}, {base!r})")


def copyreg_newobj(cls: Any, *args: Any) -> Any:
    return new_object(cls, args, {})


def copyreg_newobj_ex(cls: Any, args: Any, kwargs: Any) -> Any:
    return new_object(cls, args, kwargs)



def _path(name: str) -> Callable[[], Any]:
    def get() -> Any:
        import pathlib
        import sys

        if name == "WindowsPath" and sys.platform != "win32":
            return pathlib.PureWindowsPath
        if name == "PosixPath" and sys.platform == "win32":
            return pathlib.PurePosixPath
        return getattr(pathlib, name)
    return get


def _attr(module: str, name: str) -> Callable[[], Any]:
    return lambda: getattr(importlib.import_module(module), name)


def _const(value: Any) -> Callable[[], Any]:
    return lambda: value


def _torch_attr(name: str) -> Any:
    import torch

    return getattr(torch, name)


def _marker(module: str, name: str) -> Callable[[], Any]:
    return lambda: _Marker(f"{module}.{name}", getattr(importlib.import_module(module), name))


# Factories: each returns the object a GLOBAL opcode pushes.
FACTORIES: dict[str, Callable[[], Any]] = {
    "rebuild_tensor": _const(rebuild_tensor), "rebuild_tensor_v2": _const(rebuild_tensor_v2),
    "rebuild_tensor_v3": _const(rebuild_tensor_v3), "rebuild_parameter": _const(rebuild_parameter),
    "rebuild_parameter_with_state": _const(rebuild_parameter_with_state),
    "rebuild_device_tensor_from_numpy": _const(rebuild_device_tensor_from_numpy),
    "rebuild_meta_tensor_no_storage": _const(rebuild_meta_tensor_no_storage),
    "rebuild_qtensor": lambda: stub_class("torch._utils", "_rebuild_qtensor"),
    "rebuild_from_type_v2": _const(rebuild_from_type_v2), "rebuild_from_type": _const(rebuild_from_type),
    "get_layout": _const(get_layout), "torch_size": _attr("torch", "Size"), "torch_device": _attr("torch", "device"),
    "torch_tensor_class": _marker("torch", "Tensor"),
    "torch_parameter_class": lambda: _Marker("torch.nn.parameter.Parameter", _attr("torch.nn.parameter", "Parameter")(),
                                             legacy_parameter),
    "torch_variable_class": lambda: _Marker("torch.autograd.variable.Variable", None, legacy_variable),
    "torch_version": _const(torch_version),
    "jit_list": _const(lambda items: list(items) if isinstance(items, (list, tuple)) else _fail("list", items)),
    "jit_type_tag": _const(lambda value, type_str=None: value),
    "np_reconstruct": _const(np_reconstruct), "np_scalar": _const(np_scalar), "np_frombuffer": _const(np_frombuffer),
    "np_ndarray": lambda: _Marker("numpy.ndarray", _np().ndarray), "np_dtype": _const(np_dtype),
    "np_randomstate_ctor": lambda: _np_random("__randomstate_ctor"),
    "np_generator_ctor": lambda: _np_random("__generator_ctor"),
    "np_bit_generator_ctor": lambda: _np_random("__bit_generator_ctor"),
    "ordered_dict": _const(ordered_dict_factory), "defaultdict": _const(defaultdict_factory),
    "counter": _const(_container(collections.Counter)), "deque": _const(_container(collections.deque)),
    "codecs_encode": _const(codecs_encode), "copyreg_reconstructor": _const(copyreg_reconstructor),
    "copyreg_newobj": _const(copyreg_newobj), "copyreg_newobj_ex": _const(copyreg_newobj_ex),
    "argparse_namespace": _attr("argparse", "Namespace"), "simple_namespace": _attr("types", "SimpleNamespace"),
    "datetime": _attr("datetime", "datetime"), "date": _attr("datetime", "date"), "time": _attr("datetime", "time"),
    "timedelta": _attr("datetime", "timedelta"), "timezone": _attr("datetime", "timezone"),
    "decimal": _attr("decimal", "Decimal"), "fraction": _attr("fractions", "Fraction"), "uuid": _attr("uuid", "UUID"),
    **{f"path_{n}": _path(n) for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath",
                                       "PureWindowsPath")},
    "builtin_bytes": _const(_bytes_like(bytes)), "builtin_bytearray": _const(_bytes_like(bytearray)),
    **{f"builtin_{k.__name__}": _const(_container(k)) for k in (list, tuple, dict, set, frozenset)},
    **{f"builtin_{n}": _const(getattr(builtins, n))
       for n in ("int", "float", "complex", "bool", "str", "slice", "range", "object", "NotImplemented", "Ellipsis")},
}


def resolve(module: str, name: str, verdict: Verdict, policy: Policy, meta: bool = False) -> Any:
    """The object a GLOBAL pushes, for a global the policy did not block.

    ``meta=True`` (structure only): torch is never imported; tensors become TensorMeta.
    """
    cmod, cname = canonical_global(module, name)
    if verdict is Verdict.ALLOWED:
        key = ALLOWLIST.get((module, name)) or ALLOWLIST.get((cmod, cname))
        if key is not None:
            if meta:
                from .meta import META_FACTORIES

                if key in META_FACTORIES:
                    return META_FACTORIES[key]()
                if key == "torch_tensor_class":
                    return _Marker(f"{cmod}.{cname}", None)
                if key in ("torch_parameter_class", "torch_variable_class"):
                    ctor = legacy_parameter if key == "torch_parameter_class" else legacy_variable
                    return _Marker(f"{cmod}.{cname}", None, ctor)
            return FACTORIES[key]()
        if cname.endswith("Storage") and cmod in ("torch", "torch.cuda"):
            return _storage_type(cname)
        if cmod == "torch":
            if meta:
                from .meta import meta_dtype

                return meta_dtype(cname)
            return _torch_attr(cname)
        if cmod in ("numpy", "numpy.dtypes"):
            return _marker(cmod, cname)()
    if policy.imports_real(module, name):
        try:
            obj: Any = importlib.import_module(cmod)
            for part in cname.split("."):
                obj = getattr(obj, part)
            return obj
        except Exception:  # noqa: BLE001 - the class's code is gone: fall back to a stub
            pass
    return stub_class(module, name)


_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "QInt8Storage": "qint8", "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32", "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
    "UntypedStorage": "uint8", "_UntypedStorage": "uint8",
}


def _storage_type(name: str) -> Any:
    dtype_name = _STORAGE_DTYPES.get(name)
    if dtype_name is None:
        raise _bad(f"unknown storage type torch.{name}")
    return StorageType(name, dtype_name)


# --------------------------------------------------------------------------- object protocol
def new_object(cls: Any, args: Any, kwargs: Any) -> Any:
    """NEWOBJ / NEWOBJ_EX: ``cls.__new__(cls, *args, **kwargs)`` for real classes, a record for stubs."""
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
        raise _bad("NEWOBJ arguments must be a tuple and a dict")
    if isinstance(cls, type) and issubclass(cls, Stub):
        return cls(*args, **kwargs)
    if isinstance(cls, _Marker) and cls.ctor is not None and not kwargs:
        return cls(*args)  # copyreg.__newobj__(Parameter, data) of torch <= 0.3, protocol < 2
    if isinstance(cls, _Marker) or not isinstance(cls, type):
        raise _bad(f"NEWOBJ on {cls!r}, which is not a class")
    if cls in (bytes, bytearray, list, tuple, set, frozenset, dict):
        _material(args, cls.__name__)
    return cls.__new__(cls, *args, **kwargs)


def build(inst: Any, state: Any, policy: Policy) -> None:
    """BUILD: restore ``state`` into ``inst`` (stubs record it)."""
    if isinstance(inst, Stub):
        inst.__setstate__(state)
        return
    if isinstance(inst, TensorMeta):
        if isinstance(state, tuple) and len(state) in (3, 4) and isinstance(state[-3], bool):
            inst.requires_grad = state[-3]
        return
    if type(inst).__module__.startswith("torch") and hasattr(inst, "requires_grad_") and isinstance(state, tuple):
        # torch <= 0.3 Variable/Parameter state: (requires_grad, volatile, backward_hooks) [+ data first]
        if len(state) in (3, 4) and isinstance(state[-3], bool) and (inst.is_floating_point() or inst.is_complex()):
            inst.requires_grad_(state[-3])
        return
    np = _np() if type(inst).__module__ == "numpy" else None
    if np is not None and isinstance(inst, np.ndarray):
        state = _validate_ndarray_state(state)
        inst.__setstate__(state)
        return
    setstate = getattr(type(inst), "__setstate__", None)
    if setstate is not None:
        setstate(inst, state)
        return
    slotstate = None
    if isinstance(state, tuple) and len(state) == 2:
        state, slotstate = state
    if state:
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise _bad(f"BUILD state for {type(inst).__name__} must be a dict with string keys")
        try:
            inst.__dict__.update(state)
        except AttributeError:
            raise _bad(f"BUILD state for {type(inst).__name__}, which has no attributes") from None
    if slotstate:
        if not isinstance(slotstate, dict):
            raise _bad("BUILD slot state must be a dict")
        for k, v in slotstate.items():
            if not isinstance(k, str) or k.startswith("__"):
                raise _bad(f"BUILD slot name {k!r}")
            setattr(inst, k, v)


def extend(target: Any, items: list[Any], policy: Policy) -> None:
    """APPEND / APPENDS."""
    if isinstance(target, list):
        target.extend(items)
    elif isinstance(target, (Stub, collections.deque)):
        for item in items:
            target.append(item)
    elif policy.trust and hasattr(target, "append"):
        for item in items:
            target.append(item)
    else:
        raise _bad(f"APPENDS on a {type(target).__name__}")


_HASH_MODULUS = (1 << 61) - 1


def check_key(key: Any) -> Any:
    """Refuse dict/set keys that can be crafted to share a hash (ints and floats beyond 2**61, where
    Python's numeric hash wraps): thousands of them would make one SETITEMS take quadratic time."""
    t = type(key)
    if (t is int or t is float) and not -_HASH_MODULUS < key < _HASH_MODULUS:
        raise _bad(f"dict key {key!r:.40} is out of range (hash-collision attack?)")
    if t is tuple:
        for part in key:
            check_key(part)
    return key


def set_items(target: Any, items: list[Any], policy: Policy) -> None:
    """SETITEM / SETITEMS (``items`` alternates keys and values)."""
    if isinstance(target, (dict, Stub)) or (policy.trust and hasattr(target, "__setitem__")):
        for i in range(0, len(items), 2):
            target[check_key(items[i])] = items[i + 1]
    else:
        raise _bad(f"SETITEMS on a {type(target).__name__}")


def add_items(target: Any, items: list[Any], policy: Policy) -> None:
    """ADDITEMS."""
    if isinstance(target, set):
        target.update(check_key(item) for item in items)
    elif isinstance(target, Stub):
        for item in items:
            target.add(item)
    else:
        raise _bad(f"ADDITEMS on a {type(target).__name__}")

