"""``convert(..., to="sharded-safetensors")``: Hugging Face's sharded layout, read back by torchckpt and by
safetensors' own loader, cut by max_shard_size, published only when complete (a real full tmpfs)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import torchckpt
from torchckpt.cli.main import cli
from torchckpt.errors import AmbiguousOutputError, CheckpointError, CheckpointWriteError
from torchckpt.tools.convert.to_sharded import shard_size

INDEX = "model.safetensors.index.json"


def _model_sd(width: int = 64, layers: int = 6) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    m = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    return {k: v.clone() for k, v in m.state_dict().items()}


def _shards(out) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    index = json.loads((out / INDEX).read_text())
    files = {f: load_file(str(out / f)) for f in sorted(set(index["weight_map"].values()))}
    return index, files


def test_round_trip_three_shards_order_and_total_size(tmp_path) -> None:
    sd = _model_sd()  # 6 x (64*64 + 64) float32 = 6 x 16,640 bytes
    torch.save(sd, tmp_path / "m.pt")
    out = tmp_path / "hf"
    report = torchckpt.convert(tmp_path / "m.pt", out, to="sharded-safetensors", max_shard_size=40_000)
    assert report.verified and report.tensors == len(sd)
    index, files = _shards(out)
    n = len(files)
    assert n >= 3
    assert sorted(os.listdir(out)) == sorted([INDEX, *[f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]])
    # safetensors' own loader: every weight_map entry is in the shard it names, every shard within the limit
    for key, f in index["weight_map"].items():
        assert torch.equal(files[f][key], sd[key])
    for tensors in files.values():
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= 40_000
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert list(index["weight_map"]) == list(sd)
    back = torchckpt.load(out)
    assert list(back) == list(sd)  # key order kept
    for k in sd:
        assert torch.equal(back[k], sd[k])
    assert list(torchckpt.load(out / INDEX)) == list(sd)


def test_tensor_larger_than_limit_gets_its_own_shard_and_ties_are_stored_once(tmp_path) -> None:
    sd = {"a": torch.ones(10), "big": torch.arange(1000, dtype=torch.float32), "b": torch.zeros(10),
          "c": torch.full((5,), 2.0)}
    sd["tied"] = sd["a"]
    torch.save(sd, tmp_path / "m.pt")
    out = tmp_path / "hf"
    report = torchckpt.convert(tmp_path / "m.pt", out, to="sharded-safetensors", max_shard_size=100)
    index, files = _shards(out)
    assert index["weight_map"]["big"] not in (index["weight_map"]["a"], index["weight_map"]["b"])
    assert list(files[index["weight_map"]["big"]]) == ["big"]
    assert index["weight_map"]["b"] == index["weight_map"]["c"]  # 40 + 20 bytes fit one shard
    assert "tied" not in index["weight_map"] and index["metadata"]["torchckpt.aliases"] == {"tied": "a"}
    assert index["metadata"]["total_size"] == 4 * (10 + 1000 + 10 + 5)
    assert any("tied tensors stored once" in c for c in report.changes)
    back = torchckpt.load(out)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_default_and_spelled_shard_sizes() -> None:
    assert shard_size(None) == 5 * 10**9  # transformers' "5GB"
    assert shard_size("500MB") == 500 * 10**6 and shard_size("2GiB") == 2 * 2**30 and shard_size(123) == 123
    assert shard_size("1.5kb") == 1500
    for bad in ("", "5 parsecs", 0, -1, "0MB", True):
        with pytest.raises(ValueError):
            shard_size(bad)  # type: ignore[arg-type]


def test_dtype_cast_and_max_shard_size_alone_asks_for_shards(tmp_path) -> None:
    sd = _model_sd(layers=3)
    torch.save(sd, tmp_path / "m.pt")
    out = tmp_path / "hf"
    torchckpt.convert(tmp_path / "m.pt", out, max_shard_size="20KB", dtype="bf16")
    index, files = _shards(out)
    assert len(files) == 2 and index["metadata"]["total_size"] == sum(t.numel() * 2 for t in sd.values())
    back = torchckpt.load(out)
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], sd[k].bfloat16()) for k in sd)


def test_ambiguous_spellings_are_refused(tmp_path) -> None:
    torch.save(_model_sd(layers=1), tmp_path / "m.pt")
    src = str(tmp_path / "m.pt")
    with pytest.raises(AmbiguousOutputError, match="index file") as err:
        torchckpt.convert(src, tmp_path / INDEX)
    assert "--to sharded-safetensors" in (err.value.hint or "")
    with pytest.raises(AmbiguousOutputError, match="single file"):
        torchckpt.convert(src, tmp_path / "x.safetensors", max_shard_size="1MB")
    with pytest.raises(AmbiguousOutputError):
        torchckpt.convert(src, tmp_path / "x", to="pt", max_shard_size="1MB")
    (tmp_path / "notmine").mkdir()
    (tmp_path / "notmine" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointWriteError, match="not a sharded safetensors folder"):
        torchckpt.convert(src, tmp_path / "notmine", to="sharded-safetensors")
    assert (tmp_path / "notmine" / "keep.txt").read_text() == "x"
    assert not list(tmp_path.glob("x*"))


def test_cli_spelling_and_help(tmp_path) -> None:
    torch.save(_model_sd(), tmp_path / "m.pt")
    runner = CliRunner()
    help_text = runner.invoke(cli, ["convert", "--help"]).output
    assert "sharded-safetensors" in help_text and "--max-shard-size" in help_text
    done = runner.invoke(cli, ["convert", str(tmp_path / "m.pt"), str(tmp_path / "hf"), "--to", "sharded-safetensors",
                               "--max-shard-size", "40000", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["verified"] is True
    assert len(_shards(tmp_path / "hf")[1]) >= 3
    bad = runner.invoke(cli, ["convert", str(tmp_path / "m.pt"), str(tmp_path / INDEX)])
    assert bad.exit_code == 2 and "--to sharded-safetensors" in bad.output
    bad = runner.invoke(cli, ["convert", str(tmp_path / "m.pt"), str(tmp_path / "o"), "--max-shard-size", "5 parsecs"])
    assert bad.exit_code == 2 and "max_shard_size" in bad.output and not (tmp_path / "o").exists()


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_mid_way_leaves_the_previous_output_and_no_partial_folder(tmp_path, small_tmpfs) -> None:
    small = _model_sd(width=16, layers=2)
    torch.save(small, tmp_path / "small.pt")
    out = small_tmpfs / "hf"
    torchckpt.convert(tmp_path / "small.pt", out, to="sharded-safetensors", max_shard_size=1000)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    big = _model_sd(width=128, layers=4)  # 4 x 66,048 bytes: the tmpfs fills in the second or third shard
    torch.save(big, tmp_path / "big.pt")
    with pytest.raises(CheckpointWriteError, match="disk is full") as err:
        torchckpt.convert(tmp_path / "big.pt", out, to="sharded-safetensors", max_shard_size=70_000)
    assert isinstance(err.value, CheckpointError)
    assert sorted(os.listdir(small_tmpfs)) == ["hf"]  # no temp folder left behind
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    back = torchckpt.load(out)
    assert all(torch.equal(back[k], small[k]) for k in small)
    # with room, a conversion into the same folder replaces the previous output whole
    torchckpt.convert(tmp_path / "small.pt", out, to="sharded-safetensors", dtype="float16")
    assert sorted(os.listdir(small_tmpfs)) == ["hf"] and sorted(os.listdir(out)) == sorted([INDEX, "model-00001-of-00001.safetensors"])
    assert all(v.dtype == torch.float16 for v in torchckpt.load(out).values())


def test_url_destination_is_refused_before_any_work(tmp_path) -> None:
    torch.save(_model_sd(layers=1), tmp_path / "m.pt")
    with pytest.raises(CheckpointWriteError, match="URL"):
        torchckpt.convert(tmp_path / "m.pt", "s3://bucket/hf", to="sharded-safetensors")


def test_values_that_are_not_tensors_are_named_as_left_out(tmp_path) -> None:
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7, "config": {"lr": 0.1},
                "extra": {"nested": [torch.zeros(2), "label", {"k": 1}]}}, tmp_path / "train.pt")
    report = torchckpt.convert(tmp_path / "train.pt", tmp_path / "hf", to="sharded-safetensors")
    assert report.verified and report.tensors == 9
    (left_out,) = [c for c in report.changes if "not tensors left out" in c]
    for path in ("step", "config", "optimizer.param_groups", "extra.nested.1", "extra.nested.2"):
        assert path in left_out, path
    assert "optimizer.state" not in left_out and "model" not in left_out.split("(")[1]  # those hold tensors
    assert left_out.endswith("(5)")
    # only tensors: nothing is said to be left out
    torch.save(_model_sd(), tmp_path / "m.pt")
    plain = torchckpt.convert(tmp_path / "m.pt", tmp_path / "hf2", to="sharded-safetensors")
    assert not [c for c in plain.changes if "left out" in c]
    weights = torchckpt.convert(tmp_path / "train.pt", tmp_path / "hf3", to="sharded-safetensors", weights_only=True)
    assert not [c for c in weights.changes if "left out" in c] and weights.tensors == 2


def test_values_left_out_are_named_in_a_bounded_message(tmp_path):
    """A value left out under 30 levels of 64 KiB keys has a 2 MB dotted path: the report names it clipped,
    its control characters escaped, instead of carrying megabytes (and raw ESC) into every message."""
    name = "n" * (1 << 16)
    tree: dict = {"w": torch.zeros(1), "left\x1b]0;TITLE\x07": 3}
    for _ in range(30):
        tree = {name: tree}
    torch.save(tree, tmp_path / "deep.pt")
    report = torchckpt.convert(tmp_path / "deep.pt", tmp_path / "hf", to="sharded-safetensors")
    (left_out,) = [c for c in report.changes if "not tensors left out" in c]
    assert len(left_out) < 1000 and "\x1b" not in left_out
    assert left_out.endswith("(1)")
