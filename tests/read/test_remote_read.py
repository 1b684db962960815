"""Reading from remote storage against real servers on 127.0.0.1: moto (S3) and an HTTP file server.

Bytes moved are measured outside the code under test: by a counting TCP proxy in front of moto and
by the HTTP server itself.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import torchckpt
from conftest import assert_same_state
from remote_servers import http_server, s3_bucket

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3():
    """(fsspec filesystem, storage_options through a counting proxy, proxy) on a fresh moto server."""
    with s3_bucket("bkt") as s3:
        yield s3


def _put(fs, local, key):
    fs.put_file(str(local), key)


def _big_state(mib: int = 16) -> dict:
    n = mib * (1 << 20) // 4 // 4
    return {f"layer{i}.weight": torch.arange(n, dtype=torch.float32).reshape(-1, 64) + i for i in range(4)}


@pytest.mark.slow
def test_load_and_load_into_from_s3(s3, tmp_path, net):
    fs, opts, _ = s3
    torch.save(net.state_dict(), tmp_path / "m.pt")
    _put(fs, tmp_path / "m.pt", "bkt/models/m.pt")
    assert_same_state(net.state_dict(), torchckpt.load("s3://bkt/models/m.pt", storage_options=opts))
    from conftest import small_net

    fresh = small_net()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1)
    report = torchckpt.load_into(fresh, "s3://bkt/models/m.pt", storage_options=opts)
    assert report.ok and torch.equal(fresh.fc.weight, net.fc.weight)


@pytest.mark.slow
def test_inspect_of_remote_zip_moves_kilobytes(s3, tmp_path):
    fs, opts, proxy = s3
    state = _big_state(16)
    torch.save(state, tmp_path / "big.pt")
    size = (tmp_path / "big.pt").stat().st_size
    _put(fs, tmp_path / "big.pt", "bkt/big.pt")
    proxy.reset()
    report = torchckpt.inspect("s3://bkt/big.pt", storage_options=opts)
    assert report.format == "torch-zip" and len(report.tensors) == 4 and report.file_size == size
    assert proxy.down < 512 << 10, f"inspect moved {proxy.down} bytes of a {size}-byte object"
    proxy.reset()
    loaded = torchckpt.load("s3://bkt/big.pt", storage_options=opts)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert proxy.down >= size  # the data did come over the wire for load


@pytest.mark.slow
def test_inspect_of_remote_safetensors_reads_the_header(s3, tmp_path):
    from safetensors.torch import save_file

    fs, opts, proxy = s3
    state = _big_state(16)
    save_file(state, str(tmp_path / "big.safetensors"))
    _put(fs, tmp_path / "big.safetensors", "bkt/big.safetensors")
    proxy.reset()
    report = torchckpt.inspect("s3://bkt/big.safetensors", storage_options=opts)
    assert report.format == "safetensors" and len(report.tensors) == 4
    assert proxy.down < 256 << 10, proxy.down
    loaded = torchckpt.load("s3://bkt/big.safetensors", storage_options=opts)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


@pytest.mark.slow
def test_hf_sharded_index_from_s3(s3, tmp_path, net):
    from safetensors.torch import save_file

    fs, opts, _ = s3
    sd = net.state_dict()
    keys = list(sd)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, str(tmp_path / name))
        _put(fs, tmp_path / name, f"bkt/hf/{name}")
        weight_map.update({k: name for k in ks})
    (tmp_path / "index.json").write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    _put(fs, tmp_path / "index.json", "bkt/hf/model.safetensors.index.json")
    out, info = torchckpt.load("s3://bkt/hf/model.safetensors.index.json", storage_options=opts, return_info=True)
    assert info.kind == "sharded"
    assert {k: out[k] for k in keys} and all(torch.equal(out[k], sd[k]) for k in keys)
    # a shard missing next to the index is named
    fs.rm("bkt/hf/model-00002-of-00002.safetensors")
    with pytest.raises(torchckpt.CheckpointNotFoundError, match="model-00002-of-00002.safetensors"):
        torchckpt.load("s3://bkt/hf/model.safetensors.index.json", storage_options=opts)


@pytest.mark.slow
def test_dcp_directory_from_s3(s3, tmp_path, net):
    import torch.distributed.checkpoint as dcp

    fs, opts, _ = s3
    state = {"model": net.state_dict(), "epoch": 7}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(tmp_path / "dcp"))
    for f in (tmp_path / "dcp").iterdir():
        _put(fs, f, f"bkt/runs/dcp/{f.name}")
    out, info = torchckpt.load("s3://bkt/runs/dcp", storage_options=opts, return_info=True)
    assert info.kind == "dcp" and out["epoch"] == 7
    assert all(torch.equal(out["model"][k], v) for k, v in net.state_dict().items())
    report = torchckpt.inspect("s3://bkt/runs/dcp/", storage_options=opts)
    assert report.format == "dcp"
    from conftest import small_net

    fresh = small_net()  # load_into reads DCP tensors lazily, each from its own data file on the store
    with torch.no_grad():
        fresh.fc.bias.add_(3)
    assert torchckpt.load_into(fresh, "s3://bkt/runs/dcp", key="model", storage_options=opts).ok
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in net.state_dict().items())
    scanned = torchckpt.scan("s3://bkt/runs/dcp", storage_options=opts).files
    assert [(f.status, f.format) for f in scanned] == [("clean", "dcp")], scanned


@pytest.mark.slow
def test_http_ranges_and_a_server_without_ranges(tmp_path):
    state = _big_state(8)
    torch.save(state, tmp_path / "big.pt")
    size = (tmp_path / "big.pt").stat().st_size
    with http_server(str(tmp_path)) as server:
        report = torchckpt.inspect(f"{server.url}/big.pt")
        assert len(report.tensors) == 4 and server.sent < 256 << 10, server.sent
        out = torchckpt.load(f"{server.url}/big.pt")
        assert all(torch.equal(out[k], v) for k, v in state.items())
    with http_server(str(tmp_path), ranges=False) as server:  # python -m http.server: no Range support
        out = torchckpt.load(f"{server.url}/big.pt")
        assert all(torch.equal(out[k], v) for k, v in state.items())
        assert server.sent == size  # read once, whole, then served from memory


@pytest.mark.slow
def test_many_small_tensors_cost_few_requests(tmp_path):
    """A zip of 300 small tensors: each tensor's local header and data come from one read-ahead block,
    not three requests per tensor; inspect still moves only what it reads."""
    state = {f"t{i}": torch.full((64, 64), float(i)) for i in range(300)}  # 16 KiB each, ~4.7 MiB in all
    torch.save(state, tmp_path / "many.pt")
    with http_server(str(tmp_path)) as server:
        out = torchckpt.load(f"{server.url}/many.pt")
        assert all(torch.equal(out[k], v) for k, v in state.items())
        assert server.gets <= 24, f"{server.gets} GET requests to load 300 tensors"  # was 613: 2 per header
        server.sent = 0
        torchckpt.inspect(f"{server.url}/many.pt")
        assert server.sent < 256 << 10, server.sent


def test_memory_filesystem_url(net):
    import fsspec

    with fsspec.open("memory://remote-tests/m.pt", "wb") as fh:
        torch.save(net.state_dict(), fh)
    assert_same_state(net.state_dict(), torchckpt.load("memory://remote-tests/m.pt"))
