"""``torch.nn`` modules built as values: what ``allow=["mypkg.*"]`` gives a whole-model pickle.

When the caller allows their own classes (``allow=``, not ``trust=``), a module in the file is rebuilt
here instead of by its ``__setstate__``: the instance is made with ``cls.__new__`` (no ``__init__``
runs), then its state is checked entry by entry and set as a whole:

* ``_parameters`` (names -> ``Parameter``/tensor/None), ``_buffers`` (names -> tensor/None),
  ``_modules`` (names -> module/None, a stub allowed: inert), ``_non_persistent_buffers_set`` (names),
  ``training`` (bool);
* every hook table (``_forward_hooks``, ``_state_dict_hooks`` ...) must be empty: a hook is code the file
  would have run at ``forward``/``state_dict`` time, so a file that carries one is refused;
* any other attribute is plain data (numbers, strings, bytes, None, dtypes, devices, tensors, modules,
  stubs, and tuples/lists/dicts/sets of these), under a name that is not a dunder and does not shadow
  anything the class defines (``forward``, ``state_dict``, a property ...).

The ``torch.nn`` classes a user module is made of (``Conv2d``, ``BatchNorm2d``, ``Sequential`` ...) are
then real too (see :func:`torch_module_class`), built the same way, so the model runs.
"""

from __future__ import annotations

import collections
import sys
from typing import Any

from ...errors import CorruptCheckpointError, UnsafeCheckpointError
from .functions import FunctionRef
from .meta import TensorMeta
from .stubs import Stub

__all__ = ["is_module", "build_module", "torch_module_class"]

_MAX_PLAIN_DEPTH = 32
_PLAIN = (bool, int, float, complex, str, bytes, type(None))


def is_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # a module instance implies torch is imported (torch stays lazy)
    return torch is not None and isinstance(obj, torch.nn.Module)


def torch_module_class(module: str, name: str) -> Any:
    """The real ``torch.nn`` module class ``module.name`` (``torch.nn.modules.conv.Conv2d``), or None when
    that is not a ``torch.nn.Module`` subclass defined in ``torch.nn``."""
    if not (module == "torch.nn" or module.startswith("torch.nn.")) or "." in name or name.startswith("_"):
        return None
    import importlib

    import torch  # lazy: only a BUILD-mode read of a whole-model pickle under allow= gets here

    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    if isinstance(cls, type) and issubclass(cls, torch.nn.Module) and cls.__module__.startswith("torch.nn"):
        return cls
    return None


def _refuse(inst: Any, message: str) -> UnsafeCheckpointError:
    cls = type(inst)
    return UnsafeCheckpointError(f"{cls.__module__}.{cls.__qualname__}: {message}",
                                 global_name=f"{cls.__module__}.{cls.__qualname__}",
                                 hint="A module's state may hold parameters, buffers, sub-modules and plain "
                                      "values only. Load the weights with torchckpt.load_into(model, path) "
                                      "instead, or pass trust=True only if you trust the file.")


def _plain(value: Any, depth: int = 0) -> bool:
    """Data that cannot run code when the model is used."""
    import torch  # lazy: see torch_module_class

    if depth > _MAX_PLAIN_DEPTH:
        return False
    if isinstance(value, _PLAIN) or isinstance(value, (torch.dtype, torch.device, torch.Tensor, TensorMeta)):
        return True
    if isinstance(value, (Stub, FunctionRef)) or is_module(value):
        return True  # inert stand-ins (a torch function is a reference, never called), and modules built here
    if isinstance(value, (tuple, list, set, frozenset)):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _names(inst: Any, value: Any, what: str, kinds: tuple[type, ...]) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise CorruptCheckpointError(f"{type(inst).__name__}.{what} must be a dict with string keys")
    for k, v in value.items():
        if v is not None and not isinstance(v, kinds):
            raise _refuse(inst, f"{what}[{k!r}] is a {type(v).__name__}, not a {kinds[0].__name__}")
    return collections.OrderedDict(value)


def build_module(inst: Any, state: Any) -> None:
    """Give the fresh module ``inst`` (made by ``cls.__new__``) the checked ``state``; see the module doc."""
    import torch  # lazy: see torch_module_class

    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CorruptCheckpointError(f"the state of {type(inst).__name__} must be a dict with string keys")
    fresh = torch.nn.Module().__dict__  # every attribute nn.Module itself keeps, at its default
    hooks = {k for k, v in fresh.items() if isinstance(v, dict) and k not in ("_parameters", "_buffers", "_modules")}
    checked: dict[str, Any] = {}
    for key, default in fresh.items():
        value = state.get(key, default)
        if key in hooks:
            if value:
                raise _refuse(inst, f"the file registers {key} ({len(value)}): hooks run code when the model is "
                                    "used")
            value = type(default)()
        elif key == "_parameters":  # TensorMeta: a structure-only read (inspect) under allow=
            value = _names(inst, value, key, (torch.Tensor, TensorMeta))
            for k, v in value.items():
                if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter):
                    value[k] = torch.nn.Parameter(v, requires_grad=v.is_floating_point() or v.is_complex())
        elif key == "_buffers":
            value = _names(inst, value, key, (torch.Tensor, TensorMeta))
        elif key == "_modules":
            value = _names(inst, value, key, (torch.nn.Module, Stub))
        elif key == "_non_persistent_buffers_set":
            if not isinstance(value, (set, frozenset, list, tuple)) or not all(isinstance(v, str) for v in value):
                raise CorruptCheckpointError(f"{type(inst).__name__}._non_persistent_buffers_set must hold names")
            value = set(value)
        elif key == "training":
            if not isinstance(value, bool):
                raise CorruptCheckpointError(f"{type(inst).__name__}.training must be a bool")
        elif isinstance(default, (set, dict)):
            value = type(default)()  # a bookkeeping table of nn.Module: never taken from the file
        checked[key] = value
    cls = type(inst)
    for key, value in state.items():
        if key in checked:
            continue
        if key.startswith("__") or hasattr(cls, key) or key in ("forward",):
            raise _refuse(inst, f"the state sets {key!r}, which {cls.__name__} defines itself (a method, property "
                                "or class attribute)")
        if callable(value) and not is_module(value) and not isinstance(value, (Stub, FunctionRef)) or not _plain(value):
            raise _refuse(inst, f"attribute {key!r} is a {type(value).__name__}, not plain data")
        checked[key] = value
    object.__setattr__(inst, "__dict__", checked)
