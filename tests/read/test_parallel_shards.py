"""Sharded checkpoints are read by a bounded pool of threads (``workers=``): the same tree, trace and
errors as a read one shard after another, and the one budget still bounds all shards together."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file

import torchckpt
from torchckpt.errors import LimitExceededError, TruncatedCheckpointError, CorruptCheckpointError
from torchckpt.read.opener import open_checkpoint


def write_sharded(folder, n_shards=8, per_shard=6, fmt="safetensors", extra_items=0):
    """An index over ``n_shards`` shards, as save_pretrained writes them; returns (index path, state dict)."""
    g = torch.Generator().manual_seed(0)
    weight_map, full = {}, OrderedDict()
    suffix = "safetensors" if fmt == "safetensors" else "bin"
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.{suffix}"
        part = OrderedDict((f"layers.{s}.w{i}", torch.randn(32, 16, generator=g)) for i in range(per_shard))
        if fmt == "safetensors":
            save_file(dict(part), str(folder / name))
        else:
            torch.save({**part, **{f"layers.{s}.n{i}": i for i in range(extra_items)}}, folder / name)
            part.update((f"layers.{s}.n{i}", i) for i in range(extra_items))
        for key in part:
            weight_map[key] = name
        full.update(part)
    index = folder / f"model.{suffix}.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    return index, full


def same(a, b):
    assert list(a) == list(b)
    for key in a:
        assert (torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]), key


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("workers", [1, 2, 4, 16])
def test_every_pool_size_reads_the_same_tree_in_the_index_order(tmp_path, fmt, workers):
    index, full = write_sharded(tmp_path, fmt=fmt, extra_items=2)
    got = torchckpt.load(index, workers=workers)
    same(got, full)
    default = torchckpt.load(index)  # the default pool
    same(default, full)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_the_trace_is_the_one_a_sequential_read_makes(tmp_path, fmt):
    index, _ = write_sharded(tmp_path, fmt=fmt)
    traces = {}
    for workers in (1, 4):
        with open_checkpoint(index, "build", workers=workers) as ckpt:
            t = ckpt.trace
            traces[workers] = ([(s.source, s.member, s.offset, s.complete) for s in t.streams], list(t.ranges),
                               [c.message for c in t.checks], [str(g) for g in ckpt.globals])
    assert traces[1] == traces[4]
    if fmt == "bin":
        assert len(traces[1][0]) == 8  # one pickle stream per shard, in the index's order
        assert [s[0].rsplit("/", 1)[-1] for s in traces[1][0]] == sorted(s[0].rsplit("/", 1)[-1] for s in traces[1][0])


@pytest.mark.parametrize("workers", [1, 4])
def test_a_damaged_shard_is_a_typed_error_naming_it(tmp_path, workers):
    index, _ = write_sharded(tmp_path, fmt="bin")
    victim = tmp_path / "model-00006-of-00008.bin"
    victim.write_bytes(victim.read_bytes()[:300])
    with pytest.raises((TruncatedCheckpointError, CorruptCheckpointError)) as info:
        torchckpt.load(index, workers=workers)
    assert "model-00006-of-00008.bin" in str(info.value)


@pytest.mark.parametrize("workers", [1, 4])
def test_a_shard_missing_the_tensors_the_index_puts_there_names_it(tmp_path, workers):
    index, _ = write_sharded(tmp_path)
    save_file({"other": torch.zeros(2)}, str(tmp_path / "model-00003-of-00008.safetensors"))
    with pytest.raises(CorruptCheckpointError, match="model-00003-of-00008.safetensors lacks 6 tensors"):
        torchckpt.load(index, workers=workers)


def fits(path, steps, workers):
    """Whether ``path`` loads within a budget of ``steps`` VM steps."""
    policy = torchckpt.Policy(budget=torchckpt.Budget(steps=steps, amplification=0))
    try:
        torchckpt.load(path, policy=policy, workers=workers)
        return True
    except LimitExceededError:
        return False


def least(path, workers):
    """The smallest step budget that loads ``path`` (bisection)."""
    low, high = 0, 1 << 20
    assert fits(path, high, workers)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(path, mid, workers) else (mid, high)
    return high


def test_the_budget_bounds_all_shards_together(tmp_path):
    """The smallest step budget that reads the whole index is the same for every pool size, and it is the
    sum over the shards (far above what one shard needs): parallel parts are charged to the one budget."""
    index, _ = write_sharded(tmp_path, fmt="bin", per_shard=20, extra_items=50)
    one = tmp_path / "model-00001-of-00008.bin"
    single = least(one, 1)
    whole = {workers: least(index, workers) for workers in (1, 2, 8)}
    assert whole[1] == whole[2] == whole[8], whole
    assert whole[1] > 6 * single, (whole, single)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_workers_must_be_a_positive_count(tmp_path, bad):
    index, _ = write_sharded(tmp_path, n_shards=2)
    with pytest.raises(ValueError, match="workers"):
        torchckpt.load(index, workers=bad)


def test_inspect_and_scan_of_a_sharded_index_still_work(tmp_path):
    index, full = write_sharded(tmp_path, fmt="bin")
    report = torchckpt.scan(str(index))
    assert report.status == "clean"
    info = torchckpt.inspect(index)
    assert info.to_dict()["format"] == "sharded"
