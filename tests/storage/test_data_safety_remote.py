"""Remote writes under real faults (issue 22, item 4): moto's S3 server on 127.0.0.1 behind an HTTP proxy
that answers chosen requests (UploadPart, CompleteMultipartUpload, the marker's DELETE, LIST) with a 500.

Every failure before the commit is a typed RemoteStorageError naming the URL and leaves no multipart
upload open; every failure after the commit (the sidecar is uploaded) is a warning, and the checkpoint
counts."""

from __future__ import annotations

import warnings

import pytest
import torch

import torchckpt
from torchckpt.errors import RemoteStorageError
from torchckpt.train.checkpointer import RetentionWarning
from remote_servers import fault_proxy, moto_server, s3_options

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
pytestmark = pytest.mark.slow

BUCKET = "faults"


@pytest.fixture(scope="module")
def s3():
    import fsspec

    with moto_server() as endpoint, fault_proxy(int(endpoint.rsplit(":", 1)[1])) as proxy:
        direct = fsspec.filesystem("s3", **s3_options(endpoint), skip_instance_cache=True)
        direct.mkdir(BUCKET)
        # parts of 5 MiB (the S3 minimum): an 8 MiB model is a multipart upload of two parts
        opts = s3_options(proxy.endpoint, default_block_size=5 << 20, skip_instance_cache=True)
        yield direct, opts, proxy


@pytest.fixture(autouse=True)
def _no_faults(s3):
    s3[2].fails = lambda method, path: False
    s3[2].failed.clear()
    yield
    s3[2].fails = lambda method, path: False


def _big() -> torch.nn.Module:
    return torch.nn.Linear(2048, 1024)  # 8 MiB of weights


def _open_uploads(direct) -> list:
    return direct.call_s3("list_multipart_uploads", Bucket=BUCKET).get("Uploads", [])


@pytest.mark.parametrize("fault", ["UploadPart", "CompleteMultipartUpload"])
def test_a_failed_multipart_upload_is_typed_names_the_url_and_is_aborted(s3, fault):
    direct, opts, proxy = s3
    url = f"s3://{BUCKET}/single-{fault}.pt"
    if fault == "UploadPart":
        proxy.fails = lambda method, path: method == "PUT" and "partNumber=" in path
    else:
        proxy.fails = lambda method, path: method == "POST" and "uploadId=" in path
    with pytest.raises(RemoteStorageError) as info:
        torchckpt.save(url, model=_big(), storage_options=opts)
    assert proxy.failed, "the fault was never injected: the upload was not multipart"
    assert url in str(info.value), str(info.value)
    assert _open_uploads(direct) == []  # aborted: no storage left behind in an invisible upload
    assert not direct.exists(f"{BUCKET}/single-{fault}.pt")


def test_a_failed_upload_in_a_checkpointer_keeps_the_previous_checkpoint(s3):
    direct, opts, proxy = s3
    run = f"s3://{BUCKET}/run-upload"
    ckpt = torchckpt.Checkpointer(run, storage_options=opts)
    ckpt.save(1, model=_big())
    proxy.fails = lambda method, path: method == "PUT" and "partNumber=" in path
    with pytest.raises(RemoteStorageError) as info:
        ckpt.save(2, model=_big())
    assert run in str(info.value)
    proxy.fails = lambda method, path: False
    assert [c.step for c in ckpt.checkpoints()] == [1]
    assert _open_uploads(direct) == []
    ckpt.close()


def test_failures_after_the_commit_are_warnings_and_the_checkpoint_counts(s3):
    direct, opts, proxy = s3
    run = f"s3://{BUCKET}/run-after"
    ckpt = torchckpt.Checkpointer(run, keep_last=1, storage_options=opts)
    ckpt.save(1, model=torch.nn.Linear(4, 4))
    # after the sidecar (the commit): removing the .uncommitted marker, and listing for retention
    proxy.fails = lambda method, path: (method == "DELETE" and ".uncommitted" in path) or \
        (method == "GET" and "list-type=2" in path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ckpt.save(2, model=torch.nn.Linear(4, 4)) is not None
    assert proxy.failed
    messages = [str(w.message) for w in caught if issubclass(w.category, RetentionWarning)]
    assert any("marker" in m for m in messages) and any("retention" in m for m in messages), messages
    proxy.fails = lambda method, path: False
    assert ckpt.latest().step == 2
    ckpt.close()
