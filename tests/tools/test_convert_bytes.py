"""convert copies unchanged legacy storages file to file and verifies every tensor bit for bit (issue 14)."""

from __future__ import annotations

import math
import os
import struct

import pytest
import torch
from safetensors.torch import load_file

import torchckpt
from torchckpt.errors import CheckpointError


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _tree() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g)
    w[0, 0], w[1, 1], w[2, 2] = math.nan, -0.0, math.inf
    big = torch.randn(300, 257, generator=g)
    half = torch.randn(40, generator=g).half()
    return {"w": w, "big": big, "t": big.t(), "rows": big[10:20], "col": big[:, 3], "half": half,
            "h2": half[5:9], "i": torch.arange(7), "b": torch.tensor([True, False]), "s": torch.tensor(2.5),
            "e": torch.zeros(0, 3), "tied": w}


@pytest.mark.parametrize("to", ["safetensors", "pt"])
@pytest.mark.parametrize("legacy", [True, False])
def test_nan_and_signed_zero_survive_verification(tmp_path, to, legacy):
    """Regression: verification compared values, so any NaN made a correct conversion fail."""
    sd = _tree()
    src = tmp_path / "src.pth"
    torch.save(sd, src, _use_new_zipfile_serialization=not legacy)
    dst = tmp_path / f"out.{to}"
    report = torchckpt.convert(src, dst)
    assert report.verified
    out = torchckpt.load(dst)
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape and _bits(out[k]) == _bits(v), k


def test_legacy_storages_copied_file_to_file_are_exact(tmp_path):
    sd = _tree()
    src = tmp_path / "src.pth"
    torch.save(sd, src, _use_new_zipfile_serialization=False)
    dst = tmp_path / "out.safetensors"
    assert torchckpt.convert(src, dst).verified
    out = load_file(dst)  # safetensors' own reader
    for k, v in sd.items():
        if k != "tied":
            assert out[k].shape == v.shape and _bits(out[k]) == _bits(v), k
    # cast: nothing is copied verbatim, every value converted
    cast = torchckpt.convert(src, tmp_path / "bf16.safetensors", dtype="bfloat16")
    assert cast.verified and load_file(tmp_path / "bf16.safetensors")["big"].dtype == torch.bfloat16
    assert torch.equal(load_file(tmp_path / "bf16.safetensors")["big"], sd["big"].bfloat16())


def test_legacy_onto_itself_as_safetensors(tmp_path):
    """The output replaces the source: copies and verification read the source as it was."""
    sd = _tree()
    path = tmp_path / "model.bin"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    assert torchckpt.convert(path, path, to="safetensors").verified
    out = load_file(path)
    assert _bits(out["big"]) == _bits(sd["big"]) and _bits(out["w"]) == _bits(sd["w"])


def test_truncated_legacy_storage_is_an_error_not_a_copy(tmp_path):
    sd = {"a": torch.randn(1000), "b": torch.randn(100_000)}
    src = tmp_path / "src.pth"
    torch.save(sd, src, _use_new_zipfile_serialization=False)
    size = os.path.getsize(src)
    with open(src, "r+b") as fh:
        fh.truncate(size - 50_000)
    with pytest.raises(CheckpointError):
        torchckpt.convert(src, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_output_header_is_what_safetensors_expects(tmp_path):
    sd = {"x": torch.randn(3, 5), "y": torch.arange(4, dtype=torch.int32)}
    src = tmp_path / "src.pth"
    torch.save(sd, src, _use_new_zipfile_serialization=False)
    dst = tmp_path / "out.safetensors"
    torchckpt.convert(src, dst, weights_only=True)
    raw = dst.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert os.path.getsize(dst) == 8 + n + 3 * 5 * 4 + 4 * 4
    assert raw[8 + n:8 + n + 60] == _bits(sd["x"]) and raw[-16:] == _bits(sd["y"])

