"""What counts as a tensor in a loaded tree, and how its dtype is named.

The readers produce three kinds of tensor: real ``torch.Tensor`` objects, numeric numpy arrays, and
:class:`~torchckpt.read.unpickle.meta.TensorMeta` (structure-only reads: shape, stride, dtype and
where the bytes are). Everything above the readers (the tree, load_into, the tools) asks this module,
never the reader internals. stdlib only: torch is never imported here.
"""

from __future__ import annotations

from typing import Any

from .unpickle.meta import MetaStorage, TensorMeta

__all__ = ["TensorMeta", "MetaStorage", "is_tensor_like", "dtype_name"]


def is_tensor_like(value: Any) -> bool:
    """A torch tensor, a :class:`TensorMeta`, or a numeric numpy array."""
    t = type(value)
    if t is TensorMeta or (t.__module__.startswith("torch") and hasattr(value, "untyped_storage")):
        return True
    return t.__module__ == "numpy" and t.__name__ == "ndarray" and value.dtype.kind in "biufc"


def dtype_name(value: Any) -> str:
    """``"float16"`` for a tensor, a TensorMeta, a numpy array or a dtype (``torch.float16``, ``"torch.half"``)."""
    dtype = getattr(value, "dtype", value)
    name = str(dtype)
    return name[6:] if name.startswith("torch.") else name
