"""The promises of the README and the docstrings, tried as a new user would (issue 11 items 1, 3, 4, 8,
9, 11 and issue 15's load_state_dict names), one test each, on files the tests write."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import torchckpt
from torchckpt.cli.main import main
from torchckpt.demo.samples import saved_on_device


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_COLOR="1")
    return subprocess.run([sys.executable, "-m", "torchckpt", *args], capture_output=True, text=True, env=env)


class Full(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(classes)
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, classes)


def backbone() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


# -- 1. truncated, empty and missing files in the CLI: a message and exit 3 ---------------------------
@pytest.mark.slow
def test_cli_truncated_empty_and_missing_files_exit_3(tmp_path, net):
    good = tmp_path / "good.pt"
    torch.save(net.state_dict(), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    missing = str(tmp_path / "missing.pt")
    for bad in (cut, empty):
        for args in (["inspect", str(bad)], ["convert", str(bad), str(tmp_path / "o.pt")],
                     ["diff", str(good), str(bad)]):
            res = run_cli(*args)
            assert res.returncode == 3, (args, res.stdout, res.stderr)
            assert str(bad) in res.stderr and ("truncat" in res.stderr or "empty" in res.stderr), res.stderr
    for args in (["inspect", missing], ["scan", missing], ["convert", missing, str(tmp_path / "o.pt")],
                 ["diff", missing, str(good)], ["diff", str(good), missing]):
        res = run_cli(*args)
        assert res.returncode == 3, (args, res.stderr)
        assert "missing.pt" in res.stderr and "no such file" in res.stderr
    res = run_cli("inspect", "--json", str(empty))
    assert res.returncode == 3 and json.loads(res.stdout)["error"] == "TruncatedCheckpointError"


@pytest.mark.slow
def test_a_broken_command_fails_loudly():
    """--help lists every command from the command table (it imports none of them): `diff` stays listed
    when its module cannot be imported, and running it fails loudly, naming the module."""
    def run(*args: str) -> subprocess.CompletedProcess:
        code = ("import sys; sys.modules['torchckpt.cli.diff_cmd'] = None\n"
                "from torchckpt.cli.main import main\n"
                f"sys.exit(main({list(args)!r}))")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    listing = run("--help")
    assert listing.returncode == 0 and "  diff " in listing.stdout, listing.stderr  # not a help text without `diff`
    for args in (("diff", "--help"), ("diff", "a.pt", "b.pt")):
        res = run(*args)
        assert res.returncode != 0 and "diff_cmd" in res.stderr, (args, res.stdout, res.stderr[-2000:])


# -- 3. a prefix chooses the scope ----------------------------------------------------------------
def test_prefix_selects_a_part_of_the_network_strictly(tmp_path):
    full = Full()
    path = tmp_path / "full.pt"
    torch.save({"state_dict": full.state_dict()}, path)
    part = backbone()
    report = torchckpt.load_into(part, path, prefix="backbone.")  # strict, as the README writes it
    assert report.ok and report.applied and not report.unexpected
    assert report.outside == ["head.weight", "head.bias"]
    assert "outside the selected part" in str(report) and "unexpected" not in str(report)
    assert torch.equal(part[0].weight, full.backbone[0].weight)
    torch.save(nn.DataParallel(full).state_dict(), path)  # the same network saved under DataParallel
    report = torchckpt.load_into(backbone(), path, prefix="backbone.")
    assert report.ok and sorted(report.outside) == ["module.head.bias", "module.head.weight"]


# -- 4. resized layers: strict=False skips and reports; dry_run returns the plan -------------------
def test_strict_false_skips_resized_tensors_and_dry_run_never_raises(tmp_path):
    src = Full(1000)
    path = tmp_path / "imagenet.pt"
    torch.save(src.state_dict(), path)
    target = Full(10)
    head = target.head.weight.detach().clone()
    report = torchckpt.load_into(target, path, strict=False)
    assert sorted(report.skipped) == ["head.bias", "head.weight"] and report.applied
    assert torch.equal(target.head.weight, head) and torch.equal(target.backbone[0].weight, src.backbone[0].weight)
    assert "skipped" in str(report)
    with pytest.raises(torchckpt.StateDictMismatchError):  # an explicit "error" still raises
        torchckpt.load_into(Full(10), path, strict=False, on_mismatch="error")
    fresh = Full(10)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    plan = torchckpt.load_into(fresh, path, dry_run=True)  # strict and on_mismatch="error": still a plan
    assert not plan.ok and not plan.applied and [m.action for m in plan.mismatched] == ["error", "error"]
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    plan = torchckpt.load_into(Full(1000), {"extra.weight": torch.zeros(1), **src.state_dict()}, dry_run=True)
    assert plan.unexpected == ["extra.weight"] and not plan.ok and not plan.mismatched


# -- 8. a map_location device this machine lacks is blamed, not the file ---------------------------
def test_map_location_to_a_missing_device_names_the_device(tmp_path):
    path = tmp_path / "gpu.ckpt"
    with saved_on_device("cuda:3"):
        torch.save({"w": torch.arange(4.0)}, path)
    absent = f"cuda:{torch.cuda.device_count() + 5}"
    with pytest.raises(torchckpt.DeviceUnavailableError) as info:
        torchckpt.load(path, map_location={"cuda:3": absent})
    text = str(info.value)
    assert absent in text and "cuda:3" in text and "malformed" not in text and "map_location" in text
    assert info.value.device == absent and str(path) in text
    assert torch.equal(torchckpt.load(path, map_location={"cuda:3": "cpu"})["w"], torch.arange(4.0))


# -- 9. wording ----------------------------------------------------------------------------------
def test_strict_mismatch_does_not_claim_it_loaded(tmp_path):
    src = Full()
    bigger = Full()
    bigger.extra = nn.Linear(2, 2)
    with pytest.raises(torchckpt.StateDictMismatchError) as info:
        torchckpt.load_into(bigger, src.state_dict())
    text = str(info.value)
    assert "nothing was loaded" in text and ": loaded " not in text


def test_print_info_does_not_dump_tensors(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"weights": torch.arange(1000.0)}, path)
    _, info = torchckpt.load(path, return_info=True)
    text = repr(info)
    assert "tensor(" not in text and "999" not in text and info.kind in text


@pytest.mark.slow
def test_cli_scan_directory_suggests_r_and_atol_must_be_positive(tmp_path, net):
    torch.save(net.state_dict(), tmp_path / "a.pt")
    res = run_cli("scan", str(tmp_path))
    assert res.returncode == 2 and "-r" in res.stderr and "recursive=True" not in res.stdout + res.stderr
    res = run_cli("diff", str(tmp_path / "a.pt"), str(tmp_path / "a.pt"), "--atol", "-1")
    assert res.returncode == 2 and "atol" in res.stderr.lower()
    with pytest.raises(ValueError, match="atol"):
        torchckpt.diff(tmp_path / "a.pt", tmp_path / "a.pt", atol=-1)


# -- 11. load_into reports device moves and whole-model stubs --------------------------------------
def test_load_into_reports_device_moves_and_stubs(tmp_path):
    src = backbone()
    path = tmp_path / "gpu.pt"
    with saved_on_device("cuda:3"):
        torch.save(src.state_dict(), path)
    report = torchckpt.load_into(backbone(), path)
    assert any("cuda:3" in n and "cpu" in n for n in report.notes), report.notes
    whole = tmp_path / "whole.pt"
    torch.save(Full(), whole)  # Full lives in this test module: a stub unless allowed
    report = torchckpt.load_into(Full(), whole)
    assert report.ok and any("stubs" in n and "Full" in n for n in report.notes), report.notes
    report = torchckpt.load_into(Full(), whole, trust=True)
    assert report.ok and not any("stubs" in n for n in report.notes)


# -- issue 15: load_state_dict's names and assign= ------------------------------------------------
def test_missing_and_unexpected_keys_and_assign(tmp_path):
    src = Full()
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    sd["stray.weight"] = torch.zeros(1)
    target = Full()
    report = torchckpt.load_into(target, sd, strict=False)
    assert report.missing_keys == ["head.weight", "head.bias"] and report.unexpected_keys == ["stray.weight"]
    assert report.missing_keys is report.missing
    path = tmp_path / "full.pt"
    torch.save(src.state_dict(), path)
    target = Full(10)
    old = target.head.weight
    report = torchckpt.load_into(target, path, assign=True)
    assert report.ok and target.head.weight is not old and isinstance(target.head.weight, nn.Parameter)
    assert torch.equal(target.head.weight, src.head.weight)
    with torch.no_grad():
        target.head.weight.add_(1)  # the model owns its memory: the file and the source are untouched
    assert torch.equal(torchckpt.load(path)["head.weight"], src.head.weight)


# -- policy= everywhere, trust/allow as shorthands -------------------------------------------------
def test_policy_is_accepted_by_every_front_end(tmp_path, net):
    path = tmp_path / "whole.pt"
    torch.save(Full(), path)
    allow = torchckpt.Policy.make(trust=True)  # (allow= of a user class alone leaves torch.nn stubbed: item 5)
    assert type(torchckpt.load(path, policy=allow)) is Full
    assert torchckpt.inspect(path, policy=allow).weights[0][1] == "module object"
    assert torchckpt.inspect(path).weights[0][1] == "module stub"
    assert torchckpt.load_into(Full(), path, policy=allow).ok
    assert torchckpt.convert(path, tmp_path / "o.pt", policy=allow).verified
    assert torchckpt.diff(path, path, policy=allow).equal
    assert torchckpt.diff(path, path, trust=True).equal
    assert [s.key for s in torchckpt.report(path, policy=allow).stats] == list(Full().state_dict())
    with pytest.raises(ValueError, match="either policy"):
        torchckpt.load(path, policy=allow, trust=True)
    assert main(["inspect", "--trust", str(path)]) == 0
    assert main(["inspect", "--allow", f"{Full.__module__}.*", "--allow", "torch.nn.*", str(path)]) == 0


# -- one opener: every front end reads what load reads (a torch.distributed.checkpoint directory) ----
def test_every_front_end_reads_a_dcp_directory(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp

    model = Full()
    folder = tmp_path / "step_10"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(folder))
    keys = [f"model.{k}" for k in model.state_dict()]
    assert [t.key for t in torchckpt.inspect(folder).tensors] == keys
    page = torchckpt.report(folder, diff=folder)  # was: "this is a directory, not a checkpoint file"
    assert [s.key for s in page.stats] == keys
    assert page.stats[0].numel == model.state_dict()["backbone.0.weight"].numel()
    assert [c.change for c in page.changes] == [0.0] * len(keys)
    fresh = Full(classes=10)
    nn.init.zeros_(fresh.head.weight)
    assert torchckpt.load_into(fresh, folder, prefix=None, key="model").ok
    assert torch.equal(fresh.head.weight, model.head.weight)
    assert torchckpt.diff(folder, folder, values=True).equal


# -- records render themselves: the command line prints exactly what the record renders ---------------
def test_cli_prints_what_each_record_renders(tmp_path, net, capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(net.state_dict(), a)
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    torch.save({"state_dict": net.state_dict(), "x": {"__class__": "y"}}, b)
    capsys.readouterr()
    cases = [(["inspect", str(a)], torchckpt.inspect(a).render(), 0),
             (["scan", "-v", str(a), str(b)], torchckpt.scan([a, b]).render(verbose=True), 0),
             (["diff", "--values", str(a), str(b)], torchckpt.diff(a, b, values=True).render(), 1)]
    for args, rendered, code in cases:
        assert main(args) == code
        assert capsys.readouterr().out == rendered + "\n", args
    assert "FINDINGS" not in rendered and "max |a-b| 1" in cases[2][1]


# -- 9. a cut-off safetensors file is a truncated safetensors file, not "unrecognised content" ---------
@pytest.mark.slow
@pytest.mark.parametrize("keep", [12, 40])
def test_truncated_safetensors_header_is_named(tmp_path, keep):
    from safetensors.torch import save_file

    full = tmp_path / "full.safetensors"
    save_file({"weight": torch.ones(64, 64)}, str(full))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[:keep])  # the 8-byte length and part of the JSON header
    with pytest.raises(torchckpt.TruncatedCheckpointError, match=r"safetensors header declares \d+ bytes; "
                                                                 rf"the file has {keep}"):
        torchckpt.load(cut)
    assert torchckpt.scan(cut).files[0].status == "unreadable"
    res = run_cli("inspect", str(cut))
    assert res.returncode == 3 and "unrecognised" not in res.stderr and "cut short" in res.stderr
