"""Training checkpoints on a real S3 server (moto on 127.0.0.1): save, list, retention, best, resume,
and a writer killed with SIGKILL in the middle of an upload."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import torchckpt
from conftest import small_net
from remote_servers import s3_bucket

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers")  # the helper scripts


@pytest.fixture(scope="module")
def s3():
    with s3_bucket("train") as s3:
        yield s3


def _perturbed():
    model = small_net()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(3)
    return model


@pytest.mark.slow
def test_checkpointer_on_s3_saves_lists_keeps_and_resumes(s3, tmp_path, monkeypatch):
    fs, opts, _ = s3
    monkeypatch.chdir(tmp_path)  # nothing may land on the local disk
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ckpt = torchckpt.Checkpointer("s3://train/run1", keep_last=2, keep_best=1, monitor="loss",
                                  storage_options=opts)
    losses = {1: 0.1, 2: 0.5, 3: 0.4, 4: 0.3}
    for step, loss in losses.items():
        with torch.no_grad():
            model.fc.bias.fill_(step)
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        opt.step()
        path = ckpt.save(step, model=model, optimizer=opt, metrics={"loss": loss})
        assert path == f"s3://train/run1/ckpt-{step:010d}.pt"
    assert os.listdir(tmp_path) == [], "a URL must never be written to the local disk"
    assert [c.step for c in ckpt.checkpoints()] == [1, 3, 4]  # best (step 1) + the newest two
    assert ckpt.latest().step == 4 and ckpt.best().step == 1
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls("train/run1", refresh=True))
    assert names == sorted(f"ckpt-{s:010d}.pt{suffix}" for s in (1, 3, 4) for suffix in ("", ".meta.json"))
    # a new process (a new Checkpointer) finds the same state on the store and resumes from it
    fresh, fresh_opt = _perturbed(), torch.optim.SGD(small_net().parameters(), lr=0.1, momentum=0.9)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    state = torchckpt.Checkpointer("s3://train/run1", storage_options=opts).resume(model=fresh, optimizer=fresh_opt)
    assert state.step == 4 and state.path == "s3://train/run1/ckpt-0000000004.pt"
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert torch.equal(fresh_opt.state_dict()["state"][0]["momentum_buffer"],
                       opt.state_dict()["state"][0]["momentum_buffer"])
    # resume straight from the directory URL, and from one file's URL
    assert torchckpt.resume("s3://train/run1", model=_perturbed(), storage_options=opts).step == 4
    assert torchckpt.resume("s3://train/run1/ckpt-0000000003.pt", model=_perturbed(), storage_options=opts).step == 3
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_save_and_resume_one_file_url_and_safetensors_weights(s3, net):
    fs, opts, _ = s3
    meta = torchckpt.save("s3://train/single/model.pt", model=net, step=9, storage_options=opts)
    assert meta["size"] == fs.info("train/single/model.pt")["size"]
    fresh = _perturbed()
    assert torchckpt.resume("s3://train/single/model.pt", model=fresh, storage_options=opts).step == 9
    assert torch.equal(fresh.fc.weight, net.fc.weight)
    ckpt = torchckpt.Checkpointer("s3://train/st", weights_format="safetensors", storage_options=opts)
    ckpt.save(1, model=net)
    fresh = _perturbed()
    assert ckpt.resume(model=fresh).step == 1 and torch.equal(fresh.fc.weight, net.fc.weight)


@pytest.mark.slow
def test_a_damaged_remote_checkpoint_is_skipped_on_resume(s3, net):
    fs, opts, _ = s3
    ckpt = torchckpt.Checkpointer("s3://train/damaged", keep_last=5, storage_options=opts)
    for step in (1, 2):
        with torch.no_grad():
            net.fc.bias.fill_(step)
        ckpt.save(step, model=net)
    blob = bytearray(fs.cat_file("train/damaged/ckpt-0000000002.pt"))
    blob[200] ^= 0xFF  # same size, one flipped byte inside the data
    fs.pipe_file("train/damaged/ckpt-0000000002.pt", bytes(blob))
    fresh = _perturbed()
    with pytest.warns(torchckpt.train.checkpointer.SkippedCheckpointWarning, match="ckpt-0000000002.pt"):
        state = ckpt.resume(model=fresh)
    assert state.step == 1 and any("skipped ckpt-0000000002.pt" in n and "CRC" in n for n in state.notes), state.notes
    assert fresh.fc.bias.detach()[0].item() == 1.0


@pytest.mark.slow
def test_kill_9_mid_upload_leaves_the_previous_checkpoint_latest(s3):
    fs, opts, proxy = s3
    url = "s3://train/killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(HERE, "..", "..", "src"), HERE])}
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "remote_saver.py"), url, proxy.endpoint],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # bounded: step 1 committed, step 2 started
            line = proc.stdout.readline()
            lines.append(line.strip())
            if line.startswith("saving 2") or not line:
                break
        assert "committed 1" in lines, lines
        start = proxy.up
        while proxy.up - start < 12 << 20 and time.monotonic() < deadline:  # 12 MiB of ~32 into the upload
            time.sleep(0.01)
        assert proxy.up - start >= 12 << 20, "the second upload never got going"
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert "committed 2" not in out
    ckpt = torchckpt.Checkpointer(url, storage_options=opts)
    assert [c.step for c in ckpt.checkpoints()] == [1]
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)])
    state = ckpt.resume(model=model)
    assert state.step == 1 and float(model[0].bias.detach()[0]) == 1.0
    assert not fs.exists("train/killed/ckpt-0000000002.pt.meta.json")
    listed = sorted(p.rsplit("/", 1)[1] for p in fs.ls("train/killed", refresh=True))
    assert ".ckpt-0000000002.pt.uncommitted" in listed, listed  # resuming (a reader) removes nothing
    # the next writer removes what the killed one left (its intent marker names the files), nothing else
    staged = [n for n in os.listdir(tempfile.gettempdir()) if n.startswith(f"torchckpt-upload-{proc.pid}-")]
    assert len(staged) == 1, "the killed writer was staging step 2"
    ckpt.save(3, model=model)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls("train/killed", refresh=True)) == \
        [f"ckpt-{s:010d}.pt{x}" for s in (1, 3) for x in ("", ".meta.json")]
    staged = [n for n in os.listdir(tempfile.gettempdir()) if n.startswith(f"torchckpt-upload-{proc.pid}-")]
    assert staged == [], "the killed writer's local staging folder is removed by the next writer"


@pytest.mark.slow
def test_async_save_to_s3(s3, net):
    fs, opts, _ = s3
    with torchckpt.Checkpointer("s3://train/async", keep_last=2, async_save=True, storage_options=opts) as ckpt:
        for step in (1, 2, 3):
            with torch.no_grad():
                net.fc.bias.fill_(step)
            assert ckpt.save(step, model=net) == f"s3://train/async/ckpt-{step:010d}.pt"  # returns before the upload
            with torch.no_grad():
                net.fc.bias.fill_(-1)  # changed at once: the snapshot, not the live model, is written
        ckpt.wait()
        assert [c.step for c in ckpt.checkpoints()] == [2, 3]
    fresh = _perturbed()
    assert torchckpt.resume("s3://train/async", model=fresh, storage_options=opts).step == 3
    assert float(fresh.fc.bias.detach()[0]) == 3.0
