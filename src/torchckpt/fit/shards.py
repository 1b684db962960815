"""Full checkpoint tensors into sharded parameters (FSDP2 ``fully_shard``, tensor parallel DTensors).

Each rank keeps only its own slice: the full tensor (usually a view of the memory-mapped file) is
split locally with the parameter's own mesh and placements, without any communication, so a rank
reads only the bytes of its shard and the model is never materialised whole on every rank.
"""

from __future__ import annotations

import sys
from typing import Any

from ..errors import CorruptCheckpointError
from ..read.tensors import TensorMeta, release

__all__ = ["is_sharded", "shard_like"]


def is_sharded(target: Any) -> bool:
    """Whether ``target`` is a DTensor (checked without importing torch.distributed if nobody did)."""
    tensor_mod = sys.modules.get("torch.distributed.tensor")
    return tensor_mod is not None and isinstance(target, tensor_mod.DTensor)


def shard_like(value: Any, target: Any, src: Any = None) -> Any:
    """``value`` (a full tensor, a :class:`TensorMeta` not read yet, or a lazy DCP tensor) as a DTensor laid
    out like ``target`` in ``target``'s dtype, holding only this rank's slice.

    A ``TensorMeta`` is read from ``src`` over this rank's slice only (its bounding byte range: exactly
    the shard for FSDP2's dim-0 sharding); a lazy DCP tensor reads only the chunks that overlap it; a
    tensor mapping the file is sliced, copied and its pages released. The cast happens on the slice.
    """
    import torch
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if isinstance(value, DTensor):
        return value.to(dtype=target.dtype)
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"a tensor of shape {list(value.shape)} cannot be sharded like {list(target.shape)}")
    mesh = target.device_mesh
    sizes, offsets = compute_local_shape_and_global_offset(tuple(target.shape), mesh, target.placements)
    sizes, offsets = tuple(sizes), tuple(offsets)
    if hasattr(value, "read_region"):  # a lazy DCP tensor
        part = value.read_region(offsets, sizes)
    elif isinstance(value, TensorMeta):
        part = _read_region(value, src, offsets, sizes)
    else:
        part = value[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))]
    local = torch.empty(sizes, dtype=target.dtype, device=mesh.device_type)
    local.copy_(part)
    del part
    if isinstance(value, torch.Tensor):
        release(src, value)  # the mapped file's pages were only a way through
    return DTensor.from_local(local, mesh, target.placements, run_check=False, shape=target.shape,
                              stride=target.stride())


def _read_region(meta: TensorMeta, src: Any, offsets: tuple[Any, ...], sizes: tuple[Any, ...]) -> Any:
    """The sub-tensor ``[offsets : offsets + sizes]`` of a tensor in a file, reading only its byte span."""
    import torch

    dtype = meta.torch_dtype()
    if 0 in sizes:
        return torch.empty(sizes, dtype=dtype)
    base = meta.storage.data_offset() if meta.storage is not None else None
    if base is None or src is None:
        raise CorruptCheckpointError("tensor data location unknown (structure-only read)")
    item = meta.dtype.itemsize
    first = meta.storage_offset + sum(o * st for o, st in zip(offsets, meta.stride))
    extent = 1 + sum((n - 1) * st for n, st in zip(sizes, meta.stride))
    raw = src.read_into_storage(base + first * item, extent * item)
    flat = torch.empty(0, dtype=dtype).set_(raw, 0, (extent,), (1,))
    return flat.as_strided(sizes, meta.stride)
