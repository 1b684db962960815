"""convert keeps its promises: whole models become state dicts, --key is honoured, views stay bounded."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ForgettablePackage, assert_same_state

import torchckpt

MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
            self.head = nn.Linear(4, 2)
''')


@pytest.fixture
def whole_model(tmp_path, monkeypatch):
    """A whole-model pickle of ``convmodels.Net`` whose source is gone, and the state dict it holds."""
    package = ForgettablePackage(tmp_path, monkeypatch, "convmodels", MODEL)
    torch.manual_seed(0)
    model = package.module.Net()
    path = tmp_path / "whole_model.pkl"
    torch.save(model, path)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    package.forget()
    return path, expected



@pytest.mark.parametrize("ext", ["pt", "safetensors"])
def test_convert_whole_model_writes_its_state_dict(tmp_path, whole_model, ext):
    src, expected = whole_model
    dst = tmp_path / f"modern.{ext}"
    report = torchckpt.convert(src, dst)
    assert report.verified and any("whole model (convmodels.Net)" in c for c in report.changes)
    if ext == "pt":
        plain = torch.load(dst, weights_only=True)
        assert_same_state(expected, plain)
        assert plain._metadata[""]["torchckpt.class"] == "convmodels.Net"
        assert plain._metadata["body.0"]["torchckpt.class"] == "torch.nn.modules.conv.Conv2d"
    else:
        from safetensors import safe_open

        with safe_open(dst, "pt") as f:
            import json

            classes = json.loads(f.metadata()["torchckpt.classes"])
        assert classes["head"] == "torch.nn.modules.linear.Linear"
        assert_same_state(dict(sorted(expected.items())), dict(sorted(torchckpt.load(dst).items())))
    # load_into takes it as it is, strictly
    target = torch.nn.Module()
    target.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    target.head = torch.nn.Linear(4, 2)
    rep = torchckpt.load_into(target, dst)
    assert rep.ok and torch.equal(target.head.weight, expected["head.weight"])


@pytest.mark.slow
def test_convert_key_is_honoured_without_weights_only(tmp_path, net):
    src = tmp_path / "train.pt"
    other = torch.nn.Linear(2, 2).state_dict()
    torch.save({"model": net.state_dict(), "ema": other, "epoch": 3}, src)
    report = torchckpt.convert(src, tmp_path / "ema.pt", key="ema")
    assert report.verified and report.tensors == 2
    assert_same_state(other, torch.load(tmp_path / "ema.pt", weights_only=True))
    res = subprocess.run([sys.executable, "-m", "torchckpt", "convert", str(src), str(tmp_path / "m.pt"),
                          "--key", "model"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert_same_state(net.state_dict(), torch.load(tmp_path / "m.pt", weights_only=True))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_convert_zero_stride_view_is_bounded(tmp_path, zip_format):
    huge = torch.ones(1).expand(1 << 20, 1 << 20)  # 4 TiB if written densely, 4 bytes stored
    src = tmp_path / "expand.pt"
    torch.save({"w": huge, "b": torch.arange(3.0)}, src, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(torchckpt.LimitExceededError, match="expands to"):
        torchckpt.convert(src, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(torchckpt.LimitExceededError):
        torchckpt.convert(src, tmp_path / "out16.pt", dtype="float16")
    report = torchckpt.convert(src, tmp_path / "out.pt")  # .pt keeps the view compact
    assert report.verified and (tmp_path / "out.pt").stat().st_size < 1 << 16
    back = torch.load(tmp_path / "out.pt", weights_only=True)
    assert back["w"].shape == huge.shape and back["w"].stride() == (0, 0) and float(back["w"][7, 9]) == 1.0
    small = torch.ones(1).expand(1000, 10)  # a small expand is written densely
    torch.save({"w": small}, tmp_path / "small.pt")
    assert torchckpt.convert(tmp_path / "small.pt", tmp_path / "small.safetensors").verified
    assert torch.equal(torchckpt.load(tmp_path / "small.safetensors")["w"], small)
