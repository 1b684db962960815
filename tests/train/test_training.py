"""Training checkpoints: bit-exact resume in a fresh process, crash safety, write errors, layouts."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import torchckpt
from torchckpt import CheckpointWriteError, ResumeError

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers")  # the helper scripts


def _run(*args: str) -> None:
    res = subprocess.run([sys.executable, os.path.join(HERE, "train_script.py"), *args], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 24-step run without interruption, once per worker count."""
    runs: dict[int, str] = {}

    def get(workers: int) -> str:
        if workers not in runs:
            out = str(tmp_path_factory.mktemp("full") / "full.pt")
            _run("full", "24", out, f"workers={workers}")
            runs[workers] = out
        return runs[workers]

    return get


# 9 batches per epoch: mid-epoch, the last batch of an epoch (with workers the loader has already
# fetched the whole epoch), the epoch boundary, and into the next epoch
@pytest.mark.slow
@pytest.mark.parametrize("workers,k", [(0, 5), (0, 9), (0, 13), (2, 5), (2, 8), (2, 9), (2, 13)])
def test_bit_exact_resume_in_a_fresh_process(tmp_path, uninterrupted, workers, k):
    n = 24
    _run("first", str(k), str(n), str(tmp_path / "ckpts"), f"workers={workers}")
    _run("resume", str(n), str(tmp_path / "ckpts"), str(tmp_path / "resumed.pt"), f"workers={workers}")
    full = torch.load(uninterrupted(workers))
    resumed = torch.load(tmp_path / "resumed.pt")
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for pid, state in full["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, resumed["optimizer"]["state"][pid][name]), (pid, name)


def test_without_rng_restore_the_run_differs(tmp_path):
    from train_script import build, train

    model, opt, sched, loader, sampler = build(10)
    train(model, opt, sched, loader, 0, 4)
    torchckpt.save(tmp_path / "c.pt", model=model, optimizer=opt, scheduler=sched, step=4,
                   stateful={"sampler": sampler})
    train(model, opt, sched, loader, 4, 10)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    outcomes = []
    for restore in (True, False):
        model2, opt2, sched2, loader2, sampler2 = build(10)
        torch.manual_seed(999)
        state = torchckpt.resume(tmp_path / "c.pt", model=model2, optimizer=opt2, scheduler=sched2,
                                 stateful={"sampler": sampler2}, restore_rng=restore)
        train(model2, opt2, sched2, loader2, state.step, 10)
        outcomes.append(all(torch.equal(reference[k], v) for k, v in model2.state_dict().items()))
    assert outcomes == [True, False]


@pytest.mark.slow
def test_crash_at_random_moments_never_loses_work(tmp_path):
    rng = random.Random(0)
    directory = tmp_path / "ckpts"
    committed = 0
    for trial in range(20):
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "crash_saver.py"), str(directory)],
                                stdout=subprocess.PIPE, text=True)
        first = ""
        if trial % 4 == 3:  # anywhere: during start-up (nothing new is saved), a save, a retention pass ...
            time.sleep(rng.uniform(0.5, 2.5))
        else:  # once the saver is up (a loaded machine may take seconds to import torch): mid-save
            first = proc.stdout.readline()
            if trial == 0:  # make sure the directory holds something before the first kill
                first += proc.stdout.readline()
            time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        lines = [ln for ln in (first + out).splitlines() if ln.startswith("committed")]
        if lines:
            committed = int(lines[-1].split()[1])
        ckpt = torchckpt.Checkpointer(directory, keep_last=2)
        found = ckpt.checkpoints()
        # every file under a final name is complete, and the retention promise holds
        for name in os.listdir(directory):
            if name.startswith("ckpt-") and name.endswith(".pt"):
                obj = torchckpt.load(directory / name)
                assert obj["step"] == int(name[5:15])
        steps = [c.step for c in found]
        assert found and steps[-1] >= committed  # a commit may land after the last line printed
        if committed >= 2:  # keep_last=2 with a save every step: the two newest, consecutive, are kept
            assert steps[-2:] == [steps[-1] - 1, steps[-1]], steps
        model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(16)])
        state = ckpt.resume(model=model)
        assert state.step == found[-1].step and float(model[0].bias[0]) == state.step
    assert committed >= 5, "the saver should have committed several checkpoints"
    leftovers = [n for n in os.listdir(directory) if ".tmp-" in n]
    assert not leftovers or all(".tmp-" in n for n in leftovers)
    torchckpt.Checkpointer(directory)
    assert not [n for n in os.listdir(directory) if ".tmp-" in n], "temp files of dead writers are cleaned"


def test_unwritable_destination(tmp_path, net):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointWriteError):
        torchckpt.save(blocker / "ckpt.pt", model=net)


@pytest.mark.parametrize("save_wrapped,resume_wrapped", [(True, False), (False, True)])
def test_resume_across_layouts(tmp_path, net, save_wrapped, resume_wrapped):
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    torchckpt.save(tmp_path / "c.pt", model=torch.nn.DataParallel(net) if save_wrapped else net, optimizer=opt,
                   epoch=3, step=30, metrics={"acc": torch.tensor(0.5)})
    from conftest import small_net

    fresh = small_net()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    target = torch.nn.DataParallel(fresh) if resume_wrapped else fresh
    opt2 = torch.optim.SGD(target.parameters(), lr=0.1, momentum=0.9)
    state = torchckpt.resume(tmp_path / "c.pt", model=target, optimizer=opt2)
    assert (state.epoch, state.step, state.metrics) == (3, 30, {"acc": 0.5})
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])


def test_optimizer_groups_that_do_not_fit(tmp_path, net):
    opt = torch.optim.Adam(net.parameters())
    torchckpt.save(tmp_path / "c.pt", model=net, optimizer=opt)
    params = list(net.parameters())
    wrong = torch.optim.Adam([{"params": params[:2]}, {"params": params[2:]}])
    with pytest.raises(ResumeError) as info:
        torchckpt.resume(tmp_path / "c.pt", model=net, optimizer=wrong)
    assert "parameter groups do not fit" in str(info.value) and "c.pt" in str(info.value)


def test_scaler_and_safetensors_weights(tmp_path, net):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    meta = torchckpt.save(tmp_path / "c.pt", model=net, scaler=scaler, step=1, weights_format="safetensors")
    assert os.path.exists(tmp_path / "c.pt.safetensors") and meta["files"] == ["c.pt", "c.pt.safetensors"]
    from conftest import small_net

    fresh = small_net()
    torch.manual_seed(5)
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_()
    scaler2 = torch.amp.GradScaler("cpu", init_scale=1.0)
    torchckpt.resume(tmp_path / "c.pt", model=fresh, scaler=scaler2)
    assert scaler2.get_scale() == 1024.0
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))


def test_tied_weights_in_safetensors_are_stored_once_as_convert_does(tmp_path):
    """One safetensors writer: a training save and convert lay out tied weights the same way (stored
    once, the other name recorded as an alias), and resume restores both names."""
    import json

    from safetensors import safe_open

    torch.manual_seed(0)
    tied = torch.nn.Sequential(torch.nn.Embedding(10, 6), torch.nn.Linear(6, 10, bias=False))
    tied[1].weight = tied[0].weight
    torchckpt.save(tmp_path / "c.pt", model=tied, step=1, weights_format="safetensors")
    torch.save(tied.state_dict(), tmp_path / "sd.pt")
    torchckpt.convert(tmp_path / "sd.pt", tmp_path / "conv.safetensors")
    for path in (tmp_path / "c.pt.safetensors", tmp_path / "conv.safetensors"):
        with safe_open(str(path), "pt") as f:
            assert sorted(f.keys()) == ["0.weight"], path  # the tied tensor's bytes once
            assert json.loads(f.metadata()["torchckpt.aliases"]) == {"1.weight": "0.weight"}, path
    assert os.path.getsize(tmp_path / "c.pt.safetensors") < 8 + 2 * 10 * 6 * 4
    fresh = torch.nn.Sequential(torch.nn.Embedding(10, 6), torch.nn.Linear(6, 10, bias=False))
    torchckpt.resume(tmp_path / "c.pt", model=fresh)
    assert torch.equal(fresh[0].weight, tied[0].weight) and torch.equal(fresh[1].weight, tied[0].weight)


def test_retention_policies_are_pure():
    from torchckpt.train.checkpointer import CheckpointInfo, KeepBest, KeepEvery, KeepLast

    infos = [CheckpointInfo(s, f"p{s}", {"loss": l}, {}) for s, l in [(1, 5.0), (2, 1.0), (3, 4.0), (4, 3.0)]]
    assert KeepLast(2).keep(infos) == {3, 4}
    assert KeepBest(1, "loss", "min").keep(infos) == {2}
    assert KeepBest(2, "loss", "max").keep(infos) == {1, 3}
    assert KeepEvery(2).keep(infos) == {2, 4}


def test_async_save_and_best(tmp_path, net):
    with torchckpt.Checkpointer(tmp_path, keep_last=1, keep_best=1, monitor="loss", async_save=True) as ckpt:
        for step, loss in enumerate([3.0, 1.0, 2.0, 4.0], start=1):
            with torch.no_grad():
                net.fc.bias.fill_(step)
            ckpt.save(step, model=net, metrics={"loss": loss})
            with torch.no_grad():
                net.fc.bias.fill_(-1)  # mutating right after save must not leak into the file
    ckpt = torchckpt.Checkpointer(tmp_path, monitor="loss")
    assert [c.step for c in ckpt.checkpoints()] == [2, 4] and ckpt.best().step == 2
    assert float(torchckpt.load(ckpt.latest().path)["model"]["fc.bias"][0]) == 4.0


def test_every_n_steps(tmp_path, net):
    ckpt = torchckpt.Checkpointer(tmp_path, every_n_steps=5, keep_last=10)
    saved = [ckpt.save(s, model=net) for s in range(1, 12)]
    assert [s for s, p in zip(range(1, 12), saved) if p] == [5, 10]


@pytest.mark.parametrize("damage", ["flip-data-byte", "truncate"])
def test_damaged_latest_falls_back_to_previous(tmp_path, net, damage):
    ckpt = torchckpt.Checkpointer(tmp_path, keep_last=3)
    for step in (1, 2):
        with torch.no_grad():
            net.fc.bias.fill_(step)
        ckpt.save(step, model=net, metrics={"loss": 1.0})
    path = ckpt.latest().path
    data = bytearray(open(path, "rb").read())
    if damage == "flip-data-byte":
        import zipfile

        with zipfile.ZipFile(path) as zf:
            info = next(i for i in zf.infolist() if "/data/" in i.filename and i.file_size > 64)
        from torchckpt.read.formats.torch_zip import member_data_offset
        from torchckpt.storage.source import Source

        with Source(path) as src:
            where = member_data_offset(src, info) + 10
        data[where] ^= 0xFF
        open(path, "wb").write(bytes(data))
    else:
        open(path, "wb").write(bytes(data[: len(data) // 2]))
    with pytest.raises(torchckpt.CorruptCheckpointError):
        torchckpt.resume(path, model=net)
    with pytest.warns(UserWarning, match="ckpt-0000000002.pt"):
        state = ckpt.resume(model=net)
    assert state.step == 1 and float(net.fc.bias[0]) == 1.0
    assert any(n.startswith("skipped ckpt-0000000002.pt") for n in state.notes), state.notes
