"""One test per input the scan/load agreement fuzz (tests/agreement.py) found escaping as a raw error,
rebuilt by hand: every reader and front end ends in a value or a CheckpointError naming the file."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch

import torchckpt
from torchckpt import CheckpointError


def _torch_zip_bytes(net, compress: dict[str, int] | None = None) -> bytes:
    """``torch.save(net.state_dict())`` re-packed with the given members deflated."""
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    out = io.BytesIO()
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            suffix = info.filename.split("/", 1)[1]
            dst.writestr(info.filename, src.read(info), (compress or {}).get(suffix, zipfile.ZIP_STORED))
    return out.getvalue()


def _flag_central_entry(data: bytearray, member_suffix: bytes, bit: int) -> None:
    at = 0
    while (at := data.find(b"PK\x01\x02", at + 1)) != -1:
        name_len = int.from_bytes(data[at + 28:at + 30], "little")
        if data[at + 46:at + 46 + name_len].endswith(member_suffix):
            data[at + 8] |= bit
            return
    raise AssertionError(f"no central entry ends with {member_suffix!r}")


def _refused_everywhere(path) -> CheckpointError:
    for fn in (torchckpt.load, torchckpt.inspect, lambda p: torchckpt.load(p.read_bytes())):
        with pytest.raises(CheckpointError) as info:
            fn(path)
        assert "byteorder" in str(info.value) or "data.pkl" in str(info.value)
    assert str(path) in str(pytest.raises(CheckpointError, torchckpt.load, path).value)
    assert torchckpt.scan(path).exit_code in (1, 3)
    return info.value


def test_small_member_marked_encrypted_is_a_checkpoint_error(tmp_path, net):
    """zipfile raised RuntimeError('... is encrypted, password required') for archive/byteorder."""
    data = bytearray(_torch_zip_bytes(net))
    _flag_central_entry(data, b"/byteorder", 0x01)
    path = tmp_path / "flagged.pt"
    path.write_bytes(bytes(data))
    assert "encrypted" in str(_refused_everywhere(path))


def test_member_whose_deflate_stream_is_invalid_is_a_checkpoint_error(tmp_path, net):
    """zlib.error ('invalid code lengths set') escaped from a deflated member."""
    data = bytearray(_torch_zip_bytes(net, {"data.pkl": zipfile.ZIP_DEFLATED, "byteorder": zipfile.ZIP_DEFLATED}))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = zf.getinfo(next(n for n in zf.namelist() if n.endswith("/byteorder")))
    name_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start:start + info.compress_size] = b"\xff" * info.compress_size  # block type 3: invalid
    path = tmp_path / "inflate.pt"
    path.write_bytes(bytes(data))
    _refused_everywhere(path)
