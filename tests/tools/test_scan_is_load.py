"""Scan is load: scan reads what load reads, and says what load would do. One test per disagreement
that existed (tar records, DCP by content, symlinked folders, t7, safetensors, allowlisted calls),
per raw error that escaped the readers, per benign file that was flagged, and per path that left
the checkpoint's directory."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import warnings
import zipfile

import numpy as np
import pytest
import torch
from pickle_asm import (EMPTY_TUPLE, MARK, MEMOIZE, PROTO2, PROTO4, REDUCE, STACK_GLOBAL, STOP, TUPLE, TUPLE3, b, call,
                        glob, i, s, torch_zip)
from t7_writer import Obj, Writer, write_t7
from test_malicious import _payload_pickle, technique_os_system

import torchckpt
from torchckpt import CheckpointError, CorruptCheckpointError, LimitExceededError, UnsafeCheckpointError


def _scan_one(path, **kw):
    report = torchckpt.scan(path, **kw)
    return report, report.files[0]


# ----------------------------------------------------------------------------- disagreements fixed
def _tar_with_records(records: list[bytes]) -> bytes:
    """A torch tar checkpoint whose ``storages`` member holds ``records`` (each a pickled
    ``(key, location, type)``) of 2 floats each, and a main pickle that uses none of them."""
    sto = pickle.dumps(len(records), protocol=2)
    for record in records:
        sto += record + struct.pack("<q", 2) + b"\0" * 8
    sto += pickle.dumps([], protocol=2)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in (("sys_info", pickle.dumps({}, protocol=2)), ("pickle", pickle.dumps({"a": 1}, protocol=2)),
                           ("storages", sto), ("tensors", pickle.dumps(0, protocol=2))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_os_system_in_a_later_tar_record_is_found_by_scan_and_refused_by_load(tmp_path):
    good = pickle.dumps(("k1", "cpu", torch.FloatStorage), protocol=2)
    evil = PROTO2 + s("k2") + technique_os_system(tmp_path / "canary") + glob("torch", "FloatStorage") + TUPLE3 + STOP
    path = tmp_path / "old.tar"
    path.write_bytes(_tar_with_records([good, evil]))
    with pytest.raises(UnsafeCheckpointError):
        torchckpt.load(path)
    report, f = _scan_one(path)
    assert report.status == "findings" and any(x.kind == "dangerous-global" and "os.system" in x.message for x in f.findings)
    path.write_bytes(_tar_with_records([good, good]))
    assert torchckpt.load(path) == {"a": 1} and torchckpt.scan(path).status == "clean"
    assert not (tmp_path / "canary").exists()


def _dcp(path, state):
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path))


def test_dcp_is_found_by_its_metadata_not_by_extension(tmp_path):
    ckpt = tmp_path / "ckpt"
    _dcp(ckpt, {"w": torch.ones(3), "note": "x" * 400})
    meta = (ckpt / ".metadata").read_bytes()
    assert meta.count(b"__0_0.distcp") >= 1
    (ckpt / ".metadata").write_bytes(meta.replace(b"__0_0.distcp", b"__0_0.weight"))
    os.rename(ckpt / "__0_0.distcp", ckpt / "__0_0.weight")
    assert torch.equal(torchckpt.load(ckpt)["w"], torch.ones(3))
    assert torchckpt.scan(ckpt).status == "clean" and torchckpt.scan(tmp_path, recursive=True).status == "clean"
    # a malicious item in the renamed data file: load refuses, scan (of the directory, or of the tree) finds it
    loaded = torchckpt.load(ckpt / ".metadata")
    info = next(v.stub_attributes() for k, v in loaded.storage_data.items() if k.stub_attributes()["fqn"] == "note")
    blob = bytearray((ckpt / "__0_0.weight").read_bytes())
    evil = torch_zip(_payload_pickle(technique_os_system(tmp_path / "canary")))
    blob[info["offset"]:info["offset"] + info["length"]] = evil + b"\0" * (info["length"] - len(evil))
    (ckpt / "__0_0.weight").write_bytes(bytes(blob))
    with pytest.raises(UnsafeCheckpointError):
        torchckpt.load(ckpt)
    assert torchckpt.scan(ckpt).status == "findings"
    assert torchckpt.scan(tmp_path, recursive=True).status == "findings"
    assert not (tmp_path / "canary").exists()


def test_dcp_key_with_a_nul_byte_scans(tmp_path):
    """Found by the agreement fuzz: item names (file[key]) went through os.path.realpath."""
    _dcp(tmp_path / "ckpt", {"a\x00b": torch.ones(2), "t\x00": "text"})
    assert torch.equal(torchckpt.load(tmp_path / "ckpt")["a\x00b"], torch.ones(2))
    assert torchckpt.scan(tmp_path / "ckpt").status == "clean"


def test_scan_follows_symlinked_folders_once(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "evil.pt").write_bytes(torch_zip(_payload_pickle(technique_os_system(tmp_path / "c"))))
    tree = tmp_path / "tree"
    tree.mkdir()
    os.symlink(outside, tree / "shards")
    os.symlink(tree, tree / "loop")  # a loop is walked once
    report = torchckpt.scan(tree, recursive=True)
    assert report.status == "findings" and [f.status for f in report.files] == ["findings"]


def test_scan_runs_allowlisted_calls_as_load_does(tmp_path):
    """A call that load refuses (a 1 GiB bytes() from an allowlisted name) is not clean to scan."""
    path = tmp_path / "bomb.pkl"
    path.write_bytes(PROTO2 + call(glob("builtins", "bytes"), i(1 << 30)) + STOP)
    with pytest.raises(CorruptCheckpointError):
        torchckpt.load(path)
    report, f = _scan_one(path)
    assert report.status == "unreadable" and f.status == "unreadable" and f.error


def test_scan_parses_safetensors_and_t7_as_load_does(tmp_path):
    from safetensors.torch import save_file

    good = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(2)}, str(good))
    bad = tmp_path / "bad.safetensors"
    data = bytearray(good.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_len])
    header["a"]["data_offsets"] = [0, 4]  # shape [2] float32 is 8 bytes
    raw = json.dumps(header).encode().ljust(header_len)
    bad.write_bytes(bytes(data[:8]) + raw[:header_len] + bytes(data[8 + header_len:]))
    assert torchckpt.scan(good).status == "clean"
    with pytest.raises(CorruptCheckpointError):
        torchckpt.load(bad)
    assert torchckpt.scan(bad).files[0].status == "unreadable"
    t7 = tmp_path / "m.t7"
    write_t7(Obj("nn.Linear", {"weight": torch.ones(2, 2)}), t7)
    assert torchckpt.scan(t7).status == "clean"
    t7.write_bytes(t7.read_bytes()[:-5])
    with pytest.raises(CheckpointError):
        torchckpt.load(t7)
    assert torchckpt.scan(t7).files[0].status == "unreadable"


# ----------------------------------------------------------------------------- benign files
def test_torch_zip_recompressed_with_deflate_is_benign(tmp_path, net):
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    path = tmp_path / "deflated.pt"
    out = io.BytesIO()
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    path.write_bytes(out.getvalue())
    loaded = torchckpt.load(path)
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())
    report, f = _scan_one(path)
    assert report.status == "clean", [x.message for x in f.findings]


def test_safetensors_whose_tensor_bytes_hold_zip_magic_is_benign(tmp_path):
    from safetensors.torch import save_file

    raw = torch.frombuffer(bytearray(b"PK\x05\x06" * 16), dtype=torch.uint8)
    path = tmp_path / "w.safetensors"
    save_file({"blob": raw.clone()}, str(path))
    assert b"PK\x05\x06" in path.read_bytes()
    report, f = _scan_one(path)
    assert report.status == "clean", [x.message for x in f.findings]


# ----------------------------------------------------------------------------- raw errors -> CheckpointError
def _safetensors_with_metadata(tmp_path, metadata) -> str:
    header = json.dumps({"__metadata__": metadata, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 4)
    return str(path)


@pytest.mark.parametrize("metadata", [{"format": 5}, {"a": None}, {"torchckpt.aliases": "[1, 2]"},
                                      {"torchckpt.aliases": '{"alias": 7}'}])
def test_safetensors_metadata_errors_are_checkpoint_errors(tmp_path, metadata):
    path = _safetensors_with_metadata(tmp_path, metadata)
    for fn in (torchckpt.load, torchckpt.inspect):
        with pytest.raises(CorruptCheckpointError) as info:
            fn(path)
        assert path in str(info.value)
    assert torchckpt.scan(path).status == "unreadable"


def _dcp_metadata(ckpt, **changes):
    from torch.distributed.checkpoint.metadata import Metadata

    _dcp(ckpt, {"w": torch.ones(3)})
    with open(ckpt / ".metadata", "rb") as fh:
        meta = pickle.load(fh)  # our own test file, written just above by torch itself
    assert isinstance(meta, Metadata)
    for name, edit in changes.items():
        setattr(meta, name, edit(getattr(meta, name)))
    with open(ckpt / ".metadata", "wb") as fh:
        pickle.dump(meta, fh)


def _huge(md):
    md["w"].size = torch.Size([1 << 40, 1 << 40])
    return md


def _index_offset_int(storage):
    out = {}
    for k, v in storage.items():
        object.__setattr__(k, "offset", 5)  # not a tuple of ints
        out[k] = v
    return out


@pytest.mark.parametrize("edit", [{"state_dict_metadata": _huge}, {"storage_data": lambda sd: "garbage"},
                                  {"storage_data": lambda sd: {k: "not a record" for k in sd}},
                                  {"storage_data": _index_offset_int}])
def test_dcp_metadata_errors_are_checkpoint_errors(tmp_path, edit):
    ckpt = tmp_path / "ckpt"
    _dcp_metadata(ckpt, **edit)
    for mode in (torchckpt.load, torchckpt.inspect):
        with pytest.raises(CorruptCheckpointError):
            mode(ckpt)
    assert torchckpt.scan(ckpt).status == "unreadable"


def _zip_central_edit(tmp_path, net, edit) -> str:
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    data = bytearray(buf.getvalue())
    central = data.find(b"PK\x01\x02")
    edit(data, central)
    path = tmp_path / "z.pt"
    path.write_bytes(bytes(data))
    return str(path)


def _version_needed(data, central):
    data[central + 6] = 0xFF  # "version needed to extract": 25.5


def _bad_utf8_name(data, central):
    data[central + 8] |= 0x08  # keep bits; set UTF-8 names (bit 11) and make the name invalid UTF-8
    data[central + 9] |= 0x08
    name_len = struct.unpack("<H", data[central + 28:central + 30])[0]
    data[central + 46:central + 46 + 2] = b"\xff\xfe"
    assert name_len > 2


@pytest.mark.parametrize("edit", [_version_needed, _bad_utf8_name])
def test_zip_version_and_flag_bytes_are_checkpoint_errors(tmp_path, net, edit):
    path = _zip_central_edit(tmp_path, net, edit)
    for fn in (torchckpt.load, torchckpt.inspect):
        with pytest.raises(CheckpointError) as info:
            fn(path)
        assert path in str(info.value)
    assert torchckpt.scan(path).status in ("findings", "unreadable")


def test_npz_member_inflating_past_the_bound_is_refused(tmp_path):
    path = tmp_path / "bomb.npz"
    header = b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) + \
        b"{'descr': '|u1', 'fortran_order': False, 'shape': (314572800,), }".ljust(117) + b"\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("a.npy", "w", force_zip64=True) as fh:
            fh.write(header)
            zero = bytes(1 << 20)
            for _ in range(300):
                fh.write(zero)
    assert path.stat().st_size < 2 << 20
    with pytest.raises(LimitExceededError):
        torchckpt.load(path)
    assert torchckpt.scan(path).status == "unreadable"


def _t7_tensor_header(w: Writer, sizes, strides, storage_count: int) -> None:
    w.i(4)
    w.index += 1
    w.i(w.index)
    w.tensor_body("Float", sizes, strides, storage_count, b"\0" * 4 * storage_count)


def test_t7_zero_stride_numel_overflow_is_refused(tmp_path):
    w = Writer()
    _t7_tensor_header(w, [1 << 40, 1 << 40], [0, 0], 1)
    path = tmp_path / "x.t7"
    path.write_bytes(bytes(w.out))
    for fn in (torchckpt.load, torchckpt.inspect):
        with pytest.raises(LimitExceededError):
            fn(path)


@pytest.mark.parametrize("eps", ["tiny", {"a": 1}])
def test_t7_nn_fields_of_wrong_type_are_checkpoint_errors(tmp_path, eps):
    bn = Obj("nn.BatchNormalization", {"weight": torch.ones(2), "running_mean": torch.zeros(2),
                                       "running_std": torch.ones(2), "eps": eps})
    path = tmp_path / "bn.t7"
    write_t7(Obj("nn.Sequential", {"modules": [bn]}), path)
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(2))
    with pytest.raises(CorruptCheckpointError):
        torchckpt.load_into(model, path, strict=False)
    int_std = Obj("nn.BatchNormalization", {"running_mean": torch.zeros(2, dtype=torch.int64),
                                            "running_std": torch.ones(2, dtype=torch.int64)})
    write_t7(Obj("nn.Sequential", {"modules": [int_std]}), path)
    with pytest.raises(CorruptCheckpointError):
        torchckpt.load_into(model, path, strict=False)


# ----------------------------------------------------------------------------- confinement
def _index(folder, shard: str) -> str:
    path = os.path.join(folder, "model.safetensors.index.json")
    with open(path, "w") as fh:
        json.dump({"weight_map": {"w": shard}}, fh)
    return path


def _secret_linked_into(tmp_path, secret_name: str, folder_name: str, member: str):
    """A file of secret bytes beside a new folder, and ``folder/member`` a symlink to it: (secret, folder)."""
    secret = tmp_path / secret_name
    secret.write_bytes(b"TOPSECRET-" * 50)
    folder = tmp_path / folder_name
    folder.mkdir()
    os.symlink(secret, folder / member)
    return secret, folder


def _refused_without_the_secret(ckpt) -> None:
    """load and inspect refuse ``ckpt`` as reaching outside its folder, and never show the secret bytes."""
    for fn in (torchckpt.load, torchckpt.inspect):
        with pytest.raises(UnsafeCheckpointError) as info:
            fn(ckpt)
        assert "TOPSECRET" not in str(info.value) and "outside" in str(info.value)


def test_shard_symlink_outside_the_folder_is_refused_without_its_bytes(tmp_path):
    secret, folder = _secret_linked_into(tmp_path, "secret.txt", "model", "model-00001.safetensors")
    index = _index(folder, "model-00001.safetensors")
    _refused_without_the_secret(index)
    for shard in ("../secret.txt", str(secret), "sub/../../secret.txt"):
        with pytest.raises(UnsafeCheckpointError) as info:
            torchckpt.load(_index(folder, shard))
        assert "TOPSECRET" not in str(info.value)
    report = torchckpt.scan(index)
    assert report.status == "findings" and report.files[0].findings[0].kind == "unsafe"


def test_symlinked_shard_folder_inside_and_hf_cache_layout_load(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "model"
    (folder / "real").mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(folder / "real" / "s.safetensors"))
    os.symlink(folder / "real", folder / "shards")  # a link that stays inside is fine
    assert torch.equal(torchckpt.load(_index(folder, "shards/s.safetensors"))["w"], torch.ones(2))
    repo = tmp_path / "models--org--name"  # huggingface_hub cache: snapshot files link to ../../blobs
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc").mkdir(parents=True)
    save_file({"w": torch.full((2,), 3.0)}, str(repo / "blobs" / "0123"))
    os.symlink("../../blobs/0123", repo / "snapshots" / "abc" / "model-00001.safetensors")
    index = _index(repo / "snapshots" / "abc", "model-00001.safetensors")
    assert torch.equal(torchckpt.load(index)["w"], torch.full((2,), 3.0))


@pytest.mark.parametrize("member, outside", [("__0_0.distcp", "elsewhere.distcp"), (".metadata", "elsewhere")],
                         ids=["data-file", "metadata"])
def test_dcp_member_symlinked_outside_is_refused(tmp_path, member, outside):
    ckpt = tmp_path / "ckpt"
    _dcp(ckpt, {"w": torch.ones(3)})
    os.rename(ckpt / member, tmp_path / outside)
    os.symlink(tmp_path / outside, ckpt / member)
    with pytest.raises(UnsafeCheckpointError):
        torchckpt.load(ckpt)
    assert torchckpt.scan(ckpt).status == "findings"


# ----------------------------------------------------------------------------- issue 11: 7, 18, 19
@pytest.mark.slow
def test_scan_tree_with_broken_downloads_is_unreadable(tmp_path, net):
    tree = tmp_path / "tree"
    tree.mkdir()
    torch.save(net.state_dict(), tree / "good.pt")
    (tree / "model.pth").write_text("<!DOCTYPE html><html><head><title>Sign in</title></head></html>")
    (tree / "lfs.pth").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 1234\n")
    legacy = io.BytesIO()
    torch.save(net.state_dict(), legacy, _use_new_zipfile_serialization=False)
    (tree / "cut.pth").write_bytes(legacy.getvalue()[:-100])
    (tree / "README.md").write_text("# notes\n")
    (tree / "config.json").write_text('{"a": 1}')
    report = torchckpt.scan(tree, recursive=True)
    status = {os.path.basename(f.path): f.status for f in report.files}
    assert status == {"good.pt": "clean", "model.pth": "unreadable", "lfs.pth": "unreadable",
                      "cut.pth": "unreadable", "README.md": "skipped", "config.json": "skipped"}
    assert report.status == "unreadable"
    res = subprocess.run([sys.executable, "-m", "torchckpt", "scan", "-r", str(tree)], capture_output=True, text=True)
    assert res.returncode == 3 and "git lfs pull" in res.stdout


def test_torchscript_lite_constants_read_from_constants_folder(tmp_path):
    const = io.BytesIO()
    torch.save((torch.arange(3.0),), const)
    weights = io.BytesIO()
    torch.save({"w": torch.full((5,), 7.0)}, weights)
    with zipfile.ZipFile(const) as c, zipfile.ZipFile(weights) as w:
        cp = next(n.split("/")[0] for n in c.namelist())
        wp = next(n.split("/")[0] for n in w.namelist())
        members = {"data.pkl": w.read(f"{wp}/data.pkl"), "data/0": w.read(f"{wp}/data/0"),
                   "constants.pkl": c.read(f"{cp}/data.pkl"), "constants/0": c.read(f"{cp}/data/0"),
                   "code/__torch__.py": b"class M(Module):\n  __parameters__ = []\n",
                   "bytecode.pkl": pickle.dumps((6, ("__torch__.M.forward", ())), protocol=2)}
    path = tmp_path / "m.ptl"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(f"m/{name}", data)
    path.write_bytes(buf.getvalue())
    tree, info = torchckpt.load(path, return_info=True)
    assert info.format == "torchscript" and torch.equal(tree["w"], torch.full((5,), 7.0))
    assert torch.equal(info.details["constants"][0], torch.arange(3.0))  # not data/0 of the weights
    report, f = _scan_one(path)
    assert report.status == "clean", [x.message for x in f.findings]


def _torchscript_v1(path, params: dict[str, torch.Tensor]) -> None:
    """The pre-1.2 layout, from torch/csrc/jit/export.cpp's ModelDef (protobuf JSON; int64 as strings)."""
    tensors, modules = [], {}
    for i, (name, t) in enumerate(params.items()):
        tensors.append({"dims": [str(d) for d in t.shape], "offset": "0", "strides": [str(x) for x in t.stride()],
                        "requiresGrad": t.requires_grad, "dataType": {torch.float32: "FLOAT", torch.int64: "INT64"}[
                            t.dtype], "data": {"key": f"tensors/{i}"}, "device": "cpu"})
        *subs, leaf = name.split(".")
        modules.setdefault(tuple(subs), []).append({"isBuffer": False, "tensorId": str(i), "name": leaf})

    def module(prefix: tuple, name: str) -> dict:
        children = list(dict.fromkeys(k[len(prefix)] for k in modules if len(k) > len(prefix)
                                      and k[:len(prefix)] == prefix))
        return {"name": name, "parameters": modules.get(prefix, []),
                "submodules": [module(prefix + (c,), c) for c in children], "optimize": True,
                "torchscriptArena": {"key": "code/" + ("_".join(prefix) or "model") + ".py"}}

    model = {"protoVersion": "2", "producerName": "pytorch", "producerVersion": "1.0", "tensors": tensors,
             "mainModule": module((), "model")}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model/version", "1\n")
        zf.writestr("model/model.json", json.dumps(model))
        zf.writestr("model/code/model.py", "op_version_set = 0\ndef forward(self, x): return x\n")
        for i, t in enumerate(params.values()):
            zf.writestr(f"model/tensors/{i}", t.contiguous().numpy().tobytes())


def test_torchscript_before_torch_1_2_reads_as_a_state_dict(tmp_path, net):
    path = tmp_path / "old_script.pt"
    state = {k: v for k, v in net.state_dict().items() if v.dtype in (torch.float32, torch.int64)}
    _torchscript_v1(path, state)
    tree, info = torchckpt.load(path, return_info=True)
    assert info.format == "torchscript" and list(tree) == list(state)
    assert all(torch.equal(tree[k], v) for k, v in state.items())
    from conftest import small_net

    assert torchckpt.load_into(small_net(), path, strict=False).ok  # plain tensors fit the model
    report = torchckpt.inspect(path)
    assert {t.key for t in report.tensors} == set(state)
    assert torchckpt.scan(path).status == "clean"


def _computed_global(module: bytes, name: str) -> bytes:
    """A protocol-4 STACK_GLOBAL whose module string is computed (``str(module_bytes, "ascii")``, memoised
    and fetched back) instead of being a literal just before the opcode."""
    return (PROTO4 + s("builtins") + s("str") + STACK_GLOBAL + MARK + b(module) + s("ascii") + TUPLE + REDUCE
            + MEMOIZE + b"0" + b"h\x00" + s(name) + STACK_GLOBAL + EMPTY_TUPLE + REDUCE + STOP)


def test_stack_global_with_a_computed_module_is_judged_by_its_value(tmp_path):
    path = tmp_path / "computed.pkl"
    path.write_bytes(_computed_global(b"collections", "OrderedDict"))
    assert torchckpt.load(path) == {}
    report, f = _scan_one(path)
    assert report.status == "clean", [x.message for x in f.findings]
    assert [g.fullname for g in f.globals] == ["builtins.str", "collections.OrderedDict"]
    # the same shape naming os.getpid: load refuses, scan names the computed global
    path.write_bytes(_computed_global(b"os", "getpid"))
    with pytest.raises(UnsafeCheckpointError):
        torchckpt.load(path)
    report, f = _scan_one(path)
    assert report.status == "findings" and any("os.getpid" in x.message for x in f.findings)


def test_model_folder_files_symlinked_outside_are_refused_without_their_bytes(tmp_path):
    from safetensors.torch import save_file

    secret, folder = _secret_linked_into(tmp_path, "secret.bin", "hf", "model.safetensors")
    (folder / "config.json").write_text('{"model_type": "x"}')
    acc = tmp_path / "acc"
    acc.mkdir()
    save_file({"w": torch.ones(2)}, str(acc / "model.safetensors"))
    torch.save({"lr": 1}, acc / "optimizer.bin")
    os.symlink(secret, acc / "random_states_0.pkl")
    for ckpt in (folder, acc):
        _refused_without_the_secret(ckpt)
        for report in (torchckpt.scan(ckpt), torchckpt.scan(tmp_path, recursive=True)):
            assert report.status == "findings" and "TOPSECRET" not in json.dumps(report.to_dict())
            (f,) = [f for f in report.files if f.path == str(ckpt)]
            assert f.findings[0].kind == "unsafe"
    # a config.json linked out of the folder is refused too; the weights beside it are real
    os.remove(folder / "model.safetensors")
    save_file({"w": torch.ones(2)}, str(folder / "model.safetensors"))
    os.remove(folder / "config.json")
    os.symlink(secret, folder / "config.json")
    with pytest.raises(UnsafeCheckpointError):
        torchckpt.load(folder)


def test_model_folder_config_json_nested_too_deep_is_a_checkpoint_error(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    for fn in (torchckpt.load, torchckpt.inspect):
        with pytest.raises(CorruptCheckpointError, match="config.json") as info:
            fn(folder)
        assert str(folder) in str(info.value)


def test_model_folder_scans_as_load_reads_it_and_the_files_it_skips(tmp_path, net):
    """scan(folder) says what load(folder) does, then scans what load would not read (a second weights file)."""
    from safetensors.torch import save_file

    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "x"}')
    assert torchckpt.scan(folder).status == "clean"
    (folder / "pytorch_model.bin").write_bytes(torch_zip(_payload_pickle(technique_os_system(tmp_path / "canary"))))
    assert set(torchckpt.load(folder)) == set(net.state_dict())  # load reads model.safetensors only
    report = torchckpt.scan(folder)
    status = {os.path.basename(f.path): f.status for f in report.files}
    assert status == {"hf": "clean", "model.safetensors": "clean", "pytorch_model.bin": "findings",
                      "config.json": "skipped"}  # each weights file is also listed on its own (issue 24)
    assert report.status == "findings" and not (tmp_path / "canary").exists()


def test_scan_takes_the_policy_load_takes(tmp_path, net):
    """scan(policy=/trust=/allow=) reads under the same budget and allowlist as load, never imports."""
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    strict = torchckpt.scan(path, strict=True)
    assert strict.status == "findings" and all(f.kind == "stubbed-class" for f in strict.files[0].findings)
    assert torchckpt.scan(path, strict=True, allow=["torch.nn.*"]).status == "clean"
    tight = torchckpt.Policy.make(budget=torchckpt.Budget(depth=3))
    with pytest.raises(LimitExceededError):
        torchckpt.load(path, policy=tight)
    assert torchckpt.scan(path, policy=tight).files[0].status == "unreadable"
    with pytest.raises(ValueError):
        torchckpt.scan(path, policy=tight, trust=True)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(torch_zip(_payload_pickle(technique_os_system(tmp_path / "canary"))))
    assert torchckpt.scan(evil, trust=True).status == "findings" and not (tmp_path / "canary").exists()
