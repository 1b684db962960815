"""The checkpoint tree: walk it and flatten it (choosing the weights in it is :mod:`torchckpt.fit.select`).

One walker (:func:`walk`) serves every front end: :func:`~torchckpt.fit.select.find_state_dicts` (every
place that holds weights), :func:`flatten` (every tensor by dotted path, for convert and diff),
:func:`tensors` (the same with modules as their state dicts, for ``report``), and ``inspect``.
:func:`state_dict_of` gives, for a whole-model pickle loaded without its class, exactly what
``model.state_dict()`` would have returned: same keys, same order, the same tensors (detached,
sharing storage, tied weights under every name).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Any, Callable, Iterator, Mapping

from ..errors import CorruptCheckpointError, LimitExceededError, WeightsNotFoundError
from ..read import Stub, T7Object, TreeMeter, stub_name, t7_state_dict
from ..read.tensors import TensorMeta, is_tensor_like
from ..text import key_text
from .quantized import quantized_entries, tuple_state_module

__all__ = ["state_dict_of", "is_module_like", "is_tensor_like", "is_state_dict", "is_optimizer_state", "walk",
           "children_of", "flatten", "tensors", "TensorMeta", "module_classes", "state_tensors", "expanded_size",
           "LEAF_TYPES"]

MAX_DEPTH = 64
LUA_NN_PACKAGES = ("nn.", "cudnn.", "cunn.", "fbnn.", "inn.", "nngraph.")
LEAF_TYPES = (str, bytes, int, float, complex, bool, type(None))

Children = Callable[[Any], "list[tuple[Any, Any]] | None"]


def is_module_like(obj: Any) -> bool:
    """An ``nn.Module``, a stub of one (whole-model pickle), a TorchScript module stub, or a Lua ``nn`` object."""
    if isinstance(obj, T7Object):
        return obj.typename.startswith(LUA_NN_PACKAGES)
    if isinstance(obj, Stub):
        attrs = obj.stub_attributes()
        return isinstance(attrs.get("_parameters"), dict) and isinstance(attrs.get("_modules"), dict) or \
            _torchscript_stub(obj) or tuple_state_module(obj)
    torch = sys.modules.get("torch")  # a real nn.Module implies torch is imported already (torch stays lazy)
    return torch is not None and isinstance(obj, torch.nn.Module)


def _torchscript_stub(stub: Stub) -> bool:
    """A stub of a TorchScript module class (``__torch__.Net``)."""
    return stub_name(stub).startswith("__torch__")


def state_dict_of(obj: Any, meter: TreeMeter | None = None) -> "OrderedDict[str, Any]":
    """The state dict of a module: a real ``nn.Module``, or the stub tree of a whole-model pickle.

    For stubs the result equals what ``model.state_dict()`` returns for the original class:
    parameters, then persistent buffers, then submodules, recursively; tied weights appear under
    every name; tensors are detached and share storage with the loaded ones.
    A TorchScript module stub is read through the ``__parameters__``/``__buffers__`` declarations
    of its ``code/``. A mapping that already is a state dict is returned as is.
    Every module and tensor reached is charged to ``meter`` (a submodule shared under many names is
    reached under each, as in ``nn.Module.state_dict``).

    Raises:
        WeightsNotFoundError: ``obj`` is neither a module nor a state dict.
        LimitExceededError: the stub tree reaches more values than the budget allows.
    """
    if isinstance(obj, Stub):
        out: OrderedDict[str, Any] = OrderedDict()
        meter = meter if meter is not None else TreeMeter()
        if _torchscript_stub(obj):
            _torchscript_state(obj, "", out, set(), obj.__dict__.get("stub_declarations") or {}, 0, meter)
        else:
            meter.visit(n=expanded_size(obj, _stub_parts))  # counted with each module once: a DAG of
            _stub_state(obj, "", out, set(), 0, meter)  # modules raises here, before it is expanded
        if out or is_module_like(obj):
            return out
    elif isinstance(obj, T7Object):
        return t7_state_dict(obj)
    elif is_state_dict(obj):
        state: OrderedDict[str, Any] = obj
        return state
    elif is_module_like(obj):
        module_state: OrderedDict[str, Any] = obj.state_dict()
        return module_state
    what = stub_name(obj) if isinstance(obj, Stub) else type(obj).__name__
    raise WeightsNotFoundError(f"{what} is not a module or a state dict",
                               hint="Pass the model object, or use find_state_dicts() on a training dict.")


def module_classes(obj: Any, meter: TreeMeter | None = None) -> dict[str, str]:
    """Module path -> dotted class name for a module tree (``{"": "mypkg.Net", "fc": "torch.nn...Linear"}``).

    Works on real modules, whole-model stubs and Lua ``nn`` trees; what ``convert`` keeps as metadata
    when it turns a whole model into its state dict. A module shared under two paths is listed once.
    """
    out: dict[str, str] = {}
    listed: set[int] = set()
    for path, module, _ in walk(obj, children=_submodules, meter=meter):
        name = class_name(module)
        if name is not None and id(module) not in listed:
            listed.add(id(module))
            out[path] = name
    return out


def class_name(module: Any) -> str | None:
    if isinstance(module, Stub):
        return stub_name(module)
    if isinstance(module, T7Object):
        return module.typename
    if is_module_like(module):
        return f"{type(module).__module__}.{type(module).__qualname__}"
    return None


def _submodules(module: Any) -> list[tuple[Any, Any]] | None:
    """The child modules of a module (real, stub or Lua ``nn``): the children :func:`module_classes` walks."""
    if isinstance(module, Stub):
        attrs = module.stub_attributes()
        if isinstance(attrs.get("_modules"), dict):
            return [(k, v) for k, v in attrs["_modules"].items() if v is not None]
        return [(k, v) for k, v in attrs.items() if isinstance(v, Stub) and is_module_like(v)]
    if isinstance(module, T7Object):
        mods = module.data.get("modules") if isinstance(module.data, dict) else None
        if isinstance(mods, list):
            return [(i, v) for i, v in enumerate(mods) if v is not None]
        if isinstance(mods, dict):  # a Lua table: 1-based integer keys
            return sorted(((k - 1, v) for k, v in mods.items() if isinstance(k, int) and v is not None),
                          key=lambda kv: kv[0])
        return None
    if is_module_like(module):
        return [(k, v) for k, v in module.named_children() if v is not None]
    return None


def _detach(t: Any) -> Any:
    return t.detach() if hasattr(t, "detach") else t


def _tensor_of(value: Any, key: str, module: Stub) -> Any:
    """A parameter or buffer of a whole-model stub: a tensor, or the file is damaged."""
    if not is_tensor_like(value):
        what = stub_name(value) if isinstance(value, Stub) else type(value).__name__
        raise CorruptCheckpointError(f"{key} of {stub_name(module)} is a {what}, not a tensor",
                                     hint="The whole-model pickle is damaged or uses a tensor class torchckpt "
                                          "does not rebuild; load it with trust=True only if you trust it.")
    return _detach(value)


def _named(mapping: Any, what: str, module: Stub) -> list[tuple[str, Any]]:
    """``(name, value)`` of a stub's ``_parameters``/``_buffers``/``_modules``: a dict of string names."""
    if not mapping:
        return []
    if not isinstance(mapping, dict):
        raise CorruptCheckpointError(f"{what} of {stub_name(module)} is a {type(mapping).__name__}, not a dict",
                                     hint="The whole-model pickle is damaged; `torchckpt inspect FILE` shows it.")
    return [(key_text(k), v) for k, v in mapping.items()]


def _stub_parts(value: Any) -> Any:
    """What :func:`_stub_state` expands of a module stub: its parameters, buffers and submodules."""
    if not isinstance(value, Stub):
        return ()
    attrs = value.stub_attributes()
    return [v for what in ("_parameters", "_buffers", "_modules") if isinstance(attrs.get(what), dict)
            for v in attrs[what].values()]


def expanded_size(obj: Any, children: Callable[[Any], Any]) -> int:
    """How many nodes ``obj`` has when every shared value is written out under each path that reaches it.

    Each distinct node is looked at once (sizes of shared values are remembered), so a 400-byte tuple
    DAG with 2^48 paths is counted in 48 steps; a writer that must expand (JSON) charges the result
    to the budget before it builds anything. A cycle has no finite expansion: ``sys.maxsize``.
    """
    sizes: dict[int, int] = {}
    keep: list[Any] = []  # the nodes counted stay alive, so their ids are not reused during the count
    active: set[int] = set()
    stack: list[tuple[Any, bool]] = [(obj, False)]
    while stack:
        node, done = stack.pop()
        if done:
            active.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes.get(id(c), 1) for c in children(node))
            continue
        if id(node) in active:
            return sys.maxsize
        if id(node) in sizes:
            continue
        kids = list(children(node))
        if not kids:
            sizes[id(node)] = 1
            keep.append(node)
            continue
        active.add(id(node))
        keep.append(node)
        stack.append((node, True))
        stack.extend((c, False) for c in kids)
    return sizes.get(id(obj), 1)


def _stub_state(module: Stub, prefix: str, out: dict[str, Any], active: set[int], depth: int,
                meter: TreeMeter) -> None:
    if depth > MAX_DEPTH:
        raise LimitExceededError(f"module nesting deeper than {MAX_DEPTH} at {prefix[:200]!r}")
    if id(module) in active:
        return  # a module containing itself: nn.Module would recurse forever; we stop
    meter.visit(len(prefix))
    active.add(id(module))
    attrs = module.stub_attributes()
    non_persistent = attrs.get("_non_persistent_buffers_set") or set()
    if not isinstance(non_persistent, (set, frozenset, list, tuple)):
        non_persistent = set()
    for name, p in _named(attrs.get("_parameters"), "_parameters", module):
        if p is not None:
            meter.visit(len(prefix) + len(name))
            out[prefix + name] = _tensor_of(p, prefix + name, module)
    buffers = attrs.get("_buffers") if isinstance(attrs.get("_buffers"), dict) else {}
    for name, b in _named(attrs.get("_buffers"), "_buffers", module):
        if b is not None and name not in non_persistent:
            meter.visit(len(prefix) + len(name))
            out[prefix + name] = _tensor_of(b, prefix + name, module)
    for name, value in quantized_entries(module, buffers):
        out[prefix + name] = value
    for name, child in _named(attrs.get("_modules"), "_modules", module):
        if isinstance(child, Stub):
            _stub_state(child, f"{prefix}{name}.", out, active, depth + 1, meter)
        elif child is not None and hasattr(child, "state_dict"):
            for k, v in child.state_dict().items():
                meter.visit(len(prefix) + len(name) + len(k))
                out[f"{prefix}{name}.{k}"] = v
    active.discard(id(module))


def _torchscript_state(module: Stub, prefix: str, out: dict[str, Any], active: set[int], decls: dict[str, Any],
                       depth: int, meter: TreeMeter) -> None:
    if depth > MAX_DEPTH or id(module) in active:
        return
    meter.visit(len(prefix))
    active.add(id(module))
    attrs = module.stub_attributes()
    decl = decls.get(stub_name(module), {})
    declared = list(decl.get("__parameters__", [])) + list(decl.get("__buffers__", []))
    names = declared if decl else [k for k, v in attrs.items() if is_tensor_like(v)]
    for name in names:
        value = attrs.get(name)
        if value is not None and is_tensor_like(value):
            meter.visit(len(prefix) + len(name))
            out[prefix + name] = _detach(value)
    for name, value in quantized_entries(module, names):
        out[prefix + name] = value
    for name, value in attrs.items():
        if isinstance(value, Stub) and _torchscript_stub(value):
            _torchscript_state(value, f"{prefix}{key_text(name)}.", out, active, decls, depth + 1, meter)
    active.discard(id(module))


def is_state_dict(obj: Any) -> bool:
    """A mapping of string keys whose values are (mostly) tensors or numeric arrays."""
    if not isinstance(obj, dict) or not obj:
        return False
    count = 0
    for k, v in obj.items():
        if not isinstance(k, str):
            return False
        if is_tensor_like(v):
            count += 1
    return count > 0 and count * 2 >= len(obj)


def is_optimizer_state(value: Any) -> bool:
    """An optimizer's ``state_dict()`` (its per-parameter slots are not weights)."""
    return isinstance(value, dict) and "param_groups" in value and "state" in value


# -- one walker ------------------------------------------------------------------------------------

def children_of(value: Any) -> list[tuple[Any, Any]] | None:
    """The children of a container node as ``(key, child)`` pairs; ``None`` for a leaf.

    Containers: dicts, lists and tuples, stubs (attributes, then dict items, then list items),
    argparse/SimpleNamespace objects. Tensors and plain values are leaves.
    """
    if isinstance(value, LEAF_TYPES) or is_tensor_like(value):
        return None
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, (list, tuple)):
        return list(enumerate(value))
    if isinstance(value, Stub):
        out = list(value.stub_attributes().items()) + list((value.stub_items or {}).items())
        return out + list(enumerate(value.stub_list or []))
    if hasattr(value, "__dict__") and type(value).__module__ in ("argparse", "types"):
        return list(vars(value).items())
    if type(value).__module__ == "numpy" and getattr(value, "dtype", None) is not None and value.dtype.kind == "O" \
            and hasattr(value, "reshape"):
        return list(enumerate(value.reshape(-1)))  # an object array: its items (a list of weight arrays)
    return None


def walk(obj: Any, *, children: Children = children_of, max_depth: int = MAX_DEPTH,
         descend: Callable[[str, Any], bool] | None = None,
         meter: TreeMeter | None = None) -> Iterator[tuple[str, Any, int]]:
    """Yield ``(dotted path, value, depth)`` for every node, root first, children in order.

    A container met twice (shared or cyclic) is expanded once, under the path where it was met
    first (its children are not even listed again). ``descend(path, value)`` is asked after the
    node was yielded (so a caller can decide from what it just saw); ``False`` keeps the walk out
    of that node. Nodes deeper than ``max_depth`` are yielded but not expanded. Every node yielded,
    and the length of its path, is charged to ``meter`` (the default budget when none is given).

    Raises:
        LimitExceededError: the walk reaches more than the budget's ``visits``.
    """
    meter = meter if meter is not None else TreeMeter()
    seen: set[int] = set()
    stack: list[tuple[str, Any, int]] = [("", obj, 0)]
    while stack:
        path, value, depth = stack.pop()
        meter.visit(len(path))
        yield path, value, depth
        if depth >= max_depth or id(value) in seen or (descend is not None and not descend(path, value)):
            continue
        kids = children(value)
        if not kids:
            continue
        seen.add(id(value))
        for key, child in reversed(kids):
            name = key_text(key)
            stack.append((f"{path}.{name}" if path else name, child, depth + 1))


def _containers(value: Any) -> list[tuple[Any, Any]] | None:
    """Children for flatten: dicts, lists and tuples only (what a modernised tree is made of)."""
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, (list, tuple)) and not is_tensor_like(value):
        return list(enumerate(value))
    return None


def flatten(tree: Any, meter: TreeMeter | None = None) -> list[tuple[str, Any]]:
    """``(dotted path, tensor)`` for every tensor in nested dicts/lists/tuples, in order.

    A tensor shared under two paths is listed under both; the root tensor is named ``"tensor"``.
    """
    return [(path or "tensor", value) for path, value, _ in walk(tree, children=_containers, max_depth=10_000,
                                                                  meter=meter)
            if is_tensor_like(value)]


def tensors(obj: Any, *, max_depth: int = MAX_DEPTH, meter: TreeMeter | None = None) -> Iterator[tuple[str, Any]]:
    """``(dotted path, tensor)`` for every tensor of a loaded tree, in order; a module (real, stub of a
    whole-model pickle, or Lua ``nn``) contributes its state dict under its path. The root tensor is
    named ``"tensor"``."""
    modules: set[int] = set()
    meter = meter if meter is not None else TreeMeter()
    for path, value, _ in walk(obj, max_depth=max_depth, descend=lambda _, v: not is_module_like(v), meter=meter):
        if is_tensor_like(value):
            yield path or "tensor", value
        elif is_module_like(value) and id(value) not in modules:  # a shared module is listed once
            modules.add(id(value))
            for key, t in state_tensors(state_dict_of(value, meter)):
                yield (f"{path}.{key}" if path else key), t


def state_tensors(state: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """The tensors of a module's state dict: its tensor entries, and the ``(weight, bias)`` of a quantized
    layer's packed parameters as ``key.0`` / ``key.1``; other entries (a quantized layer's ``dtype``) are not
    tensors."""
    for key, value in state.items():
        if is_tensor_like(value):
            yield key, value
        elif isinstance(value, tuple):
            yield from ((f"{key}.{i}", x) for i, x in enumerate(value) if is_tensor_like(x))
