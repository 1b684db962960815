"""Convert both ways: a DCP directory written by 2 ranks -> one .pt / .safetensors -> a DCP directory
again, every dtype exact and verified; non-tensor values and lists survive; the CLI does the same."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import torchckpt
from test_distributed_reader import full_tensors, two_rank_dcp  # noqa: F401 - the shared 2-rank fixture


def assert_tensors(got: dict, want: dict) -> None:
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("ext", ["pt", "safetensors"])
def test_dcp_to_one_file_and_back_is_exact(tmp_path, two_rank_dcp, ext):  # noqa: F811
    want = {k: v for k, v in full_tensors().items() if not (ext == "safetensors" and k == "complex64")}
    one = tmp_path / f"one.{ext}"
    if ext == "safetensors":  # safetensors has no complex dtype: a DCP copy without it is the source
        state = torchckpt.load(two_rank_dcp)
        state.pop("complex64")
        torch.save(state, tmp_path / "nocomplex.pt")
        assert torchckpt.convert(tmp_path / "nocomplex.pt", tmp_path / "nocomplex.dcp").verified
        source = tmp_path / "nocomplex.dcp"
    else:
        source = two_rank_dcp
    report = torchckpt.convert(source, one)
    assert report.verified and report.source_format == "torch.distributed.checkpoint directory"
    assert_tensors(torchckpt.load(one), want)
    back = torchckpt.convert(one, tmp_path / "back.dcp")
    assert back.verified and back.to == "dcp"
    out = torchckpt.load(tmp_path / "back.dcp")
    assert_tensors(out, want)
    if ext == "pt":
        assert out["optim"]["param_groups"][0]["betas"] == (0.9, 0.999) and out["pair"] == (1, "two")
        # the directory is a real DCP checkpoint: torch's own loader reads it
        import torch.distributed.checkpoint as dcp

        target = {k: torch.empty_like(v) for k, v in want.items()}
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(target, checkpoint_id=str(tmp_path / "back.dcp"), no_dist=True)
        assert_tensors(target, want)


def test_convert_into_an_existing_path_is_refused(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "a.pt")
    (tmp_path / "out.dcp").mkdir()
    with pytest.raises(FileExistsError):
        torchckpt.convert(tmp_path / "a.pt", tmp_path / "out.dcp")


def test_cli_converts_to_dcp(tmp_path, two_rank_dcp):  # noqa: F811
    torchckpt.convert(two_rank_dcp, tmp_path / "w.pt", weights_only=True, key="optim.state.w")
    src = os.path.join(os.path.dirname(__file__), os.pardir, "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "torchckpt", "convert", str(tmp_path / "w.pt"), str(tmp_path / "w.dcp")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "verified: yes" in out.stdout, out.stdout + out.stderr
    assert torch.equal(torchckpt.load(tmp_path / "w.dcp")["exp_avg"], full_tensors()["fp32"])


def test_the_public_convert_takes_every_option_of_the_file_converter():
    """torchckpt.convert dispatches to DCP or to tools.convert: no option of the latter may be lost."""
    import inspect

    from torchckpt.tools import convert as file_convert

    public = inspect.signature(torchckpt.convert).parameters
    for name, param in inspect.signature(file_convert.convert).parameters.items():
        assert name in public and public[name].kind == param.kind and public[name].default == param.default, name
