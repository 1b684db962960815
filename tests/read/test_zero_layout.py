"""ZeRO step folders laid out as DeepSpeed lays them out (written here with torch.save, any number of ranks, in
milliseconds; tests/read/test_deepspeed.py checks the same reader against folders DeepSpeed itself wrote and
its own zero_to_fp32): the rank files' fp32 slices are read into the full tensors rank by rank on the pool
(``workers=``), with every pool size giving the parameters the folder was made from, and a folder whose
partitions do not fit together is a typed error naming the file or folder, whatever the pool size.

DeepSpeed's layout (deepspeed/runtime/zero/stage_1_and_2.py, stage3.py, utils/zero_to_fp32.py):
* stages 1/2: the trainable parameters of each group flattened into one vector, padded to a multiple of
  2 * world, cut into ``world`` equal slices; the file of the last rank holds its slice without the padding.
* stage 3: each parameter cut on its own into ``ceil(numel / world)`` elements per rank (the last padded);
  a rank's group slice is its pieces of the group's parameters one after another.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict

import pytest
import torch

import torchckpt
from torchckpt.errors import CheckpointError, CorruptCheckpointError

WORKERS = (1, 2, 4, None)


def model_params() -> list["OrderedDict[str, torch.Tensor]"]:
    """Two parameter groups of odd sizes (so slices split parameters and the padding is not empty)."""
    g = torch.Generator().manual_seed(3)
    first = OrderedDict((f"layer{i}.weight", torch.randn(7 + i, 5, generator=g)) for i in range(6))
    second = OrderedDict((f"layer{i}.bias", torch.randn(7 + i, generator=g)) for i in range(6))
    return [first, second]


def write_zero(step, groups, stage: int, world: int) -> None:
    """A step folder of ``world`` ranks holding ``groups`` (name -> fp32 tensor, per group) as DeepSpeed does."""
    os.makedirs(step, exist_ok=True)
    slices: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for params in groups:
        if stage == 3:
            for r in range(world):
                pieces = []
                for t in params.values():
                    per = math.ceil(t.numel() / world)
                    flat = torch.cat([t.reshape(-1), torch.zeros(per * world - t.numel())])
                    pieces.append(flat[r * per:(r + 1) * per])
                slices[r].append(torch.cat(pieces).clone())
        else:
            flat = torch.cat([t.reshape(-1) for t in params.values()])
            align = 2 * world
            padded = torch.cat([flat, torch.zeros(-flat.numel() % align)])
            per = padded.numel() // world
            for r in range(world):
                end = min((r + 1) * per, flat.numel())
                slices[r].append(flat[r * per:end].clone())
    shapes = [OrderedDict((n, torch.Size(t.shape)) for n, t in params.items()) for params in groups]
    module = OrderedDict((n, t.clone() if stage < 3 else torch.empty(0)) for params in groups for n, t in params.items())
    module["scale"] = torch.linspace(0, 1, 5)
    states = {"module": module, "buffer_names": ["scale"], "param_shapes": shapes, "frozen_param_shapes": {},
              "shared_params": {}, "global_steps": 5, "ds_version": "0.19.8",
              "ds_config": {"zero_optimization": {"stage": stage}}}
    if stage == 3:
        for r in range(world):
            torch.save(dict(states, frozen_param_fragments={}), os.path.join(step, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"))
    else:
        torch.save(states, os.path.join(step, "mp_rank_00_model_states.pt"))
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    for r in range(world):
        base = {"state": {g: {"exp_avg": torch.zeros_like(s), "exp_avg_sq": torch.zeros_like(s), "step": torch.tensor(5.0)}
                          for g, s in enumerate(slices[r])}, "param_groups": [{"lr": 0.1}, {"lr": 0.2}]}
        optim = {"zero_stage": stage, "partition_count": [world, world], key: slices[r]}
        optim["optimizer_state_dict" if stage == 3 else "base_optimizer_state"] = base
        torch.save({"optimizer_state_dict": optim, "ds_config": {}},
                   os.path.join(step, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))


def optim_file(step, rank: int) -> str:
    return os.path.join(step, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")


def rewrite_slices(step, rank: int, change) -> None:
    """Rank ``rank``'s optimizer file with ``change(slices)`` applied to its fp32 slices (a list)."""
    saved = torch.load(optim_file(step, rank), weights_only=False)
    optim = saved["optimizer_state_dict"]
    key = "fp32_flat_groups" if "fp32_flat_groups" in optim else "single_partition_of_fp32_groups"
    optim[key] = change(list(optim[key]))
    torch.save(saved, optim_file(step, rank))


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("world", [1, 3, 8])
def test_every_pool_size_gives_the_parameters(tmp_path, stage: int, world: int) -> None:
    groups = model_params()
    write_zero(tmp_path / "step", groups, stage, world)
    for workers in WORKERS:
        got = torchckpt.load(str(tmp_path / "step"), workers=workers)
        assert list(got) == ["scale"] + [n for params in groups for n in params], workers
        for params in groups:
            for name, want in params.items():
                assert got[name].dtype == torch.float32 and torch.equal(got[name], want), (workers, name)
        assert torch.equal(got["scale"], torch.linspace(0, 1, 5))


@pytest.mark.parametrize("stage", [2, 3])
def test_slices_not_laid_out_in_the_file_are_copied(tmp_path, stage: int) -> None:
    """A slice that is a strided view (or any tensor that is not one run of its file) is copied, not pread."""
    groups = model_params()
    step = tmp_path / "step"
    write_zero(step, groups, stage, 4)
    rewrite_slices(step, 2, lambda s: [torch.stack([t, torch.zeros_like(t)], 1)[:, 0] for t in s])
    assert not torch.load(optim_file(step, 2))["optimizer_state_dict"][
        "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"][0].is_contiguous()
    for workers in (1, 2):
        got = torchckpt.load(str(step), workers=workers)
        for params in groups:
            for name, want in params.items():
                assert torch.equal(got[name], want), (workers, name)


def assert_refused(step, match: str, names: str) -> None:
    """The same typed error for every pool size, naming ``names`` (a file or the folder)."""
    messages = set()
    for workers in WORKERS:
        with pytest.raises(CorruptCheckpointError, match=match) as info:
            torchckpt.load(str(step), workers=workers)
        assert names in str(info.value), str(info.value)
        messages.add(str(info.value))
    assert len(messages) == 1, messages


def test_stage2_slices_that_do_not_add_up(tmp_path) -> None:
    step = tmp_path / "step"
    write_zero(step, model_params(), 2, 4)
    rewrite_slices(step, 1, lambda s: [torch.cat([s[0], s[0][:9]]), s[1]])  # 9 elements too many, past the padding
    assert_refused(step, "group 0: its parameters take 285 elements but the 4 partitions hold 294", str(step))


def test_stage2_slices_too_short_for_the_parameters(tmp_path) -> None:
    step = tmp_path / "step"
    write_zero(step, model_params(), 2, 4)
    rewrite_slices(step, 3, lambda s: [s[0][:2], s[1]])
    assert_refused(step, "fewer than", str(step))


def test_stage3_ranks_of_different_sizes_name_the_file(tmp_path) -> None:
    step = tmp_path / "step"
    write_zero(step, model_params(), 3, 4)
    rewrite_slices(step, 2, lambda s: [s[0][:-1], s[1]])
    assert_refused(step, "differ in size between ranks: rank 2", "zero_pp_rank_2_mp_rank_00_optim_states.pt")


@pytest.mark.parametrize("stage", [2, 3])
def test_a_slice_of_another_dtype_names_the_file(tmp_path, stage: int) -> None:
    step = tmp_path / "step"
    write_zero(step, model_params(), stage, 4)
    rewrite_slices(step, 1, lambda s: [s[0].double(), s[1]])
    assert_refused(step, "float64", "zero_pp_rank_1_mp_rank_00_optim_states.pt")


def test_missing_and_extra_ranks(tmp_path) -> None:
    step = tmp_path / "step"
    write_zero(step, model_params(), 3, 4)
    os.rename(optim_file(step, 1), optim_file(step, 7))
    assert_refused(step, r"ranks \[1\] are missing", str(step))
    os.rename(optim_file(step, 7), optim_file(step, 1))
    os.unlink(optim_file(step, 3))
    assert_refused(step, "4 model-state files but 3 optimizer partitions", str(step))


def test_a_slice_that_is_not_flat(tmp_path) -> None:
    step = tmp_path / "step"
    write_zero(step, model_params(), 2, 2)
    rewrite_slices(step, 0, lambda s: [s[0].reshape(1, -1), s[1]])
    assert_refused(step, "not a flat tensor", "zero_pp_rank_0_mp_rank_00_optim_states.pt")


def test_an_error_in_the_copies_stops_the_pool(tmp_path) -> None:
    """A rank file that shrinks after its parse (here: its fp32 bytes cut off while the read is open) is a typed
    error naming it, for every pool size; nothing is left running."""
    import threading

    from torchckpt.read.formats import deepspeed

    step = tmp_path / "step"
    write_zero(step, model_params(), 3, 4)
    original = deepspeed._Ranks.read

    def read_then_truncate(self, name):
        tree = original(self, name)
        if name.startswith("zero_pp_rank_2_") and "optim" in name:
            os.truncate(os.path.join(self.step_dir, name), 600)  # the slices' bytes are gone; the parse was done
        return tree

    before = threading.active_count()
    for workers in (1, 2, 4):
        write_zero(step, model_params(), 3, 4)
        deepspeed._Ranks.read = read_then_truncate
        try:
            with pytest.raises(CheckpointError) as info:
                torchckpt.load(str(step), workers=workers)
        finally:
            deepspeed._Ranks.read = original
        assert "zero_pp_rank_2_mp_rank_00_optim_states.pt" in str(info.value), str(info.value)
        assert threading.active_count() == before


def test_a_large_rank_0_beside_many_tiny_rank_files_allocates_no_more_than_the_files_hold(tmp_path):
    """The early plan guesses every rank's slices have rank 0's sizes: 4000 rank files, rank 0 holding 16 MiB
    and the others nothing, guessed 64 GB of parameters (a raw allocator RuntimeError, or that much memory
    promised). The guess is dropped when it exceeds the bytes of the files; the real plan names the problem."""
    world, per = 4000, 4 << 20
    step = tmp_path / "global_step1"
    step.mkdir()
    shapes = [OrderedDict([("w", torch.Size([per * world]))])]
    torch.save({"module": OrderedDict(w=torch.empty(0)), "buffer_names": [], "param_shapes": shapes,
                "frozen_param_shapes": {}, "shared_params": {}, "global_steps": 1, "ds_version": "0.19.8",
                "ds_config": {"zero_optimization": {"stage": 2}}}, step / "mp_rank_00_model_states.pt")
    for r in range(world):
        part = torch.zeros(per if r == 0 else 0)
        optim = {"zero_stage": 2, "partition_count": [world], "single_partition_of_fp32_groups": [part],
                 "base_optimizer_state": {"state": {}, "param_groups": [{"lr": 0.1}]}}
        torch.save({"optimizer_state_dict": optim, "ds_config": {}}, optim_file(step, r))
    with pytest.raises(CorruptCheckpointError, match="partitions hold 4194304 elements, fewer than"):
        torchckpt.load(str(step), workers=2)  # (was: the allocator's "can't allocate 67108864000 bytes")
