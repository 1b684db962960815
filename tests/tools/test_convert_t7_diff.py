"""convert (every era to modern .pt/.safetensors, verified), Lua Torch7 reading, diff."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import LOCAL_T7, assert_same_state, small_net
from t7_writer import Obj, write_t7

import torchckpt
from torchckpt.demo.samples import write_py2_legacy

T7 = LOCAL_T7


# ----------------------------------------------------------------------------- Lua Torch7
def test_t7_fixtures_match_the_torchfile_oracle():
    torchfile = pytest.importorskip("torchfile")  # test oracle only (in the test extras)

    def same(ours, theirs, seen=None):
        seen = seen or set()
        if id(ours) in seen:
            return True
        seen.add(id(ours))
        if isinstance(theirs, np.ndarray):
            return np.array_equal(ours.numpy(), theirs)
        if isinstance(theirs, bytes):
            return ours == theirs.decode()
        if isinstance(theirs, list):
            return isinstance(ours, list) and len(ours) == len(theirs) and all(
                same(a, b, seen) for a, b in zip(ours, theirs))
        if isinstance(theirs, dict):
            return len(ours) == len(theirs)
        if type(theirs).__name__ == "TorchObject":
            return ours.typename == theirs._typename.decode()
        if type(theirs).__name__ == "LuaFunction":
            return ours.bytecode == theirs.dumped
        return ours == theirs

    for name in sorted(os.listdir(T7)):
        if name.endswith(".t7"):
            ours = torchckpt.load(os.path.join(T7, name))
            assert same(ours, torchfile.load(os.path.join(T7, name))), name


def test_t7_values_and_references():
    t = torchckpt.load(os.path.join(T7, "doubletensor.t7"))
    assert torch.equal(t, torch.tensor([[1, 2, 3], [4, 5, 6.9]], dtype=torch.float64))
    assert abs(float(torchckpt.load(os.path.join(T7, "floattensor.t7")).sum()) - 12.97241666913) < 1e-5
    assert torchckpt.load(os.path.join(T7, "hello=123.t7")) == {"hello": 123}
    recursive = torchckpt.load(os.path.join(T7, "recursive_class.t7"))
    assert recursive.typename == "A" and recursive.data["a"] is recursive
    kv = torchckpt.load(os.path.join(T7, "recursive_kv_table.t7"))
    (key, value), = kv.items()
    assert key is kv and value is kv
    fn = torchckpt.load(os.path.join(T7, "function.t7"))
    assert fn.bytecode.startswith(b"\x1bLJ") and "not executed" in repr(fn)
    assert torchckpt.load(os.path.join(T7, "tds_vec.t7")) == [123, 456]
    assert torchckpt.inspect(os.path.join(T7, "doubletensor.t7")).tensors[0].shape == (2, 3)


def _lua_net(tmp_path, old_bn=False):
    torch.manual_seed(0)
    conv_w, conv_b = torch.randn(4, 3, 3, 3), torch.randn(4)
    var = torch.rand(4) + 0.5
    bn = {"weight": torch.rand(4), "bias": torch.rand(4), "running_mean": torch.randn(4), "eps": 1e-5,
          "gradWeight": torch.zeros(4)}
    if old_bn:
        bn["running_std"] = 1 / torch.sqrt(var + 1e-5)
    else:
        bn["running_var"] = var
    lin_w, lin_b = torch.randn(2, 4), torch.randn(2)
    net = Obj("nn.Sequential", {"modules": [
        Obj("nn.SpatialConvolution", {"weight": conv_w, "bias": conv_b, "gradWeight": torch.zeros(4, 3, 3, 3),
                                      "nInputPlane": 3, "nOutputPlane": 4, "kW": 3, "kH": 3}),
        Obj("nn.SpatialBatchNormalization", bn),
        Obj("nn.ReLU", {"inplace": True}),
        Obj("nn.View", {"size": torch.tensor([4], dtype=torch.int64)}),
        Obj("nn.Linear", {"weight": lin_w, "bias": lin_b}),
    ], "train": False})
    path = tmp_path / "lua_net.t7"
    write_t7(net, path)
    return path, {"0.weight": conv_w, "0.bias": conv_b, "1.weight": bn["weight"], "1.bias": bn["bias"],
                  "1.running_mean": bn["running_mean"], "1.running_var": var, "4.weight": lin_w, "4.bias": lin_b}


@pytest.mark.parametrize("old_bn", [False, True])
def test_t7_nn_tree_to_state_dict_and_into_a_model(tmp_path, old_bn):
    path, expected = _lua_net(tmp_path, old_bn)
    obj = torchckpt.load(path)
    assert obj.typename == "nn.Sequential"
    sd = torchckpt.state_dict_of(obj)
    assert set(sd) == set(expected)
    for k, v in expected.items():
        assert torch.allclose(sd[k].float(), v.float(), rtol=1e-5, atol=1e-6) if old_bn else torch.equal(sd[k], v), k
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2))
    report = torchckpt.load_into(model, path, strict=False)
    assert report.loaded and torch.equal(model[4].weight, expected["4.weight"])
    out = tmp_path / "lua.safetensors"
    rep = torchckpt.convert(path, out, weights_only=True)
    assert rep.verified and set(torchckpt.load(out)) == set(expected)


def test_t7_hostile_sizes_are_refused(tmp_path):
    bad = bytearray(open(os.path.join(T7, "doubletensor.t7"), "rb").read())
    bad[12 + 3 + 4 + 17 + 4:12 + 3 + 4 + 17 + 4 + 8] = (2**40).to_bytes(8, "little")
    path = tmp_path / "bad.t7"
    path.write_bytes(bytes(bad))
    with pytest.raises(torchckpt.CheckpointError):
        torchckpt.load(path)


# ----------------------------------------------------------------------------- convert
def _py2_training_file(tmp_path, net):
    path = tmp_path / "old.pth.tar"
    write_py2_legacy({"epoch": 7, "arch": "net", "state_dict": net.state_dict(), "best": np.float64(0.91),
                      "arr": np.arange(3, dtype=np.float32)}, path)
    return path


@pytest.mark.parametrize("to", ["pt", "safetensors"])
def test_convert_py2_era_to_modern(tmp_path, net, to):
    src = _py2_training_file(tmp_path, net)
    dst = tmp_path / f"new.{to}"
    report = torchckpt.convert(src, dst)
    assert report.verified and report.to == to
    assert any("numpy scalars" in c for c in report.changes)
    out = torchckpt.load(dst)
    assert out["epoch"] == 7 and out["best"] == 0.91 and type(out["best"]) is float
    assert_same_state(net.state_dict(), out["state_dict"])
    if to == "pt":
        plain = torch.load(dst, weights_only=True)  # modern in the full sense
        assert_same_state(net.state_dict(), plain["state_dict"])


def test_convert_whole_model_weights_only_and_dtype(tmp_path, net):
    src = tmp_path / "whole.pt"
    torch.save(torch.nn.DataParallel(net), src)
    dst = tmp_path / "w.safetensors"
    report = torchckpt.convert(src, dst, weights_only=True, dtype="bfloat16")
    assert report.verified and any("bfloat16" in c for c in report.changes)
    out = torchckpt.load(dst)
    assert out["module.conv1.weight"].dtype == torch.bfloat16
    assert torch.equal(out["module.conv1.weight"], net.conv1.weight.detach().bfloat16())
    assert out["module.bn1.num_batches_tracked"].dtype == torch.int64


def test_convert_tied_and_non_contiguous_to_safetensors(tmp_path):
    w = torch.randn(4, 3)
    src = tmp_path / "t.pt"
    torch.save({"embed.weight": w, "head.weight": w, "t": w.t(), "s": w[:, 1]}, src)
    report = torchckpt.convert(src, tmp_path / "t.safetensors")
    assert report.verified and any("tied" in c for c in report.changes)
    out = torchckpt.load(tmp_path / "t.safetensors")
    assert torch.equal(out["head.weight"], w) and torch.equal(out["t"], w.t()) and torch.equal(out["s"], w[:, 1])
    from safetensors import safe_open

    with safe_open(tmp_path / "t.safetensors", "pt") as f:
        assert "head.weight" not in f.keys()  # stored once
        assert json.loads(f.metadata()["torchckpt.aliases"]) == {"head.weight": "embed.weight"}


def test_convert_onto_itself_is_safe(tmp_path, net):
    path = tmp_path / "same.pt"
    torch.save({"state_dict": net.state_dict(), "args": argparse.Namespace(a=1), "p": pathlib.Path("/x")}, path,
               _use_new_zipfile_serialization=False)
    report = torchckpt.convert(path, path)
    assert report.verified and torch.load(path, weights_only=True)["args"] == {"a": 1}


@pytest.mark.slow
def test_convert_streams_legacy_to_safetensors_with_small_memory(tmp_path):
    code = f"""
import torch, resource, torchckpt
sd = {{f"w{{i}}": torch.randn(512, 1024) for i in range(64)}}  # 128 MiB in 64 tensors of 2 MiB
torch.save(sd, {str(tmp_path / 'big.pth')!r}, _use_new_zipfile_serialization=False)
del sd
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak RSS counter
base = rss()
torchckpt.convert({str(tmp_path / 'big.pth')!r}, {str(tmp_path / 'big.safetensors')!r})
peak = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024
print(peak - base)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    # verification reloads through mmap; the conversion itself must not hold the model (128 MiB)
    assert float(res.stdout.strip()) < 110


@pytest.mark.slow
def test_convert_cli(tmp_path, net):
    src = _py2_training_file(tmp_path, net)
    res = subprocess.run([sys.executable, "-m", "torchckpt", "convert", str(src), str(tmp_path / "o.safetensors"),
                          "--weights-only", "--json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["verified"] is True


def test_convert_ambiguous_weights(tmp_path, net):
    src = tmp_path / "two.pt"
    torch.save({"model": net.state_dict(), "ema": small_net().state_dict()}, src)
    with pytest.raises(torchckpt.AmbiguousCheckpointError):
        torchckpt.convert(src, tmp_path / "x.pt", weights_only=True)
    assert torchckpt.convert(src, tmp_path / "x.pt", weights_only=True, key="ema").verified


# ----------------------------------------------------------------------------- diff
def test_diff_prefix_only_shapes_values_and_nonfinite(tmp_path, net):
    a = tmp_path / "a.pt"
    torch.save(net.state_dict(), a)
    b = tmp_path / "b.pth"
    torch.save(torch.nn.DataParallel(net).state_dict(), b, _use_new_zipfile_serialization=False)
    report = torchckpt.diff(a, b, values=True)
    assert "module." in report.renamed and not report.only_a and not report.only_b and not report.changed
    assert "names differ only by" in str(report) and len(str(report).splitlines()) <= 3
    tuned = small_net()
    with torch.no_grad():
        tuned.fc.weight.add_(0.25)
        tuned.bn1.running_mean[0] = float("inf")
    c = tmp_path / "c.pt"
    torch.save(tuned.state_dict(), c)
    report = torchckpt.diff(a, c, values=True)
    assert set(report.changed_layers) == {"fc", "bn1"}
    fc = next(d for d in report.changed if d.key == "fc.weight")
    assert abs(fc.max_abs - 0.25) < 1e-6
    assert any("bn1.running_mean" in n for n in report.nonfinite)
    bigger = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3))
    d = tmp_path / "d.pt"
    torch.save(bigger.state_dict(), d)
    report = torchckpt.diff(a, d)
    assert ("conv1.weight" in report.only_a) or report.shape_changes


@pytest.mark.slow
def test_diff_cli_exit_codes(tmp_path, net):
    a = tmp_path / "a.pt"
    torch.save(net.state_dict(), a)
    b = tmp_path / "b.pt"
    torch.save(net.state_dict(), b)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "torchckpt", "diff", *args], capture_output=True, text=True)

    assert run(str(a), str(b), "--values").returncode == 0
    with torch.no_grad():
        net.fc.bias.add_(1)
    torch.save(net.state_dict(), b)
    res = run(str(a), str(b), "--values", "--json")
    assert res.returncode == 1 and json.loads(res.stdout)["changed_layers"] == ["fc"]
