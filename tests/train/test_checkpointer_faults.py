"""Checkpointer under real faults: a full disk, kills at precise moments, two writers, damage, read-only places."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch

import torchckpt
from torchckpt import CheckpointWriteError
from torchckpt.train.checkpointer import SkippedCheckpointWarning
from torchckpt.train import sidecar

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers")  # the helper scripts
WORKER = os.path.join(HERE, "ckpt_worker.py")


def _worker(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, WORKER, *args], capture_output=True, text=True, timeout=240, **kw)


@contextlib.contextmanager
def _mounted_tmpfs(where, options: str):
    """A real tmpfs mounted at ``where``; yields False where mounting is not permitted (no root, no CAP_SYS_ADMIN)."""
    where.mkdir()
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                            capture_output=True).returncode == 0
    except OSError:
        ok = False
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


# --------------------------------------------------------------------------- 12: disk full
@pytest.mark.slow
def test_disk_full_is_a_write_error_and_keeps_the_previous_checkpoint(tmp_path):
    with _mounted_tmpfs(tmp_path / "small", "size=2m") as mounted:
        # 2 MiB of disk, or (where mounting is not permitted) a 2 MiB file-size limit on the writer
        res = _worker("diskfull", str(tmp_path / "small"), *([] if mounted else [str(2 << 20)]))
        assert res.returncode == 0, res.stderr[-3000:]
        outcomes = json.loads(res.stdout.splitlines()[-1])
        why = "the disk is full" if mounted else "file-size limit"
        for where in ("checkpointer", "save", "async", "async_later"):
            got = outcomes[where]
            assert got["is_write_error"], (where, got)
            assert why in got["message"] and "needs about 4.0 MiB" in got["message"], (where, got)
            assert "unexpected pos" not in got["message"]
        run = tmp_path / "small" / "run"
        ckpt = torchckpt.Checkpointer(run)
        assert [c.step for c in ckpt.checkpoints()] == [1]
        assert sorted(os.listdir(run)) == [".torchckpt.lock", "ckpt-0000000001.pt", "ckpt-0000000001.pt.meta.json"]
        model = torch.nn.Linear(16, 16)
        assert ckpt.resume(model=model).step == 1
        assert not os.path.exists(tmp_path / "small" / "single.pt")


# --------------------------------------------------------------------------- 13: commit and retention crash safety
def test_a_sidecar_that_cannot_be_written_leaves_no_data_file(tmp_path, net):
    ckpt = torchckpt.Checkpointer(tmp_path, keep_last=1)
    ckpt.save(1, model=net)
    os.mkdir(ckpt.path_for(2) + ".meta.json")  # the sidecar's name is taken by a directory: os.replace fails
    with pytest.raises(CheckpointWriteError):
        ckpt.save(2, model=net)
    assert not os.path.exists(ckpt.path_for(2))
    assert [c.step for c in ckpt.checkpoints()] == [1]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".uncommitted") or ".tmp-" in n]


def test_retention_that_cannot_remove_an_old_checkpoint_warns_and_keeps_the_new_one(tmp_path, net):
    from torchckpt.train.checkpointer import RetentionWarning

    ckpt = torchckpt.Checkpointer(tmp_path, keep_last=1)
    ckpt.save(1, model=net)
    os.mkdir(tmp_path / ".ckpt-0000000001.pt.uncommitted")  # the intent marker of its removal cannot be created
    with pytest.warns(RetentionWarning, match="saved ckpt-0000000002.pt, but could not remove the old ckpt-0000000001"):
        ckpt.save(2, model=net)
    assert [c.step for c in ckpt.checkpoints()] == [1, 2]
    os.rmdir(tmp_path / ".ckpt-0000000001.pt.uncommitted")
    ckpt.save(3, model=net)  # the next save removes both
    assert [c.step for c in ckpt.checkpoints()] == [3]


@pytest.mark.slow
def test_a_full_disk_before_the_first_save_is_a_write_error(tmp_path):
    with _mounted_tmpfs(tmp_path / "full", "size=1m") as mounted:
        if not mounted:  # no right to mount: a file-size limit cannot fill a disk; the tmpfs cases cover the rest
            return
        (tmp_path / "full" / "run").mkdir()
        with open(tmp_path / "full" / "fill", "wb", buffering=0) as fh:  # every page of the file system taken
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * 4096)
        with pytest.raises(CheckpointWriteError, match="the disk is full"):
            torchckpt.Checkpointer(tmp_path / "full" / "run").save(1, model=torch.nn.Linear(2, 2))
        assert not [n for n in os.listdir(tmp_path / "full" / "run") if n.startswith("ckpt-")]


@pytest.mark.slow
@pytest.mark.parametrize("where,orphan", [
    ("before-sidecar", "ckpt-0000000003.pt"),  # step 3's data renamed, its sidecar not
    ("after-weights", "ckpt-0000000003.pt.safetensors"),  # step 3's weights file renamed, its data and sidecar not
    ("inside-retention", "ckpt-0000000002.pt"),  # step 3 committed; retention removed step 2's sidecar, not its data
])
def test_a_kill_inside_the_protocol_leaves_nothing_uncommitted(tmp_path, where, orphan):
    res = _worker("kill-at", where, str(tmp_path))
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stderr[-2000:])
    names = set(os.listdir(tmp_path))
    assert orphan in names and orphan.replace(".safetensors", "") + ".meta.json" not in names  # what the kill left
    open(tmp_path / "ckpt-0000000000.pt", "wb").write(b"a file the user put here by hand")
    ckpt = torchckpt.Checkpointer(tmp_path, keep_last=1)
    assert orphan in ckpt.reclaimed
    names = set(os.listdir(tmp_path))
    data = {n for n in names if n.endswith(".pt") or n.endswith(".safetensors")}
    committed = {os.path.basename(c.path) for c in ckpt.checkpoints()}
    committed |= {n + ".safetensors" for n in committed}
    assert data - committed == {"ckpt-0000000000.pt"}  # no data file without sidecar, except the user's own
    assert not [n for n in names if n.endswith(".uncommitted")]
    assert ckpt.resume(model=torch.nn.Linear(4, 4)).step == (3 if where == "inside-retention" else 2)
    ckpt.save(4, model=torch.nn.Linear(4, 4))
    assert "ckpt-0000000000.pt" in os.listdir(tmp_path)  # retention never deletes what it did not write


@pytest.mark.slow
def test_a_kill_after_the_renames_before_the_directory_fsync_keeps_the_new_checkpoint(tmp_path):
    res = _worker("kill-at", "before-dir-fsync", str(tmp_path))
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stderr[-2000:])
    assert ".ckpt-0000000003.pt.uncommitted" in os.listdir(tmp_path)  # its save had not returned
    ckpt = torchckpt.Checkpointer(tmp_path, keep_last=1)
    assert ckpt.reclaimed == []  # complete: its marker is dropped, nothing is removed
    assert [c.step for c in ckpt.checkpoints()] == [2, 3]  # retention had not run yet
    assert ckpt.resume(model=torch.nn.Linear(4, 4)).step == 3
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".uncommitted") or ".tmp-" in n]


# Every point of an overwrite (single file, no Checkpointer): the old checkpoint or the new one, never a mix
@pytest.mark.slow
@pytest.mark.parametrize("where,step", [
    ("before-old-sidecar-removed", 1),  # the new files are durable under temp names; nothing final changed
    ("after-old-sidecar-removed", 1),  # the old data stays, without a sidecar: complete, unverified
    ("between-renames", 2),  # the new data without a sidecar: complete, unverified
    ("before-dir-fsync", 2),  # the new data and its sidecar
])
def test_a_kill_while_overwriting_a_single_file_leaves_a_resumable_file(tmp_path, where, step):
    path = tmp_path / "last.pt"
    res = _worker("overwrite-kill", str(path), where)
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stderr[-2000:])
    model = torch.nn.Linear(4, 4)
    state = torchckpt.resume(path, model=model)  # an old sidecar must never condemn new, complete data
    assert state.step == step and float(model.bias[0].detach()) == float(step)
    meta = sidecar.read(str(path))
    assert meta is None or meta["step"] == step  # a sidecar, if any, describes the data beside it


@pytest.mark.slow
@pytest.mark.parametrize("where,sidecar", [("between-renames", False), ("before-dir-fsync", True)])
def test_a_kill_while_saving_a_new_single_file_leaves_it_complete(tmp_path, where, sidecar):
    path = tmp_path / "new.pt"  # no file under these names yet: renamed first, fsynced together
    res = _worker("new-kill", str(path), where)
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stderr[-2000:])
    assert os.path.exists(str(path) + ".meta.json") == sidecar
    model = torch.nn.Linear(4, 4)
    assert torchckpt.resume(path, model=model).step == 1 and float(model.bias[0].detach()) == 1.0


# A power loss before a new checkpoint's fsyncs finished can leave its names with content that never
# reached the disk (a new checkpoint is renamed before it is fsynced: see AtomicFiles.publish). These
# are the states ext4/XFS can come back with; the sidecar's size and digest must refuse each of them.
@pytest.mark.parametrize("lost", ["data-empty", "data-half", "sidecar-empty", "data-zeros"])
def test_a_new_checkpoint_whose_content_did_not_reach_the_disk_is_never_resumed(tmp_path, net, lost):
    ckpt = torchckpt.Checkpointer(tmp_path, keep_last=3)
    for step in (1, 2):
        with torch.no_grad():
            net.fc.bias.fill_(step)
        ckpt.save(step, model=net)
    ckpt.close()
    path = ckpt.path_for(2)
    open(os.path.join(tmp_path, ".ckpt-0000000002.pt.uncommitted"), "wb").close()  # its save had not returned
    size = os.path.getsize(path)
    if lost == "data-empty":
        open(path, "wb").close()
    elif lost == "data-half":
        os.truncate(path, size // 2)
    elif lost == "sidecar-empty":
        open(path + ".meta.json", "wb").close()
    else:  # the size reached the disk, the blocks did not (unwritten extents read as zeros)
        open(path, "wb").write(bytes(size))
    ckpt = torchckpt.Checkpointer(tmp_path, keep_last=3)
    if lost != "data-zeros":  # incomplete by its size or sidecar: removed as the leftovers of an unfinished save
        assert "ckpt-0000000002.pt" in ckpt.reclaimed or "ckpt-0000000002.pt.meta.json" in ckpt.reclaimed
        assert [c.step for c in ckpt.checkpoints()] == [1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedCheckpointWarning)  # data-zeros: skipped by its digest
        state = ckpt.resume(model=net)
    assert state.step == 1 and float(net.fc.bias[0].detach()) == 1.0


# --------------------------------------------------------------------------- 15: two writers
@pytest.mark.slow
def test_a_second_writer_gets_a_clear_error_naming_the_holder(tmp_path, net):
    holder = subprocess.Popen([sys.executable, WORKER, "hold", str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready", holder.stderr.read()[-2000:]
        mine = torchckpt.Checkpointer(tmp_path, keep_last=1)
        with pytest.raises(CheckpointWriteError) as info:
            mine.save(100, model=net)
        assert f"pid {holder.pid}" in str(info.value) and "another writer" in str(info.value)
        assert [c.step for c in mine.checkpoints()] == [3]  # the holder's checkpoint is untouched
        assert mine.resume(model=torch.nn.Linear(4, 4)).step == 3  # readers need no lock
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "saved 4"
        holder.wait(timeout=60)
        mine.save(100, model=net)  # the holder exited: the kernel released its lock
        assert [c.step for c in mine.checkpoints()] == [100]
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


@pytest.mark.slow
def test_a_killed_writer_does_not_block_the_next_one(tmp_path, net):
    holder = subprocess.Popen([sys.executable, WORKER, "hold", str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "ready"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    ckpt = torchckpt.Checkpointer(tmp_path, keep_last=5)
    ckpt.save(4, model=net)
    assert [c.step for c in ckpt.checkpoints()] == [3, 4]


def test_two_checkpointers_in_one_process(tmp_path, net):
    first = torchckpt.Checkpointer(tmp_path)
    first.save(1, model=net)
    with pytest.raises(CheckpointWriteError) as info:
        torchckpt.Checkpointer(tmp_path).save(2, model=net)
    assert "this process" in str(info.value)
    first.close()
    torchckpt.Checkpointer(tmp_path).save(2, model=net)


# --------------------------------------------------------------------------- 14: damaged newest checkpoint
@pytest.mark.parametrize("damage,why", [("truncate", "truncated"), ("no-sidecar", "no sidecar"),
                                        ("garbage-sidecar", "sidecar is unreadable"),
                                        ("json-list-sidecar", "not an object"),
                                        ("flip-crc", "CRC-32")])
def test_every_fallback_warns_and_names_the_file(tmp_path, net, damage, why):
    ckpt = torchckpt.Checkpointer(tmp_path, keep_last=3)
    for step in (1, 2):
        with torch.no_grad():
            net.fc.bias.fill_(step)
        ckpt.save(step, model=net)
    path = ckpt.path_for(2)
    if damage == "truncate":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif damage == "no-sidecar":
        os.remove(path + ".meta.json")
    elif damage == "garbage-sidecar":
        open(path + ".meta.json", "wb").write(b"\xff\xfe{not json")
    elif damage == "json-list-sidecar":
        open(path + ".meta.json", "w").write("[1, 2]")
    else:
        import zipfile

        with zipfile.ZipFile(path) as zf:
            info = next(i for i in zf.infolist() if i.filename.endswith("data.pkl"))
        data = bytearray(open(path, "rb").read())
        name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
        start = info.header_offset + 30 + name_len + extra_len
        data[start + 5] ^= 0x01
        open(path, "wb").write(bytes(data))
    with pytest.warns(SkippedCheckpointWarning, match="ckpt-0000000002.pt"):
        state = ckpt.resume(model=net)
    assert state.step == 1 and float(net.fc.bias[0].detach()) == 1.0
    note = next(n for n in state.notes if "ckpt-0000000002.pt" in n)
    assert note.startswith("skipped ckpt-0000000002.pt") and why in note, state.notes


def test_every_single_byte_flip_falls_back_or_resumes_exactly(tmp_path):
    """Flip each byte of the newest checkpoint (a dense sample of a small file); bounded time."""
    import time
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ckpt = torchckpt.Checkpointer(tmp_path, keep_last=2)
    expected = {}
    for step in (1, 2):
        with torch.no_grad():
            model.bias.fill_(step)
        expected[step] = {k: v.clone() for k, v in model.state_dict().items()}
        ckpt.save(step, model=model, optimizer=opt, metrics={"loss": 1.0 / step})
    path = ckpt.path_for(2)
    original = open(path, "rb").read()
    sidecar = open(path + ".meta.json", "rb").read()
    offsets = sorted(_structure_bytes(original) | set(range(0, len(original), 64)))
    targets = [(path, original, o) for o in offsets] + \
              [(path + ".meta.json", sidecar, o) for o in range(0, len(sidecar), 8)]
    deadline = time.monotonic() + 240
    fell_back = resumed = 0
    for name, data, offset in targets:
        assert time.monotonic() < deadline, f"too slow: {fell_back + resumed} flips in 240 s"
        damaged = bytearray(data)
        damaged[offset] ^= 0xFF
        open(name, "wb").write(bytes(damaged))
        fresh = torch.nn.Linear(3, 2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                state = ckpt.resume(model=fresh, optimizer=torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9),
                                    restore_rng=False)
            except Exception as exc:  # noqa: BLE001
                raise AssertionError(f"flip at {os.path.basename(name)}:{offset} escaped: {type(exc).__name__}: {exc}")
        got = {k: v for k, v in fresh.state_dict().items()}
        assert all(torch.equal(got[k], expected[state.step][k]) for k in got), (name, offset)
        if state.step == 1:
            fell_back += 1
            assert any(issubclass(w.category, SkippedCheckpointWarning) for w in caught), (name, offset)
            assert any("ckpt-0000000002.pt" in n for n in state.notes)
        else:
            resumed += 1
        open(name, "wb").write(data)
    assert fell_back > len(targets) // 3, (fell_back, resumed)  # the rest hit fields no reader depends on


def _structure_bytes(data: bytes) -> set[int]:
    """Offsets of every fixed field of the zip: local and central headers, end records (where flips bite)."""
    out: set[int] = set()
    end = data.rindex(b"PK\x05\x06")
    out |= set(range(end, len(data)))
    zip64 = data.rfind(b"PK\x06\x06", 0, end)
    if zip64 >= 0:
        out |= set(range(zip64, end))
    count, _, offset = struct.unpack("<HII", data[end + 10:end + 20])
    pos = offset
    for _ in range(count):
        n, m, k = struct.unpack("<HHH", data[pos + 28:pos + 34])
        local = struct.unpack("<I", data[pos + 42:pos + 46])[0]
        out |= set(range(pos, pos + 46)) | set(range(local, local + 30))
        pos += 46 + n + m + k
    return out


# --------------------------------------------------------------------------- 17: a place that cannot be written
@contextlib.contextmanager
def _read_only_parent(tmp_path):
    """A directory this process cannot create entries in: chmod for a normal user; for root a read-only tmpfs."""
    if os.geteuid() != 0:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o555)
        try:
            yield parent
        finally:
            parent.chmod(0o755)
        return
    with _mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as mounted:
        yield tmp_path / "ro" if mounted else None


@pytest.mark.slow
def test_new_subdir_under_a_read_only_parent(tmp_path):
    with _read_only_parent(tmp_path) as parent:
        if parent is not None:
            with pytest.raises(CheckpointWriteError) as info:
                torchckpt.Checkpointer(parent / "run")
            assert "not writable" in str(info.value) and "run" in str(info.value)
            with pytest.raises(CheckpointWriteError) as info:
                torchckpt.save(parent / "single.pt", model=torch.nn.Linear(2, 2))
            assert info.value.path == str(parent / "single.pt") and "not writable" in str(info.value)
            return
    # root without the right to mount: the same check from a process that gave up root
    work = tempfile.mkdtemp()
    try:
        os.chmod(work, 0o755)
        os.mkdir(os.path.join(work, "ro"), 0o555)
        code = ("import torchckpt, sys\ntry:\n    torchckpt.Checkpointer(sys.argv[1])\nexcept torchckpt.CheckpointWriteError"
                " as e:\n    print('write error:', e)\n")
        res = subprocess.run([sys.executable, "-c", code, os.path.join(work, "ro", "run")], capture_output=True,
                             text=True, timeout=120, preexec_fn=lambda: (os.setgid(65534), os.setuid(65534)))
        assert res.stdout.startswith("write error:") and "not writable" in res.stdout, res.stderr[-2000:]
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
