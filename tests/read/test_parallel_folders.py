"""Folders of many parts other than an index (torch.distributed.checkpoint directories: their ``__R_N.distcp``
data files) are read by the bounded pool of ``read_parts``: the same values, trace and errors as a read one
file after another, and the one budget bounds the whole read."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import torchckpt
from torchckpt.errors import CheckpointError
from torchckpt.read.opener import open_checkpoint

from test_parallel_shards import fits, least


def state() -> dict:
    g = torch.Generator().manual_seed(1)
    layers = {f"layer{i}": {"w": torch.randn(24, 8, generator=g), "b": torch.randn(8, generator=g).half(),
                            "n": torch.arange(i, i + 5, dtype=torch.int64)} for i in range(10)}
    return {"model": layers, "step": 7, "note": "x" * 300,
            "optim": {"param_groups": [{"lr": 0.1, "params": ["a"]}], "state": {"a": {"m": torch.ones(3, 3)}}},
            "empty": torch.zeros(0, 4), "flags": torch.tensor([True, False])}


def save_dcp(path, threads: int = 4) -> None:
    """One process, ``threads`` writer threads: DCP writes one data file per thread (``__0_0.distcp`` ...)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state(), storage_writer=dcp.FileSystemWriter(str(path), thread_count=threads))


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "ckpt"
    save_dcp(path)
    files = sorted(n for n in os.listdir(path) if n.endswith(".distcp"))
    assert len(files) == 4, files  # really several parts
    return path


def same(a, b, where="") -> None:
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("workers", [1, 2, 4, 16, None])
def test_every_pool_size_reads_the_saved_state(folder, workers):
    got = torchckpt.load(folder, workers=workers)
    want = state()
    for key in want:
        same(got[key], want[key], key)


def test_the_trace_is_the_one_a_sequential_read_makes(folder):
    traces = {}
    for workers in (1, 4):
        with open_checkpoint(folder, "build", workers=workers) as ckpt:
            t = ckpt.trace
            traces[workers] = ([(s.source, s.member, s.offset, s.complete) for s in t.streams], list(t.ranges),
                               [c.message for c in t.checks])
    assert traces[1] == traces[4]
    files = [os.path.basename(r[0]) for r in traces[1][1] if r[0].endswith(".distcp")]  # not the items' members
    assert sorted(set(files)) == [f"__0_{i}.distcp" for i in range(4)]
    runs = [f for i, f in enumerate(files) if i == 0 or files[i - 1] != f]
    assert len(runs) == 4  # data file after data file: each file's items together


def _damage_one_item(folder, data_file: str) -> str:
    """Overwrite the bytes of one item stored in ``data_file`` with garbage of the same length."""
    meta = torchckpt.load(folder / ".metadata")
    for index, info in meta.storage_data.items():
        info = info.stub_attributes()
        if info["relative_path"] == data_file:
            blob = bytearray((folder / data_file).read_bytes())
            blob[info["offset"]:info["offset"] + info["length"]] = b"\xff" * info["length"]
            (folder / data_file).write_bytes(bytes(blob))
            return str(index.stub_attributes()["fqn"])
    raise AssertionError(f"no item in {data_file}")


@pytest.mark.parametrize("workers", [1, 4])
def test_a_damaged_data_file_is_a_typed_error_naming_it(folder, workers):
    _damage_one_item(folder, "__0_2.distcp")
    with pytest.raises(CheckpointError) as info:
        torchckpt.load(folder, workers=workers)
    assert "__0_2.distcp" in str(info.value)
    assert "__0_0.distcp" not in str(info.value)


@pytest.mark.parametrize("workers", [1, 4])
def test_a_missing_data_file_is_named_before_any_read(folder, workers):
    os.remove(folder / "__0_3.distcp")
    with pytest.raises(CheckpointError, match="__0_3.distcp"):
        torchckpt.load(folder, workers=workers)


def test_the_budget_bounds_all_data_files_together(folder):
    """The smallest step budget that reads the directory is the same for every pool size: the steps of the
    items read on other threads are charged to the one budget."""

    whole = {workers: least(folder, workers) for workers in (1, 2, 4)}
    assert whole[1] == whole[2] == whole[4], whole
    assert not fits(folder, whole[1] - 1, 4)


def test_scan_and_inspect_of_a_multi_file_directory(folder):
    assert torchckpt.scan(folder, recursive=True).status == "clean"
    report = torchckpt.inspect(folder)
    assert report.format == "dcp" and "model.layer3.w" in {t.key for t in report.tensors}


@pytest.mark.parametrize("workers", [1, 2])
def test_after_a_failed_part_the_parts_not_started_never_run(workers):
    """read_parts itself: the first part fails at once while the others take a while; the error comes out
    as raised, and of 40 parts only those already running when it came were started."""
    import threading
    import time

    from torchckpt.errors import CorruptCheckpointError
    from torchckpt.read.formats.base import ReadOptions
    from torchckpt.read.formats.parallel import read_parts

    started, lock = [], threading.Lock()

    def read_one(part, opts):
        with lock:
            started.append(part)
        if part == 0:
            raise CorruptCheckpointError("part 0 is damaged", path="part-0.bin")
        time.sleep(0.05)
        return part

    with pytest.raises(CorruptCheckpointError, match="part 0 is damaged"):
        list(read_parts(ReadOptions(workers=workers), list(range(40)), read_one))
    settled = list(started)
    time.sleep(0.2)
    assert started == settled  # nothing starts after the error came out
    assert len(started) <= (1 if workers == 1 else 2 * workers), started
