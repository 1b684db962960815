"""A lone shard of a torch.distributed.checkpoint folder (``__0_0.distcp``: torch.save archives back to back)
is refused with a typed error that names the folder to load, never read as one tensor."""

from __future__ import annotations

import io
import shutil
import warnings

import pytest
import torch

import torchckpt
from torchckpt.errors import PartialCheckpointError, UnsupportedFormatError


def _dcp(path, state):
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(path))


@pytest.fixture
def shard(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "ckpt"
    _dcp(folder, {"model": {"w": torch.randn(3, 4), "b": torch.randn(4)}, "epoch": 3, "note": "hello"})
    files = sorted(folder.glob("*.distcp"))
    assert files and (folder / ".metadata").exists()
    return folder, files[0]


def test_lone_shard_names_its_folder(shard):
    folder, path = shard
    with pytest.raises(PartialCheckpointError) as info:
        torchckpt.load(path)
    err = info.value
    assert isinstance(err, UnsupportedFormatError) and err.folder == str(folder)
    assert str(folder) in err.hint and "shard" in err.reason
    assert torchckpt.load(folder)["epoch"] == 3  # the folder it names loads


def test_lone_shard_in_scan_inspect_load_into_and_cli(shard, tmp_path, capsys):
    folder, path = shard
    report = torchckpt.scan(path)
    assert report.status == "unreadable" and str(folder) in (report.files[0].hint or "")
    with pytest.raises(PartialCheckpointError):
        torchckpt.inspect(path)
    with pytest.raises(PartialCheckpointError):
        torchckpt.load_into(torch.nn.Linear(4, 3), path)
    from torchckpt.cli.main import main

    capsys.readouterr()
    assert main(["inspect", str(path)]) == 3  # unreadable
    assert str(folder) in capsys.readouterr().err


def test_shard_away_from_its_folder_gets_the_general_hint(shard, tmp_path):
    _, path = shard
    alone = tmp_path / "alone.distcp"
    shutil.copy(path, alone)
    with pytest.raises(PartialCheckpointError) as info:
        torchckpt.load(alone)
    assert info.value.folder is None and ".metadata" in info.value.hint


def test_two_torch_save_archives_back_to_back_are_not_read_as_the_last(tmp_path):
    a, b = io.BytesIO(), io.BytesIO()
    torch.save({"a": torch.ones(2)}, a)
    torch.save({"b": torch.zeros(3)}, b)
    (tmp_path / "cat.pt").write_bytes(a.getvalue() + b.getvalue())
    with pytest.raises(PartialCheckpointError):
        torchckpt.load(tmp_path / "cat.pt")


def test_an_ordinary_file_is_no_shard(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "one.pt")
    assert torch.equal(torchckpt.load(tmp_path / "one.pt")["w"], torch.ones(2))


def test_a_zip_behind_a_fake_local_header_is_no_shard_but_a_finding(tmp_path):
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    path = tmp_path / "prefixed.pt"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 26 + buf.getvalue())  # no whole archive before it
    report = torchckpt.scan(path)
    assert any("before the first zip member" in f.message for f in report.files[0].findings)
