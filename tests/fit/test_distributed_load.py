"""``load_into`` a FSDP2 model (DTensor parameters) from single files, on 2 real ranks: each rank
takes its own slice of every tensor (uneven shards included), casts are reported."""

from __future__ import annotations

import pytest
import torch

import torchckpt
from dist_launch import launch
from test_distributed import shard, tiny_model


def source_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {k: torch.randn(v.shape, generator=g) for k, v in tiny_model().state_dict().items()}


def load_sharded(rank: int, world: int, path: str, want_cast: bool) -> None:
    from torch.distributed.tensor import DTensor

    model = shard(tiny_model())
    report = torchckpt.load_into(model, path)
    assert report.ok and report.applied
    assert bool(report.cast) == want_cast
    assert all(isinstance(p, DTensor) for p in model.parameters())
    want = source_state()
    for name, p in model.named_parameters():
        expected = want[name].to(p.dtype) if not want_cast else want[name].to(torch.bfloat16).to(p.dtype)
        assert torch.equal(p.full_tensor(), expected), name
    # [5, 16] over 2 ranks: rank 0 holds 3 rows, rank 1 holds 2
    assert model[2].weight.to_local().shape[0] == (3 if rank == 0 else 2)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pt", "safetensors", "bf16.pt", "legacy.pt"])
def test_load_into_a_fsdp2_model_from_one_file(tmp_path, fmt):
    state = source_state()
    path = tmp_path / f"weights.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    elif fmt == "bf16.pt":
        torch.save({"model": {k: v.to(torch.bfloat16) for k, v in state.items()}, "epoch": 3}, path)
    elif fmt == "legacy.pt":  # not mappable: each rank reads only its slice's bytes from the file
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:  # mapped: each rank touches only its slice's pages
        torch.save(state, path)
    launch(load_sharded, 2, str(path), fmt == "bf16.pt")


def wide_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(16)])  # 64 MiB


def peak_while_loading(rank: int, world: int, path: str) -> float:
    """MiB this rank's peak RSS rose by during load_into (the model's own memory allocated before)."""
    import gc

    from torch.distributed.fsdp import fully_shard

    model = wide_model()
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:  # peak := current RSS
        fh.write("5")

    def status(key: str) -> float:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(key)) / 1024

    before = status("VmRSS")
    torchckpt.load_into(model, path)
    peak = status("VmHWM") - before
    assert torch.equal(model[3].weight.full_tensor(), torch.load(path, weights_only=True)["3.weight"])
    return peak


@pytest.mark.slow
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_each_rank_reads_about_its_slice_not_the_whole_model(tmp_path, legacy):
    """64 MiB of weights into FSDP2 on 2 ranks: no rank's memory grows by even its own half (32 MiB)."""
    path = tmp_path / "wide.pt"
    torch.save(wide_model().state_dict(), path, _use_new_zipfile_serialization=not legacy)
    peaks = launch(peak_while_loading, 2, str(path), timeout=120)
    assert all(peak < 32 for peak in peaks.values()), peaks  # the whole model is 64 MiB; measured 12-18
