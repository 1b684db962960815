"""``storage_options`` reach every front end: each public function that takes a path takes them, and
each one, called with them, reads from (or writes to) a real moto S3 server on 127.0.0.1 whose
endpoint exists only in those options (nothing in the environment points at it)."""

from __future__ import annotations

import inspect as pyinspect
import json
import os
import subprocess
import sys

import pytest
import torch

import torchckpt
from conftest import small_net
from remote_servers import s3_bucket

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

# Every public callable that opens a checkpoint by path (or writes one).
FRONT_ENDS = ["load", "read_checkpoint", "load_into", "inspect", "scan", "diff", "convert", "report", "save",
              "resume", "Checkpointer", "download"]
COMMANDS = ["inspect", "scan", "diff", "convert", "report"]  # every command that reads a checkpoint (tour reads none)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    assert not any(k.startswith("AWS_ENDPOINT") for k in os.environ), "the endpoint must come from the options"
    with s3_bucket("fends", count=False) as (fs, opts, _):
        net = small_net()
        local = tmp_path_factory.mktemp("fends") / "m.pt"
        torch.save(net.state_dict(), local)
        fs.put_file(str(local), "fends/m.pt")
        yield fs, opts, net


@pytest.mark.parametrize("name", FRONT_ENDS)
def test_every_front_end_takes_storage_options(name):
    target = getattr(torchckpt, name)
    params = pyinspect.signature(target.__init__ if isinstance(target, type) else target).parameters
    assert "storage_options" in params, f"torchckpt.{name} has no storage_options="


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_every_reading_command_takes_storage_option(command):
    res = subprocess.run([sys.executable, "-m", "torchckpt", command, "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "--storage-option" in res.stdout, res.stdout + res.stderr


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_read_front_ends_reach_the_server(s3, tmp_path):
    fs, opts, net = s3
    url = "s3://fends/m.pt"
    assert _same(torchckpt.load(url, storage_options=opts), net.state_dict())
    assert torchckpt.read_checkpoint(url, storage_options=opts).format == "torch-zip"
    model = small_net()
    with torch.no_grad():
        model.fc.bias.add_(5)
    assert torchckpt.load_into(model, url, storage_options=opts).ok and _same(model.state_dict(), net.state_dict())
    assert len(torchckpt.inspect(url, storage_options=opts).tensors) == len(net.state_dict())
    assert torchckpt.scan(url, storage_options=opts).files[0].status == "clean"
    assert torchckpt.diff(url, url, values=True, storage_options=opts).equal
    os.environ["TORCHCKPT_CACHE"] = str(tmp_path / "cache")
    try:
        local = torchckpt.download(url, storage_options=opts)
    finally:
        del os.environ["TORCHCKPT_CACHE"]
    assert _same(torch.load(local, weights_only=True), net.state_dict())


@pytest.mark.slow
def test_convert_and_report_reach_the_server(s3, tmp_path):
    fs, opts, net = s3
    torchckpt.convert("s3://fends/m.pt", "s3://fends/m.safetensors", storage_options=opts)
    assert _same(torchckpt.load("s3://fends/m.safetensors", storage_options=opts), net.state_dict())
    pytest.importorskip("matplotlib")
    pytest.importorskip("jinja2")
    out = tmp_path / "r.html"
    result = torchckpt.report("s3://fends/m.pt", diff="s3://fends/m.safetensors", against=small_net, output=out,
                              storage_options=opts)
    assert out.stat().st_size > 0 and result.safety == "clean" and len(result.stats) == len(net.state_dict())
    res = subprocess.run([sys.executable, "-m", "torchckpt", "report", "s3://fends/m.pt", "-o", str(tmp_path / "c.html"),
                          "--json", "--storage-option", f"endpoint_url={opts['endpoint_url']}",
                          "--storage-option", f"key={opts['key']}", "--storage-option", f"secret={opts['secret']}"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "c.html").stat().st_size > 0


@pytest.mark.slow
def test_write_front_ends_reach_the_server(s3):
    fs, opts, net = s3
    meta = torchckpt.save("s3://fends/run/one.pt", model=net, step=3, storage_options=opts)
    assert fs.info("fends/run/one.pt")["size"] == meta["size"]
    assert json.loads(fs.cat_file("fends/run/one.pt.meta.json"))["step"] == 3
    assert torchckpt.resume("s3://fends/run/one.pt", model=small_net(), storage_options=opts).step == 3
    torchckpt.save("s3://fends/run/one.pt", model=net, step=4, storage_options=opts)  # the same key again
    assert json.loads(fs.cat_file("fends/run/one.pt.meta.json"))["step"] == 4
    assert torchckpt.resume("s3://fends/run/one.pt", model=small_net(), storage_options=opts).step == 4
    with torchckpt.Checkpointer("s3://fends/run/dir", storage_options=opts) as ckpt:
        ckpt.save(7, model=net)
    assert torchckpt.resume("s3://fends/run/dir", model=small_net(), storage_options=opts).step == 7
