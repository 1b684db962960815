"""Failures on real processes (gloo, CPU): a rank that cannot write fails the save on every rank (never a
success, never a hang) and training goes on; a rank killed mid-save leaves the previous checkpoint latest
and its leftovers are reclaimed; resuming on other world sizes hands each rank the right per-rank state;
a checkpoint that does not fit the model raises on every rank."""

from __future__ import annotations

import os
import resource
import signal
import time

import pytest
import torch

import torchckpt
from dist_launch import launch
from test_distributed import assert_equal_tree, full_state, make_optim, shard, tiny_model, train_steps
from torchckpt.errors import CheckpointWriteError, ResumeError


# --------------------------------------------------------------------------- one rank cannot write
def save_with_a_failing_rank(rank: int, world: int, directory: str, async_save: bool) -> dict:
    torch.manual_seed(100 + rank)
    model = shard(tiny_model())
    opt, sched = make_optim(model)
    ckpt = torchckpt.Checkpointer(directory, keep_last=5, async_save=async_save)
    train_steps(model, opt, sched, 1)
    ckpt.save(1, model=model, optimizer=opt, scheduler=sched)
    ckpt.wait()
    train_steps(model, opt, sched, 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if rank == 1:  # a full disk on this rank only: its writes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
    error, returned = None, None
    started = time.monotonic()
    try:
        returned = ckpt.save(2, model=model, optimizer=opt, scheduler=sched)
        ckpt.wait()  # an async save reports its failure here
    except CheckpointWriteError as exc:
        error = str(exc)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    failed_in = time.monotonic() - started
    latest_after_failure = ckpt.latest().step
    train_steps(model, opt, sched, 1)
    ckpt.save(3, model=model, optimizer=opt, scheduler=sched)  # the run goes on: the group is still usable
    ckpt.wait()
    ref = full_state(model, opt)
    ckpt.close()
    if rank == 0:
        torch.save(ref, os.path.join(directory, "reference.pt"))
    return {"error": error, "returned": returned, "latest": latest_after_failure, "seconds": failed_in}


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_rank_that_cannot_write_fails_the_save_on_every_rank_and_training_goes_on(tmp_path, async_save):
    outcome = launch(save_with_a_failing_rank, 2, str(tmp_path), async_save, timeout=90, pg_timeout=20)
    for rank in (0, 1):
        error = outcome[rank]["error"]
        assert error is not None, f"rank {rank} reported the failed save as a success"
        assert "distributed save of step 2 failed" in error and "ckpt-0000000002.dcp" in error
        assert "rank 1: OSError: [Errno 27] File too large" in error  # every rank names the rank that failed
        assert outcome[rank]["latest"] == 1  # the failed step never became the latest
        assert outcome[rank]["seconds"] < 15  # raised promptly, not after a process-group timeout
    assert not (tmp_path / "ckpt-0000000002.dcp.meta.json").exists()
    ckpt = torchckpt.Checkpointer(tmp_path)  # a new run reclaims the uncommitted directory
    assert [c.step for c in ckpt.checkpoints()] == [1, 3]
    assert "ckpt-0000000002.dcp" in ckpt.reclaimed and not (tmp_path / "ckpt-0000000002.dcp").exists()
    ref = torch.load(tmp_path / "reference.pt", weights_only=True)
    assert_equal_tree(ref["model"], torchckpt.load(ckpt.latest())["model"])


# --------------------------------------------------------------------------- per-rank state, other world sizes
class Position:
    """A stateful object whose state differs per rank (like a sampler's position in its shard)."""

    def __init__(self, rank: int = -1, seen: int = 0) -> None:
        self.rank, self.seen = rank, seen

    def state_dict(self) -> dict:
        return {"rank": self.rank, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.rank, self.seen = int(state["rank"]), int(state["seen"])


def save_per_rank_state(rank: int, world: int, directory: str) -> None:
    torch.manual_seed(100 + rank)
    model = shard(tiny_model())
    opt, sched = make_optim(model)
    train_steps(model, opt, sched, 1)
    with torchckpt.Checkpointer(directory) as ckpt:
        ckpt.save(5, model=model, optimizer=opt, scheduler=sched, stateful={"pos": Position(rank, 10 * (rank + 1))})
    return torch.randn(3).tolist()  # what this rank's RNG gives next: a resumed rank must give the same


def resume_per_rank_state(rank: int, world: int, directory: str) -> dict:
    torch.manual_seed(999)
    model = shard(tiny_model())
    opt, sched = make_optim(model)
    pos = Position()
    state = torchckpt.Checkpointer(directory).resume(model=model, optimizer=opt, scheduler=sched,
                                                     stateful={"pos": pos})
    return {"pos": (pos.rank, pos.seen), "notes": state.notes, "next": torch.randn(3).tolist()}


@pytest.mark.slow
def test_per_rank_state_resumes_on_the_same_and_on_other_world_sizes(tmp_path):
    saved = launch(save_per_rank_state, 2, str(tmp_path))
    same = launch(resume_per_rank_state, 2, str(tmp_path))
    for rank in (0, 1):  # same world size: each rank its own sampler position and RNG stream
        assert same[rank]["pos"] == (rank, 10 * (rank + 1))
        assert same[rank]["next"] == saved[rank]
    more = launch(resume_per_rank_state, 4, str(tmp_path))
    assert [more[r]["pos"] for r in range(4)] == [(0, 10), (1, 20), (0, 10), (0, 10)]
    assert more[0]["next"] == saved[0] and more[1]["next"] == saved[1]
    for rank in (2, 3):  # ranks that did not exist when saving: told so, never silently
        notes = " ".join(more[rank]["notes"])
        assert "saved on 2 rank(s), resumed on 4" in notes
        assert f"rank {rank} did not exist when saving: its stateful objects took rank 0's state" in notes
        assert f"no RNG state for rank {rank}" in notes
    one = Position()
    model = tiny_model()
    opt, sched = make_optim(model)
    state = torchckpt.Checkpointer(tmp_path).resume(model=model, optimizer=opt, scheduler=sched,
                                                    stateful={"pos": one})
    assert (one.rank, one.seen) == (0, 10) and "saved on 2 rank(s), resumed on 1" in " ".join(state.notes)


# --------------------------------------------------------------------------- a checkpoint that does not fit
def resume_into_a_wider_model(rank: int, world: int, directory: str) -> str:
    torch.manual_seed(0)
    model = shard(torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)))
    opt, sched = make_optim(model)
    with pytest.raises(ResumeError) as info:
        torchckpt.Checkpointer(directory).resume(model=model, optimizer=opt, scheduler=sched)
    return str(info.value)


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_raises_on_every_rank(tmp_path):
    launch(save_per_rank_state, 2, str(tmp_path))
    outcome = launch(resume_into_a_wider_model, 2, str(tmp_path), timeout=60, pg_timeout=20)
    for rank in (0, 1):
        assert "loading the distributed checkpoint failed" in outcome[rank] and "ckpt-0000000005.dcp" in outcome[rank]
