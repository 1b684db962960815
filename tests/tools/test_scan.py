"""scan: every attack flagged (same parser as load), every benign layout clean, container tricks found."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch
from pickle_asm import torch_zip
from test_malicious import CONTAINERS, TECHNIQUES, _container, _payload_pickle, technique_os_system

import torchckpt


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("technique", sorted(TECHNIQUES))
def test_every_attack_is_a_finding(tmp_path, technique, container):
    canary = tmp_path / "canary"
    path = tmp_path / "evil.bin"
    path.write_bytes(_container(container, technique, canary))
    report = torchckpt.scan(path)
    assert report.status == "findings" and report.files[0].status == "findings"
    assert any(f.kind == "dangerous-global" for f in report.files[0].findings)
    assert not canary.exists()


def _benign_corpus(folder, net) -> list:
    from tar_writer import write_torch_tar

    from torchckpt.demo.samples import write_py2_legacy
    from torchckpt.demo.tour import SCENARIOS

    files = []
    for sc in SCENARIOS:
        if sc.expect_error is None:
            sc.make(str(folder / sc.filename))
            files.append(folder / sc.filename)
    extra = {
        "legacy_whole.pth": lambda p: torch.save(net, p, _use_new_zipfile_serialization=False),
        "py2.pth": lambda p: write_py2_legacy({"state_dict": net.state_dict()}, p),
        "tar.pth": lambda p: write_torch_tar({"w": torch.ones(2)}, p),
        "protocol4.pt": lambda p: torch.save(net.state_dict(), p, pickle_protocol=4),
        "opt.pt": lambda p: torch.save(torch.optim.Adam(net.parameters()).state_dict(), p),
        "plain5.pkl": lambda p: open(p, "wb").write(pickle.dumps({"a": [1, 2.5, "x"]}, protocol=5)),
        "npz.npz": lambda p: __import__("numpy").savez(p, a=[1, 2]),
    }
    for name, make in extra.items():
        make(folder / name)
        files.append(folder / name)
    return files


def test_benign_files_scan_clean(tmp_path, net):
    files = _benign_corpus(tmp_path, net)
    report = torchckpt.scan(files)
    bad = [(f.path, [x.message for x in f.findings], f.error) for f in report.files if f.status != "clean"]
    assert not bad and report.status == "clean"
    assert torchckpt.scan(tmp_path, recursive=True).status == "clean"


def test_stubbed_classes_are_listed_not_findings(tmp_path, net):
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    report = torchckpt.scan(path)
    names = {g.fullname for g in report.files[0].globals}
    assert "torch.nn.modules.conv.Conv2d" in names and report.status == "clean"
    strict = torchckpt.scan(path, strict=True)
    assert strict.status == "findings" and all(f.kind == "stubbed-class" for f in strict.files[0].findings)


def test_pickle_hidden_in_extra_zip_member(tmp_path, net):
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    with zipfile.ZipFile(buf) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    prefix = next(iter(members)).split("/")[0]
    evil = _payload_pickle(technique_os_system(tmp_path / "c"))
    extra = {n[len(prefix) + 1:]: d for n, d in members.items() if not n.endswith("/data.pkl")}
    extra["data/extra.bin"] = b""
    extra["payload"] = evil
    path = tmp_path / "hidden.pt"
    path.write_bytes(torch_zip(members[f"{prefix}/data.pkl"], extra, prefix=prefix))
    assert torchckpt.load(path)  # the loader never reads it ...
    report = torchckpt.scan(path)  # ... but the scanner reports it
    kinds = {f.kind for f in report.files[0].findings}
    assert {"container", "dangerous-global"} <= kinds


def test_zip_flag_bit_and_compression_tricks(tmp_path):
    evil = _payload_pickle(technique_os_system(tmp_path / "c"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", evil)
    data = bytearray(buf.getvalue())
    path = tmp_path / "deflated.pt"
    path.write_bytes(bytes(data))
    messages = [f.message for f in torchckpt.scan(path).files[0].findings]
    assert any("posix.system" in m or "os.system" in m for m in messages)  # found inside the deflated member
    # set the 'encrypted' flag in the central directory only: local and central now disagree
    central = data.rfind(b"PK\x01\x02")
    data[central + 8] |= 0x01
    path.write_bytes(bytes(data))
    messages = [f.message for f in torchckpt.scan(path).files[0].findings]
    assert any("unusual zip flags" in m for m in messages) and any("disagrees" in m for m in messages)


def test_local_header_name_differs_from_central_directory(tmp_path):
    data = bytearray(torch_zip(pickle.dumps({"a": 1}, protocol=2)))
    i = data.find(b"archive/data.pkl")  # the local header's copy comes first
    data[i:i + 7] = b"archivX"
    path = tmp_path / "mismatch.pt"
    path.write_bytes(bytes(data))
    assert any("disagrees" in f.message for f in torchckpt.scan(path).files[0].findings)


def test_polyglot_pickle_before_zip(tmp_path, net):
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    evil = _payload_pickle(technique_os_system(tmp_path / "c"))
    path = tmp_path / "polyglot.pt"
    path.write_bytes(evil + buf.getvalue())
    report = torchckpt.scan(path)
    messages = [f.message for f in report.files[0].findings]
    assert any("polyglot" in m for m in messages)  # read as a pickle (as torch.load would), zip appended
    assert any(f.kind == "dangerous-global" for f in report.files[0].findings)
    prefixed = tmp_path / "prefixed.pt"  # junk before a zip that still opens as one
    prefixed.write_bytes(b"PK\x03\x04" + b"\x00" * 26 + buf.getvalue())
    messages = [f.message for f in torchckpt.scan(prefixed).files[0].findings]
    assert any("before the first zip member" in m or "local header" in m for m in messages), messages


def test_zip_appended_to_legacy_file(tmp_path, net):
    legacy = io.BytesIO()
    torch.save(net.state_dict(), legacy, _use_new_zipfile_serialization=False)
    path = tmp_path / "appended.pth"
    path.write_bytes(legacy.getvalue() + torch_zip(pickle.dumps({}, protocol=2)))
    assert any("appended" in f.message for f in torchckpt.scan(path).files[0].findings)


@pytest.mark.parametrize("wrapper", ["gzip", "7z"])
def test_compressed_wrappers_are_findings(tmp_path, wrapper):
    evil = _payload_pickle(technique_os_system(tmp_path / "c"))
    data = gzip.compress(evil) if wrapper == "gzip" else b"7z\xbc\xaf\x27\x1c\x00\x04" + evil
    path = tmp_path / f"evil.{wrapper}"
    path.write_bytes(data)
    report = torchckpt.scan(path)
    assert report.status == "findings" and report.files[0].findings[0].kind == "container"


def test_nullifai_broken_stream_reports_what_came_before(tmp_path):
    evil = _payload_pickle(technique_os_system(tmp_path / "c"))[:-1] + b"\x00garbage"
    path = tmp_path / "broken.pkl"
    path.write_bytes(evil)
    kinds = [f.kind for f in torchckpt.scan(path).files[0].findings]
    assert "dangerous-global" in kinds and "unparsable-pickle" in kinds


@pytest.mark.slow
def test_cli_scan_exit_codes_and_json(tmp_path, net):
    good = tmp_path / "good.pt"
    torch.save(net.state_dict(), good)
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(_payload_pickle(technique_os_system(tmp_path / "c")))
    lfs = tmp_path / "lfs.bin"
    lfs.write_bytes(b"version https://git-lfs.github.com/spec/v1\nsize 3\n")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "torchckpt", "scan", *args], capture_output=True, text=True)

    assert run(str(good)).returncode == 0
    assert run(str(bad)).returncode == 1
    assert run(str(lfs)).returncode == 3
    res = run("--json", str(good), str(bad))
    doc = json.loads(res.stdout)
    assert res.returncode == 1 and [f["status"] for f in doc["files"]] == ["clean", "findings"]
    assert doc["exit_code"] == 1 and doc["status"] == "findings"  # the CLI's code beside the tool's facts
    lfs_doc = json.loads(run("--json", str(lfs)).stdout)
    assert lfs_doc["exit_code"] == 3 and lfs_doc["status"] == "unreadable"
    assert doc["files"][1]["findings"][0]["offset"] is not None
    res = run(str(tmp_path))  # a directory without --recursive: a usage error naming the command (issue 24)
    assert res.returncode == 2 and "-r" in res.stderr
    notes = tmp_path / "notes"  # only files that are not checkpoints: skipped, and skipped is fine
    notes.mkdir()
    (notes / "README.md").write_text("# notes\n")
    res = run("-r", "--json", str(notes))
    doc = json.loads(res.stdout)
    assert res.returncode == 0 and doc["exit_code"] == 0 and doc["status"] == "clean"
    assert [f["status"] for f in doc["files"]] == ["skipped"]
    assert run("-r", str(tmp_path)).returncode == 1
    assert os.path.exists(good)
