"""The download cache: sha256 checked before use, hits reused without a transfer, mismatches refused
and never kept, torch.hub-style hash prefixes in the name. Served by http.server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

import torchckpt
from remote_servers import http_server

pytest.importorskip("aiohttp")


@pytest.fixture
def served(tmp_path, net, monkeypatch):
    root = tmp_path / "www"
    root.mkdir()
    torch.save(net.state_dict(), root / "model.pt")
    digest = hashlib.sha256((root / "model.pt").read_bytes()).hexdigest()
    (root / f"resnet-{digest[:8]}.pt").write_bytes((root / "model.pt").read_bytes())
    monkeypatch.setenv("TORCHCKPT_CACHE", str(tmp_path / "cache"))
    with http_server(str(root)) as server:
        yield server, root, digest


@pytest.mark.slow
def test_miss_then_hit_without_a_transfer(served, net):
    server, root, digest = served
    url = f"{server.url}/model.pt"
    size = (root / "model.pt").stat().st_size
    path = torchckpt.download(url, sha256=digest)
    assert server.sent == size and hashlib.sha256(open(path, "rb").read()).hexdigest() == digest
    out = torchckpt.load(url, sha256=digest)  # a hit: nothing moves
    assert server.sent == size
    assert all(torch.equal(out[k], v) for k, v in net.state_dict().items())
    assert torchckpt.download(url, sha256=digest[:12]) == path  # a prefix is enough


@pytest.mark.slow
def test_mismatch_is_refused_and_not_kept(served):
    server, root, digest = served
    url = f"{server.url}/model.pt"
    wrong = "0" * 64
    with pytest.raises(torchckpt.IntegrityError, match="sha256 mismatch") as info:
        torchckpt.load(url, sha256=wrong)
    assert info.value.expected == wrong and info.value.actual == digest and info.value.path == url
    cache = os.environ["TORCHCKPT_CACHE"]
    assert not [f for _, _, names in os.walk(cache) for f in names], "a file that failed its check is not kept"


@pytest.mark.slow
def test_a_damaged_cache_entry_is_downloaded_again(served):
    server, root, digest = served
    url = f"{server.url}/model.pt"
    path = torchckpt.download(url, sha256=digest)
    with open(path, "r+b") as fh:
        fh.seek(100)
        fh.write(b"\xff\xff")
    sent = server.sent
    assert torchckpt.download(url, sha256=digest) == path
    assert server.sent == 2 * sent and hashlib.sha256(open(path, "rb").read()).hexdigest() == digest


@pytest.mark.slow
def test_hash_prefix_in_the_file_name(served, net):
    server, root, digest = served
    out = torchckpt.load(f"{server.url}/resnet-{digest[:8]}.pt", check_hash=True)
    assert all(torch.equal(out[k], v) for k, v in net.state_dict().items())
    (root / "resnet-deadbeef.pt").write_bytes((root / "model.pt").read_bytes())
    with pytest.raises(torchckpt.IntegrityError, match="expected deadbeef"):
        torchckpt.load(f"{server.url}/resnet-deadbeef.pt", check_hash=True)
    with pytest.raises(ValueError, match="check_hash=True needs"):
        torchckpt.download(f"{server.url}/model.pt", check_hash=True)


def test_local_file_is_verified_in_place(tmp_path, net):
    torch.save(net.state_dict(), tmp_path / "m.pt")
    digest = hashlib.sha256((tmp_path / "m.pt").read_bytes()).hexdigest()
    assert torchckpt.download(str(tmp_path / "m.pt"), sha256=digest) == str(tmp_path / "m.pt")
    with pytest.raises(torchckpt.IntegrityError):
        torchckpt.load(tmp_path / "m.pt", sha256="1" * 64)


@pytest.mark.slow
def test_download_from_a_server_without_range(tmp_path, net, monkeypatch):
    """python -m http.server answers every GET with the whole file: the download streams it once."""
    torch.save(net.state_dict(), tmp_path / "m.pt")
    digest = hashlib.sha256((tmp_path / "m.pt").read_bytes()).hexdigest()
    monkeypatch.setenv("TORCHCKPT_CACHE", str(tmp_path / "cache"))
    with http_server(str(tmp_path), ranges=False) as server:
        out = torchckpt.load(f"{server.url}/m.pt", sha256=digest)
        assert server.sent == (tmp_path / "m.pt").stat().st_size
        assert all(torch.equal(out[k], v) for k, v in net.state_dict().items())
        torchckpt.load(f"{server.url}/m.pt", sha256=digest)  # a hit: verified again, nothing moves
        assert server.sent == (tmp_path / "m.pt").stat().st_size
