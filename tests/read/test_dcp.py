"""torch.distributed.checkpoint directories: load, load_into, inspect, convert, scan; hostile items."""

from __future__ import annotations

import warnings

import pytest
import torch

import torchckpt


def _dcp(path, state):
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(path))


def test_dcp_directory_loads_nested_and_into_a_model(tmp_path, net):
    state = {"model": net.state_dict(), "epoch": 4, "extra": {"lr": 0.1}}
    _dcp(tmp_path / "ckpt", state)
    out, info = torchckpt.load(tmp_path / "ckpt", return_info=True)
    assert info.kind == "dcp" and out["epoch"] == 4 and out["extra"] == {"lr": 0.1}
    assert all(torch.equal(out["model"][k], v) for k, v in net.state_dict().items())
    from conftest import small_net

    fresh = small_net()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    assert torchckpt.load_into(fresh, tmp_path / "ckpt").ok
    assert torch.equal(fresh.fc.weight, net.fc.weight)
    report = torchckpt.inspect(tmp_path / "ckpt")
    assert report.format == "dcp" and {t.key for t in report.tensors} == {f"model.{k}" for k in net.state_dict()}
    assert torchckpt.scan(tmp_path / "ckpt", recursive=True).status == "clean"
    assert torchckpt.convert(tmp_path / "ckpt", tmp_path / "out.safetensors", weights_only=True, key="model").verified


def test_malicious_item_inside_distcp(tmp_path):
    """Replace a non-tensor item's bytes with a malicious torch zip of the same length."""
    from test_malicious import _payload_pickle, technique_os_system

    from pickle_asm import torch_zip

    _dcp(tmp_path / "ckpt", {"w": torch.ones(3), "note": "x" * 400})
    meta = torchckpt.load(tmp_path / "ckpt" / ".metadata")
    info = next(v.stub_attributes() for k, v in meta.storage_data.items() if k.stub_attributes()["fqn"] == "note")
    data_file = tmp_path / "ckpt" / info["relative_path"]
    blob = bytearray(data_file.read_bytes())
    evil = torch_zip(_payload_pickle(technique_os_system(tmp_path / "canary")))
    assert len(evil) <= info["length"]
    blob[info["offset"]:info["offset"] + info["length"]] = evil + b"\0" * (info["length"] - len(evil))
    data_file.write_bytes(bytes(blob))
    with pytest.raises(torchckpt.UnsafeCheckpointError):
        torchckpt.load(tmp_path / "ckpt")
    report = torchckpt.scan(tmp_path / "ckpt", recursive=True)
    assert report.status == "findings" and not (tmp_path / "canary").exists()


def test_metadata_pointing_outside_is_refused(tmp_path):
    _dcp(tmp_path / "ckpt", {"w": torch.ones(3)})
    meta_path = tmp_path / "ckpt" / ".metadata"
    data = meta_path.read_bytes()
    name = b"__0_0.distcp"
    assert name in data
    meta_path.write_bytes(data.replace(name, b"../evil.bin!"[:len(name)]))
    with pytest.raises(torchckpt.UnsafeCheckpointError):
        torchckpt.load(tmp_path / "ckpt")
