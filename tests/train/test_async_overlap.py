"""An async save writes while the snapshot is still being copied: every storage goes out after its copy,
in the order torch writes them; a write out of that order is discarded and redone; an interrupted copy
publishes nothing."""

from __future__ import annotations

import os
import threading

import pytest
import torch

import torchckpt
from torchckpt.train.snapshot import Copies, SnapshotInterrupted, start_snapshot, write_overlapped
from torchckpt.train.training import write_payload


def _state() -> dict:
    torch.manual_seed(0)
    big = torch.randn(3 << 20)  # 12 MiB: three chunks of the copy
    return {"model": {"embed": big, "w": torch.randn(64, 64), "tied": big, "view": big[10:20],
                      "half": torch.randn(1000).half(), "empty": torch.empty(0)},
            "optimizer": {"state": {0: {"exp_avg": torch.randn(5000)}}, "param_groups": [{"lr": 0.1}]}}


def _saved(path) -> dict:
    return torch.load(path, weights_only=True)


def _assert_same(a: dict, b: dict) -> None:
    for key in ("embed", "w", "tied", "view", "half"):
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])


def test_the_writer_copies_what_it_waits_for_and_writes_the_copied_values(tmp_path):
    state = _state()
    expected = {"model": {k: v.clone() for k, v in state["model"].items()},
                "optimizer": {"state": {0: {"exp_avg": state["optimizer"]["state"][0]["exp_avg"].clone()}}}}
    snapshot, copies = start_snapshot(state, {})
    assert len(copies) == 4  # embed (with tied and view), w, half, exp_avg; the empty tensor needs none
    errors: list[BaseException] = []

    def writer() -> None:
        try:  # guarded, not write_overlapped: a write out of order would raise here instead of being redone
            write_payload(str(tmp_path / "a.pt"), snapshot, copies=copies)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    thread.join(60)  # nobody runs the copies: the writer copies each chunk it needs itself
    assert not thread.is_alive() and not errors, errors
    copies.run()  # nothing left: returns at once
    _assert_same(_saved(tmp_path / "a.pt"), expected)
    state["model"]["embed"].add_(1)  # the file and the snapshot are the values of the moment of run()
    assert not torch.equal(state["model"]["embed"], snapshot["model"]["embed"])


def _write_out_of_order(fh, a: torch.Tensor, b: torch.Tensor) -> None:
    """What a torch that wrote records in another order would hand its file: b's bytes before a's."""
    fh.write(b"header")
    fh.write(memoryview(b.numpy()).cast("B"))
    fh.write(memoryview(a.numpy()).cast("B"))


def test_a_write_out_of_the_copy_order_is_refused_then_redone_from_the_whole_snapshot(tmp_path):
    a, b = torch.randn(1 << 20), torch.randn(1 << 20)
    snapshot, copies = start_snapshot({"a": a, "b": b}, {})
    copies.run()
    guarded = copies.guard(open(tmp_path / "raw", "wb"))
    _write_out_of_order(guarded, snapshot["a"], snapshot["b"])
    with pytest.raises(Exception, match="in the order of the copies"):
        guarded.check()
    # through write_overlapped the refusal costs a second, unguarded write and the file is right
    calls = []

    def write(c: Copies | None) -> None:
        calls.append(c)
        if c is not None:
            g = c.guard(open(tmp_path / "first", "wb"))
            _write_out_of_order(g, snapshot["a"], snapshot["b"])
            g.check()
        else:
            torch.save(snapshot, tmp_path / "second.pt")

    write_overlapped(write, copies)
    assert calls == [copies, None]
    assert torch.equal(_saved(tmp_path / "second.pt")["a"], a)


@pytest.mark.parametrize("copied_first", [0, 1, 3])
def test_an_interrupted_copy_publishes_nothing_and_the_writer_gives_up(tmp_path, copied_first):
    state = _state()
    snapshot, copies = start_snapshot(state, {})
    assert copies.wait(copied_first)  # part of the snapshot was copied when Ctrl-C came
    copies.abort()  # what run() does when it is interrupted
    with pytest.raises(SnapshotInterrupted):
        write_payload(str(tmp_path / "a.pt"), snapshot, copies=copies)
    assert os.listdir(tmp_path) == []  # no data file, no sidecar, no temp file


def test_checkpointer_async_saves_of_a_large_model_match_sync_saves(tmp_path):
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
                    p.mul_(-2)
            saved = torchckpt.load(ckpt.path_for(step))
            assert all(torch.equal(saved["model"][k], v) for k, v in expected.items()), step
    assert [c.step for c in torchckpt.Checkpointer(tmp_path / "async").checkpoints()] == [1, 2, 3]
