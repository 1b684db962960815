"""Remote failures, each its own typed error naming the URL, exit code 3 in the CLI, never a traceback:
not found, access denied, connection refused, endpoint unreachable (timeout), a missing extra.
Plus scan/diff/convert/inspect with URLs and --storage-option. Servers run on 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import torchckpt
from remote_servers import LOOPBACK, blackhole, free_port, http_server, moto_server, s3_options

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers")  # the helper scripts


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(HERE, "..", "..", "src"), HERE]), "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "torchckpt", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def opt_args(opts: dict) -> list[str]:
    """--storage-option arguments for s3_options(...) (nested keys dotted)."""
    out = []
    for key, value in opts.items():
        if isinstance(value, dict):
            out += opt_args({f"{key}.{k}": v for k, v in value.items()})
        else:
            out += ["--storage-option", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return out


@pytest.fixture(scope="module")
def s3():
    import fsspec

    with moto_server() as endpoint:
        opts = s3_options(endpoint)
        fs = fsspec.filesystem("s3", **opts)
        fs.mkdir("errs")
        yield fs, opts


def test_storage_option_parsing():
    from torchckpt.cli.storage_opt import parse_storage_options

    assert parse_storage_options(["endpoint_url=http://h:1", "anon=true", "config_kwargs.retries.max_attempts=2",
                                  "key=a=b"]) == {"endpoint_url": "http://h:1", "anon": True, "key": "a=b",
                                                  "config_kwargs": {"retries": {"max_attempts": 2}}}
    assert parse_storage_options([]) is None


@pytest.mark.slow
def test_not_found(s3):
    fs, opts = s3
    for url in ("s3://errs/missing.pt", "s3://no-such-bucket/m.pt"):
        with pytest.raises(torchckpt.RemoteNotFoundError) as info:
            torchckpt.load(url, storage_options=opts)
        assert info.value.path == url and isinstance(info.value, FileNotFoundError)
    res = cli("inspect", "s3://errs/missing.pt", *opt_args(opts))
    assert res.returncode == 3, res.stderr
    assert "s3://errs/missing.pt: no such remote object" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_access_denied(tmp_path):
    import fsspec
    import requests

    with moto_server() as endpoint:
        opts = s3_options(endpoint)
        fs = fsspec.filesystem("s3", **opts)
        fs.mkdir("locked")
        fs.pipe_file("locked/m.pt", b"x" * 100)
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10)  # moto now checks credentials
        try:
            _denied(endpoint, opts)
        finally:  # the setting is process-wide in moto: switch it off for the other servers of this process
            requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf", timeout=10)
    (tmp_path / "m.pt").write_bytes(b"x")
    with http_server(str(tmp_path)) as server:  # an HTTP 403 is an auth failure too
        with pytest.raises(torchckpt.RemoteAuthError, match="access denied"):
            torchckpt.load(f"{server.url}/private/m.pt")
        with pytest.raises(torchckpt.RemoteNotFoundError):
            torchckpt.load(f"{server.url}/nothing-here.pt")


def _denied(endpoint, opts):
    fresh = s3_options(endpoint, skip_instance_cache=True)
    with pytest.raises(torchckpt.RemoteAuthError, match="access denied") as info:
        torchckpt.load("s3://locked/m.pt", storage_options=fresh)
    assert info.value.path == "s3://locked/m.pt" and "credentials" in info.value.hint
    res = cli("inspect", "s3://locked/m.pt", *opt_args(opts))
    assert res.returncode == 3 and "access denied" in res.stderr and "Traceback" not in res.stderr
    with pytest.raises(torchckpt.RemoteAuthError):
        torchckpt.Checkpointer("s3://locked/run", storage_options=fresh).save(1, model=torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_connection_refused():
    port = free_port()  # nothing listens there
    opts = s3_options(f"http://{LOOPBACK}:{port}")
    with pytest.raises(torchckpt.RemoteConnectionRefusedError, match="refused") as info:
        torchckpt.inspect("s3://b/m.pt", storage_options=opts)
    assert info.value.path == "s3://b/m.pt" and f"{LOOPBACK}:{port}" in str(info.value)
    res = cli("scan", "s3://b/m.pt", *opt_args(opts))
    assert res.returncode == 3 and "refused" in res.stdout + res.stderr and "Traceback" not in res.stderr
    with pytest.raises(torchckpt.RemoteConnectionRefusedError):
        torchckpt.load(f"http://{LOOPBACK}:{port}/m.pt")


@pytest.mark.slow
def test_unreachable_endpoint_times_out():
    with blackhole() as port:
        opts = s3_options(f"http://{LOOPBACK}:{port}", config_kwargs={"connect_timeout": 1, "read_timeout": 1,
                                                                      "retries": {"max_attempts": 1}})
        start = time.monotonic()
        with pytest.raises(torchckpt.RemoteUnreachableError, match="did not answer") as info:
            torchckpt.load("s3://b/m.pt", storage_options=opts)
        assert time.monotonic() - start < 60 and info.value.path == "s3://b/m.pt"
        res = cli("inspect", "s3://b/m.pt", *opt_args(opts))
        assert res.returncode == 3 and "did not answer" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("url, extra", [("hf://org/repo/model.safetensors", "hf"), ("gs://b/m.pt", "gcs")])
def test_missing_extra_names_what_to_install(url, extra):
    package = {"hf": "huggingface_hub", "gcs": "gcsfs"}[extra]
    code = (f"import sys; sys.modules[{package!r}] = None\n"  # as if the package were not installed
            "import torchckpt\n"
            f"try:\n    torchckpt.load({url!r})\n"
            "except torchckpt.RemoteStorageError as e:\n    print(type(e).__name__, '|', e)\n")
    env = {**os.environ, "PYTHONPATH": os.path.join(HERE, "..", "..", "src")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert f"pip install 'torchckpt[{extra}]'" in res.stdout, res.stdout + res.stderr
    assert url in res.stdout and "Traceback" not in res.stderr


@pytest.mark.slow
def test_scan_diff_convert_and_inspect_take_urls(s3, tmp_path, net, monkeypatch):
    fs, opts = s3
    torch.save(net.state_dict(), tmp_path / "a.pt")
    changed = {k: v.clone() for k, v in net.state_dict().items()}
    changed["fc.bias"] += 1
    torch.save(changed, tmp_path / "b.pt")
    fs.put_file(str(tmp_path / "a.pt"), "errs/cli/a.pt")
    fs.put_file(str(tmp_path / "b.pt"), "errs/cli/b.pt")
    args = opt_args(opts)
    res = cli("scan", "-r", "s3://errs/cli", *args)
    assert res.returncode == 0 and "s3://errs/cli/a.pt: clean" in res.stdout, res.stdout + res.stderr
    assert cli("diff", "s3://errs/cli/a.pt", "s3://errs/cli/a.pt", "--values", *args).returncode == 0
    res = cli("diff", "s3://errs/cli/a.pt", "s3://errs/cli/b.pt", "--values", *args)
    assert res.returncode == 1 and "fc.bias" in res.stdout
    res = cli("inspect", "s3://errs/cli/a.pt", "--json", *args)
    assert res.returncode == 0 and json.loads(res.stdout)["totals"]["tensors"] == len(net.state_dict())
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    res = cli("convert", "s3://errs/cli/a.pt", "s3://errs/cli/a.safetensors", *args)
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(tmp_path)) == before  # nothing written to the local disk
    out = torchckpt.load("s3://errs/cli/a.safetensors", storage_options=opts)
    assert all(torch.equal(out[k], v) for k, v in net.state_dict().items())
