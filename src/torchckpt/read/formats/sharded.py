"""Sharded checkpoints described by an index (``model.safetensors.index.json``,
``pytorch_model.bin.index.json``): every shard is read by the same readers and merged."""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

from ...errors import CheckpointNotFoundError, CorruptCheckpointError
from ...storage.remote import join
from ...storage.source import Source, confined_path
from .base import Checkpoint, ReadOptions, parse_json

__all__ = ["read_sharded_index"]

MAX_INDEX = 64 << 20


def read_sharded_index(src: Source, opts: ReadOptions) -> Checkpoint | None:
    """The merged state dict of the shards an index lists, or None if ``src`` is not such an index."""
    if src.size > MAX_INDEX:
        return None
    try:
        index = parse_json(src.read_at(0, src.size), "sharded checkpoint index")
    except CorruptCheckpointError:
        return None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        return None
    folder = src.folder  # a local directory or a URL prefix
    itself = src.url if src.url is not None else os.path.realpath(src.path or "")
    # one read per shard FILE: spellings of one file ("a.safetensors", "./a.safetensors", ...) resolve to the
    # same path, and the keys are grouped in one pass (the index may spell one shard thousands of ways)
    resolved: dict[str, str] = {}
    groups: OrderedDict[str, tuple[str, list[str]]] = OrderedDict()  # path -> (first spelling, its keys)
    for key, shard in weight_map.items():
        path = resolved.get(shard)
        if path is None:
            path = resolved[shard] = confined_path(folder, shard, what="shard", checkpoint=src.name)
            if shard.endswith(".json") or path == itself:
                raise CorruptCheckpointError(f"the index names another index ({shard!r:.120}) as a shard")
        groups.setdefault(path, (shard, []))[1].append(key)
    merged: OrderedDict[str, Any] = OrderedDict()
    loaded = Checkpoint(tree=merged, format="sharded", description=f"sharded checkpoint index ({len(groups)} shards)")
    assert opts.read_child is not None, "the opener passes the format dispatcher"
    for path, (shard, wanted) in groups.items():
        shown = join(folder, shard)
        if src.url is None and not os.path.isfile(path):
            raise CheckpointNotFoundError(f"shard {shard} listed in the index is missing", path=shown,
                                          hint="Download every shard next to the index file.")
        try:
            shard_src = Source(path, name=shown, storage_options=opts.storage_options)
        except CheckpointNotFoundError:
            raise CheckpointNotFoundError(f"shard {shard} listed in the index is missing", path=shown,
                                          hint="Upload every shard next to the index file.") from None
        with shard_src:
            part = opts.read_child(shard_src, opts)
        tensors = part.obj if isinstance(part.obj, dict) else {}
        missing = [k for k in wanted if k not in tensors]
        if missing:
            raise CorruptCheckpointError(f"shard {shard} lacks {len(missing)} tensors the index puts there, "
                                         f"e.g. {missing[0]!r:.200}", path=path)
        for key in wanted:
            merged[key] = tensors[key]
        loaded.notes.extend(f"{shard}: {note}" for note in part.notes)
    loaded.evidence.append(f"JSON index with a weight_map over {len(groups)} shard files")
    metadata = index.get("metadata") or {}
    loaded.details["metadata"] = {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
    return loaded
