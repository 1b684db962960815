"""The command line: output, --json, exit codes."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from torchckpt.cli.main import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_COLOR="1")
    return subprocess.run([sys.executable, "-m", "torchckpt", *args], capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_inspect_human_and_json(tmp_path, net):
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 4, "arch": "small", "state_dict": net.state_dict()}, path,
               _use_new_zipfile_serialization=False)
    res = run_cli("inspect", str(path))
    assert res.returncode == 0, res.stderr
    assert "legacy stream format" in res.stdout and "conv1.weight" in res.stdout
    assert "epoch" in res.stdout and "small" in res.stdout
    total = sum(v.numel() for v in net.state_dict().values())
    assert f"{total:,} parameters" in res.stdout
    doc = json.loads(run_cli("inspect", "--json", str(path)).stdout)
    assert doc["format"] == "torch-legacy" and doc["totals"]["parameters"] == total
    keys = {t["key"]: t for t in doc["tensors"]}
    assert keys["state_dict.conv1.weight"]["shape"] == [8, 3, 3, 3]
    assert keys["state_dict.conv1.weight"]["bytes"] == 8 * 3 * 3 * 3 * 4
    assert {"path": "epoch", "type": "int", "value": "4"} in doc["values"]


def test_exit_codes(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.pt")]) == 3
    (tmp_path / "lfs.bin").write_bytes(b"version https://git-lfs.github.com/spec/v1\nsize 10\n")
    assert main(["inspect", str(tmp_path / "lfs.bin")]) == 3
    assert "git lfs pull" in capsys.readouterr().err

    class Evil:
        def __reduce__(self):
            return os.system, ("true",)

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil()))
    assert main(["inspect", str(tmp_path / "evil.pt")]) == 4
    assert main(["inspect"]) == 2
    assert main(["no-such-command"]) == 2


@pytest.mark.slow
def test_help_everywhere():
    for args in (["--help"], ["inspect", "--help"], ["tour", "--help"]):
        res = run_cli(*args)
        assert res.returncode == 0 and "Usage" in res.stdout


@pytest.mark.slow
def test_tour_runs_every_scenario(tmp_path):
    res = run_cli("tour", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    outcomes = json.loads(res.stdout)
    assert len(outcomes) >= 12 and all(o["ok"] for o in outcomes)


@pytest.mark.slow
def test_inspect_never_imports_torch(tmp_path, net):
    """inspect reads structure only: no torch import, so it is fast whatever the file size."""
    from safetensors.torch import save_file

    from torchckpt.demo.samples import write_py2_legacy

    files = [tmp_path / "a.pt", tmp_path / "b.pth", tmp_path / "c.pth", tmp_path / "d.safetensors"]
    torch.save({"sd": net.state_dict(), "epoch": 1}, files[0])
    torch.save(net, files[1], _use_new_zipfile_serialization=False)
    write_py2_legacy({"state_dict": net.state_dict()}, files[2])
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, files[3])
    code = ("import sys, torchckpt\n"
            f"reports = [torchckpt.inspect(p) for p in {[str(f) for f in files]!r}]\n"
            "assert 'torch' not in sys.modules\n"
            "print([r.total_parameters for r in reports])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    total = sum(v.numel() for v in net.state_dict().values())
    assert json.loads(res.stdout) == [total] * 4


@pytest.mark.slow
def test_json_mode_reports_errors_as_json(tmp_path):
    (tmp_path / "page.bin").write_bytes(b"<html><title>Error 403</title></html>")
    res = run_cli("inspect", "--json", str(tmp_path / "page.bin"))
    assert res.returncode == 3
    doc = json.loads(res.stdout)
    assert doc["error"] == "NotACheckpointError" and "403" in doc["reason"] and doc["exit_code"] == 3
