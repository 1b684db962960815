"""Frictions a first-time user met following the README: each test repeats what the user did."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import torchckpt


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "torchckpt", *map(str, args)], capture_output=True, text=True,
                          **kw)


def test_convert_creates_missing_parent_directories(tmp_path):
    """`save` and a `.dcp` destination create missing parents; a file destination did not (exit 3,
    "the directory does not exist"), the one output that refused."""
    src = tmp_path / "x.pt"
    torch.save({"w": torch.randn(3, 3)}, src)
    for name in ("out/a/x.safetensors", "out/b/x.pt"):
        report = torchckpt.convert(src, tmp_path / name)
        assert report.verified
        assert torch.equal(torchckpt.load(tmp_path / name)["w"], torch.load(src)["w"])


def test_convert_of_a_missing_source_creates_no_directory(tmp_path):
    with pytest.raises(torchckpt.CheckpointError):
        torchckpt.convert(tmp_path / "absent.pt", tmp_path / "out" / "x.pt")
    assert not (tmp_path / "out").exists()
