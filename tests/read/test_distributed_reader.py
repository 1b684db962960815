"""DCP directories written by 2 real ranks: every dtype and shape rebuilt exactly, lists as lists,
``inspect`` with dtypes, bytes and optimizer groups, and hostile chunk layouts refused."""

from __future__ import annotations

import pickle

import pytest
import torch

import torchckpt
from dist_launch import launch


SPECIAL = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1.0]  # bit patterns a value compare would blur
FLOAT8 = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")


def full_tensors() -> dict[str, torch.Tensor]:
    """Every dtype torch.distributed.checkpoint stores, with values that only an exact copy keeps."""
    g = torch.Generator().manual_seed(0)
    out = {
        "bf16": (torch.randn(5, 3, generator=g) * 100).to(torch.bfloat16),
        "bf16_special": torch.tensor(SPECIAL * 2, dtype=torch.bfloat16),
        "fp16": torch.randn(7, generator=g).half(),
        "fp16_special": torch.tensor(SPECIAL * 2, dtype=torch.float16),
        "fp32": torch.randn(4, 6, generator=g),
        "fp32_special": torch.tensor(SPECIAL + [float.fromhex("0x1p-149")] * 2, dtype=torch.float32),  # + subnormal
        "fp64": torch.randn(3, 5, generator=g, dtype=torch.float64),
        "int64": torch.tensor([2**40 + 1, -(2**62) - 3, 7, 2**53 + 1, 0], dtype=torch.int64),
        "int32": torch.tensor([2**31 - 1, -(2**31), 5, 0], dtype=torch.int32),
        "int16": torch.tensor([2**15 - 1, -(2**15), 3, 0], dtype=torch.int16),
        "int8": torch.arange(-5, 6, dtype=torch.int8),
        "uint8": torch.arange(250, 256, dtype=torch.uint8),
        "uint16": torch.tensor([2**16 - 1, 0, 1, 40000], dtype=torch.uint16),
        "uint32": torch.tensor([2**32 - 1, 0, 1, 3_000_000_000], dtype=torch.uint32),
        "uint64": torch.tensor([2**64 - 1, 0, 1, 2**63 + 5], dtype=torch.uint64),
        "bool": torch.tensor([True, False, False, True, True]),
        "complex64": torch.randn(4, generator=g, dtype=torch.complex64),
        "complex128": torch.randn(4, generator=g, dtype=torch.complex128),
        "empty": torch.zeros(0, 3),
    }
    for name in FLOAT8:  # every byte pattern, NaNs included
        out[name] = torch.arange(256, dtype=torch.uint8).view(getattr(torch, name)).reshape(16, 16)
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN equals the same NaN; float8 has no torch.equal)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


def shard_of(full: torch.Tensor, mesh, dim: int):
    """This rank's piece of ``full`` as a DTensor, cut locally (gloo cannot scatter float8 or uint16..64)."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    sizes, offsets = compute_local_shape_and_global_offset(full.shape, mesh, [Shard(dim)])
    local = full[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))].contiguous()
    return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False, shape=full.shape, stride=full.stride())


def save_sharded(rank: int, world: int, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    state = {k: shard_of(v, mesh, 1 if k in ("fp64",) + FLOAT8[:1] else 0) for k, v in full_tensors().items()}
    state["optim"] = {"state": {"w": {"step": torch.tensor(3.0), "exp_avg": shard_of(
        full_tensors()["fp32"], mesh, 0)}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": ["w"]}, {"lr": 0.01, "params": []}]}
    state["pair"] = (1, "two")
    dcp.save(state, checkpoint_id=path)


@pytest.fixture(scope="module")
def two_rank_dcp(tmp_path_factory):
    path = tmp_path_factory.mktemp("dcp") / "ckpt"
    launch(save_sharded, 2, str(path))
    return path


@pytest.mark.slow
def test_every_dtype_of_a_chunked_tensor_is_exact(two_rank_dcp):
    out = torchckpt.load(two_rank_dcp)
    for key, want in full_tensors().items():
        assert same_bits(out[key], want), key
    assert int(out["int64"][0]) == 2**40 + 1
    meta = torchckpt.load(two_rank_dcp / ".metadata")
    assert all(len(meta.state_dict_metadata[k].chunks) == 2 for k in full_tensors() if k != "empty")  # really split


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2, 4])
def test_every_pool_size_rebuilds_the_chunked_tensors(two_rank_dcp, workers):
    """Each rank's data file is one part of the read (``workers=``); the chunks of a tensor come from both
    files and are copied into one tensor by the threads that read them."""
    out = torchckpt.load(two_rank_dcp, workers=workers)
    for key, want in full_tensors().items():
        assert same_bits(out[key], want), key
    assert torch.equal(out["optim"]["state"]["w"]["exp_avg"], full_tensors()["fp32"])
    assert sorted(p.name for p in two_rank_dcp.iterdir() if p.suffix == ".distcp") == ["__0_0.distcp", "__1_0.distcp"]


@pytest.mark.slow
def test_lists_and_tuples_come_back_as_saved(two_rank_dcp):
    out = torchckpt.load(two_rank_dcp)
    groups = out["optim"]["param_groups"]
    assert groups == [{"lr": 0.1, "betas": (0.9, 0.999), "params": ["w"]}, {"lr": 0.01, "params": []}]
    assert out["pair"] == (1, "two")
    assert torch.equal(out["optim"]["state"]["w"]["exp_avg"], full_tensors()["fp32"])


@pytest.mark.slow
def test_inspect_shows_dtypes_bytes_and_optimizer_groups(two_rank_dcp):
    report = torchckpt.inspect(two_rank_dcp)
    by_key = {t.key: t for t in report.tensors}
    for key, want in full_tensors().items():
        assert by_key[key].dtype == str(want.dtype).replace("torch.", ""), key
        assert by_key[key].nbytes == want.numel() * want.element_size(), key
    summary = dict((p, r) for p, _, r in report.values)["optim"]
    assert summary.startswith("2 param group(s), 1 params, lr 0.01, 0.1"), summary


def _rewrite_metadata(path, change) -> None:
    """Edit a real .metadata the way a damaged or hostile file would differ (the test wrote this file)."""
    meta_file = path / ".metadata"
    meta = pickle.loads(meta_file.read_bytes())
    change(meta)
    meta_file.write_bytes(pickle.dumps(meta))


@pytest.mark.slow
@pytest.mark.parametrize("damage, message", [
    ("overlap", "overlap"), ("gap", "cover"), ("outside", "does not fit"), ("dtype", "declares"),
    ("list_gap", "gap in the list"),
])
def test_damaged_chunk_layouts_are_refused(tmp_path, two_rank_dcp, damage, message):
    import shutil

    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    path = tmp_path / "ckpt"
    shutil.copytree(two_rank_dcp, path)

    def change(meta):
        md = meta.state_dict_metadata["fp32"]
        first, second = md.chunks
        if damage == "overlap":  # second chunk moved onto the first, still the right element count
            md.chunks[1] = ChunkStorageMetadata(offsets=torch.Size([1, 0]), sizes=second.sizes)
        elif damage == "gap":
            md.chunks.pop()
        elif damage == "outside":
            md.chunks[1] = ChunkStorageMetadata(offsets=torch.Size([3, 0]), sizes=second.sizes)
        elif damage == "dtype":
            md.properties.dtype = torch.float16
        else:
            meta.planner_data["optim.param_groups.1.lr"] = ("optim", "param_groups", 3, "lr")

    _rewrite_metadata(path, change)
    for workers in (1, 2):
        with pytest.raises(torchckpt.CorruptCheckpointError, match=message):
            torchckpt.load(path, workers=workers)
