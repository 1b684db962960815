"""The copy of an async save is shared by the caller's and the writer's threads; it is complete when
``save()`` returns, and an interrupted one commits nothing."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

import torchckpt
from torchckpt.train.snapshot import Copies, SnapshotInterrupted, start_snapshot


def _state() -> dict:
    torch.manual_seed(0)
    big = torch.randn(3 << 20)  # 12 MiB: three chunks
    return {"model": {"embed": big, "w": torch.randn(64, 64), "tied": big, "view": big[10:20],
                      "half": torch.randn(1000).half(), "empty": torch.empty(0)},
            "optimizer": {"state": {0: {"exp_avg": torch.randn(5000)}}, "param_groups": [{"lr": 0.1}]}}


def _flat(state: dict) -> dict:
    return {**state["model"], "exp_avg": state["optimizer"]["state"][0]["exp_avg"]}


def test_the_writer_alone_copies_every_chunk_it_waits_for():
    state = _state()
    snapshot, copies = start_snapshot(state, {})
    assert len(copies) == 4  # embed (shared by tied and view), w, half, exp_avg; the empty tensor needs none
    assert copies.CHUNK < state["model"]["embed"].nbytes  # the big storage is copied in several chunks
    waiter = threading.Thread(target=copies.wait_all)
    waiter.start()
    waiter.join(60)
    assert not waiter.is_alive()
    copies.run()  # nothing left: returns at once
    got, expected = _flat(snapshot), _flat(state)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert snapshot["model"]["tied"].untyped_storage().data_ptr() == snapshot["model"]["embed"].untyped_storage().data_ptr()


def test_with_both_threads_copying_the_snapshot_is_complete_when_run_returns():
    state = _state()
    expected = {k: v.clone() for k, v in _flat(state).items()}
    for _ in range(5):  # the threads race for chunks differently each time
        snapshot, copies = start_snapshot(state, {})
        helper = threading.Thread(target=copies.wait_all)
        helper.start()
        copies.run()
        got = _flat(snapshot)
        assert all(torch.equal(got[k], expected[k]) for k in expected)  # before the helper is joined
        helper.join(60)
    state["model"]["embed"].add_(1)
    assert not torch.equal(_flat(snapshot)["embed"], state["model"]["embed"])  # a copy, not the source


@pytest.mark.parametrize("copied_first", [0, 1])  # 2 and 3 share the last chunk with 4: complete
def test_an_interrupted_copy_wakes_the_writer_with_a_typed_error(copied_first):
    snapshot, copies = start_snapshot(_state(), {})
    assert copies.wait(copied_first)  # part of the snapshot was copied when Ctrl-C came
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            copies.wait_all()
        except SnapshotInterrupted as exc:
            errors.append(exc)

    thread = threading.Thread(target=writer)
    assert copies.abort()  # what run() does when it is interrupted
    thread.start()
    thread.join(60)
    assert len(errors) == 1 and not copies.wait()


def test_ctrl_c_during_an_async_save_commits_nothing_and_the_next_save_works(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(8)])  # 128 MiB: a copy of ~50 ms

    def interrupt(signum, frame):  # a real Ctrl-C (SIGINT): it stops the copy between chunks
        os.kill(os.getpid(), signal.SIGINT)

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        with torchckpt.Checkpointer(tmp_path / "run", async_save=True) as ckpt:
            signal.setitimer(signal.ITIMER_REAL, 0.003)
            with pytest.raises(KeyboardInterrupt):
                ckpt.save(1, model=model)
                signal.pause()  # the copy was faster than the timer: interrupted after it
            ckpt.wait()  # the abandoned save is not reported as a failure
            assert ckpt.checkpoints() == [] or [c.step for c in ckpt.checkpoints()] == [1]
            first = [c.step for c in ckpt.checkpoints()]
            ckpt.save(2, model=model)
        assert [c.step for c in torchckpt.Checkpointer(tmp_path / "run").checkpoints()] == first + [2]
        assert not [n for n in os.listdir(tmp_path / "run") if n.startswith(".") and "tmp" in n]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_checkpointer_async_saves_of_a_large_model_hold_the_values_of_the_moment(tmp_path):
    torch.manual_seed(1)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])  # 8 MiB: chunked copies
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 512)).sum().backward()
    opt.step()
    with torchckpt.Checkpointer(tmp_path / "async", async_save=True, keep_last=3) as ckpt:
        for step in (1, 2, 3):  # later saves reuse the buffers
            expected = {k: v.clone() for k, v in model.state_dict().items()}
            ckpt.save(step, model=model, optimizer=opt)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(-2)  # while the writer may still be writing
            ckpt.wait()
            saved = torchckpt.load(ckpt.path_for(step))
            assert all(torch.equal(saved["model"][k], v) for k, v in expected.items()), step
    assert [c.step for c in torchckpt.Checkpointer(tmp_path / "async").checkpoints()] == [1, 2, 3]


def test_copies_without_storages_are_complete_at_once():
    copies = Copies([])
    copies.run()
    copies.wait_all()
    assert len(copies) == 0
