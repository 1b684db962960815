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


def quantized_file(path, seed=0):
    """A dynamically quantized (qint8) one-layer model's state dict saved at ``path``."""
    import warnings

    torch.manual_seed(seed)
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in torch 2.13; still what users have
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(4, 4)), {torch.nn.Linear},
                                                   dtype=torch.qint8)
    torch.save(q.state_dict(), path)
    return path


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


def test_wrong_model_hint_does_not_offer_to_load_nothing(tmp_path):
    """A checkpoint of another model: the hint said "Pass strict=False to load the 0 tensors that fit"."""
    path = tmp_path / "conv.pt"
    torch.save(torch.nn.Conv2d(3, 4, 3).state_dict(), path)
    with pytest.raises(torchckpt.StateDictMismatchError) as info:
        torchckpt.load_into(torch.nn.LSTM(3, 4), path)
    hint = info.value.hint
    assert "0 tensors" not in hint and "check that this checkpoint is for this model" in hint
    assert "load no tensor" in hint


def test_diff_key_missing_in_one_file_names_that_file(tmp_path):
    """`diff A B --key state_dict` where only B has `state_dict`: the error did not say which file lacked it."""
    plain, training = tmp_path / "plain.pt", tmp_path / "training.pt"
    sd = {"w": torch.ones(2)}
    torch.save(sd, plain)
    torch.save({"state_dict": sd, "epoch": 1}, training)
    res = run_cli("diff", training, plain, "--key", "state_dict")
    assert res.returncode == 3
    assert f"{plain}: key='state_dict' not found" in res.stderr or "plain.pt: key='state_dict'" in res.stderr
    assert "training.pt" not in res.stderr
    assert run_cli("diff", training, training, "--key", "state_dict").returncode == 0


def test_every_exit_code_is_documented_in_help_and_readme():
    """70 (internal error) was returned by the CLI but listed neither in `torchckpt --help` nor the README."""
    import pathlib
    import re

    from torchckpt.cli import codes

    values = sorted({v for k, v in vars(codes).items() if k.startswith("EXIT_") and isinstance(v, int)})
    assert 70 in values and 130 in values
    helptext = " ".join(run_cli("--help").stdout.split())
    readme = " ".join((pathlib.Path(__file__).parents[2] / "README.md").read_text().split())
    section = readme[readme.index("## Command line"):]
    for value in values:
        assert re.search(rf"\b{value} [a-z]", helptext), (value, helptext)
        assert re.search(rf"\b{value} [a-z]", section), value


def test_inspect_reads_a_run_directory_like_load(tmp_path):
    """`torchckpt.load("runs/exp1")` worked; `torchckpt inspect runs/exp1` said "not a checkpoint folder"."""
    run = tmp_path / "runs" / "exp1"
    model = torch.nn.Linear(3, 2)
    with torchckpt.Checkpointer(run, keep_last=2) as ckpt:
        ckpt.save(1, model=model)
        ckpt.save(2, model=model)
    res = run_cli("inspect", run)
    assert res.returncode == 0, res.stderr
    assert "ckpt-0000000002.pt" in res.stdout and "model.weight" in res.stdout
    res = run_cli("inspect", run, "--json")
    assert res.returncode == 0, res.stderr
    import json
    assert any("newest committed checkpoint" in n for n in json.loads(res.stdout)["notes"])


def test_report_creates_the_output_directory(tmp_path):
    """`torchckpt report ckpt.pt -o reports/x.html` exited 3, "the directory does not exist"."""
    pytest.importorskip("matplotlib")
    src = tmp_path / "x.pt"
    torch.save({"w": torch.randn(3, 3)}, src)
    out = tmp_path / "reports" / "x.html"
    res = run_cli("report", src, "-o", out)
    assert res.returncode == 0, res.stderr
    assert out.read_text().lstrip().lower().startswith("<!doctype html")


@pytest.mark.slow
def test_scan_takes_a_deepspeed_folder_without_r(tmp_path):
    """The README: "`load_into`, `scan` and `convert` take the folder"; `scan FOLDER` answered "pass -r"
    for a DeepSpeed run folder, while DCP, Hugging Face and accelerate folders were scanned as they are."""
    pytest.importorskip("deepspeed")
    import os

    from dist_launch import free_port

    app = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers", "deepspeed_app.py")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), app, str(tmp_path), "1-fp32"],
                          env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "1-fp32"
    for path in (folder, folder / "global_step3"):
        res = run_cli("scan", path)
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"{path}: clean (deepspeed" in res.stdout
    plain = tmp_path / "plain"
    plain.mkdir()
    assert run_cli("scan", plain).returncode == 2  # any other directory still needs -r


def test_diff_compares_the_weights_of_quantized_layers(tmp_path):
    """Two dynamically quantized models with different weights: `diff` said "identical (4 tensors)", exit 0:
    it compared only the scales and zero points, not the weights inside the layers' packed params."""
    paths = [quantized_file(tmp_path / f"q{seed}.pt", seed) for seed in (0, 1)]
    report = torchckpt.diff(*paths)
    assert report.equal is False and report.changed, report.render()
    assert any("_packed_params" in d.key for d in report.changed)
    assert torchckpt.diff(paths[0], paths[0]).equal is True
    res = run_cli("diff", *paths)
    assert res.returncode == 1, res.stdout


def test_convert_quantized_to_safetensors_says_what_to_do(tmp_path):
    """The file is fine, the output format cannot hold qint8: the error was CorruptCheckpointError, no hint."""
    src = quantized_file(tmp_path / "q.pt")
    with pytest.raises(torchckpt.UnsupportedFormatError) as info:
        torchckpt.convert(src, tmp_path / "q.safetensors")
    assert not isinstance(info.value, torchckpt.CorruptCheckpointError)
    assert ".pt" in info.value.hint and "qint8" in str(info.value)
    assert torchckpt.convert(src, tmp_path / "q2.pt").verified  # the hint works


def test_inspect_names_a_dtype_value_as_load_gives_it(tmp_path):
    """`inspect` showed the type of a saved torch.dtype as 'torchckpt.read.unpickle.meta.MetaDType'."""
    path = tmp_path / "d.pt"
    torch.save({"w": torch.ones(2), "dtype": torch.bfloat16}, path)
    assert type(torchckpt.load(path)["dtype"]) is torch.dtype
    row = next(v for v in torchckpt.inspect(path).to_dict()["values"] if v["path"] == "dtype")
    assert row["type"] == "torch.dtype", row
    assert "MetaDType" not in run_cli("inspect", path).stdout


def test_convert_of_a_quantized_model_prints_no_torch_warning(tmp_path):
    """`torchckpt convert q.pt out.pt` printed torch's "TypedStorage is deprecated" UserWarning (its verification)."""
    src = quantized_file(tmp_path / "q.pt")
    res = run_cli("convert", src, tmp_path / "out.pt")
    assert res.returncode == 0, res.stderr
    assert "TypedStorage" not in res.stderr and "Warning" not in res.stderr, res.stderr


def test_every_reading_subcommand_documents_its_exit_codes():
    """inspect and convert --help listed no exit codes (inspect --against exits 1 when the plan does not fit)."""
    for command in ("inspect", "scan", "convert", "diff", "report"):
        text = " ".join(run_cli(command, "--help").stdout.split())
        assert "Exit code" in text and "3 unreadable" in text, (command, text)


def test_inspect_refuses_a_negative_max_tensors(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"w": torch.ones(2)}, path)
    res = run_cli("inspect", path, "--max-tensors", "-1")
    assert res.returncode == 2 and "--max-tensors" in res.stderr


def test_diff_of_a_prefix_only_difference_says_values_are_equal(tmp_path):
    """A DataParallel copy of the same weights read "values differ in 0 tensors; layers changed: none"."""
    sd = torch.nn.Linear(3, 2).state_dict()
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(sd, a)
    torch.save({"module." + k: v for k, v in sd.items()}, b)
    text = torchckpt.diff(a, b).render()
    assert "adding 'module.'" in text and "equal in the 2 tensors compared" in text
    assert "differ in 0" not in text and "none" not in text
