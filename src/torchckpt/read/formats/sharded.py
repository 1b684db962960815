"""Sharded checkpoints described by an index (``model.safetensors.index.json``,
``pytorch_model.bin.index.json``): every shard is read by the same readers and merged."""

from __future__ import annotations

import os
from collections import OrderedDict
from contextlib import closing
from typing import Any

from ...errors import CheckpointNotFoundError, CorruptCheckpointError
from ...storage.remote import join
from ...storage.source import Source, confined_path
from .base import Checkpoint, ReadOptions, parse_json
from .parallel import read_parts

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
    # one read per shard FILE: the spellings of one file ("a.safetensors", "./a.safetensors", ...) resolve to
    # one path and are read once, under the first spelling (an index may spell one shard thousands of ways)
    spelled: dict[str, str] = {}  # spelling -> the first spelling of its file
    first: dict[str, str] = {}  # resolved path -> first spelling
    for spelling in dict.fromkeys(weight_map.values()):
        path = confined_path(folder, spelling, what="shard", checkpoint=src.name)
        if spelling.endswith(".json") or path == itself:
            raise CorruptCheckpointError(f"the index names another index ({spelling!r:.120}) as a shard")
        spelled[spelling] = first.setdefault(path, spelling)
    shards = list(first.values())
    merged: OrderedDict[str, Any] = OrderedDict()
    loaded = Checkpoint(tree=merged, format="sharded", description=f"sharded checkpoint index ({len(shards)} shards)")
    assert opts.read_child is not None, "the opener passes the format dispatcher"
    itself = src.url if src.url is not None else os.path.realpath(src.path or "")
    paths: dict[str, str] = {}
    for shard in shards:  # every name is checked before any shard is read
        path = confined_path(folder, shard, what="shard", checkpoint=src.name)
        if shard.endswith(".json") or path == itself:
            raise CorruptCheckpointError(f"the index names another index ({shard!r:.120}) as a shard")
        shown = join(folder, shard)
        if src.url is None and not os.path.isfile(path):
            raise CheckpointNotFoundError(f"shard {shard} listed in the index is missing", path=shown,
                                          hint="Download every shard next to the index file.")
        paths[shard] = path
    wanted: dict[str, list[str]] = {shard: [] for shard in shards}
    for key, shard in weight_map.items():
        wanted[spelled[shard]].append(key)

    def read_shard(shard: str, shard_opts: ReadOptions) -> tuple[dict[str, Any], list[str]]:
        shown = join(folder, shard)
        try:
            shard_src = Source(paths[shard], name=shown, storage_options=shard_opts.storage_options)
        except CheckpointNotFoundError:
            raise CheckpointNotFoundError(f"shard {shard} listed in the index is missing", path=shown,
                                          hint="Upload every shard next to the index file.") from None
        assert shard_opts.read_child is not None
        with shard_src:
            part = shard_opts.read_child(shard_src, shard_opts)
        tensors = part.obj if isinstance(part.obj, dict) else {}
        missing = [k for k in wanted[shard] if k not in tensors]
        if missing:
            raise CorruptCheckpointError(f"shard {shard} lacks {len(missing)} tensors the index puts there, "
                                         f"e.g. {missing[0]!r:.200}", path=paths[shard])
        return {key: tensors[key] for key in wanted[shard]}, part.notes

    # the shards are read side by side (opts.workers threads), merged in the index's order
    with closing(read_parts(opts, shards, read_shard)) as results:  # closed on any error: the pool stops
        for shard, (tensors, notes) in zip(shards, results):
            merged.update(tensors)
            loaded.notes.extend(f"{shard}: {note}" for note in notes)
    loaded.evidence.append(f"JSON index with a weight_map over {len(shards)} shard files")
    metadata = index.get("metadata") or {}
    _restore_aliases(merged, metadata.get("torchckpt.aliases") if isinstance(metadata, dict) else None)
    loaded.details["metadata"] = {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
    return loaded


def _restore_aliases(merged: "OrderedDict[str, Any]", aliases: Any) -> None:
    """torchckpt's sharded output stores a tied tensor once and records ``{"alias": "stored name"}`` in the
    index metadata (``torchckpt.aliases``); each alias becomes the stored tensor again."""
    if aliases is None:
        return
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise CorruptCheckpointError("torchckpt.aliases in the index metadata is not a JSON object of names")
    for alias, stored in aliases.items():
        if stored not in merged:
            raise CorruptCheckpointError(f"torchckpt.aliases entry {alias!r:.60} names {stored!r:.60}, which no "
                                         "shard holds")
        merged.setdefault(alias, merged[stored])
