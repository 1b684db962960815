"""What a caller holds after load / load_into / resume never aliases the user's file (issue 22, item 1).

Each case runs in a real child process: it loads, then the file is truncated, rewritten in place or
replaced by a real second process (or by the child's own natural next step, ``torch.save`` to the same
path), and the child reads every value it was handed. A tensor that still maps the file dies with
SIGBUS (truncation) or sees the new bytes (rewrite in place); a private copy sees neither.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import torchckpt

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX mappings and signals")]

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")

PRELUDE = textwrap.dedent("""
    import os, sys, torch, torchckpt
    path, how = sys.argv[1], sys.argv[2]
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(256, 256)
            self.b = torch.nn.Linear(256, 256)
    def total(tensors):
        return sum(float(t.double().sum()) for t in tensors)
""")

# what the child is handed, and every tensor in it
HANDED = {
    "load": "held = torchckpt.load(path); tensors = list(held['model'].values())",
    "load_sd": "held = torchckpt.load(path); tensors = list(held.values())",
    "meta": ("with torch.device('meta'):\n    held = Net()\n"
             "torchckpt.load_into(held, path, key='model' if how.endswith('ckpt') else None)\n"
             "tensors = list(held.state_dict().values())"),
    "assign": ("held = Net()\ntorchckpt.load_into(held, path, assign=True, key='model' "
               "if how.endswith('ckpt') else None)\ntensors = list(held.state_dict().values())"),
    "resume": ("held = Net(); opt = torch.optim.SGD(held.parameters(), lr=0.1, momentum=0.9)\n"
               "torchckpt.resume(path, model=held, optimizer=opt)\ntensors = list(held.state_dict().values())\n"
               "momentum = [s['momentum_buffer'] for s in opt.state.values()]  # optimizers keep what they get"),
}


def _child(handed: str, then: str, *args: str) -> subprocess.CompletedProcess[str]:
    script = PRELUDE + HANDED[handed] + "\n" + textwrap.dedent(then)
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                          timeout=120)


def _net_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=g) for k, v in (("a.weight", torch.empty(256, 256)),
                                                             ("a.bias", torch.empty(256)),
                                                             ("b.weight", torch.empty(256, 256)),
                                                             ("b.bias", torch.empty(256)))}


def _write(folder, kind: str) -> str:
    sd = _net_state()
    if kind == "safetensors":
        path = os.path.join(folder, "m.safetensors")
        save_file(sd, path)
    elif kind == "sharded":  # an index over two shards: their mappings belong to the same read
        import json

        save_file({k: v for k, v in sd.items() if k.startswith("a.")}, os.path.join(folder, "s1.safetensors"))
        save_file({k: v for k, v in sd.items() if k.startswith("b.")}, os.path.join(folder, "s2.safetensors"))
        path = os.path.join(folder, "model.safetensors.index.json")
        with open(path, "w") as fh:
            json.dump({"weight_map": {k: "s1.safetensors" if k.startswith("a.") else "s2.safetensors"
                                      for k in sd}}, fh)
    elif kind == "ckpt":  # a training dict: weights + optimizer, the shape people edit
        path = os.path.join(folder, "train.pt")
        torch.save({"model": sd, "optimizer": {"state": {0: {"momentum_buffer": torch.ones(256, 256)}},
                                               "param_groups": [{"lr": 0.1, "params": [0]}]}, "epoch": 3}, path)
    elif kind == "torchckpt":
        path = os.path.join(folder, "saved.pt")
        net = torch.nn.Module()
        net.a, net.b = torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)
        net.load_state_dict(sd)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        for p in net.parameters():
            p.grad = torch.full_like(p, 0.5)
        opt.step()  # momentum buffers of 0.5: the optimizer's state is in the file too
        net.load_state_dict(sd)
        torchckpt.save(path, model=net, optimizer=opt, step=1)
    else:
        path = os.path.join(folder, "m.pt")
        torch.save(sd, path)
    return path


def _expected(kind: str) -> float:
    return sum(float(t.double().sum()) for t in _net_state().values())


# --------------------------------------------------------------- a real second process changes the file
SECOND = {
    "truncate": ("import os, sys\nd = os.path.dirname(sys.argv[1])\n"  # the file, and any shards beside it
                 "for f in os.listdir(d): os.truncate(os.path.join(d, f), 0)"),
    "rewrite": ("import os, sys\nn = os.path.getsize(sys.argv[1])\n"
                "with open(sys.argv[1], 'r+b') as f: f.write(b'\\x7f' * n); f.flush(); os.fsync(f.fileno())"),
    "replace": ("import os, sys\nopen(sys.argv[1] + '.new', 'wb').write(b'x' * 100)\n"
                "os.replace(sys.argv[1] + '.new', sys.argv[1])"),
}

WAIT_THEN_READ = """
print("loaded", flush=True)
sys.stdin.readline()  # the test lets a second process change the file, then says go
print(repr(total(tensors)), flush=True)
if how == "torchckpt":
    print(repr(total(momentum)), flush=True)
"""


def _held_while_changed(handed: str, path: str, how: str, change: str) -> subprocess.CompletedProcess[str]:
    script = PRELUDE + HANDED[handed] + "\n" + textwrap.dedent(WAIT_THEN_READ)
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-c", script, path, how], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None and child.stdin is not None
        line = child.stdout.readline()
        assert line.strip() == "loaded", child.stderr.read() if child.stderr else line
        subprocess.run([sys.executable, "-c", SECOND[change], path], check=True, timeout=60)
        out, err = child.communicate("go\n", timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


@pytest.mark.parametrize("handed,kind,change", [
    *((h, k, "truncate") for h, k in [("load_sd", "zip"), ("load_sd", "safetensors"), ("meta", "zip"),
                                      ("meta", "safetensors"), ("meta", "sharded"), ("assign", "zip"),
                                      ("resume", "torchckpt")]),
    ("load_sd", "zip", "rewrite"), ("meta", "safetensors", "rewrite"), ("load_sd", "zip", "replace")])
def test_tensors_handed_out_survive_another_process_changing_the_file(tmp_path, handed, kind, change):
    path = _write(str(tmp_path), kind)
    proc = _held_while_changed(handed, path, kind, change)
    assert proc.returncode == 0, f"exit {proc.returncode} (-7 is SIGBUS): {proc.stderr[-2000:]}"
    lines = proc.stdout.strip().splitlines()
    assert float(lines[0]) == pytest.approx(_expected(kind), rel=1e-9)
    if kind == "torchckpt":
        assert float(lines[1]) == 0.5 * (2 * 256 * 256 + 2 * 256)


# --------------------------------------------------------------- the user's own next natural step
def test_load_edit_and_torch_save_to_the_same_path(tmp_path):
    path = _write(str(tmp_path), "ckpt")
    proc = _child("load", """
        del held["optimizer"]
        torch.save(held, path)
        print(repr(total(tensors)))
    """, path, "ckpt")
    assert proc.returncode == 0, f"exit {proc.returncode} (-7 is SIGBUS): {proc.stderr[-2000:]}"
    again = torch.load(path, weights_only=True)
    assert set(again) == {"model", "epoch"}
    for k, v in _net_state().items():
        assert torch.equal(again["model"][k], v)


@pytest.mark.parametrize("kind", ["zip", "safetensors", "ckpt"])
def test_load_into_meta_model_then_torch_save_its_state_dict_to_the_same_path(tmp_path, kind):
    path = _write(str(tmp_path), kind)
    save = ("import safetensors.torch; safetensors.torch.save_file(held.state_dict(), path)"
            if kind == "safetensors" else "torch.save(held.state_dict(), path)")
    proc = _child("meta", save + "\nprint(repr(total(tensors)))", path, kind)
    assert proc.returncode == 0, f"exit {proc.returncode} (-7 is SIGBUS): {proc.stderr[-2000:]}"
    again = torchckpt.load(path)
    for k, v in _net_state().items():
        assert torch.equal(again[k], v)


def test_resume_then_save_to_the_same_path(tmp_path):
    path = _write(str(tmp_path), "torchckpt")
    proc = _child("resume", """
        torch.save({"model": held.state_dict(), "optimizer": opt.state_dict()}, path)  # plain torch, in place
        torchckpt.save(path, model=held, optimizer=opt, step=2)
        print(repr(total(tensors) + total(momentum)))
    """, path, "torchckpt")
    assert proc.returncode == 0, f"exit {proc.returncode} (-7 is SIGBUS): {proc.stderr[-2000:]}"
    state = torchckpt.load(path)
    assert state["step"] == 2
    assert all(float(s["momentum_buffer"].sum()) == 0.5 * s["momentum_buffer"].numel()
               for s in state["optimizer"]["state"].values())
    model = torch.nn.Module()
    model.a, model.b = torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)
    torchckpt.load_into(model, path)
    for k, v in _net_state().items():
        assert torch.equal(model.state_dict()[k], v)


def test_mmap_true_still_maps_and_says_so(tmp_path):
    """The explicit opt-in keeps the zero-copy view (documented as aliasing the file)."""
    path = _write(str(tmp_path), "zip")
    with torch.device("meta"):
        model = torch.nn.Module()
        model.a, model.b = torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)
    report = torchckpt.load_into(model, path, mmap=True)
    assert any("mmap=True" in n for n in report.notes)
    plain = torch.nn.Module()
    plain.a, plain.b = torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)
    with torch.device("meta"):
        other = torch.nn.Module()
        other.a, other.b = torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)
    assert not any("mmap" in n for n in torchckpt.load_into(other, path).notes)
