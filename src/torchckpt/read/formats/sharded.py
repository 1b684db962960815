"""Sharded checkpoints described by an index (``model.safetensors.index.json``,
``pytorch_model.bin.index.json``): every shard is read by the same readers and merged."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Any

from ...errors import CheckpointNotFoundError, CorruptCheckpointError
from ...storage.source import Source
from .base import Loaded, ReadOptions

__all__ = ["read_sharded_index"]

MAX_INDEX = 64 << 20


def read_sharded_index(src: Source, opts: ReadOptions) -> Loaded | None:
    """The merged state dict of the shards an index lists, or None if ``src`` is not such an index."""
    if src.size > MAX_INDEX:
        return None
    try:
        index = json.loads(src.read_at(0, src.size))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        return None
    shards = list(dict.fromkeys(weight_map.values()))
    merged: OrderedDict[str, Any] = OrderedDict()
    loaded = Loaded(obj=merged, kind="sharded", description=f"sharded checkpoint index ({len(shards)} shards)")
    from . import read

    for shard in shards:
        if os.path.isabs(shard) or "://" in shard or ".." in shard.replace("\\", "/").split("/"):
            raise CorruptCheckpointError(f"the index names shard {shard!r} outside its folder")
        if shard.endswith(".json") or shard == os.path.basename(src.url or src.path or ""):
            raise CorruptCheckpointError(f"the index names another index ({shard!r}) as a shard")
        try:
            shard_src = src.sibling(shard)
        except CheckpointNotFoundError as exc:
            raise type(exc)(f"shard {shard} listed in the index is missing", path=exc.path,
                                          hint="Download every shard next to the index file.") from None
        path = shard_src.name
        with shard_src:
            part = read(shard_src, opts)
        tensors = part.obj if isinstance(part.obj, dict) else {}
        wanted = [k for k, v in weight_map.items() if v == shard]
        missing = [k for k in wanted if k not in tensors]
        if missing:
            raise CorruptCheckpointError(f"shard {shard} lacks {len(missing)} tensors the index puts there, "
                                         f"e.g. {missing[0]!r}", path=path)
        for key in wanted:
            merged[key] = tensors[key]
        loaded.notes.extend(f"{shard}: {note}" for note in part.notes)
    loaded.evidence.append(f"JSON index with a weight_map over {len(shards)} shard files")
    loaded.details["metadata"] = {str(k): str(v) for k, v in (index.get("metadata") or {}).items()}
    return loaded
