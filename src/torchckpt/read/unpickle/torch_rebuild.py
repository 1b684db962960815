"""Safe reimplementations of torch's tensor rebuild functions (``torch._utils._rebuild_tensor_v2`` & co.).

Every view is checked to lie inside its storage before it is created; tensor subclasses, hooks and
parameter state are restored only as plain attributes.
"""

from __future__ import annotations

from typing import Any

from ...errors import CorruptCheckpointError
from .meta import TensorMeta, check_int, check_numpy_tensor, check_shape, check_view, layout_name

MAX_DIMS = 64


def _bad(message: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(message)


class Marker:
    """A class reference that may be passed around (``new_type`` arguments). Calling it runs only the
    given safe constructor (``ctor``); without one it refuses."""

    __slots__ = ("name", "target", "ctor")

    def __init__(self, name: str, target: Any, ctor: Any = None) -> None:
        self.name = name
        self.target = target
        self.ctor = ctor

    def __call__(self, *args: Any) -> Any:
        if self.ctor is None:
            raise _bad(f"{self.name} cannot be called from a checkpoint")
        return self.ctor(*args)

    def __repr__(self) -> str:
        return f"<class {self.name}>"


def legacy_parameter(data: Any = None, requires_grad: Any = True) -> Any:
    """``Parameter(data)`` as torch <= 0.3 pickled it (``Variable.__reduce_ex__``); BUILD sets the rest."""
    if isinstance(data, TensorMeta):
        data.is_parameter = True
        return data
    import torch

    if data is None:
        data = torch.empty(0)
    if not isinstance(data, torch.Tensor):
        raise _bad(f"Parameter built from a {type(data).__name__}")
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad) and (data.is_floating_point()
                                                                         or data.is_complex()))


def legacy_variable(data: Any = None, *rest: Any) -> Any:
    """``Variable(data)`` of torch <= 0.3: today simply the tensor."""
    if isinstance(data, TensorMeta):
        return data
    import torch

    if data is None:
        return torch.empty(0)
    if not isinstance(data, torch.Tensor):
        raise _bad(f"Variable built from a {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- torch rebuilders
_STORAGE_TYPES: tuple[Any, ...] | None = None


def check_storage_view(storage: Any, offset: Any, size: Any, stride: Any, itemsize: int) -> tuple[Any, ...]:
    """Validate a tensor view against its storage; returns (offset, size, stride) as ints."""
    global _STORAGE_TYPES
    if _STORAGE_TYPES is None:
        from torch.storage import TypedStorage, UntypedStorage  # torch stays lazy: only real tensors need it

        _STORAGE_TYPES = (TypedStorage, UntypedStorage)
    if not isinstance(storage, _STORAGE_TYPES):
        raise _bad(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    untyped = storage._untyped_storage if isinstance(storage, _STORAGE_TYPES[0]) else storage
    return check_view(untyped.nbytes() // max(itemsize, 1), offset, size, stride)


def _tensor_from_view(storage: Any, offset: Any, size: Any, stride: Any, dtype: Any = None) -> Any:
    import torch

    untyped = storage._untyped_storage if hasattr(storage, "_untyped_storage") else storage
    dtype = dtype if dtype is not None else storage.dtype
    itemsize = dtype.itemsize
    offset, size, stride = check_storage_view(storage, offset, size, stride, itemsize)
    t = torch.empty((0,), dtype=dtype, device=untyped.device)
    return t.set_(untyped, offset, size, stride)


def _set_requires_grad(t: Any, requires_grad: Any) -> None:
    if requires_grad is True and (t.is_floating_point() or t.is_complex()):
        t.requires_grad_(True)


def _apply_metadata(t: Any, metadata: Any) -> None:
    if isinstance(metadata, dict) and metadata and all(isinstance(k, str) for k in metadata):
        import torch._utils as tu

        try:
            tu.set_tensor_metadata(t, metadata)
        except Exception as exc:  # noqa: BLE001 - report as corrupt
            raise _bad(f"invalid tensor metadata {metadata!r}: {exc}") from None


def rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> Any:
    return _tensor_from_view(storage, storage_offset, size, stride)


def rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                      backward_hooks: Any = None, metadata: Any = None) -> Any:
    t = _tensor_from_view(storage, storage_offset, size, stride)
    _set_requires_grad(t, requires_grad)
    _apply_metadata(t, metadata)
    return t


def rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                      backward_hooks: Any, dtype: Any, metadata: Any = None) -> Any:
    import torch

    if not isinstance(dtype, torch.dtype):
        raise _bad(f"tensor dtype must be a torch.dtype, got {type(dtype).__name__}")
    t = _tensor_from_view(storage, storage_offset, size, stride, dtype=dtype)
    _set_requires_grad(t, requires_grad)
    _apply_metadata(t, metadata)
    return t


def rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any = None) -> Any:
    import torch

    if not isinstance(data, torch.Tensor):
        raise _bad(f"Parameter rebuilt from a {type(data).__name__}")
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad))


def rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any, state: Any) -> Any:
    param = rebuild_parameter(data, requires_grad, backward_hooks)
    _set_plain_attributes(param, state)
    return param


def _set_plain_attributes(obj: Any, state: Any) -> None:
    if isinstance(state, tuple) and len(state) == 2:
        for part in state:
            _set_plain_attributes(obj, part)
        return
    if isinstance(state, dict):
        for k, v in state.items():
            if isinstance(k, str) and not k.startswith("__") and not hasattr(type(obj), k):
                try:
                    setattr(obj, k, v)
                except (AttributeError, TypeError):
                    pass


def rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    import torch

    if not isinstance(args, tuple):
        raise _bad("tensor subclass arguments must be a tuple")
    if isinstance(func, Marker) or not callable(func):
        raise _bad(f"tensor subclass rebuilt through {func!r}")
    ret = func(*args)
    target = new_type.target if isinstance(new_type, Marker) else new_type
    if isinstance(ret, torch.Tensor) and isinstance(target, type) and issubclass(target, torch.Tensor) \
            and type(ret) is not target:
        ret = ret.as_subclass(target)
    if isinstance(ret, torch.Tensor):
        _set_plain_attributes(ret, state)
    return ret


def rebuild_from_type(func: Any, type_: Any, args: Any, dict_: Any) -> Any:
    return rebuild_from_type_v2(func, type_, args, dict_)


def rebuild_device_tensor_from_numpy(data: Any, dtype: Any, device: Any, requires_grad: Any) -> Any:
    import numpy as np
    import torch

    data = check_numpy_tensor(data)
    if not isinstance(dtype, torch.dtype):
        raise _bad("device tensor rebuilt with something other than a dtype")
    t = torch.from_numpy(np.ascontiguousarray(data)).to(dtype=dtype)
    _set_requires_grad(t, requires_grad)
    return t


def rebuild_meta_tensor_no_storage(dtype: Any, size: Any, stride: Any, requires_grad: Any) -> Any:
    import torch

    size, stride = check_shape(size, stride)
    if not isinstance(dtype, torch.dtype):
        raise _bad("meta tensor rebuilt with something other than a dtype")
    return torch.empty_strided(size, stride, dtype=dtype, device="meta", requires_grad=bool(requires_grad))


def get_layout(name: Any) -> Any:
    import torch

    return getattr(torch, layout_name(name))


class torch_version(str):  # noqa: N801 - stands for torch.torch_version.TorchVersion
    """A version string (``torch.__version__`` pickles as this ``str`` subclass via REDUCE or NEWOBJ)."""

    def __new__(cls, value: Any = "") -> "torch_version":
        return super().__new__(cls, value if isinstance(value, str) else str(value)[:64])


