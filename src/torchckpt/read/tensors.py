"""What counts as a tensor in a loaded tree, and how its dtype is named.

The readers produce three kinds of tensor: real ``torch.Tensor`` objects, numeric numpy arrays, and
:class:`~torchckpt.read.unpickle.meta.TensorMeta` (structure-only reads: shape, stride, dtype and
where the bytes are). Everything above the readers (the tree, load_into, the tools) asks this module,
never the reader internals. torch is imported only inside :func:`to_torch`, when tensor data is wanted.

Streaming front ends (``convert``, ``diff``, ``report``) read one tensor at a time from an open
checkpoint with :func:`to_torch` and hand its mapped file pages back with :func:`release` once used,
so memory stays near the largest tensor.
"""

from __future__ import annotations

from typing import Any

from .unpickle.meta import MetaStorage, TensorMeta, dtype_name

__all__ = ["TensorMeta", "MetaStorage", "is_tensor_like", "dtype_name", "to_torch", "release"]


def is_tensor_like(value: Any) -> bool:
    """A torch tensor, a :class:`TensorMeta`, or a numeric numpy array."""
    t = type(value)
    if isinstance(value, TensorMeta) or (t.__module__.startswith("torch") and hasattr(value, "untyped_storage")):
        return True
    return t.__module__ == "numpy" and t.__name__ == "ndarray" and value.dtype.kind in "biufc"


def to_torch(value: Any, reader: Any) -> Any:
    """A CPU ``torch.Tensor`` for a tensor of a loaded tree: a :class:`TensorMeta` is read from
    ``reader`` (the checkpoint's open :class:`~torchckpt.storage.source.Source`), a numpy array is
    wrapped without a copy, a tensor is detached."""
    if isinstance(value, TensorMeta):  # DCP's lazy tensors (a subclass) read their own chunks
        return value.materialize(reader)
    import torch  # lazy: torchckpt imports torch only when tensor data is needed

    if type(value).__module__ == "numpy":
        return torch.from_numpy(value)
    return value.detach()


def release(reader: Any, tensor: Any, *, view_only: bool = False) -> None:
    """Drop the file pages behind ``tensor`` if it maps ``reader``'s file (a no-op otherwise).

    The pages of its whole storage, or with ``view_only`` those under the bytes of the (contiguous)
    view itself: a reader of a large tensor can drop each part once it has read it.
    """
    if reader is None or not hasattr(tensor, "untyped_storage"):
        return
    storage = tensor.untyped_storage()
    if storage.device.type != "cpu":
        return
    if view_only and tensor.is_contiguous():
        reader.release_pointer(tensor.data_ptr(), tensor.numel() * tensor.element_size())
    elif not view_only:
        reader.release_pointer(storage.data_ptr(), storage.nbytes())
