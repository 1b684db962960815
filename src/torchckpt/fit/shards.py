"""Full checkpoint tensors into sharded parameters (FSDP2 ``fully_shard``, tensor parallel DTensors).

Each rank keeps only its own slice: the full tensor (usually a view of the memory-mapped file) is
split locally with the parameter's own mesh and placements, without any communication, so a rank
reads only the bytes of its shard and the model is never materialised whole on every rank.
"""

from __future__ import annotations

import sys
from typing import Any

from ..read.unpickle.meta import TensorMeta

__all__ = ["is_sharded", "shard_like"]


def is_sharded(target: Any) -> bool:
    """Whether ``target`` is a DTensor (checked without importing torch.distributed if nobody did)."""
    tensor_mod = sys.modules.get("torch.distributed.tensor")
    return tensor_mod is not None and isinstance(target, tensor_mod.DTensor)


def shard_like(value: Any, target: Any, src: Any = None) -> Any:
    """``value`` (a full tensor, or a :class:`TensorMeta` not read yet) as a DTensor laid out like ``target``.

    A ``TensorMeta`` is read from ``src`` only over this rank's slice (its bounding byte range: exactly
    the shard for FSDP2's dim-0 sharding). The dtype is left as it is: casting happens afterwards on
    the local slice, never on the full tensor.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(value, DTensor):
        return value
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"a tensor of shape {list(value.shape)} cannot be sharded like {list(target.shape)}")
    if isinstance(value, TensorMeta):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        sizes, offsets = compute_local_shape_and_global_offset(tuple(target.shape), target.device_mesh,
                                                               target.placements)
        local = _read_region(value, src, tuple(offsets), tuple(sizes))
        return DTensor.from_local(local.to(target.device_mesh.device_type), target.device_mesh, target.placements,
                                  run_check=False, shape=target.shape, stride=target.stride())
    return distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)


def _read_region(meta: TensorMeta, src: Any, offsets: tuple, sizes: tuple) -> Any:
    """The sub-tensor ``[offsets : offsets + sizes]`` of a tensor in a file, reading only its byte span."""
    import torch

    from ..errors import CorruptCheckpointError

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
    return flat.as_strided(sizes, meta.stride).contiguous()
