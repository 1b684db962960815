"""Quantized tensors and the packed parameters of torch.ao quantized layers, rebuilt as validated values.

``torch._utils._rebuild_qtensor(storage, offset, size, stride, quantizer_params, requires_grad, hooks)``
is how torch pickles a quantized tensor; ``quantizer_params`` is ``(qscheme, scale, zero_point)`` per
tensor or ``(qscheme, scales, zero_points, axis)`` per channel. The packed weights of quantized
``Linear`` / ``Conv`` layers are TorchScript custom-class objects (``LinearPackedParamsBase``,
``Conv2dPackedParamsBase``): a whole-model pickle stores them as ``torch.ScriptObject`` with the state
``(inner_state, "__torch__.torch.classes.quantized.<Class>")``, a TorchScript archive as an object of
``__torch__.torch.classes.quantized.<Class>`` whose BUILD state is the inner state. Either way they become
a :class:`PackedParams` value ``(weight, bias)``: nothing of torch's ``__setstate__`` (which would prepack
for a particular engine) runs.

Every rule (qscheme, dtype, per-tensor scale and zero point ranges, per-channel axis, lengths and dtypes,
no expanded views) is checked the same way on real tensors (``load``) and on :class:`~.meta.TensorMeta`
(``scan``), so the two cannot disagree. The values inside per-channel ``scales`` / ``zero_points`` tensors
are tensor data, which a structure read does not read: like torch, a load does not judge them either.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from ...errors import CorruptCheckpointError
from .meta import MetaStorage, TensorMeta, check_int, check_view, dtype_name
from .stubs import Stub, stub_class
from .torch_rebuild import check_storage_view

__all__ = ["PackedParams", "QSCHEMES", "QUANTIZED_DTYPES", "rebuild_qtensor", "meta_rebuild_qtensor",
           "PACKED_CLASSES", "script_object", "packed_object", "finish_script_object"]

QSCHEMES = frozenset({"per_tensor_affine", "per_channel_affine", "per_channel_affine_float_qparams"})
# the zero point range of each quantized dtype (what torch's quantizers accept)
QUANTIZED_DTYPES = {"qint8": (-128, 127), "quint8": (0, 255), "qint32": (-(1 << 31), (1 << 31) - 1),
                    "quint4x2": (0, 15), "quint2x4": (0, 3)}
# TorchScript custom classes of torch.ao quantized layers: name -> kind
PACKED_CLASSES = {"LinearPackedParamsBase": "linear", "Conv1dPackedParamsBase": "conv1d",
                  "Conv2dPackedParamsBase": "conv2d", "Conv3dPackedParamsBase": "conv3d"}
_SCRIPT_PREFIX = "__torch__.torch.classes.quantized."
MAX_CONFIG = 64


def _bad(message: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(message, hint="The file is damaged or was crafted; a quantized tensor torch wrote "
                                                "passes these checks.")


class PackedParams(tuple):  # type: ignore[type-arg]
    """The packed parameters of a quantized layer as plain values: the tuple ``(weight, bias)``, as torch's
    ``state_dict`` stores ``_packed_params._packed_params``, with ``kind`` (``"linear"``, ``"conv2d"``, ...)
    and, for convolutions read with their data, ``options`` (stride, padding, dilation, output_padding,
    groups, transpose). Immutable."""

    kind: str
    options: dict[str, Any]

    def __new__(cls, weight: Any, bias: Any, kind: str, options: dict[str, Any] | None = None) -> "PackedParams":
        self = super().__new__(cls, (weight, bias))
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "options", dict(options or {}))
        return self

    @property
    def weight(self) -> Any:
        return self[0]

    @property
    def bias(self) -> Any:
        return self[1]

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("PackedParams is immutable")

    def __repr__(self) -> str:
        return f"PackedParams({self.kind}, weight={self[0]!r}, bias={self[1]!r})"

    def __reduce__(self) -> Any:
        return (tuple, (tuple(self),))


# --------------------------------------------------------------------------- quantizer parameters
def _scheme(value: Any) -> str:
    name = str(value)
    name = name[6:] if name.startswith("torch.") else name
    if type(value).__name__ not in ("qscheme", "MetaDType") or name not in QSCHEMES:
        raise _bad(f"quantized tensor with qscheme {str(value)[:60]!r} (torch saves only {sorted(QSCHEMES)})")
    return name


def _vector(value: Any, what: str, length: int, kinds: tuple[str, ...]) -> None:
    if not (is_tensorish(value) and len(value.shape) == 1 and value.shape[0] == length
            and dtype_name(value) in kinds):
        shape = list(value.shape) if is_tensorish(value) else type(value).__name__
        raise _bad(f"per-channel {what} must be a 1-D {'/'.join(kinds)} tensor of {length} values, got {shape} "
                   f"{dtype_name(value) if is_tensorish(value) else ''}".rstrip())


def is_tensorish(value: Any) -> bool:
    return isinstance(value, TensorMeta) or type(value).__module__.startswith("torch") and hasattr(value, "shape") \
        and hasattr(value, "dtype")


def check_quantizer(params: Any, size: tuple[int, ...], dtype: str) -> tuple[Any, ...]:
    """``quantizer_params`` checked against the tensor's size and dtype; returns (scheme, scale(s), zero
    point(s), axis)."""
    if not isinstance(params, tuple) or not params:
        raise _bad(f"quantizer parameters must be a tuple, got {type(params).__name__}")
    scheme = _scheme(params[0])
    low, high = QUANTIZED_DTYPES[dtype]
    if scheme == "per_tensor_affine":
        if len(params) != 3:
            raise _bad(f"per-tensor quantizer parameters are (qscheme, scale, zero_point), got {len(params)} values")
        scale, zero_point = params[1], params[2]
        if type(scale) is not float or not math.isfinite(scale) or scale <= 0:
            raise _bad(f"quantized tensor scale {scale!r:.40} (must be a finite float above 0)")
        zero_point = check_int(zero_point, "zero point")
        if not low <= zero_point <= high:
            raise _bad(f"zero point {zero_point} outside the range of {dtype} [{low}, {high}]")
        return scheme, scale, zero_point, None
    if len(params) != 4:
        raise _bad(f"per-channel quantizer parameters are (qscheme, scales, zero_points, axis), got {len(params)}")
    axis = check_int(params[3], "per-channel axis")
    if not 0 <= axis < len(size):
        raise _bad(f"per-channel axis {axis} of a {len(size)}-dimensional quantized tensor")
    _vector(params[1], "scales", size[axis], ("float64", "float32"))
    zero_kinds = ("float64", "float32", "float16") if scheme == "per_channel_affine_float_qparams" else ("int64",)
    _vector(params[2], "zero points", size[axis], zero_kinds)
    return scheme, params[1], params[2], axis


def _check_layout(size: tuple[int, ...], stride: tuple[int, ...]) -> None:
    if any(n > 1 and s == 0 for n, s in zip(size, stride)):
        raise _bad(f"quantized tensor of size {list(size)} with stride {list(stride)}: torch never saves an expanded "
                   "(zero-stride) quantized tensor")


def _qdtype(storage: Any) -> str:
    name = dtype_name(getattr(storage, "dtype", None))
    if name not in QUANTIZED_DTYPES:
        raise _bad(f"quantized tensor rebuilt from a {name} storage (expected one of {sorted(QUANTIZED_DTYPES)})")
    return name


def rebuild_qtensor(storage: Any, storage_offset: Any, size: Any, stride: Any, quantizer_params: Any,
                    requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    """``torch._utils._rebuild_qtensor``: a quantized tensor viewing ``storage``, every argument checked first."""
    import torch  # lazy: structure-only reads never import torch

    dtype = _qdtype(storage)
    offset, size, stride = check_storage_view(storage, storage_offset, size, stride, 1)
    _check_layout(size, stride)
    scheme, scale, zero_point, axis = check_quantizer(quantizer_params, size, dtype)
    zeros = [0] * len(size)  # allocate nothing: the view below is the tensor
    with warnings.catch_warnings():  # torch 2.13 deprecates making quantized tensors; reading them is the job
        warnings.simplefilter("ignore", UserWarning)
        q = _empty_quantized(torch, zeros, scheme, scale, zero_point, axis, dtype, storage.dtype)
    q.set_(storage, offset, size, stride)
    return q


def _empty_quantized(torch: Any, zeros: list[int], scheme: str, scale: Any, zero_point: Any, axis: int | None,
                     dtype: str, torch_dtype: Any) -> Any:
    if axis is None:
        return torch._empty_affine_quantized(zeros, scale=scale, zero_point=zero_point, dtype=torch_dtype)
    return torch._empty_per_channel_affine_quantized(zeros, scales=scale.to(torch.float64),
                                                     zero_points=zero_point if scheme != "per_channel_affine"
                                                     else zero_point.to(torch.int64), axis=axis, dtype=torch_dtype)


def meta_rebuild_qtensor(storage: Any, storage_offset: Any, size: Any, stride: Any, quantizer_params: Any,
                         requires_grad: Any = False, backward_hooks: Any = None) -> TensorMeta:
    """The structure-only twin of :func:`rebuild_qtensor`: the same checks, a :class:`TensorMeta`."""
    if not isinstance(storage, MetaStorage):
        raise _bad(f"quantized tensor rebuilt from a {type(storage).__name__}, not a storage")
    dtype = _qdtype(storage)
    offset, size, stride = check_view(storage.nbytes, storage_offset, size, stride)
    _check_layout(size, stride)
    check_quantizer(quantizer_params, size, dtype)
    return TensorMeta(size, stride, storage.dtype, offset, storage)


# --------------------------------------------------------------------------- packed parameters
def _weight(value: Any, kind: str) -> Any:
    allowed = (*QUANTIZED_DTYPES, "float32", "float16") if kind == "linear" else QUANTIZED_DTYPES  # fp16 dynamic
    if not is_tensorish(value) or dtype_name(value) not in allowed:
        what = dtype_name(value) + " tensor" if is_tensorish(value) else type(value).__name__
        raise _bad(f"{kind} packed weight is a {what}, not a quantized tensor")
    ndim = {"linear": 2, "conv1d": 3, "conv2d": 4, "conv3d": 5}[kind]
    if len(value.shape) != ndim:
        raise _bad(f"{kind} packed weight has {len(value.shape)} dimensions, expected {ndim}")
    return value


def _bias(value: Any, weight: Any, kind: str) -> Any:
    if value is None:
        return None
    if not is_tensorish(value) or dtype_name(value) not in ("float32", "float16", "bfloat16", "float64") \
            or len(value.shape) != 1:
        raise _bad(f"{kind} packed bias must be None or a 1-D float tensor, got "
                   f"{dtype_name(value) if is_tensorish(value) else type(value).__name__}")
    rows = weight.shape[0]
    if kind != "linear" and value.shape[0] != rows and value.shape[0] != 0:
        return value  # a transposed convolution's bias has out_channels = weight.shape[1] * groups
    if kind == "linear" and value.shape[0] != rows:
        raise _bad(f"linear packed bias of {value.shape[0]} values for a weight of {rows} rows")
    return value


def _conv_options(config: list[int], spatial: int) -> dict[str, Any]:
    """v2/v3 config: [spatial_dim, stride*n, padding*n, dilation*n, output_padding*n, groups, transpose]."""
    n = spatial
    if len(config) < 1 + 4 * n + 2:
        return {}
    part = [config[1 + i * n:1 + (i + 1) * n] for i in range(4)]
    return {"stride": part[0], "padding": part[1], "dilation": part[2], "output_padding": part[3],
            "groups": config[1 + 4 * n], "transpose": bool(config[2 + 4 * n])}


def packed_params(kind: str, state: Any) -> Any:
    """The inner state of a ``<Kind>PackedParamsBase`` object as a :class:`PackedParams`, or None when its
    layout is not one torch writes (the caller keeps a stub)."""
    if kind == "linear":
        if not isinstance(state, tuple) or len(state) != 2:
            raise _bad(f"linear packed parameters must be (weight, bias), got {type(state).__name__}")
        weight = _weight(state[0], kind)
        return PackedParams(weight, _bias(state[1], weight, kind), kind)
    if not isinstance(state, tuple) or len(state) != 3 or not all(isinstance(p, (list, tuple)) for p in state[1:]):
        return None
    version, first, second = state
    spatial = int(kind[4])
    if version in (3, "3"):  # (3, config ints, [weight, bias])
        if len(first) > MAX_CONFIG or not all(type(c) is int for c in first) or len(second) != 2:
            raise _bad(f"{kind} packed parameters (version 3) with a config of {len(first)} values")
        weight = _weight(second[0], kind)
        return PackedParams(weight, _bias(second[1], weight, kind), kind, _conv_options(list(first), spatial))
    if version == "2":  # ("2", [config tensor, weight], [bias])
        if len(first) != 2 or len(second) != 1 or not is_tensorish(first[0]) or len(first[0].shape) != 1 \
                or first[0].shape[0] > MAX_CONFIG:
            raise _bad(f"{kind} packed parameters (version 2) do not hold [config, weight], [bias]")
        weight = _weight(first[1], kind)
        config = [] if isinstance(first[0], TensorMeta) else [int(v) for v in first[0].tolist()]
        return PackedParams(weight, _bias(second[0], weight, kind), kind, _conv_options(config, spatial))
    return None


class _Pending:
    """What NEWOBJ makes of a packed-params class before its BUILD gives the state."""

    __slots__ = ("kind",)

    def __init__(self, kind: str | None) -> None:
        self.kind = kind


def script_object(u: Any, *args: Any) -> Any:
    """NEWOBJ of ``torch.ScriptObject`` (whole-model pickles)."""
    return _Pending(None)


def packed_object(kind: str) -> Any:
    def make(u: Any, *args: Any) -> Any:
        return _Pending(kind)
    return make


def _stub_with(name: str, state: Any) -> Stub:
    module, _, leaf = name.rpartition(".")
    stub: Stub = stub_class(module, leaf)()
    stub.__setstate__(state)
    return stub


def finish_script_object(u: Any, old: Any, state: Any) -> Any:
    """BUILD of a packed-params object: the validated :class:`PackedParams`; any other TorchScript custom
    class stays an inert stub recording its state, as before."""
    if old.kind is not None:  # __torch__.torch.classes.quantized.<Class>: the state is the inner state
        value = packed_params(old.kind, state)
        return value if value is not None else _stub_with(_SCRIPT_PREFIX + old.kind, state)
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], str) \
            and state[1].startswith(_SCRIPT_PREFIX) and state[1][len(_SCRIPT_PREFIX):] in PACKED_CLASSES:
        value = packed_params(PACKED_CLASSES[state[1][len(_SCRIPT_PREFIX):]], state[0])
        if value is not None:
            return value
    return _stub_with("torch.ScriptObject", state)
