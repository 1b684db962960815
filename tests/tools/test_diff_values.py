"""diff --values streams tensor pairs chunk by chunk, in their own dtype, across every pair of formats."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import torchckpt
from torchckpt.tools import diffing


def _save(sd, path, fmt):
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "legacy":
        torch.save(sd, str(path), _use_new_zipfile_serialization=False)
    else:
        torch.save(sd, str(path))
    return str(path)


def _reference(x, y):
    """max |x-y| and max |x-y| / max|x| over finite values, in float64 on whole tensors."""
    xd, yd = x.double(), y.double()
    delta = (xd - yd).abs()
    max_abs = float(delta.max())
    scale = float(xd.abs().max())
    return max_abs, (max_abs / scale if scale else 0.0)


FORMATS = ["zip", "legacy", "safetensors"]


@pytest.mark.parametrize("fa", FORMATS)
@pytest.mark.parametrize("fb", FORMATS)
def test_values_across_every_pair_of_formats(tmp_path, fa, fb):
    g = torch.Generator().manual_seed(1)
    a = {"w": torch.randn(300, 70, generator=g), "h": torch.randn(500, generator=g).half(),
         "i": torch.arange(40, dtype=torch.int64), "same": torch.randn(64, generator=g)}
    b = {k: v.clone() for k, v in a.items()}
    b["w"][123, 5] += 0.25
    b["h"][7] = -b["h"][7]
    b["i"][3] = 100
    pa, pb = _save(a, tmp_path / f"a.{fa}", fa), _save(b, tmp_path / f"b.{fb}", fb)
    report = torchckpt.diff(pa, pb, values=True)
    changed = {d.key: d for d in report.changed}
    assert set(changed) == {"w", "h", "i"}
    for k in changed:
        max_abs, rel = _reference(a[k], b[k])
        assert changed[k].max_abs == pytest.approx(max_abs, rel=1e-6)
        assert changed[k].max_rel == pytest.approx(rel, rel=1e-6)
    assert torchckpt.diff(pa, _save(a, tmp_path / f"c.{fb}", fb), values=True).equal


def test_chunks_nonfinite_and_dtypes(tmp_path, monkeypatch):
    """Small chunks: differences, NaN/Inf and the scale are found in any chunk, for every kind of dtype."""
    monkeypatch.setattr(diffing, "CHUNK_BYTES", 64)
    g = torch.Generator().manual_seed(2)
    a = {"f": torch.randn(1000, generator=g), "bf": torch.randn(333, generator=g).bfloat16(),
         "b": torch.rand(100, generator=g) > 0.5, "nan_both": torch.randn(100, generator=g),
         "nan_one": torch.randn(100, generator=g), "u8": torch.randint(0, 255, (77,), dtype=torch.uint8),
         "mixed": torch.randn(50, generator=g), "nan_b": torch.randn(100, generator=g)}
    a["nan_both"][90] = float("nan")
    a["f"][999] = 50.0  # scale found in the last chunk, difference in the first
    b = {k: v.clone() for k, v in a.items()}
    b["nan_b_src"] = b.pop("nan_b")
    b["f"][0] += 1.0
    b["bf"][100] = 3.0
    b["b"][55] = ~b["b"][55]
    b["nan_one"][10] = float("inf")
    b["nan_b"] = b.pop("nan_b_src")
    b["nan_b"][33] = float("nan")
    b["u8"][76] = (int(a["u8"][76]) + 9) % 256
    b["mixed"] = b["mixed"].double()
    b["mixed"][49] += 2.0
    pa, pb = _save(a, tmp_path / "a.pt", "zip"), _save(b, tmp_path / "b.safetensors", "safetensors")
    report = torchckpt.diff(pa, pb, values=True)
    changed = {d.key: d for d in report.changed}
    assert set(changed) == {"f", "bf", "b", "nan_one", "u8", "mixed", "nan_b"}
    assert changed["nan_b"].max_abs == float("inf") and changed["nan_b"].nonfinite_b == 1
    assert changed["f"].max_abs == pytest.approx(1.0, rel=1e-6)
    assert changed["f"].max_rel == pytest.approx(1.0 / 50.0, rel=1e-6)
    assert changed["bf"].max_abs == pytest.approx(_reference(a["bf"], b["bf"])[0], rel=1e-6)
    assert changed["b"].max_abs == 1.0
    assert changed["nan_one"].max_abs == float("inf") and changed["nan_one"].nonfinite_b == 1
    assert changed["u8"].max_abs == pytest.approx(_reference(a["u8"], b["u8"])[0])
    assert changed["mixed"].max_abs == pytest.approx(2.0, rel=1e-6)
    assert report.dtype_changes == [("mixed", "float32", "float64")]
    assert any(s.startswith("nan_both (A: 1, B: 1)") for s in report.nonfinite)


@pytest.mark.slow
def test_cli_values_on_safetensors(tmp_path):
    """`diff --values` on safetensors files used to fail with 'tensor data location unknown'."""
    a = {"w": torch.ones(10)}
    pa = _save(a, tmp_path / "a.safetensors", "safetensors")
    pb = _save({"w": torch.ones(10) * 2}, tmp_path / "b.safetensors", "safetensors")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "torchckpt", "diff", "--values", *args],
                              capture_output=True, text=True, timeout=120)

    same, different = run(pa, pa), run(pa, pb)
    assert same.returncode == 0, same.stderr
    assert different.returncode == 1 and "max |a-b| 1" in different.stdout, different.stdout + different.stderr


def test_negative_atol_is_refused(tmp_path):
    p = _save({"w": torch.ones(3)}, tmp_path / "a.pt", "zip")
    with pytest.raises(ValueError, match="atol"):
        torchckpt.diff(p, p, values=True, atol=-1)
