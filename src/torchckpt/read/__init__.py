"""The read layer's face: everything the layers above (``fit``, ``train``, ``tools``, ``cli``, the
facade) may know about reading a checkpoint.

Nothing outside ``read/`` imports ``read.unpickle.*`` or ``read.formats.*``; it imports from here.
The face is cheap: importing it imports nothing else. Each name is imported from its module on first
use (PEP 562 ``__getattr__``), so ``import torchckpt`` and ``inspect`` on a safetensors file do not
pay for the readers, the pickle VM, numpy or torch until they need them. Type checkers see the real
objects through the ``TYPE_CHECKING`` imports below.

``torchckpt.read.load`` is the module that holds :func:`torchckpt.load`; import the function as
``from torchckpt.read.load import load`` (a package attribute cannot be both).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the real names for type checkers; at run time __getattr__ imports them on first use
    from .formats import Checkpoint, Trace, deepspeed_kind, folder_kind, is_dcp_dir
    from .formats.deepspeed_names import rank_file_kind
    from .formats.folders import is_accelerate_folder
    from .formats.lua_t7 import LuaFunction, T7Object, t7_state_dict
    from .formats.safetensors import split_tied, tensor_bytes, write_safetensors
    from .formats.simple import SAFETENSORS_DTYPES, safetensors_header
    from .load import read_checkpoint, read_zero_optimizer
    from .opener import open_checkpoint
    from .tensors import MetaStorage, TensorMeta, dtype_name, is_tensor_like, release, to_torch
    from .trust import resolve_policy
    from .unpickle.budget import Budget, TreeMeter
    from .unpickle.machine import GlobalRef
    from .unpickle.mode import Mode
    from .unpickle.policy import Policy, Verdict
    from .unpickle.functions import FunctionRef
    from .unpickle.meta import meta_dtype
    from .unpickle.quantized import PackedParams
    from .unpickle.stubs import Stub, is_stub_class, stub_name, stub_to_plain

__all__ = [
    # opening a checkpoint and what comes back
    "open_checkpoint", "read_checkpoint", "Mode", "Checkpoint", "Trace",
    # what a pickle may import, and how much work it may cost
    "Policy", "Verdict", "Budget", "TreeMeter", "GlobalRef", "resolve_policy",
    # values in a loaded tree
    "TensorMeta", "MetaStorage", "is_tensor_like", "dtype_name", "to_torch", "release",
    "Stub", "stub_name", "stub_to_plain", "is_stub_class", "T7Object", "LuaFunction", "t7_state_dict",
    "PackedParams", "FunctionRef", "meta_dtype",
    # formats the layers above must recognise or write
    "is_dcp_dir", "folder_kind", "is_accelerate_folder", "SAFETENSORS_DTYPES", "safetensors_header", "write_safetensors",
    "tensor_bytes", "split_tied", "deepspeed_kind", "rank_file_kind", "read_zero_optimizer",
]

_WHERE = {
    "open_checkpoint": "opener", "read_checkpoint": "load",
    "Mode": "unpickle.mode", "Checkpoint": "formats", "Trace": "formats",
    "Policy": "unpickle.policy", "Verdict": "unpickle.policy", "Budget": "unpickle.budget", "TreeMeter": "unpickle.budget",
    "GlobalRef": "unpickle.machine", "resolve_policy": "trust",
    "TensorMeta": "tensors", "MetaStorage": "tensors", "is_tensor_like": "tensors", "dtype_name": "tensors",
    "to_torch": "tensors", "release": "tensors",
    "Stub": "unpickle.stubs", "stub_name": "unpickle.stubs", "stub_to_plain": "unpickle.stubs",
    "is_stub_class": "unpickle.stubs",
    "PackedParams": "unpickle.quantized", "FunctionRef": "unpickle.functions", "meta_dtype": "unpickle.meta",
    "T7Object": "formats.lua_t7", "LuaFunction": "formats.lua_t7", "t7_state_dict": "formats.lua_t7",
    "is_dcp_dir": "formats", "folder_kind": "formats", "is_accelerate_folder": "formats.folders",
    "SAFETENSORS_DTYPES": "formats.simple", "safetensors_header": "formats.simple",
    "write_safetensors": "formats.safetensors", "tensor_bytes": "formats.safetensors",
    "split_tied": "formats.safetensors",
    "deepspeed_kind": "formats", "rank_file_kind": "formats.deepspeed_names", "read_zero_optimizer": "load",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{where}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
