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
    assert torchckpt.scan(path).status in ("findings", "unreadable")
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


class _Reduce:
    """Pickles as ``fn(*args)`` (what torch's own objects reduce to), so the test files are made by pickle."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _calls():
    import numpy as np

    rebuild_meta = torch._utils._rebuild_meta_tensor_no_storage
    from_numpy = torch._utils._rebuild_device_tensor_from_numpy
    good = {"layout": _Reduce(torch.serialization._get_layout, "torch.sparse_coo"),
            "device": _Reduce(torch.device, "cuda:3"), "device2": _Reduce(torch.device, "mps", 0),
            "meta": _Reduce(rebuild_meta, torch.float16, (2, 3), (3, 1), False),
            "numpy": _Reduce(from_numpy, np.arange(3, dtype=np.int16), torch.int16, "cpu", False)}
    bad = {"layout": _Reduce(torch.serialization._get_layout, "torch.stridel"),
           "device": _Reduce(torch.device, "foo"), "device_index": _Reduce(torch.device, "cuda:128"),
           "device_both": _Reduce(torch.device, "cuda:1", 1), "device_negative": _Reduce(torch.device, "cuda", -1),
           "meta_negative": _Reduce(rebuild_meta, torch.float32, (-2,), (1,), False),
           "meta_lengths": _Reduce(rebuild_meta, torch.float32, (2,), (1, 1), False),
           "meta_overflow": _Reduce(rebuild_meta, torch.float32, (1 << 40, 1 << 40), (1, 1), False),
           "meta_dtype": _Reduce(rebuild_meta, "float32", (2,), (1,), False),
           "numpy_text": _Reduce(from_numpy, np.array(["a", "b"]), torch.float32, "cpu", False)}
    return good, bad


@pytest.mark.parametrize("name", sorted(_calls()[1]))
def test_allowlisted_torch_calls_are_judged_alike_by_load_inspect_and_scan(tmp_path, name):
    """The structure read (inspect, and scan in record mode) accepted any layout name, device string,
    meta-tensor shape and numpy array that load refused: a file scan called clean and load could not read."""
    import pickle

    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps({"x": _calls()[1][name]}, protocol=2))
    for fn in (torchckpt.load, torchckpt.inspect):
        with pytest.raises(torchckpt.CorruptCheckpointError):
            fn(path)
    report = torchckpt.scan(path)
    assert report.status == "unreadable" and report.files[0].status == "unreadable"


def test_valid_torch_calls_still_load_and_scan_clean(tmp_path):
    import pickle

    good = _calls()[0]
    path = tmp_path / "good.pkl"
    path.write_bytes(pickle.dumps(good, protocol=2))
    loaded = torchckpt.load(path)
    assert loaded["layout"] is torch.sparse_coo and loaded["device"] == torch.device("cuda", 3)
    assert loaded["device2"] == torch.device("mps", 0)
    assert loaded["meta"].shape == (2, 3) and loaded["meta"].dtype == torch.float16 and loaded["meta"].is_meta
    assert torch.equal(loaded["numpy"], torch.arange(3, dtype=torch.int16))
    torchckpt.inspect(path)
    assert torchckpt.scan(path).status == "clean"


def test_whole_model_parameter_that_is_not_a_tensor_is_a_checkpoint_error(tmp_path, net):
    """A whole-model pickle whose parameter rebuilder name was damaged gave a stub in _parameters:
    inspect raised AttributeError ('stub ... has no attribute shape')."""
    buf = io.BytesIO()
    torch.save(net, buf, _use_new_zipfile_serialization=False)  # no CRC: the damage reaches the reader
    data = buf.getvalue()
    assert b"_rebuild_parameter" in data
    path = tmp_path / "whole.pt"
    path.write_bytes(data.replace(b"_rebuild_parameter", b"_rebuild_paqameter"))
    with pytest.raises(torchckpt.CorruptCheckpointError, match="not a tensor") as info:
        torchckpt.inspect(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError):
        torchckpt.load_into(net, path)
    assert torchckpt.scan(path).status == "clean"  # load itself reads it (stubs); what it is, is not a model
