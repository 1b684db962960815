"""Files that are not (complete) checkpoints get a typed error naming the file, the cause and the fix."""

from __future__ import annotations

import gzip
import io

import pytest
import torch
from pickle_asm import PROTO2, STOP, glob, s

import torchckpt
from torchckpt import (CheckpointNotFoundError, CorruptCheckpointError, LimitExceededError, NotACheckpointError,
                       TruncatedCheckpointError, UnsupportedFormatError)


def _saved(net, zip_format=True) -> bytes:
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf, _use_new_zipfile_serialization=zip_format)
    return buf.getvalue()


def _load_error(tmp_path, data: bytes, name="model.pth"):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(torchckpt.CheckpointError) as info:
        torchckpt.load(path)
    assert str(path) in str(info.value), "the message must name the file"
    return info.value


def test_empty_file(tmp_path):
    err = _load_error(tmp_path, b"")
    assert isinstance(err, TruncatedCheckpointError) and isinstance(err, EOFError) and "empty" in str(err)


def test_git_lfs_pointer(tmp_path):
    err = _load_error(tmp_path, b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12345\n")
    assert isinstance(err, NotACheckpointError) and "git lfs pull" in str(err) and "12345" in str(err)


def test_html_error_page(tmp_path):
    err = _load_error(tmp_path, b"\n<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>")
    assert isinstance(err, NotACheckpointError) and "404 Not Found" in str(err) and "download" in str(err)


def test_json_text(tmp_path):
    assert isinstance(_load_error(tmp_path, b'{"architectures": ["Bert"]}'), NotACheckpointError)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.99])
def test_truncated_zip(tmp_path, net, fraction):
    data = _saved(net)
    err = _load_error(tmp_path, data[: int(len(data) * fraction)])
    assert isinstance(err, TruncatedCheckpointError) and "cut short" in str(err)


@pytest.mark.parametrize("cut", [30, 200, -100, -1])
def test_truncated_legacy(tmp_path, net, cut):
    data = _saved(net, zip_format=False)
    err = _load_error(tmp_path, data[:cut])
    assert isinstance(err, (TruncatedCheckpointError, CorruptCheckpointError))
    if cut < 0:  # cut inside the tensor data: sizes are known
        assert isinstance(err, TruncatedCheckpointError) and err.actual_size == len(data) + cut
        assert err.expected_size == len(data)


def test_corrupted_bytes_in_pickle(tmp_path, net):
    data = bytearray(_saved(net, zip_format=False))
    data[60:70] = b"\xff" * 10
    assert isinstance(_load_error(tmp_path, bytes(data)), CorruptCheckpointError)


def test_gzip_wrapped(tmp_path, net):
    err = _load_error(tmp_path, gzip.compress(_saved(net)))
    assert isinstance(err, UnsupportedFormatError) and "ecompress" in str(err)


def test_unknown_binary(tmp_path):
    assert isinstance(_load_error(tmp_path, bytes(range(7, 200))), UnsupportedFormatError)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointNotFoundError) as info:
        torchckpt.load(tmp_path / "nope.pt")
    assert isinstance(info.value, FileNotFoundError) and "nope.pt" in str(info.value)
    with pytest.raises(NotACheckpointError):
        torchckpt.load(tmp_path)


def test_storage_larger_than_file_is_refused_before_allocation(tmp_path):
    # A 200-byte legacy file declaring a 1 TiB storage must fail fast, not allocate.
    from pickle_asm import MARK, TUPLE, legacy
    pid = MARK + s("storage") + glob("torch", "FloatStorage") + s("0") + s("cpu") + b"\x8a\x06" \
        + (1 << 40).to_bytes(6, "little") + b"N" + TUPLE + b"Q"
    main = PROTO2 + pid + STOP
    err = _load_error(tmp_path, legacy(main))
    assert isinstance(err, LimitExceededError) and "declare" in str(err)


def test_tensor_view_outside_storage_is_refused(tmp_path, net):
    t = torch.arange(4.0)
    buf = io.BytesIO()
    torch.save({"t": t}, buf)
    import zipfile

    from pickle_asm import torch_zip
    with zipfile.ZipFile(buf) as zf:
        prefix = zf.namelist()[0].split("/")[0]
        pkl = zf.read(f"{prefix}/data.pkl")
        storage = zf.read(f"{prefix}/data/0")
    bad = pkl.replace(b"K\x04\x85", b"K\x40\x85")  # size (4,) -> (64,)
    assert bad != pkl
    err = _load_error(tmp_path, torch_zip(bad, {"data/0": storage}))
    assert isinstance(err, CorruptCheckpointError) and "storage" in str(err)


def test_memo_index_bomb_is_cheap(tmp_path):
    # LONG_BINPUT 0xffffffff would make the C unpickler allocate a 32 GiB memo; the memo is a dense
    # list, so an index far beyond what was stored is refused at once, allocating nothing
    data = PROTO2 + s("x") + b"r\xff\xff\xff\xff" + STOP
    with pytest.raises(LimitExceededError, match="memo index 4294967295"):
        torchckpt.load(data)
    # a few skipped indices (pickletools-optimised or hand-written streams) still load
    assert torchckpt.load(PROTO2 + s("x") + b"r\x05\x00\x00\x00" + b"j\x05\x00\x00\x00" + STOP) == "x"


def test_deep_nesting_is_bounded(tmp_path):
    data = PROTO2 + b"(" * 200_000 + b"t" * 200_000 + STOP
    with pytest.raises(LimitExceededError):
        torchckpt.load(data)


def test_bytes_of_size_bomb_refused():
    from pickle_asm import call, i
    with pytest.raises(CorruptCheckpointError):
        torchckpt.load(PROTO2 + call(glob("builtins", "bytes"), i(1 << 30)) + STOP)
    with pytest.raises(CorruptCheckpointError):
        torchckpt.load(PROTO2 + call(glob("builtins", "list"), call(glob("builtins", "range"), i(1 << 30))) + STOP)


def test_fuzz_regression_zip64_record_with_bad_offsets(tmp_path, net):
    """Found by tests/test_fuzz.py: a damaged zip64 end record made zipfile seek to a negative offset."""
    data = bytearray(_saved(net))
    i = data.rfind(b"PK\x06\x06")  # zip64 end of central directory record
    assert i > 0
    data[i + 48:i + 56] = (2**63 - 1).to_bytes(8, "little")  # offset of the central directory
    for fn in (torchckpt.load, torchckpt.inspect):
        path = tmp_path / "z.pt"
        path.write_bytes(bytes(data))
        with pytest.raises(torchckpt.CheckpointError):
            fn(path)
    assert torchckpt.scan(tmp_path / "z.pt").status in ("findings", "unreadable")


def test_decompression_bomb_member_is_refused(tmp_path):
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02N." + b"\x00" * (300 << 20))  # 300 MiB of zeros
    assert len(buf.getvalue()) < 1 << 20
    err = _load_error(tmp_path, buf.getvalue())
    assert isinstance(err, LimitExceededError) and "decompression bomb" in str(err)


def test_hash_collision_keys_are_refused():
    import pickle
    import time

    modulus = (1 << 61) - 1
    colliding = {i * modulus: 0 for i in range(1, 50)}  # every key hashes to 0
    start = time.perf_counter()
    with pytest.raises(CorruptCheckpointError):
        torchckpt.load(pickle.dumps(colliding, protocol=2))
    assert time.perf_counter() - start < 1
    ordinary = {0: {"step": 1}, 3: {"step": 2}, -5: 1.5, 2**60: "big but fine"}
    assert torchckpt.load(pickle.dumps(ordinary, protocol=2)) == ordinary


def test_index_that_lists_itself_is_refused(tmp_path):
    import json

    (tmp_path / "m.index.json").write_text(json.dumps({"weight_map": {"a": "m.index.json"}}))
    (tmp_path / "n.index.json").write_text(json.dumps({"weight_map": {"a": "../etc/passwd"}}))
    with pytest.raises(CorruptCheckpointError):
        torchckpt.load(tmp_path / "m.index.json")
    with pytest.raises(torchckpt.UnsafeCheckpointError):  # a path outside the checkpoint's folder
        torchckpt.load(tmp_path / "n.index.json")


def test_deeply_nested_t7_is_bounded(tmp_path):
    import struct

    depth = 5000
    data = b"".join(struct.pack("<iii", 3, i + 1, 1) + struct.pack("<i", 1) + struct.pack("<d", 1.0)
                    for i in range(depth))
    path = tmp_path / "deep.t7"
    path.write_bytes(data + struct.pack("<i", 0) * depth)
    with pytest.raises(LimitExceededError):
        torchckpt.load(path)
