"""Structure-only reading without importing torch: what ``inspect`` and ``scan`` build tensors as.

``import torch`` costs over a second; describing a checkpoint needs only names, shapes and dtypes.
In meta mode storages are :class:`MetaStorage` (a dtype and a byte count) and tensors are
:class:`TensorMeta`, validated against their storage exactly like real tensors are.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from ...errors import CorruptCheckpointError

__all__ = ["TensorMeta", "MetaStorage", "DTYPE_SIZES", "check_view", "check_shape", "layout_name", "dtype_name",
           "contiguous_stride"]

DTYPE_SIZES = {
    "float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16, "complex32": 4, "qint8": 1, "quint8": 1, "qint32": 4,
    "quint4x2": 1, "quint2x4": 1, "uint16": 2, "uint32": 4, "uint64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
}
_ALIASES = {"float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32",
            "short": "int16", "cfloat": "complex64", "cdouble": "complex128"}


class MetaDType(str):
    """A torch dtype by name (``"float16"``), printable like ``torch.float16``."""

    display_type = "torch.dtype"  # what `inspect` calls its type: the type `load` gives, not this stand-in

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES.get(str(self), 1)

    def __repr__(self) -> str:
        return f"torch.{str(self)}"


def meta_dtype(name: str) -> MetaDType:
    return MetaDType(_ALIASES.get(name, name))


def dtype_name(value: Any) -> str:
    """``"float16"`` for a tensor, a TensorMeta, a numpy array or a dtype (``torch.float16``, ``"torch.half"``)."""
    dtype = getattr(value, "dtype", value)
    name = str(dtype)
    return name[6:] if name.startswith("torch.") else name


class MetaStorage:
    """A storage that was not read: its dtype, size, saved location and (when known) where its bytes are.

    A view storage (legacy format) points at its ``root`` with a byte offset.
    """

    __slots__ = ("dtype", "nbytes", "location", "file_offset", "root", "root_offset")

    def __init__(self, dtype: MetaDType, nbytes: int, location: str = "cpu", root: "MetaStorage | None" = None,
                 root_offset: int = 0) -> None:
        self.dtype, self.nbytes, self.location = dtype, nbytes, location
        self.file_offset: int | None = None
        self.root, self.root_offset = root, root_offset

    def data_offset(self) -> int | None:
        """Absolute file offset of this storage's first byte, if known."""
        base = self.root.file_offset if self.root is not None else self.file_offset
        return None if base is None else base + self.root_offset


class TensorMeta:
    """Shape, stride and dtype of a tensor whose data was not read."""

    __slots__ = ("shape", "stride", "dtype", "storage_offset", "requires_grad", "is_parameter", "storage")

    def __init__(self, shape: tuple[int, ...], stride: tuple[int, ...], dtype: MetaDType, storage_offset: int = 0,
                 storage: MetaStorage | None = None) -> None:
        self.shape, self.stride, self.dtype, self.storage_offset = shape, stride, dtype, storage_offset
        self.storage = storage
        self.requires_grad = False
        self.is_parameter = False

    def numel(self) -> int:  # a method, as on torch.Tensor, so callers need not tell them apart
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel() * self.dtype.itemsize

    def detach(self) -> "TensorMeta":
        return self

    def dim(self) -> int:
        return len(self.shape)

    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, str(self.dtype))

    def materialize(self, source: Any, *, prefault: bool = False) -> Any:
        """Read this tensor's bytes from ``source`` (a :class:`~torchckpt.storage.source.Source`) into a CPU tensor
        (``prefault``: see ``Source.read_into``; only for a caller that reads on one thread)."""
        import torch

        offset = self.storage.data_offset() if self.storage is not None else None
        if offset is None:
            raise CorruptCheckpointError("tensor data location unknown (structure-only read)")
        item = self.dtype.itemsize
        if 0 in self.shape:
            return torch.empty(self.shape, dtype=self.torch_dtype())
        extent = 1 + sum((s - 1) * st for s, st in zip(self.shape, self.stride))
        start = offset + self.storage_offset * item
        raw = source.read_into_storage(start, extent * item, prefault=prefault)
        flat = torch.empty(0, dtype=self.torch_dtype()).set_(raw, 0, (extent,), (1,))
        return flat.as_strided(self.shape, self.stride)

    def __repr__(self) -> str:
        return f"TensorMeta(shape={list(self.shape)}, dtype={self.dtype!r})"


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a contiguous (row-major) tensor of ``shape``."""
    return tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))


def check_int(value: Any, what: str) -> int:
    """An int from the file (numpy integer scalars accepted). Raises CorruptCheckpointError."""
    if type(value) is int:
        return value
    if type(value).__name__ not in ("int64", "int32"):
        raise CorruptCheckpointError(f"{what} must be an integer, got {type(value).__name__}")
    return int(value)


def check_view(capacity: int, offset: Any, size: Any, stride: Any) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """Validate a view of ``capacity`` elements; returns ints. Raises CorruptCheckpointError."""
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):
        raise CorruptCheckpointError("tensor size and stride must be tuples")
    if type(offset) is int and all(type(s) is int for s in size) and all(type(s) is int for s in stride):
        size, stride = tuple(size), tuple(stride)  # the common case, once per tensor: no per-element calls
    else:
        offset = check_int(offset, "storage offset")
        size = tuple(check_int(s, "tensor size") for s in size)
        stride = tuple(check_int(s, "tensor stride") for s in stride)
    if len(size) != len(stride) or len(size) > 64:
        raise CorruptCheckpointError(f"tensor with {len(size)} sizes and {len(stride)} strides")
    if offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CorruptCheckpointError(f"negative tensor offset, size or stride ({offset}, {size}, {stride})")
    needed = offset if 0 in size else offset + 1 + sum((s - 1) * st for s, st in zip(size, stride))
    if needed > capacity:
        raise CorruptCheckpointError(f"tensor view (offset {offset}, size {list(size)}, stride {list(stride)}) "
                                     f"reaches element {needed} of a storage of {capacity} elements")
    return offset, size, stride


# What build and structure reads both accept (the structure read cannot ask torch, so the rules are
# written out once here and checked first in both modes: scan, in record mode, refuses what load refuses).
TORCH_LAYOUTS = frozenset({"strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn",
                           "jagged"})
NUMPY_TENSOR_DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                                 "float16", "float32", "float64", "complex64", "complex128"})


def layout_name(name: Any) -> str:
    """The layout ``torch.serialization._get_layout(name)`` names (``"torch.strided"`` -> ``"strided"``)."""
    last = name.rsplit(".", 1)[-1] if isinstance(name, str) else None
    if last not in TORCH_LAYOUTS:
        raise CorruptCheckpointError(f"unknown tensor layout {name!r:.60}")
    return last


def check_numpy_tensor(data: Any) -> Any:
    """The numpy array a device tensor is rebuilt from (``_rebuild_device_tensor_from_numpy``)."""
    import numpy as np

    if not isinstance(data, np.ndarray) or data.dtype.name not in NUMPY_TENSOR_DTYPES:
        raise CorruptCheckpointError("device tensor rebuilt from something other than a numeric numpy array")
    return data


def check_shape(size: Any, stride: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Sizes and strides of a tensor without storage: ints, as many of each, none negative, numel and
    extent below 2**62."""
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)) or len(size) != len(stride) \
            or len(size) > 64:
        raise CorruptCheckpointError("tensor size and stride must be tuples of the same length")
    size = tuple(check_int(s, "size") for s in size)
    stride = tuple(check_int(s, "stride") for s in stride)
    numel = extent = 1
    for n, st in zip(size, stride):
        if n < 0 or st < 0:
            raise CorruptCheckpointError(f"negative tensor size or stride ({list(size)}, {list(stride)})")
        numel *= n
        extent += (n - 1) * st if n else 0
        if numel >= 1 << 62 or extent >= 1 << 62:
            raise CorruptCheckpointError(f"tensor of size {list(size)} and stride {list(stride)} is beyond any memory")
    return size, stride


def _meta_tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: Any = None) -> TensorMeta:
    if not isinstance(storage, MetaStorage):
        raise CorruptCheckpointError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    dtype = meta_dtype(str(dtype)) if dtype is not None else storage.dtype
    offset, size, stride = check_view(storage.nbytes // max(dtype.itemsize, 1), offset, size, stride)
    return TensorMeta(size, stride, dtype, offset, storage)


def rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any) -> TensorMeta:
    return _meta_tensor(storage, storage_offset, size, stride)


def rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                      backward_hooks: Any, dtype: Any, metadata: Any = None) -> TensorMeta:
    return _meta_tensor(storage, storage_offset, size, stride, dtype)


def rebuild_parameter(data: Any, requires_grad: Any = False, *rest: Any) -> Any:
    if not isinstance(data, TensorMeta):  # as the build rebuilder refuses anything but a tensor
        raise CorruptCheckpointError(f"Parameter rebuilt from a {type(data).__name__}")
    data.is_parameter = True
    data.requires_grad = bool(requires_grad)
    return data


def _check_dtype(dtype: Any) -> MetaDType:
    if not isinstance(dtype, MetaDType):
        raise CorruptCheckpointError("tensor rebuilt with something other than a dtype")
    return dtype


def rebuild_meta_tensor_no_storage(dtype: Any, size: Any, stride: Any, requires_grad: Any) -> TensorMeta:
    size, stride = check_shape(size, stride)
    return TensorMeta(size, stride, _check_dtype(dtype))


def rebuild_device_tensor_from_numpy(data: Any, dtype: Any, device: Any, requires_grad: Any) -> TensorMeta:
    return TensorMeta(tuple(check_numpy_tensor(data).shape), (), _check_dtype(dtype))


class MetaDevice(str):
    def __new__(cls, kind: Any = "cpu", index: Any = None) -> "MetaDevice":
        text = str(kind) if index is None else f"{kind}:{index}"
        return super().__new__(cls, text)

    def __repr__(self) -> str:
        return f"device({str(self)!r})"


class MetaSize(tuple[int, ...]):
    def __repr__(self) -> str:
        return f"torch.Size({list(self)})"


def const(value: Any) -> Callable[[], Any]:
    return lambda: value
