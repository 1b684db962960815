"""Convert both ways: a DCP directory written by 2 ranks -> one .pt / .safetensors -> a DCP directory
again, every dtype exact and verified; non-tensor values and lists survive; the CLI does the same."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import torchckpt
from test_distributed_reader import full_tensors, same_bits, two_rank_dcp  # noqa: F401 - the 2-rank fixture

NOT_IN_SAFETENSORS = ("complex128", "float8_e4m3fnuz", "float8_e5m2fnuz")  # dtypes the format has no code for


def assert_tensors(got: dict, want: dict) -> None:
    for key, value in want.items():
        assert same_bits(got[key], value), key


@pytest.mark.parametrize("ext", ["pt", "safetensors"])
def test_dcp_to_one_file_and_back_is_exact(tmp_path, two_rank_dcp, ext):  # noqa: F811
    """Every dtype: DCP (2 ranks) -> one file -> DCP, bit for bit, each step verified by convert itself."""
    want = {k: v for k, v in full_tensors().items() if not (ext == "safetensors" and k in NOT_IN_SAFETENSORS)}
    one = tmp_path / f"one.{ext}"
    if ext == "safetensors":  # a DCP copy without the dtypes safetensors cannot hold is the source
        state = torchckpt.load(two_rank_dcp)
        for key in NOT_IN_SAFETENSORS:
            state.pop(key)
        torch.save(state, tmp_path / "st_dtypes.pt")
        assert torchckpt.convert(tmp_path / "st_dtypes.pt", tmp_path / "st_dtypes.dcp").verified
        source = tmp_path / "st_dtypes.dcp"
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


@pytest.mark.slow
def test_cli_converts_to_dcp(tmp_path, two_rank_dcp):  # noqa: F811
    torchckpt.convert(two_rank_dcp, tmp_path / "w.pt", weights_only=True, key="optim.state.w")
    src = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torchckpt", "convert", str(tmp_path / "w.pt"), str(tmp_path / "w.dcp")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "verified: yes" in out.stdout, out.stdout + out.stderr
    assert same_bits(torchckpt.load(tmp_path / "w.dcp")["exp_avg"], full_tensors()["fp32"])


def test_the_public_convert_takes_every_option_of_the_file_converter():
    """torchckpt.convert dispatches to DCP or to tools.convert: no option of the latter may be lost."""
    import inspect

    from torchckpt.tools.convert import to_file as file_convert

    public = inspect.signature(torchckpt.convert).parameters
    for name, param in inspect.signature(file_convert.convert).parameters.items():
        assert name in public and public[name].kind == param.kind and public[name].default == param.default, name
