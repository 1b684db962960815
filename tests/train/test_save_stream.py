"""The training writer streams weights to disk with their digest in the same pass (issue 14)."""

from __future__ import annotations

import math

import pytest
import torch

import torchckpt
from torchckpt.errors import CheckpointError


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_training_safetensors_weights_are_streamed_with_their_digest(tmp_path):
    """weights_format="safetensors": written tensor by tensor, sha256 from the same pass, readable by safetensors."""
    import hashlib

    from safetensors import safe_open

    net = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 16))
    net[1].weight = torch.nn.Parameter(net[0].weight.t())  # shares memory, not contiguous
    net.register_buffer("h16", torch.randn(5).half())
    net.register_buffer("bf", torch.randn(3, 2).bfloat16())
    net.register_buffer("empty", torch.zeros(0, 4))
    net.register_buffer("nan", torch.tensor([math.nan, -0.0]))
    meta = torchckpt.save(tmp_path / "c.pt", model=net, step=3, weights_format="safetensors")
    wpath = tmp_path / "c.pt.safetensors"
    data = wpath.read_bytes()
    assert meta["weights_sha256"] == hashlib.sha256(data).hexdigest() and meta["weights_size"] == len(data)
    with safe_open(str(wpath), "pt") as f:
        assert sorted(f.keys()) == sorted(net.state_dict())
        for k, v in net.state_dict().items():
            assert _bits(f.get_tensor(k)) == _bits(v) and f.get_tensor(k).dtype == v.dtype, k
    fresh = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 16))
    fresh.register_buffer("h16", torch.zeros(5).half())
    fresh.register_buffer("bf", torch.zeros(3, 2).bfloat16())
    fresh.register_buffer("empty", torch.zeros(0, 4))
    fresh.register_buffer("nan", torch.zeros(2))
    torchckpt.resume(tmp_path / "c.pt", model=fresh)
    for k, v in net.state_dict().items():
        assert _bits(fresh.state_dict()[k]) == _bits(v), k
    wpath.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one flipped bit in the last tensor
    with pytest.raises(CheckpointError):
        torchckpt.resume(tmp_path / "c.pt", model=fresh)
