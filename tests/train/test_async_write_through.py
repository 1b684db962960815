"""The first async save of a Checkpointer writes its file on the caller's thread (the page cache is its snapshot)
and leaves only the durable part (fsync, rename, sidecar, retention) to the writer's thread; the snapshot buffers
it made are warmed afterwards for the next save (issue 27: the first async save was 1.4-2.7x a sync save)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

import torchckpt
from torchckpt.errors import CheckpointWriteError
from torchckpt.train.snapshot import start_snapshot
from torchckpt.train.warming import Warming

from test_ctrl_c_bookkeeping import interrupt_at_call

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")


def _model(width: int = 256, layers: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def _records(path) -> dict:
    """Every zip member but the pickle (it holds the save's time) and torch's random serialization id: name ->
    (size, CRC-32) of the bytes written."""
    with zipfile.ZipFile(path) as zf:
        return {i.filename: (i.file_size, i.CRC) for i in zf.infolist()
                if not i.filename.endswith(("data.pkl", "serialization_id"))}


def _listing(directory) -> list[str]:
    return sorted(os.listdir(directory))


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_the_first_async_save_writes_what_a_sync_save_writes(tmp_path):
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 256)).sum().backward()
    opt.step()
    with torchckpt.Checkpointer(tmp_path / "sync") as sync:
        sync.save(1, model=model, optimizer=opt, extra={"note": "x", "t": torch.arange(5)})
    with torchckpt.Checkpointer(tmp_path / "async", async_save=True) as ck:
        ck.save(1, model=model, optimizer=opt, extra={"note": "x", "t": torch.arange(5)})
        assert ck._buffers and all(b.nbytes() for b in ck._buffers.values())  # sized for the next save
    a, b = sync.path_for(1), ck.path_for(1)
    assert _records(a) == _records(b)  # every tensor's bytes, member by member
    assert _listing(tmp_path / "sync") == _listing(tmp_path / "async")
    loaded_a, loaded_b = torchckpt.load(a), torchckpt.load(b)
    for loaded in (loaded_a, loaded_b):
        loaded.pop("created")
    assert loaded_a.keys() == loaded_b.keys()
    assert all(torch.equal(loaded_a["model"][k], v) for k, v in loaded_b["model"].items())
    assert loaded_a["extra"]["note"] == loaded_b["extra"]["note"] and torch.equal(loaded_a["extra"]["t"],
                                                                                  loaded_b["extra"]["t"])
    meta_a, meta_b = (json.loads(open(p + ".meta.json").read()) for p in (a, b))
    assert meta_a["size"] == meta_b["size"]
    assert torchckpt.Checkpointer(tmp_path / "async").resume(model=_model(), optimizer=torch.optim.Adam(
        _model().parameters())).step == 1


def test_tensors_changed_after_save_returns_never_reach_the_file_first_and_second_save(tmp_path):
    """The first save's file is written before save() returns; the second copies into the warmed buffers."""
    model = _model(512, 8)  # 8 MiB: buffers large enough to be warmed
    with torchckpt.Checkpointer(tmp_path / "run", async_save=True, keep_last=None) as ck:
        for step in (1, 2, 3):
            expected = {k: v.clone() for k, v in model.state_dict().items()}
            ck.save(step, model=model)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(-3).add_(1)  # the next training step, while the writer may still be writing
            ck.wait()
            saved = torchckpt.load(ck.path_for(step))["model"]
            assert all(torch.equal(saved[k], v) for k, v in expected.items()), step
            if step == 1:
                assert ck._warming is not None and ck._warming.done.wait(60)  # warmed before the second save


def test_the_second_save_copies_into_the_buffers_the_first_made_and_warmed(tmp_path):
    model = _model(1024, 8)  # 32 MiB
    nbytes = sum(p.nbytes for p in model.state_dict().values())
    with torchckpt.Checkpointer(tmp_path / "run", async_save=True) as ck:
        before = _rss_mib()
        ck.save(1, model=model)
        buffers = {name: (b.data_ptr(), b.nbytes()) for name, b in ck._buffers.items()}
        assert 0 <= sum(n for _, n in buffers.values()) - nbytes < 64 << 10  # one per storage (and the RNG's)
        ck.wait()
        assert ck._warming.done.wait(60)
        assert _rss_mib() - before > 0.9 * nbytes / 2**20  # their pages are mapped now (the file is not in RSS)
        ck.save(2, model=model)
        assert {name: (b.data_ptr(), b.nbytes()) for name, b in ck._buffers.items()} == buffers  # reused
        assert ck._warming is None  # a snapshot: nothing new to warm
        ck.wait()
    assert [c.step for c in torchckpt.Checkpointer(tmp_path / "run").checkpoints()] == [1, 2]


def test_a_failure_of_the_durable_part_comes_out_of_wait_and_leaves_nothing(tmp_path):
    """The file is written in save(); its rename (in the writer's thread) fails: a directory holds the name."""
    run = tmp_path / "run"
    (run / "ckpt-0000000001.pt").mkdir(parents=True)
    (run / "ckpt-0000000001.pt" / "keep").write_text("not ours")
    model = _model()
    with torchckpt.Checkpointer(run, async_save=True) as ck:
        ck.save(1, model=model)  # returns: the write itself succeeded
        with pytest.raises(CheckpointWriteError) as caught:
            ck.wait()
        assert "ckpt-0000000001.pt" in str(caught.value)
        assert _listing(run) == [".torchckpt.lock", "ckpt-0000000001.pt"]  # no temp file, sidecar or marker
        ck.save(2, model=model)  # the next save works (a snapshot into the buffers of the first)
    assert [c.step for c in torchckpt.Checkpointer(run).checkpoints()] == [2]
    with torchckpt.Checkpointer(tmp_path / "sync") as sync:  # a sync save reports the same failure at once
        (tmp_path / "sync" / "ckpt-0000000001.pt").mkdir()
        (tmp_path / "sync" / "ckpt-0000000001.pt" / "keep").write_text("not ours")
        with pytest.raises(CheckpointWriteError):
            sync.save(1, model=model)


def test_ctrl_c_inside_the_write_through_leaves_nothing_and_the_next_save_works(tmp_path):
    """A real SIGINT inside torch.save's writes of the first async save: as in a sync save, nothing is published
    and the temp file and marker are gone."""
    run = tmp_path / "run"
    model = _model()
    ck = torchckpt.Checkpointer(run, async_save=True)
    try:
        sys.settrace(interrupt_at_call("_Counted.write", os.path.join("storage", "atomic.py"), call=3))
        try:
            with pytest.raises(KeyboardInterrupt):
                ck.save(1, model=model)
        finally:
            sys.settrace(None)
        assert _listing(run) == [".torchckpt.lock"]
        ck.wait()  # nothing was handed to the writer: nothing to report
        ck.save(2, model=model)
        ck.wait()
    finally:
        ck.close()
    assert [c.step for c in torchckpt.Checkpointer(run).checkpoints()] == [2]
    assert _listing(run) == [".torchckpt.lock", "ckpt-0000000002.pt", "ckpt-0000000002.pt.meta.json"]


@pytest.mark.slow
def test_a_full_disk_in_the_write_through_raises_from_save(tmp_path):
    """Without a small file system to mount: a file-size limit, in a child process, is the real fault."""
    script = textwrap.dedent("""
        import os, resource, signal, sys, torch, torchckpt
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        ck = torchckpt.Checkpointer(sys.argv[1], async_save=True)
        try:
            ck.save(1, model=torch.nn.Linear(1024, 1024))  # 4 MiB
        except torchckpt.CheckpointWriteError as exc:
            print("save raised:", exc)
        ck.wait()
        ck.close()
        print(sorted(os.listdir(sys.argv[1])))
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "save raised:" in proc.stdout and "file-size limit" in proc.stdout, proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "['.torchckpt.lock']"


def test_which_snapshots_write_through():
    """Only a snapshot whose CPU storages all need new buffers (and no device tensors) writes through."""
    state = {"w": torch.randn(300, 300), "b": torch.randn(300), "n": 3}
    buffers: dict = {}
    _, first = start_snapshot(state, buffers)
    assert first.write_through and len(first.fresh) == 2
    _, again = start_snapshot(state, buffers)
    assert not again.write_through and again.reused == 2 and not again.fresh
    _, grown = start_snapshot({**state, "new": torch.randn(10)}, buffers)
    assert not grown.write_through  # partly reused: a snapshot (the new storage gets a new buffer)
    _, resized = start_snapshot({"w": torch.randn(200, 200), "b": torch.randn(200), "n": 3}, buffers)
    assert resized.write_through  # every kept buffer the wrong size: like a first save
    _, none = start_snapshot({"n": 3, "s": "text"}, {})
    assert not none.write_through  # no tensor data: the snapshot costs nothing
    _, meta = start_snapshot({"m": torch.empty(1000, device="meta")}, {})
    assert not meta.write_through


def test_warming_maps_pages_without_changing_them_and_stops_when_cancelled():
    size = 64 << 20
    buf = torch.UntypedStorage(size)
    view = torch.empty(0, dtype=torch.uint8).set_(buf)
    view[:1 << 20].fill_(7)  # a save copied part of it already
    cancelled = Warming([buf])
    cancelled.cancel()
    before = _rss_mib()
    cancelled.run()
    assert cancelled.done.is_set() and _rss_mib() - before < 8  # stopped before its first piece
    warm = Warming([buf])
    warm.run()
    if _rss_mib() - before < 0.9 * (size >> 20) - 1:
        pytest.skip("no MADV_POPULATE_WRITE on this kernel: nothing is warmed ahead (the next save maps the pages)")
    assert bool((view[:1 << 20] == 7).all()) and int(view[1 << 20:].count_nonzero()) == 0  # content unchanged


def test_close_right_after_the_first_save_does_not_wait_for_the_warming(tmp_path):
    model = _model(1024, 8)
    ck = torchckpt.Checkpointer(tmp_path / "run", async_save=True)
    ck.save(1, model=model)
    warm = ck._warming
    assert warm is not None
    ck.close()  # cancels it, without waiting for it
    assert ck._warming is None
    assert warm.done.wait(10)  # it stopped (within one piece)
    assert [c.step for c in torchckpt.Checkpointer(tmp_path / "run").checkpoints()] == [1]


@pytest.mark.slow
def test_a_durable_part_that_fails_after_the_script_ended_is_reported_at_exit(tmp_path):
    """The script ends right after the first async save (no wait(), no close()): the exit waits for the durable
    part, which fails (a directory holds the file's name), prints the typed error and exits with status 1."""
    script = textwrap.dedent("""
        import os, sys, torch, torchckpt
        os.makedirs(os.path.join(sys.argv[1], "ckpt-0000000001.pt", "keep"))
        ckpt = torchckpt.Checkpointer(sys.argv[1], async_save=True)
        ckpt.save(1, model=torch.nn.Linear(64, 64))
        print("the script ended", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1"), timeout=120)
    assert "the script ended" in proc.stdout, proc.stderr[-3000:]
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "CheckpointWriteError" in proc.stderr and "without wait() or close()" in proc.stderr, proc.stderr
    assert _listing(tmp_path / "run") == [".torchckpt.lock", "ckpt-0000000001.pt"]
