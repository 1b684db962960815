"""Walk a loaded checkpoint: rebuild state dicts from stubbed modules, locate the weights.

:func:`state_dict_of` gives, for a whole-model pickle loaded without its class, exactly what
``model.state_dict()`` would have returned: same keys, same order, the same tensors (detached,
sharing storage, tied weights under every name). :func:`find_state_dicts` lists every place in a
training dict that holds weights, with a path such as ``"state_dict"`` or ``"model_ema.module"``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

from ..errors import LimitExceededError, WeightsNotFoundError
from ..read.unpickle.meta import TensorMeta
from ..read.unpickle.stubs import Stub, stub_name

__all__ = ["state_dict_of", "is_module_like", "find_state_dicts", "Candidate", "is_tensor_like",
           "is_state_dict", "walk_tree"]

MAX_DEPTH = 64


def is_tensor_like(value: Any) -> bool:
    t = type(value)
    if isinstance(value, TensorMeta) or (t.__module__.startswith("torch") and hasattr(value, "untyped_storage")):
        return True
    return t.__module__ == "numpy" and t.__name__ == "ndarray" and value.dtype.kind in "biufc"


def is_module_like(obj: Any) -> bool:
    """An ``nn.Module``, a stub of one (whole-model pickle), a TorchScript module stub, or a Lua ``nn`` object."""
    if type(obj).__name__ == "T7Object":
        return obj.typename.startswith(("nn.", "cudnn.", "cunn.", "fbnn.", "inn.", "nngraph."))
    if isinstance(obj, Stub):
        attrs = obj.stub_attributes()
        return isinstance(attrs.get("_parameters"), dict) and isinstance(attrs.get("_modules"), dict) or \
            type(obj)._stub_module.startswith("__torch__")
    import sys

    torch = sys.modules.get("torch")  # a real nn.Module implies torch is imported already
    return torch is not None and isinstance(obj, torch.nn.Module)


def state_dict_of(obj: Any) -> "OrderedDict[str, Any]":
    """The state dict of a module: a real ``nn.Module``, or the stub tree of a whole-model pickle.

    For stubs the result equals what ``model.state_dict()`` returns for the original class:
    parameters, then persistent buffers, then submodules, recursively; tied weights appear under
    every name; tensors are detached and share storage with the loaded ones.
    A TorchScript module stub is read through the ``__parameters__``/``__buffers__`` declarations
    of its ``code/``. A mapping that already is a state dict is returned as is.

    Raises:
        WeightsNotFoundError: ``obj`` is neither a module nor a state dict.
    """
    if isinstance(obj, Stub):
        out: OrderedDict[str, Any] = OrderedDict()
        if type(obj)._stub_module.startswith("__torch__"):
            _torchscript_state(obj, "", out, set(), obj.__dict__.get("stub_declarations") or {}, 0)
        else:
            _stub_state(obj, "", out, set(), 0)
        if out or is_module_like(obj):
            return out
    elif type(obj).__name__ == "T7Object":
        from ..read.formats.lua_t7 import t7_state_dict

        return t7_state_dict(obj)
    elif is_state_dict(obj):
        return obj  # type: ignore[return-value]
    elif is_module_like(obj):
        return obj.state_dict()
    what = stub_name(obj) if isinstance(obj, Stub) else type(obj).__name__
    raise WeightsNotFoundError(f"{what} is not a module or a state dict",
                               hint="Pass the model object, or use find_state_dicts() on a training dict.")


def _detach(t: Any) -> Any:
    return t.detach() if hasattr(t, "detach") else t


def _stub_state(module: Stub, prefix: str, out: dict, active: set, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise LimitExceededError(f"module nesting deeper than {MAX_DEPTH} at {prefix!r}")
    if id(module) in active:
        return  # a module containing itself: nn.Module would recurse forever; we stop
    active.add(id(module))
    attrs = module.stub_attributes()
    params = attrs.get("_parameters") or {}
    buffers = attrs.get("_buffers") or {}
    non_persistent = attrs.get("_non_persistent_buffers_set") or set()
    for name, p in params.items():
        if p is not None:
            out[prefix + name] = _detach(p)
    for name, b in buffers.items():
        if b is not None and name not in non_persistent:
            out[prefix + name] = _detach(b)
    for name, child in (attrs.get("_modules") or {}).items():
        if isinstance(child, Stub):
            _stub_state(child, f"{prefix}{name}.", out, active, depth + 1)
        elif child is not None and hasattr(child, "state_dict"):
            for k, v in child.state_dict().items():
                out[f"{prefix}{name}.{k}"] = v
    active.discard(id(module))


def _torchscript_state(module: Stub, prefix: str, out: dict, active: set, decls: dict, depth: int) -> None:
    if depth > MAX_DEPTH or id(module) in active:
        return
    active.add(id(module))
    attrs = module.stub_attributes()
    decl = decls.get(stub_name(module), {})
    declared = list(decl.get("__parameters__", [])) + list(decl.get("__buffers__", []))
    names = declared if decl else [k for k, v in attrs.items() if is_tensor_like(v)]
    for name in names:
        value = attrs.get(name)
        if value is not None and is_tensor_like(value):
            out[prefix + name] = _detach(value)
    for name, value in attrs.items():
        if isinstance(value, Stub) and type(value)._stub_module.startswith("__torch__"):
            _torchscript_state(value, f"{prefix}{name}.", out, active, decls, depth + 1)
    active.discard(id(module))


def is_state_dict(obj: Any) -> bool:
    """A mapping of string keys whose values are (mostly) tensors or numeric arrays."""
    if not isinstance(obj, dict) or not obj:
        return False
    tensors = 0
    for k, v in obj.items():
        if not isinstance(k, str):
            return False
        if is_tensor_like(v):
            tensors += 1
    return tensors > 0 and tensors * 2 >= len(obj)


@dataclass
class Candidate:
    """A place in the checkpoint that holds weights."""

    path: str  # "" for the root, "state_dict", "model.ema", ...
    state_dict: "OrderedDict[str, Any] | dict[str, Any]"
    source: str  # "state dict", "module object", "module stub"


def walk_tree(obj: Any, max_depth: int = 8) -> Iterator[tuple[str, Any]]:
    """Yield ``(path, value)`` for every node of dicts/lists/stub attributes, root first."""
    seen: set[int] = set()
    stack: list[tuple[str, Any, int]] = [("", obj, 0)]
    while stack:
        path, value, depth = stack.pop()
        yield path, value
        if depth >= max_depth or id(value) in seen:
            continue
        seen.add(id(value))
        children: list[tuple[Any, Any]] = []
        if isinstance(value, dict) and _is_optimizer_state(value):
            continue  # per-parameter optimizer slots (exp_avg, momentum_buffer ...) are not weights
        if isinstance(value, dict):
            children = list(value.items())
        elif isinstance(value, (list, tuple)) and len(value) <= 64:
            children = list(enumerate(value))
        elif isinstance(value, Stub) and not is_module_like(value):
            children = list(value.stub_attributes().items()) + list((value.stub_items or {}).items())
        for key, child in reversed(children):
            if is_tensor_like(child) or isinstance(child, (str, bytes, int, float)) or child is None:
                continue
            stack.append((f"{path}.{key}" if path else str(key), child, depth + 1))


def _is_optimizer_state(d: dict) -> bool:
    return "param_groups" in d and "state" in d


def find_state_dicts(obj: Any, max_depth: int = 8) -> list[Candidate]:
    """Every state dict or module in ``obj``, outermost first (nested ones inside a hit are skipped)."""
    found: list[Candidate] = []
    taken: list[str] = []
    for path, value in walk_tree(obj, max_depth):
        if any(t == "" or path == t or path.startswith(t + ".") for t in taken):
            continue
        if is_state_dict(value):
            found.append(Candidate(path, value, "state dict"))
            taken.append(path)
        elif is_module_like(value):
            try:
                sd = state_dict_of(value)
            except WeightsNotFoundError:
                continue
            if sd:
                found.append(Candidate(path, sd, "module stub" if isinstance(value, Stub) else "module object"))
                taken.append(path)
    return found
