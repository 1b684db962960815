"""The README's distributed example, run as a user would: torchrun --nproc-per-node 2 on CPU (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import torchckpt
from dist_launch import free_port

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.path.join(ROOT, "src"),
                                                                    os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           os.path.join(ROOT, "examples", "train_fsdp.py"), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


@pytest.mark.slow
def test_train_fsdp_example_under_torchrun_then_resume_in_one_process(tmp_path):
    out = torchrun(str(tmp_path), "--steps", "4", "--every", "2")
    assert "done at step 4 on 2 rank(s)" in out.stdout
    ckpt = torchckpt.Checkpointer(tmp_path)
    assert [c.step for c in ckpt.checkpoints()] == [2, 4] and ckpt.latest().meta["world_size"] == 2
    # the example's model, resumed here in one plain process: the sharded checkpoint fits it
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = ckpt.resume(model=model, optimizer=opt)
    assert state.step == 4
    weights = torchckpt.load(ckpt.latest())["model"]
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert int(opt.state[model[0].weight]["step"]) == 4


@pytest.mark.slow
def test_ddp_under_torchrun_writes_the_replicated_state_once(tmp_path):
    out = torchrun(str(tmp_path), "--steps", "2", "--every", "2", "--ddp")
    assert "done at step 2 on 2 rank(s)" in out.stdout
    latest = torchckpt.Checkpointer(tmp_path).latest()
    assert latest.step == 2 and latest.meta["world_size"] == 2
    meta = torchckpt.load(os.path.join(latest.path, ".metadata"))
    fqns = [k.stub_attributes()["fqn"] for k in meta.storage_data]
    assert len(fqns) == len(set(fqns))  # no entry written by two ranks
    assert sorted(f for f in fqns if f.startswith("model.")) == ["model.0.bias", "model.0.weight", "model.2.bias",
                                                                  "model.2.weight"]  # no "module." prefix
    data = sum(os.path.getsize(os.path.join(latest.path, f)) for f in os.listdir(latest.path) if f.endswith(".distcp"))
    assert data == sum(v.stub_attributes()["length"] for v in meta.storage_data.values())  # no second copy
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert torchckpt.Checkpointer(tmp_path).resume(model=model, optimizer=opt).step == 2
    weights = torchckpt.load(latest)["model"]
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
