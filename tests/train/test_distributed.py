"""Sharded training checkpoints on real processes (gloo, CPU): FSDP2 save on 2 ranks, resume on 1, 2
and 4 (and a 2x2 HSDP mesh), bit-exact continuation, DDP written once, and a rank SIGKILLed mid-save."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

import torchckpt
from dist_launch import launch
from torchckpt.train.checkpointer import SkippedCheckpointWarning


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))


def shard(model: torch.nn.Module, mesh_shape: tuple[int, ...] | None = None) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh

    world = torch.distributed.get_world_size()
    shape = mesh_shape or (world,)
    names = ("replicate", "shard") if len(shape) == 2 else ("shard",)
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def train_steps(model, opt, sched, n: int) -> None:
    for _ in range(n):
        x = torch.randn(4, 8)  # per-rank data from the per-rank RNG
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        sched.step()


def make_optim(model):
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)


def full_state(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    # cloned: some values (the optimizer's "step") are the live tensors, which the next step changes
    return torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, {"model": msd, "optimizer": osd})


def assert_equal_tree(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, sorted(map(str, a)), sorted(map(str, b)))
        for k in a:
            assert_equal_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# --------------------------------------------------------------------------- the ranks' programs
def fsdp_save(rank: int, world: int, directory: str, async_save: bool, keep_last: int = 2) -> None:
    torch.manual_seed(100 + rank)
    model = shard(tiny_model())
    opt, sched = make_optim(model)
    ckpt = torchckpt.Checkpointer(directory, keep_last=keep_last, async_save=async_save)
    train_steps(model, opt, sched, 2)
    ckpt.save(1, model=model, optimizer=opt, scheduler=sched, epoch=0, metrics={"loss": 1.5})
    train_steps(model, opt, sched, 1)
    ckpt.save(2, model=model, optimizer=opt, scheduler=sched, epoch=1, metrics={"loss": 1.25})
    ckpt.wait()
    ref = full_state(model, opt)
    train_steps(model, opt, sched, 1)  # the continuation a resumed run must reproduce
    after = full_state(model, opt)
    ckpt.close()
    if rank == 0:
        torch.save({"at_save": ref, "after_one_more": after, "lr": sched.get_last_lr()},
                   os.path.join(directory, "reference.pt"))


def fsdp_resume(rank: int, world: int, directory: str, mesh_shape: tuple | None, check_continuation: bool) -> None:
    torch.manual_seed(999)  # different from the saved run: resume must restore the RNG
    model = shard(tiny_model(), mesh_shape)
    opt, sched = make_optim(model)
    state = torchckpt.Checkpointer(directory).resume(model=model, optimizer=opt, scheduler=sched)
    ref = torch.load(os.path.join(directory, "reference.pt"), weights_only=True)
    assert state.step == 2 and state.epoch == 1 and state.metrics == {"loss": 1.25}
    assert_equal_tree(ref["at_save"], full_state(model, opt))
    if check_continuation:
        train_steps(model, opt, sched, 1)
        assert_equal_tree(ref["after_one_more"], full_state(model, opt))
        assert sched.get_last_lr() == ref["lr"]


@pytest.fixture(scope="module")
def fsdp_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fsdp")
    launch(fsdp_save, 2, str(directory), False)
    return directory


@pytest.mark.slow
def test_fsdp2_save_on_2_ranks_writes_shards_and_commits(fsdp_checkpoint):
    ckpt = torchckpt.Checkpointer(fsdp_checkpoint)
    assert [c.step for c in ckpt.checkpoints()] == [1, 2]
    latest = ckpt.latest()
    assert latest.path.endswith("ckpt-0000000002.dcp") and latest.metrics == {"loss": 1.25}
    marker = json.loads((fsdp_checkpoint / "ckpt-0000000002.dcp.meta.json").read_text())
    assert marker["world_size"] == 2 and set(marker["files"]) == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    # each rank wrote only its shard: the reader assembles the full weight from two chunks
    ref = torch.load(fsdp_checkpoint / "reference.pt", weights_only=True)["at_save"]
    full = torchckpt.load(latest)
    assert_equal_tree(ref["model"], full["model"])
    meta = torchckpt.load(fsdp_checkpoint / "ckpt-0000000002.dcp" / ".metadata")
    chunks = meta.state_dict_metadata["model.0.weight"].chunks
    assert len(chunks) == 2 and [list(c.sizes) for c in chunks] == [[8, 8], [8, 8]]


@pytest.mark.slow
@pytest.mark.parametrize("world, mesh, continuation", [(2, None, True), (4, None, False), (4, (2, 2), False)],
                         ids=["2-ranks-bit-exact", "4-ranks", "4-ranks-hsdp-2x2"])
def test_fsdp2_resume_on_other_world_sizes(fsdp_checkpoint, world, mesh, continuation):
    launch(fsdp_resume, world, str(fsdp_checkpoint), mesh, continuation)


@pytest.mark.slow
def test_resume_in_one_plain_process(fsdp_checkpoint):
    """Saved by 2 FSDP2 ranks, resumed by a script with no process group and a plain model."""
    model = tiny_model()
    opt, sched = make_optim(model)
    state = torchckpt.Checkpointer(fsdp_checkpoint).resume(model=model, optimizer=opt, scheduler=sched)
    ref = torch.load(fsdp_checkpoint / "reference.pt", weights_only=True)["at_save"]
    assert_equal_tree(ref, full_state(model, opt))
    assert any("saved on 2 rank(s), resumed on 1" in n for n in state.notes)


@pytest.mark.slow
def test_resume_from_one_sharded_checkpoint_directory(tmp_path, fsdp_checkpoint):
    """torchckpt.resume(".../ckpt-<step>.dcp") restores that checkpoint; an uncommitted one is refused."""
    import shutil

    model = tiny_model()
    opt, sched = make_optim(model)
    state = torchckpt.resume(fsdp_checkpoint / "ckpt-0000000002.dcp", model=model, optimizer=opt, scheduler=sched)
    assert state.step == 2
    ref = torch.load(fsdp_checkpoint / "reference.pt", weights_only=True)["at_save"]
    assert_equal_tree(ref, full_state(model, opt))
    shutil.copytree(fsdp_checkpoint / "ckpt-0000000002.dcp", tmp_path / "ckpt-0000000002.dcp")  # no marker
    with pytest.raises(torchckpt.CheckpointNotFoundError, match="never committed"):
        torchckpt.resume(tmp_path / "ckpt-0000000002.dcp", model=model, optimizer=opt, scheduler=sched)


@pytest.mark.slow
def test_async_save_commits_in_the_background_and_retention_removes_whole_directories(tmp_path):
    launch(fsdp_save, 2, str(tmp_path), True, 1)
    ckpt = torchckpt.Checkpointer(tmp_path)
    assert [c.step for c in ckpt.checkpoints()] == [2]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt-")) == [
        "ckpt-0000000002.dcp", "ckpt-0000000002.dcp.meta.json"]
    ref = torch.load(tmp_path / "reference.pt", weights_only=True)["at_save"]
    assert_equal_tree(ref["model"], torchckpt.load(ckpt.latest())["model"])


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_skipped(tmp_path, fsdp_checkpoint):
    import shutil

    shutil.copytree(fsdp_checkpoint, tmp_path / "run")
    data = tmp_path / "run" / "ckpt-0000000002.dcp" / "__1_0.distcp"
    data.write_bytes(data.read_bytes()[:-100])  # truncated after the commit
    model = tiny_model()
    opt, sched = make_optim(model)
    ckpt = torchckpt.Checkpointer(tmp_path / "run")
    assert [c.step for c in ckpt.checkpoints()] == [1]  # a damaged one is never listed (latest, retention)
    damage = r"ckpt-0000000002.dcp: __1_0.distcp is \d+ bytes but \d+ were written"
    with pytest.warns(SkippedCheckpointWarning, match=damage):
        state = ckpt.resume(model=model, optimizer=opt, scheduler=sched)
    assert state.step == 1 and "resumed from ckpt-0000000001.dcp" in state.notes


# --------------------------------------------------------------------------- DDP: written once
def ddp_save(rank: int, world: int, directory: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(tiny_model())
    opt, sched = make_optim(model)
    torch.manual_seed(rank)
    train_steps(model, opt, sched, 1)
    torchckpt.Checkpointer(directory).save(3, model=model, optimizer=opt, scheduler=sched)


@pytest.mark.slow
def test_ddp_replicated_state_is_written_once(tmp_path):
    launch(ddp_save, 2, str(tmp_path))
    latest = torchckpt.Checkpointer(tmp_path).latest()
    meta = torchckpt.load(os.path.join(latest.path, ".metadata"))
    fqns = [k.stub_attributes()["fqn"] for k in meta.storage_data]
    model_keys = [f for f in fqns if f.startswith("model.")]
    assert sorted(model_keys) == sorted(f"model.{k}" for k in tiny_model().state_dict())  # once, no "module."
    assert len(fqns) == len(set(fqns))
    # every byte in the data files belongs to exactly one metadata entry: no rank wrote a second copy
    data = sum(os.path.getsize(os.path.join(latest.path, f)) for f in os.listdir(latest.path) if f.endswith(".distcp"))
    assert data == sum(v.stub_attributes()["length"] for v in meta.storage_data.values())
    where = {k.stub_attributes()["fqn"]: v.stub_attributes()["relative_path"] for k, v in meta.storage_data.items()}
    assert {where[k] for k in model_keys} <= {"__0_0.distcp", "__1_0.distcp"}
    out = torchckpt.load(latest)
    assert set(out["ranks"]) == {"0", "1"}  # each rank's own RNG
    assert not torch.equal(out["ranks"]["0"]["rng"]["torch"], out["ranks"]["1"]["rng"]["torch"])


# --------------------------------------------------------------------------- a rank dies mid-save
def save_then_die(rank: int, world: int, directory: str) -> None:
    torch.manual_seed(100 + rank)
    model = shard(tiny_model())
    opt, sched = make_optim(model)
    ckpt = torchckpt.Checkpointer(directory, keep_last=1)
    train_steps(model, opt, sched, 1)
    ckpt.save(1, model=model, optimizer=opt, scheduler=sched)
    ref = full_state(model, opt)  # a collective: every rank takes part
    if rank == 0:
        torch.save(ref, os.path.join(directory, "reference.pt"))
    train_steps(model, opt, sched, 1)
    if rank == 1:  # die by SIGKILL after writing part of this rank's data for step 2
        import torch.distributed.checkpoint.filesystem as fs

        real, written = fs._write_item, []

        def write_then_die(*args, **kwargs):
            result = real(*args, **kwargs)
            written.append(result)
            if len(written) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        fs._write_item = write_then_die
    ckpt.save(2, model=model, optimizer=opt, scheduler=sched)


def resume_after_crash(rank: int, world: int, directory: str) -> None:
    model = shard(tiny_model())
    opt, sched = make_optim(model)
    state = torchckpt.Checkpointer(directory).resume(model=model, optimizer=opt, scheduler=sched)
    assert state.step == 1
    assert_equal_tree(torch.load(os.path.join(directory, "reference.pt"), weights_only=True), full_state(model, opt))


@pytest.mark.slow
def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint_latest(tmp_path):
    outcome = launch(save_then_die, 2, str(tmp_path), timeout=60, pg_timeout=10, expect_ok=False)
    assert outcome[1] == ("signal", signal.SIGKILL)
    # the survivor raises (never a success, never a hang until the launcher's timeout)
    assert outcome[0][0] == "error", outcome[0]
    assert "CheckpointWriteError" in outcome[0][1] and "distributed save of step 2 failed" in outcome[0][1]
    assert (tmp_path / "ckpt-0000000002.dcp").is_dir()  # half written ...
    assert not (tmp_path / "ckpt-0000000002.dcp.meta.json").exists()  # ... and never committed
    ckpt = torchckpt.Checkpointer(tmp_path)  # the next run (its rank 0) reclaims the leftovers
    assert [c.step for c in ckpt.checkpoints()] == [1]
    assert ckpt.reclaimed == ["ckpt-0000000002.dcp"] and not (tmp_path / "ckpt-0000000002.dcp").exists()
    launch(resume_after_crash, 2, str(tmp_path))
