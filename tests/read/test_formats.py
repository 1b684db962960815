"""Every format and era loads to the same tensors, whatever the extension and source kind."""

from __future__ import annotations

import argparse
import io
import pathlib
import pickle

import numpy as np
import pytest
import torch
from conftest import assert_same_state, small_net

import torchckpt
from torchckpt.demo.samples import saved_on_device, write_py2_legacy


@pytest.mark.parametrize("ext", [".pt", ".pth", ".pkl", ".bin", ".tar", ".t7", ".ckpt", ""])
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_state_dict_roundtrip_any_extension(tmp_path, net, ext, zip_format):
    path = tmp_path / f"model{ext}"
    torch.save(net.state_dict(), path, _use_new_zipfile_serialization=zip_format)
    loaded, info = torchckpt.load(path, return_info=True)
    assert info.kind == ("torch-zip" if zip_format else "torch-legacy")
    assert_same_state(net.state_dict(), loaded)


@pytest.mark.parametrize("mmap", [None, True, False])
def test_zip_mmap_modes_give_equal_tensors(tmp_path, net, mmap):
    path = tmp_path / "m.pt"
    torch.save(net.state_dict(), path)
    assert_same_state(net.state_dict(), torchckpt.load(path, mmap=mmap))


@pytest.mark.parametrize("kind", ["bytes", "fileobj", "pathlib"])
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_sources_other_than_paths(tmp_path, net, kind, zip_format):
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf, _use_new_zipfile_serialization=zip_format)
    (tmp_path / "m.pt").write_bytes(buf.getvalue())
    source = {"bytes": buf.getvalue(), "fileobj": io.BytesIO(buf.getvalue()), "pathlib": tmp_path / "m.pt"}[kind]
    assert_same_state(net.state_dict(), torchckpt.load(source))


def test_views_and_shared_storages_survive(tmp_path):
    base = torch.arange(24.0)
    obj = {"a": base, "view": base[4:10].view(2, 3), "t": base.view(4, 6).t(), "half": torch.ones(3).half()}
    for zip_format in (True, False):
        path = tmp_path / f"v{zip_format}.pt"
        torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
        out = torchckpt.load(path)
        for k in obj:
            assert torch.equal(out[k], obj[k]) and out[k].stride() == obj[k].stride(), k
        assert out["view"].untyped_storage().data_ptr() == out["a"].untyped_storage().data_ptr()


def test_benign_metadata_that_weights_only_rejects(tmp_path, net):
    obj = {"epoch": 5, "state_dict": net.state_dict(), "args": argparse.Namespace(lr=0.1, arch="r50"),
           "best": np.float64(0.75), "i": np.int64(3), "arr": np.arange(4, dtype=np.float32),
           "dtype": np.dtype("float16"), "path": pathlib.Path("/data/x"), "set": {1, 2}, "fs": frozenset("ab"),
           "bytes": b"\x00\x8c", "dev": torch.device("cuda", 3), "tdtype": torch.bfloat16, "size": torch.Size([2, 3])}
    path = tmp_path / "train.pth.tar"
    torch.save(obj, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    out = torchckpt.load(path)
    assert out["args"] == obj["args"] and isinstance(out["args"], argparse.Namespace)
    assert out["best"] == 0.75 and isinstance(out["best"], np.float64)
    assert out["i"] == 3 and out["dtype"] == np.float16
    np.testing.assert_array_equal(out["arr"], obj["arr"])
    for key in ("path", "set", "fs", "bytes", "dev", "tdtype", "size", "epoch"):
        assert out[key] == obj[key], key
    assert_same_state(net.state_dict(), out["state_dict"])


def test_numpy_core_and_underscore_core_paths(tmp_path):
    # numpy 1.x writes numpy.core.multiarray, numpy 2.x numpy._core.multiarray: both must load.
    raw = np.float64(1.5).tobytes()
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        from pickle_asm import MARK, PROTO2, REDUCE, STOP, TUPLE, b, glob, s
        data = PROTO2 + glob(module, "scalar") + MARK + glob("numpy", "dtype") + MARK + s("f8") + b"\x89\x88" + TUPLE \
            + REDUCE + b(raw) + TUPLE + REDUCE + STOP
        assert torchckpt.load(data) == 1.5


def test_python2_legacy_file(tmp_path, net):
    obj = {"epoch": 90, "state_dict": net.state_dict(), "best_prec1": np.float64(69.758), "arch": "resnet18",
           "café": "naïve", "arr": np.arange(5, dtype=np.float64), "nested": {"lr": 0.1, "steps": [30, 60]}}
    path = tmp_path / "model_best.pth.tar"
    write_py2_legacy(obj, path, location="cuda:0")
    with pytest.raises((UnicodeDecodeError, RuntimeError, pickle.UnpicklingError)):
        torch.load(path, weights_only=False)  # the failure users meet today
    out, info = torchckpt.load(path, return_info=True)
    assert any("Python 2" in e for e in info.evidence)
    assert all(type(k) is str for k in out) and all(type(k) is str for k in out["state_dict"])
    assert out["best_prec1"] == np.float64(69.758) and out["arch"] == "resnet18" and out["café"] == "naïve"
    np.testing.assert_array_equal(out["arr"], obj["arr"])
    assert out["nested"] == {"lr": 0.1, "steps": [30, 60]}
    assert_same_state(net.state_dict(), out["state_dict"])
    assert torchckpt.inspect(path).evidence[-1] == "storages saved on cuda:0"


def test_python2_numpy_scalar_with_non_ascii_bytes(tmp_path):
    value = np.frombuffer(b"\x8c\x00\x00\x00\x00\x00\xf0\x3f", dtype=np.float64)[0]  # first byte 0x8c
    path = tmp_path / "p.pth"
    write_py2_legacy({"x": value, "t": torch.zeros(1)}, path)
    assert torchckpt.load(path)["x"] == value


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_cuda3_checkpoint_on_cpu_machine(tmp_path, net, zip_format):
    path = tmp_path / "gpu.pt"
    with saved_on_device("cuda:3"):
        torch.save(net.state_dict(), path, _use_new_zipfile_serialization=zip_format)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            torch.load(path)
    out, info = torchckpt.load(path, return_info=True)
    assert_same_state(net.state_dict(), out)
    assert all(t.device.type == "cpu" for t in out.values())
    assert any("cuda:3" in n for n in info.notes)
    out2, info2 = torchckpt.load(path, map_location=None, return_info=True)
    if not torch.cuda.is_available():
        assert any("not available" in n for n in info2.notes)


def test_map_location_forms(tmp_path, net):
    path = tmp_path / "m.pt"
    with saved_on_device("cuda:1"):
        torch.save(net.state_dict(), path)
    seen = []

    def fn(storage, location):
        seen.append(location)
        return storage

    for ml in ("cpu", torch.device("cpu"), {"cuda:1": "cpu"}, fn):
        assert_same_state(net.state_dict(), torchckpt.load(path, map_location=ml))
    assert seen and set(seen) == {"cuda:1"}
    meta = torchckpt.load(path, map_location="meta")
    assert all(t.device.type == "meta" for t in meta.values())


def test_safetensors(tmp_path, net):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_file(sd, path, metadata={"note": "hi"})
    out, info = torchckpt.load(path, return_info=True)
    assert info.kind == "safetensors" and info.details["metadata"] == {"note": "hi"}
    assert set(out) == set(sd) and all(torch.equal(out[k], sd[k]) for k in sd)
    renamed = tmp_path / "weights.bin"  # the extension says nothing
    renamed.write_bytes(path.read_bytes())
    assert set(torchckpt.load(renamed)) == set(sd)
    assert set(torchckpt.load(renamed.read_bytes())) == set(sd)


def test_torchscript_parameters_without_running_code(tmp_path, net):
    path = tmp_path / "traced.pt"
    torch.jit.trace(net.eval(), torch.randn(1, 3, 8, 8)).save(str(path))
    obj, info = torchckpt.load(path, return_info=True)
    assert info.kind == "torchscript"
    assert_same_state(net.state_dict(), torchckpt.state_dict_of(obj))


def test_plain_numpy_pickle(tmp_path):
    blobs = {"conv1_w": np.random.rand(4, 3).astype(np.float32), "fc_b": np.arange(3, dtype=np.float64)}
    path = tmp_path / "R-50.pkl"
    for protocol in (0, 2, 4, 5):
        path.write_bytes(pickle.dumps({"blobs": blobs, "model_iter": 9}, protocol=protocol))
        out = torchckpt.load(path)
        assert out["model_iter"] == 9
        for k, v in blobs.items():
            np.testing.assert_array_equal(out["blobs"][k], v)


def test_numpy_npy_and_npz(tmp_path):
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.save(tmp_path / "a.npy", arr)
    np.testing.assert_array_equal(torchckpt.load(tmp_path / "a.npy"), arr)
    np.savez(tmp_path / "b.npz", w=arr, b=arr[0])
    out = torchckpt.load(tmp_path / "b.npz")
    np.testing.assert_array_equal(out["w"], arr)


def test_lua_t7_is_recognised_and_named(tmp_path):
    import os

    from conftest import LOCAL_T7, SHARED_T7
    folder = LOCAL_T7 if os.path.isdir(LOCAL_T7) else SHARED_T7
    from torchckpt.read.sniff import sniff
    from torchckpt.storage.source import Source

    with Source(os.path.join(folder, "doubletensor.t7")) as src:
        sniffed = sniff(src)
    assert sniffed.kind == "lua-t7" and "torch.DoubleTensor" in sniffed.evidence[0]


def test_legacy_tar_format(tmp_path):
    from tar_writer import write_torch_tar

    t = torch.arange(6.0).view(2, 3)
    path = tmp_path / "ancient.pth"
    write_torch_tar({"w": t, "b": t[1], "epoch": 3}, path)
    out, info = torchckpt.load(path, return_info=True)
    assert info.kind == "torch-tar"
    assert torch.equal(out["w"], t) and torch.equal(out["b"], t[1]) and out["epoch"] == 3


@pytest.mark.slow
def test_lazy_import_does_not_load_torch():
    import subprocess
    import sys

    code = "import sys, torchckpt; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"


def test_mapped_tensors_outlive_the_reader(tmp_path, net):
    import gc

    path = tmp_path / "m.pt"
    torch.save(net.state_dict(), path)
    out = torchckpt.load(path, mmap=True)
    gc.collect()
    assert_same_state(net.state_dict(), out)  # the mapping lives as long as its tensors
    out["fc.bias"].add_(1)  # copy-on-write: the file is untouched
    assert_same_state(net.state_dict(), torchckpt.load(path))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_checkpoint_index(tmp_path, net, fmt):
    import json

    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    keys = list(sd)
    shards = {f"model-0000{i + 1}-of-00002.{fmt}": keys[i::2] for i in range(2)}
    for name, part in shards.items():
        tensors = {k: sd[k] for k in part}
        if fmt == "safetensors":
            save_file(tensors, tmp_path / name)
        else:
            torch.save(tensors, tmp_path / name)
    index = {"metadata": {"total_size": 1}, "weight_map": {k: n for n, part in shards.items() for k in part}}
    (tmp_path / f"model.{fmt}.index.json").write_text(json.dumps(index))
    out, info = torchckpt.load(tmp_path / f"model.{fmt}.index.json", return_info=True)
    assert info.kind == "sharded" and set(out) == set(sd)
    assert all(torch.equal(out[k], sd[k]) for k in sd)
    fresh = small_net()
    assert torchckpt.load_into(fresh, tmp_path / f"model.{fmt}.index.json").ok
    assert_same_state(net.state_dict(), fresh.state_dict())
    (tmp_path / list(shards)[1]).unlink()
    with pytest.raises(torchckpt.CheckpointNotFoundError):
        torchckpt.load(tmp_path / f"model.{fmt}.index.json")


def test_remote_url_through_fsspec(net):
    fsspec = pytest.importorskip("fsspec")  # the [remote] extra; installed with the test extras here
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    with fsspec.open("memory://ckpts/model.pt", "wb") as fh:
        fh.write(buf.getvalue())
    assert_same_state(net.state_dict(), torchckpt.load("memory://ckpts/model.pt"))
    with pytest.raises(torchckpt.CheckpointNotFoundError):
        torchckpt.load("memory://ckpts/missing.pt")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_dtypes_that_torch_saves_with_untyped_storages(tmp_path, zip_format):
    """uint16/32/64 and float8 have no storage class: torch.save names torch.storage.UntypedStorage and
    _rebuild_tensor_v3 (bug: refused as 'malformed storage reference'). Every byte pattern comes back."""
    want = {name: torch.arange(256, dtype=torch.uint8).view(getattr(torch, name)) for name in
            ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")}
    want.update(uint16=torch.tensor([0, 1, 2**16 - 1], dtype=torch.uint16),
                uint32=torch.tensor([0, 2**32 - 1], dtype=torch.uint32),
                uint64=torch.tensor([2**64 - 1, 2**63 + 1], dtype=torch.uint64))
    path = tmp_path / "untyped.pt"
    torch.save(want, path, _use_new_zipfile_serialization=zip_format)
    got = torchckpt.load(path)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name].view(torch.uint8), value.view(torch.uint8))
    described = {t.key: (t.dtype, t.nbytes) for t in torchckpt.inspect(path).tensors}
    assert described == {name: (str(v.dtype)[6:], v.nbytes) for name, v in want.items()}
    assert torchckpt.scan(path).clean
