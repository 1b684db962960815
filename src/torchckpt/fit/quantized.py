"""The state-dict entries of torch.ao quantized modules, read from their stubs.

Quantized modules keep their weights outside ``_parameters``/``_buffers`` and write them in their own
``_save_to_state_dict``: a quantized ``Conv`` pickles ``__getstate__``'s tuple (``weight`` and ``bias`` at
10 and 11, ``scale`` and ``zero_point`` at 12 and 13), ``LinearPackedParams`` adds ``dtype`` and
``_packed_params`` (the ``(weight, bias)`` pair), and most quantized modules add ``scale`` and
``zero_point`` as 0-d tensors. :func:`quantized_entries` gives exactly those entries, in torch's order,
for a whole-model stub or a TorchScript module stub, so ``state_dict_of`` equals ``model.state_dict()``.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from ..read import PackedParams, Stub, meta_dtype, stub_name
from ..read.tensors import TensorMeta, is_tensor_like

__all__ = ["is_quantized_module", "quantized_entries"]

_EAGER = ("torch.ao.nn.quantized.", "torch.nn.quantized.", "torch.ao.nn.intrinsic.quantized.",
          "torch.nn.intrinsic.quantized.")
_PACKAGES: tuple[str, ...] = _EAGER + tuple("__torch__." + p for p in _EAGER)


def is_quantized_module(obj: Any) -> bool:
    """A stub of a torch.ao quantized module class (whole-model pickle or TorchScript)."""
    return isinstance(obj, Stub) and stub_name(obj).startswith(_PACKAGES)


def _conv_state(state: Any) -> bool:
    return isinstance(state, tuple) and len(state) in (14, 15) and is_tensor_like(state[10]) \
        and (state[11] is None or is_tensor_like(state[11]))


def tuple_state_module(obj: Any) -> bool:
    """A quantized convolution whose pickled state is ``_ConvNd.__getstate__``'s tuple."""
    return is_quantized_module(obj) and _conv_state(obj.__dict__.get("stub_state"))


def _scalar(value: Any, dtype: str, like: Any) -> Any:
    """``torch.tensor(value)`` as the module's ``_save_to_state_dict`` makes it (a TensorMeta in a structure
    read, where torch is not imported)."""
    torch = sys.modules.get("torch")  # real tensors in the tree imply torch is imported (torch stays lazy)
    if torch is None or isinstance(like, TensorMeta):
        return TensorMeta((), (), meta_dtype(dtype))
    return torch.tensor(value, dtype=getattr(torch, dtype))


# c10::ScalarType numbers: TorchScript stores a module's dtype attribute as one
_SCALAR_TYPES = {5: "float16", 6: "float32", 12: "qint8", 13: "quint8", 14: "qint32", 16: "quint4x2", 17: "quint2x4"}


def _dtype(value: Any, like: Any) -> Any:
    if type(value) is not int or value not in _SCALAR_TYPES:
        return value
    torch = sys.modules.get("torch")  # see _scalar
    name = _SCALAR_TYPES[value]
    return meta_dtype(name) if torch is None or isinstance(like, TensorMeta) else getattr(torch, name)


def quantized_entries(module: Stub, buffers: Any = ()) -> list[tuple[str, Any]]:
    """What a quantized module's ``_save_to_state_dict`` adds after its parameters and buffers."""
    if not is_quantized_module(module):
        return []
    state = module.__dict__.get("stub_state")
    if state is not None and _conv_state(state):
        weight, bias, scale, zero_point = state[10:14]
        out = [("weight", weight.detach())]
        if bias is not None:
            out.append(("bias", bias.detach()))
        if isinstance(scale, float) and type(zero_point) is int:
            out += [("scale", _scalar(scale, "float32", weight)), ("zero_point", _scalar(zero_point, "int64", weight))]
        return out
    attrs = module.stub_attributes()
    out = []
    packed = attrs.get("_packed_params")
    if isinstance(packed, PackedParams):
        if "dtype" in attrs:
            out.append(("dtype", _dtype(attrs["dtype"], packed[0])))
        out.append(("_packed_params", packed))
    scale, zero_point = attrs.get("scale"), attrs.get("zero_point")
    if "scale" not in buffers and isinstance(scale, float) and math.isfinite(scale) and type(zero_point) is int:
        like = packed[0] if isinstance(packed, PackedParams) else None
        out += [("scale", _scalar(scale, "float32", like)), ("zero_point", _scalar(zero_point, "int64", like))]
    return out
