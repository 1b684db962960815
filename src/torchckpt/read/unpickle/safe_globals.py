"""What allowlisted globals become, and the object protocol (NEWOBJ, BUILD, APPENDS, SETITEMS) over them.

Every allowlisted global resolves to a :class:`SafeCallable`, a class :class:`Marker` or a constant
(``torch.float16``), never to the real class or function: REDUCE, NEWOBJ and BUILD go only through
validating constructors (:mod:`.constructors`, :mod:`.numpy_values`, :mod:`.torch_rebuild`). Values, not
mutation: a BUILD makes a *new* value from the validated state, put where the old one was; a class, type,
function or module is never BUILD-ed (unsafe), no real ``__setstate__`` runs unless the caller trusted
the class. torch and numpy are imported only when a pickle needs them.
"""

from __future__ import annotations

import collections
import importlib
import inspect
import re
import types
from typing import Any, Callable

from ...errors import CorruptCheckpointError
from . import meta
from .constructors import CONSTANTS, CONSTRUCTORS, LAZY_CONSTRUCTORS
from .meta import DTYPE_SIZES, MetaDevice, MetaSize, MetaStorage, TensorMeta, check_int, const, meta_dtype
from .numpy_values import (finish_array, finish_dtype, finish_random, np_dtype, np_frombuffer, np_reconstruct,
                           np_scalar, random_ctor)
from .mode import Mode
from .functions import safe_getattr, torch_function_ref
from .quantized import (PACKED_CLASSES, finish_script_object, meta_rebuild_qtensor, packed_object, rebuild_qtensor,
                        script_object)
from .policy import ALLOWLIST, Policy, Verdict, canonical_global
from .modules import build_module, is_module, torch_module_class
from .stubs import Stub, stub_class
from .torch_rebuild import (Marker, get_layout, legacy_parameter, legacy_variable, rebuild_device_tensor_from_numpy,
                            rebuild_from_type_v2, rebuild_meta_tensor_no_storage, rebuild_parameter,
                            rebuild_parameter_with_state, rebuild_tensor, rebuild_tensor_v2, rebuild_tensor_v3,
                            torch_version)

__all__ = ["StorageType", "SafeCallable", "resolve", "new_object", "build", "extend", "set_items", "add_items",
           "rebuild_tensor"]


class StorageType:
    """Stands for ``torch.FloatStorage`` & co. in persistent ids; carries the element dtype."""

    __slots__ = ("name", "dtype_name", "itemsize")

    def __init__(self, name: str, dtype_name: str) -> None:
        self.name = name
        self.dtype_name = dtype_name
        self.itemsize = DTYPE_SIZES[dtype_name]

    @property
    def dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype_name)

    def meta(self, nbytes: int, location: str = "cpu") -> MetaStorage:
        """A storage of this type that was not read (structure only)."""
        return MetaStorage(meta_dtype(self.dtype_name), nbytes, location)

    def wrap(self, untyped: Any) -> Any:
        """``untyped`` (a ``torch.UntypedStorage``) as a typed storage of this type."""
        import torch

        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=self.dtype, _internal=True)

    def __repr__(self) -> str:
        return f"StorageType({self.name})"


def _bad(message: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(message)


class SafeCallable:
    """An allowlisted global. ``fn(u, *args)`` is its validating constructor (REDUCE); ``newobj`` says
    whether NEWOBJ may build it the same way; ``finish(u, old, state)`` makes the value BUILD asks for."""

    __slots__ = ("name", "fn", "newobj", "finish", "target", "plain")

    def __init__(self, name: str, fn: Callable[..., Any], newobj: bool = False,
                 finish: Callable[[Any, Any, Any], Any] | None = None, target: Any = None) -> None:
        self.name, self.fn, self.newobj, self.finish, self.target = name, fn, newobj, finish, target
        self.plain = getattr(fn, "plain", None)  # fn(*args) without the unpickler (the hot tensor rebuilders)

    def __repr__(self) -> str:
        return f"<allowlisted {self.name}>"


def _plain(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A constructor that needs no budget (its work is bounded by validated sizes)."""
    def call(u: Any, *args: Any) -> Any:
        return fn(*args)
    call.plain = fn  # type: ignore[attr-defined]
    return call


def _torch_size(u: Any, sizes: Any = ()) -> Any:
    import torch

    if not isinstance(sizes, (list, tuple)) or len(sizes) > 4096:
        raise _bad(f"torch.Size of a {type(sizes).__name__} (a list or tuple of at most 4096 ints is accepted)")
    u.meter.step(len(sizes))
    return torch.Size([check_int(s, "torch.Size element") for s in sizes])


# torch.device's own parser (c10::Device), written out so that a structure read refuses what a build refuses
_DEVICE_TYPES = frozenset("cpu cuda ipu xpu mkldnn opengl opencl ideep hip ve fpga maia xla lazy vulkan mps meta hpu mtia "
                          "privateuseone".split())
_DEVICE = re.compile(r"([a-z_]+)(?::(0|[1-9][0-9]{0,2}))?")


def device_string(kind: Any, index: Any = None) -> str:
    """The device ``torch.device(kind[, index])`` names, or CorruptCheckpointError (indices 0..127)."""
    m = _DEVICE.fullmatch(kind) if isinstance(kind, str) and len(kind) <= 64 else None
    if m is None or m.group(1) not in _DEVICE_TYPES or not (index is None or type(index) is int) \
            or (index is not None and m.group(2) is not None):
        raise _bad(f"invalid torch.device({kind!r:.70}" + (f", {index!r:.20})" if index is not None else ")"))
    number = index if index is not None else int(m.group(2)) if m.group(2) is not None else None
    if number is not None and not 0 <= number <= 127:
        raise _bad(f"invalid torch.device index {number}")
    return m.group(1) if number is None else f"{m.group(1)}:{number}"


def _torch_device(u: Any, kind: Any = "cpu", index: Any = None) -> Any:
    import torch

    return torch.device(device_string(kind, index))


def _meta_size(u: Any, sizes: Any = ()) -> Any:
    if not isinstance(sizes, (list, tuple)) or len(sizes) > 4096:
        raise _bad(f"torch.Size of a {type(sizes).__name__}")
    u.meter.step(len(sizes))
    return MetaSize(check_int(s, "torch.Size element") for s in sizes)


def _meta_device(u: Any, kind: Any = "cpu", index: Any = None) -> Any:
    return MetaDevice(device_string(kind, index))


def _jit_list(u: Any, items: Any) -> list[Any]:
    if not isinstance(items, (list, tuple)):
        raise _bad(f"expected a list, got {type(items).__name__}")
    u.meter.step(len(items))
    u.meter.materialise(8 * len(items) + 56, "lists")
    return list(items)


def _jit_tensor_from_id(u: Any, tensor_id: Any) -> Any:
    """``torch.jit._pickle.build_tensor_from_id(n)``: tensor ``n`` of the archive's table (TorchScript < 1.2)."""
    if u.tensor_table is None:
        raise _bad("build_tensor_from_id outside a TorchScript archive of torch < 1.2 (there is no tensor table)")
    return u.tensor_table(check_int(tensor_id, "tensor id"))


def _jit_build_class(u: Any, qualname: Any, state: Any) -> Any:
    """``torch.jit._pickle.build_class(qualname, state)``: an inert stub of that TorchScript class with its state
    (torch's own helper imports the class and runs its ``__setstate__``; nothing here does)."""
    if not isinstance(qualname, str) or not 0 < len(qualname) <= 512:
        raise _bad(f"build_class of a {type(qualname).__name__} qualified name")
    module, _, name = qualname.rpartition(".")
    obj = stub_class(module, name)()
    obj.__setstate__(state)
    return obj


def _from_type(u: Any, func: Any, new_type: Any, args: Any, state: Any = None) -> Any:
    if not isinstance(args, tuple):
        raise _bad("tensor subclass arguments must be a tuple")
    if not isinstance(func, SafeCallable):
        raise _bad(f"tensor subclass rebuilt through {func!r:.80}")
    if u.mode is not Mode.BUILD:
        return u.call(func, args, u.pos)
    return rebuild_from_type_v2(lambda *a: u.call(func, a, u.pos), new_type, args, state)


def _copyreg_reconstructor(u: Any, cls: Any, base: Any = None, state: Any = None) -> Any:
    if isinstance(cls, type) and issubclass(cls, Stub):
        obj = cls()
        if state is not None:
            obj.__dict__["stub_args"] = (state,)
        return obj
    base_type = getattr(base, "target", base)
    if base_type is object or base_type is None:
        return u.new_object(cls, (), {})
    if isinstance(cls, SafeCallable) and cls.target is base_type:
        return u.new_object(cls, () if state is None else (state,), {})
    raise _bad(f"copyreg._reconstructor({cls!r:.60}, {base!r:.60})")


def _copyreg_newobj(u: Any, cls: Any = None, *args: Any) -> Any:
    return u.new_object(cls, args, {})


def _copyreg_newobj_ex(u: Any, cls: Any = None, args: Any = (), kwargs: Any = None) -> Any:
    return u.new_object(cls, args, kwargs if kwargs is not None else {})


def _safe(name: str, fn: Callable[..., Any], newobj: bool = False, finish: Any = None,
          target: Any = None) -> Callable[[], SafeCallable]:
    return lambda: SafeCallable(name, fn, newobj, finish, target)


def _safe_later(name: str, entry: Callable[[], tuple[Any, bool, Any, Any]]) -> Callable[[], SafeCallable]:
    return lambda: SafeCallable(name, *entry())  # an entry made on first use (constructors.LAZY_CONSTRUCTORS)


# Factories: each returns what a GLOBAL opcode pushes for an allowlisted name (BUILD mode).
FACTORIES: dict[str, Callable[[], Any]] = {
    "rebuild_tensor": _safe("torch._utils._rebuild_tensor", _plain(rebuild_tensor)),
    "rebuild_tensor_v2": _safe("torch._utils._rebuild_tensor_v2", _plain(rebuild_tensor_v2)),
    "rebuild_tensor_v3": _safe("torch._utils._rebuild_tensor_v3", _plain(rebuild_tensor_v3)),
    "rebuild_parameter": _safe("torch._utils._rebuild_parameter", _plain(rebuild_parameter)),
    "rebuild_parameter_with_state": _safe("torch._utils._rebuild_parameter_with_state",
                                          _plain(rebuild_parameter_with_state)),
    "rebuild_device_tensor_from_numpy": _safe("torch._utils._rebuild_device_tensor_from_numpy",
                                              _plain(rebuild_device_tensor_from_numpy)),
    "rebuild_meta_tensor_no_storage": _safe("torch._utils._rebuild_meta_tensor_no_storage",
                                            _plain(rebuild_meta_tensor_no_storage)),
    "rebuild_qtensor": _safe("torch._utils._rebuild_qtensor", _plain(rebuild_qtensor)),
    "script_object": _safe("torch.ScriptObject", script_object, newobj=True, finish=finish_script_object),
    **{"packed_" + n: _safe("__torch__.torch.classes.quantized." + n, packed_object(kind), newobj=True,
                            finish=finish_script_object) for n, kind in PACKED_CLASSES.items()},
    "rebuild_from_type_v2": _safe("torch._tensor._rebuild_from_type_v2", _from_type),
    "rebuild_from_type": _safe("torch._tensor._rebuild_from_type", _from_type),
    "get_layout": _safe("torch.serialization._get_layout", _plain(get_layout)),
    "torch_size": _safe("torch.Size", _torch_size, newobj=True),
    "torch_device": _safe("torch.device", _torch_device),
    "torch_tensor_class": lambda: Marker("torch.Tensor", _attr("torch", "Tensor")),
    "torch_parameter_class": lambda: Marker("torch.nn.parameter.Parameter",
                                             _attr("torch.nn.parameter", "Parameter"), legacy_parameter),
    "torch_variable_class": lambda: Marker("torch.autograd.variable.Variable", None, legacy_variable),
    "torch_version": _safe("torch.torch_version.TorchVersion", _plain(torch_version), newobj=True,
                           target=torch_version),
    "jit_list": _safe("torch.jit._pickle.build_list", _jit_list),
    "builtin_getattr": _safe("builtins.getattr", safe_getattr),
    "jit_tensor_from_id": _safe("torch.jit._pickle.build_tensor_from_id", _jit_tensor_from_id),
    "jit_build_class": _safe("torch.jit._pickle.build_class", _jit_build_class),
    "jit_type_tag": _safe("torch.jit._pickle.restore_type_tag", lambda u, value, type_str=None: value),
    "np_reconstruct": _safe("numpy.core.multiarray._reconstruct", np_reconstruct, finish=finish_array),
    "np_scalar": _safe("numpy.core.multiarray.scalar", np_scalar),
    "np_frombuffer": _safe("numpy.core.numeric._frombuffer", np_frombuffer, finish=finish_array),
    "np_ndarray": lambda: Marker("numpy.ndarray", None),
    "np_matrix": lambda: Marker("numpy.matrix", None),
    "np_recarray": lambda: Marker("numpy.recarray", None),
    "np_memmap": lambda: Marker("numpy.memmap", None),
    "np_dtype": _safe("numpy.dtype", np_dtype, finish=finish_dtype),
    "np_randomstate_ctor": _safe("numpy.random._pickle.__randomstate_ctor", random_ctor("randomstate"),
                                 finish=finish_random),
    "np_generator_ctor": _safe("numpy.random._pickle.__generator_ctor", random_ctor("generator")),
    "np_bit_generator_ctor": _safe("numpy.random._pickle.__bit_generator_ctor", random_ctor("bit_generator"),
                                   finish=finish_random),
    "copyreg_reconstructor": _safe("copyreg._reconstructor", _copyreg_reconstructor),
    "copyreg_newobj": _safe("copyreg.__newobj__", _copyreg_newobj),
    "copyreg_newobj_ex": _safe("copyreg.__newobj_ex__", _copyreg_newobj_ex),
    **{key: _safe(key, fn, newobj, finish, target) for key, (fn, newobj, finish, target) in CONSTRUCTORS.items()},
    **{key: _safe_later(key, entry) for key, entry in LAZY_CONSTRUCTORS.items()},
    **{key: const(value) for key, value in CONSTANTS.items()},
}


def _attr(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


def _arity(fn: Callable[..., Any]) -> tuple[int, int]:
    params = inspect.signature(fn).parameters.values()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    most = 1 << 30 if any(p.kind is p.VAR_POSITIONAL for p in params) else len(positional)
    return sum(p.default is p.empty for p in positional), most


def _like(build: Callable[..., Any], structure: Callable[..., Any]) -> Callable[..., Any]:
    """``structure`` (the torch-free rebuilder) called as ``build`` would be: the same arguments are refused in
    both modes, so scan (structure) refuses exactly what load (build) refuses."""
    least, most = _arity(build)
    name = getattr(build, "__name__", "rebuilder")

    def call(*args: Any) -> Any:
        if not least <= len(args) <= most:
            raise _bad(f"{name}() takes {least} to {most} arguments, the pickle gives {len(args)}")
        return structure(*args)
    return _plain(call)


def _meta_factories() -> dict[str, Callable[[], Any]]:
    def from_type(u: Any, func: Any, new_type: Any, args: Any, state: Any = None) -> Any:
        if not isinstance(args, tuple) or not isinstance(func, SafeCallable):
            raise _bad(f"tensor subclass rebuilt through {func!r:.80}")
        return u.call(func, args, u.pos)

    return {
        "rebuild_tensor": _safe("torch._utils._rebuild_tensor", _like(rebuild_tensor, meta.rebuild_tensor)),
        "rebuild_tensor_v2": _safe("torch._utils._rebuild_tensor_v2", _like(rebuild_tensor_v2, meta.rebuild_tensor)),
        "rebuild_tensor_v3": _safe("torch._utils._rebuild_tensor_v3", _like(rebuild_tensor_v3, meta.rebuild_tensor_v3)),
        "rebuild_parameter": _safe("torch._utils._rebuild_parameter", _like(rebuild_parameter, meta.rebuild_parameter)),
        "rebuild_parameter_with_state": _safe("torch._utils._rebuild_parameter_with_state",
                                              _like(rebuild_parameter_with_state, meta.rebuild_parameter)),
        "rebuild_device_tensor_from_numpy": _safe("torch._utils._rebuild_device_tensor_from_numpy",
                                                  _like(rebuild_device_tensor_from_numpy, meta.rebuild_device_tensor_from_numpy)),
        "rebuild_meta_tensor_no_storage": _safe("torch._utils._rebuild_meta_tensor_no_storage",
                                                _like(rebuild_meta_tensor_no_storage, meta.rebuild_meta_tensor_no_storage)),
        "rebuild_from_type_v2": _safe("torch._tensor._rebuild_from_type_v2", from_type),
        "rebuild_from_type": _safe("torch._tensor._rebuild_from_type", from_type),
        "get_layout": _safe("torch.serialization._get_layout", _like(get_layout, meta.layout_name)),
        "rebuild_qtensor": _safe("torch._utils._rebuild_qtensor", _like(rebuild_qtensor, meta_rebuild_qtensor)),
        "torch_size": _safe("torch.Size", _meta_size, newobj=True),
        "torch_device": _safe("torch.device", _meta_device),
        "torch_tensor_class": lambda: Marker("torch.Tensor", None),
        "torch_parameter_class": lambda: Marker("torch.nn.parameter.Parameter", None, legacy_parameter),
        "torch_variable_class": lambda: Marker("torch.autograd.variable.Variable", None, legacy_variable),
    }


_META: dict[str, Callable[[], Any]] = {}


def resolve(module: str, name: str, verdict: Verdict, policy: Policy, mode: Mode = Mode.BUILD) -> Any:
    """The object a GLOBAL pushes, for a global the policy did not block. STRUCTURE and RECORD modes never
    import torch (tensors become TensorMeta); RECORD mode imports nothing for real whatever the policy says."""
    cmod, cname = canonical_global(module, name)
    if verdict is Verdict.ALLOWED:
        key = ALLOWLIST.get((module, name)) or ALLOWLIST.get((cmod, cname))
        if key is not None:
            if mode is not Mode.BUILD:
                if not _META:
                    _META.update(_meta_factories())
                if key in _META:
                    return _META[key]()
            return FACTORIES[key]()
        if cname.endswith("Storage") and cmod in ("torch", "torch.cuda") or (cmod, cname) == ("torch.storage",
                                                                                             "UntypedStorage"):
            return _storage_type(cname)
        if cmod == "torch":
            if mode is not Mode.BUILD:
                return meta_dtype(cname)
            return _attr("torch", cname)
        if cmod in ("numpy", "numpy.dtypes"):
            return Marker(f"{cmod}.{cname}", _attr(cmod, cname))
    if mode is Mode.BUILD and policy.allow and not policy.trust and not policy.imports_real(module, name):
        # the caller allowed their own classes: the torch.nn layers they are made of are real values too,
        # built by modules.build_module (never called, never their __setstate__)
        nn_class = torch_module_class(cmod, cname)
        if nn_class is not None:
            return nn_class
    if verdict is Verdict.UNKNOWN and not (mode is not Mode.RECORD and policy.imports_real(module, name)):
        ref = torch_function_ref(cmod, cname)  # torch.sigmoid, F.relu stored as an activation: a reference
        if ref is not None:
            return ref
    if mode is not Mode.RECORD and policy.imports_real(module, name):
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
_NEVER_BUILT = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
                SafeCallable, Marker, StorageType)


def build(u: Any, inst: Any, state: Any) -> Any:
    """BUILD on anything but a fresh allowlisted value (those go to their finisher, see the VM): stubs
    record it, legacy tensors take ``requires_grad``, instances of classes the caller imported for real
    take their own ``__setstate__``. A class, type, module or function is never BUILD-ed."""
    if isinstance(inst, Stub):
        inst.__setstate__(state)
        return inst
    if isinstance(inst, _NEVER_BUILT):
        return u.unsafe(f"BUILD on {inst!r:.80}, which is a class, function or module: a pickle may only restore "
                        "the state of instances", f"{type(inst).__module__}.{type(inst).__qualname__}")
    if isinstance(inst, TensorMeta):
        if isinstance(state, tuple) and len(state) in (3, 4) and isinstance(state[-3], bool):
            inst.requires_grad = state[-3]
        return inst
    if type(inst).__module__.startswith("torch") and hasattr(inst, "requires_grad_") and isinstance(state, tuple):
        # torch <= 0.3 Variable/Parameter state: (requires_grad, volatile, backward_hooks) [+ data first]
        if len(state) in (3, 4) and isinstance(state[-3], bool) and (inst.is_floating_point() or inst.is_complex()):
            inst.requires_grad_(state[-3])
        return inst
    real = u.trusted_instance(inst)
    if real and is_module(inst) and not u.policy.trust:  # allow=: a module is built as a checked value
        build_module(u, inst, state)
        return inst
    if real:
        _trusted_build(inst, state)
        return inst
    raise _bad(f"BUILD on a finished {type(inst).__name__} value (state may only be given once, right after "
               "the value is made)")


def _trusted_build(inst: Any, state: Any) -> None:
    """BUILD on an instance of a class the caller imported for real (``trust`` / ``allow``)."""
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


def new_object(u: Any, cls: Any, args: Any, kwargs: Any) -> Any:
    """NEWOBJ / NEWOBJ_EX / copyreg: a record for stubs, the validating constructor for allowlisted classes,
    ``cls.__new__`` only for classes the caller imported for real."""
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
        raise _bad("NEWOBJ arguments must be a tuple and a dict")
    if isinstance(cls, type) and issubclass(cls, Stub):
        return cls(*args, **kwargs)
    if isinstance(cls, SafeCallable):
        if not cls.newobj:
            raise _bad(f"NEWOBJ on {cls.name}, which is not a class")
        return u.call(cls, args, u.pos, kwargs)
    if isinstance(cls, Marker) and cls.ctor is not None and not kwargs:
        return cls(*args)  # copyreg.__newobj__(Parameter, data) of torch <= 0.3, protocol < 2
    if isinstance(cls, type) and u.trusted_class(cls):
        return cls.__new__(cls, *args, **kwargs)
    raise _bad(f"NEWOBJ on {cls!r:.80}, which is not a class this policy builds")


def _mutable_real(u: Any, target: Any) -> bool:
    """Whether APPENDS/SETITEMS may call ``target``'s own ``append``/``__setitem__``: an instance of a class the
    caller imported for real, except a module built as a value under ``allow=`` (``ModuleList.append`` would add
    a child unchecked, itself included, after :func:`modules.build_module` checked the tree; torch's pickles
    never append to a module)."""
    return u.trusted_instance(target) and (u.policy.trust or not is_module(target))


def extend(u: Any, target: Any, items: list[Any]) -> None:
    """APPEND / APPENDS."""
    if isinstance(target, list):
        target.extend(items)
    elif isinstance(target, (Stub, collections.deque)):
        for item in items:
            target.append(item)
    elif _mutable_real(u, target) and hasattr(target, "append"):
        for item in items:
            target.append(item)
    else:
        raise _bad(f"APPENDS on a {type(target).__name__}")


def set_items(u: Any, target: Any, items: list[Any]) -> None:
    """SETITEM / SETITEMS (``items`` alternates keys and values)."""
    if isinstance(target, (dict, Stub)) or (_mutable_real(u, target) and hasattr(target, "__setitem__")):
        keys = items[0::2]
        u.keys.admit(target, keys)
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]
    else:
        raise _bad(f"SETITEMS on a {type(target).__name__}")


def add_items(u: Any, target: Any, items: list[Any]) -> None:
    """ADDITEMS."""
    if isinstance(target, set):
        u.keys.admit(target, items)
        target.update(items)
    elif isinstance(target, Stub):
        for item in items:
            target.add(item)
    else:
        raise _bad(f"ADDITEMS on a {type(target).__name__}")
