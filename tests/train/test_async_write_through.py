"""The first async save of a Checkpointer writes its file on the caller's thread (the page cache is its snapshot)
and leaves only the durable part (fsync, rename, sidecar, retention) to the writer's thread; the snapshot buffers
it made are warmed afterwards for the next save (issue 27: the first async save was 1.4-2.7x a sync save)."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

import torchckpt
from torchckpt.errors import CheckpointWriteError
from torchckpt.storage import prefault as prefault_module
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


def _resident_fraction(buffers) -> float:
    """The share of the buffers' whole pages that are mapped in RAM (mincore(2), anonymous memory included)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = mmap.PAGESIZE
    resident = total = 0
    for buf in buffers:
        start = -(-buf.data_ptr() // page) * page
        end = (buf.data_ptr() + buf.nbytes()) // page * page
        if end <= start:
            continue
        vec = ctypes.create_string_buffer((end - start) // page)
        assert libc.mincore(start, end - start, vec) == 0, os.strerror(ctypes.get_errno())
        resident += sum(b & 1 for b in vec.raw)
        total += len(vec.raw)
    return resident / total


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
        ck.save(1, model=model)
        buffers = {name: (b.data_ptr(), b.nbytes()) for name, b in ck._buffers.items()}
        assert 0 <= sum(n for _, n in buffers.values()) - nbytes < 64 << 10  # one per storage (and the RNG's)
        ck.wait()
        assert ck._warming.done.wait(60)
        # their pages are mapped now (RSS may not grow: the allocator can hand out memory a test freed before)
        assert _resident_fraction(ck._buffers.values()) > 0.99
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
    region = mmap.mmap(-1, size)  # fresh anonymous memory of its own (an allocator may hand out resident pages)
    view = torch.frombuffer(region, dtype=torch.uint8)
    buf = view.untyped_storage()
    view[:1 << 20].fill_(7)  # a save copied part of it already
    cancelled = Warming([buf])
    cancelled.cancel()
    cancelled.run()  # (only the first MiB is mapped so far)
    assert cancelled.done.is_set() and _resident_fraction([buf]) < 0.1  # stopped before its first piece
    warm = Warming([buf])
    warm.run()
    if prefault_module._madvise is False:
        pytest.skip("no MADV_POPULATE_WRITE on this kernel: nothing is warmed ahead (the next save maps the pages)")
    assert _resident_fraction([buf]) > 0.99
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


@pytest.mark.slow
def test_a_process_forked_while_the_durable_part_runs_exits_at_once(tmp_path):
    """A DataLoader worker or multiprocessing.Process forked right after save() (the durable part still running)
    has no writer thread: at its exit it waited TORCHCKPT_EXIT_TIMEOUT s (600) for the parent's write, which never
    completes there, then exited with status 1. The parent's write is the parent's to wait for."""
    script = textwrap.dedent("""
        import multiprocessing as mp, sys, time, torch, torchckpt
        from torchckpt.train import exit_guard

        def child():
            print("child saw pending:", exit_guard._pending and not all(f.done() for f, _, _ in
                  exit_guard._pending.values()), flush=True)

        if __name__ == "__main__":
            ck = torchckpt.Checkpointer(sys.argv[1], async_save=True)
            ck.save(1, model=torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(8)]))  # 128 MiB
            pending = not ck._pending.done()
            started = time.monotonic()
            proc = mp.get_context("fork").Process(target=child)
            proc.start()
            proc.join(60)
            print("forked while pending:", pending, flush=True)
            print("child exit", proc.exitcode, round(time.monotonic() - started, 1), flush=True)
            if proc.is_alive():
                proc.kill()
            ck.close()
    """)
    path = tmp_path / "probe.py"
    path.write_text(script)
    proc = subprocess.run([sys.executable, str(path), str(tmp_path / "run")], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1", TORCHCKPT_EXIT_TIMEOUT="30"),
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "forked while pending: True" not in proc.stdout:
        pytest.skip("the durable part ended before the fork (a very fast disk): nothing to test")
    code, took = proc.stdout.split("child exit ")[1].split()
    assert code == "0" and float(took) < 20, proc.stdout + proc.stderr[-2000:]
    assert [c.step for c in torchckpt.Checkpointer(tmp_path / "run").checkpoints()] == [1]


class _CountsItsPickling:
    """An object whose pickling has an effect (a counter of saves, a config that records when it was written)."""

    def __init__(self) -> None:
        self.n = 0

    def __reduce__(self):
        self.n += 1
        return (dict, ({"pickled": self.n},))


def test_an_objects_reduce_runs_once_as_in_a_sync_save(tmp_path):
    """The write-through decided after a walk that called every object's __reduce_ex__, then pickled the payload:
    each ran twice, and the file held what the second call returned (a sync save's holds the first's)."""
    for kind in ("sync", "async"):
        counted = _CountsItsPickling()
        with torchckpt.Checkpointer(tmp_path / kind, async_save=kind == "async", keep_last=None) as ck:
            ck.save(1, model=_model(), extra={"c": counted})
            assert counted.n == 1, kind
            ck.save(2, model=_model(128), extra={"c": counted})  # every kept buffer the wrong size
            ck.wait()
            assert counted.n == 2, kind
        for step in (1, 2):
            assert torchckpt.load(ck.path_for(step))["extra"] == {"c": {"pickled": step}}, (kind, step)
    assert _records(tmp_path / "sync" / "ckpt-0000000001.pt") == _records(tmp_path / "async" / "ckpt-0000000001.pt")


def test_the_layout_walk_runs_no_code_and_copies_nothing():
    counted = _CountsItsPickling()
    arr = __import__("numpy").arange(4)
    state = {"w": torch.randn(300, 300), "obj": counted, "arr": arr, "q": torch.randn(8).to_sparse(
        ), "od": __import__("collections").OrderedDict(b=torch.randn(300))}
    buffers: dict = {}
    out, laid = start_snapshot(state, buffers, layout=True)
    assert laid.write_through and len(laid.fresh) == 2 and counted.n == 0 and laid.objects == 0
    assert out["obj"] is counted and out["arr"] is arr and len(buffers) == 2  # (none made for the sparse one)
    _, full = start_snapshot(state, buffers)  # the snapshot that follows reuses the buffers laid out
    assert full.reused == 2 and not full.fresh and counted.n == 1 and full.objects == 1


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_a_nested_tensor_is_saved_async_as_a_sync_save_saves_it(tmp_path):
    """A nested tensor is strided and on the CPU, but has no sizes: the walk raised torch's 'Internal error:
    NestedTensorImpl doesn't support sizes' from save() (first save and later ones)."""
    nested = torch.nested.nested_tensor([torch.randn(300, 300), torch.randn(200, 300)])
    with torchckpt.Checkpointer(tmp_path / "run", async_save=True, keep_last=None) as ck:
        for step in (1, 2):
            expected = [t.clone() for t in nested.unbind()]
            ck.save(step, model=_model(), extra={"nested": nested})
            for t in nested.unbind():
                t.mul_(-1)  # changed after save(): not in the file
            ck.wait()
            saved = torch.load(ck.path_for(step), weights_only=True)["extra"]["nested"]
            assert saved.is_nested and all(torch.equal(a, b) for a, b in zip(saved.unbind(), expected)), step


def test_an_async_checkpointer_saves_again_after_close_as_a_sync_one_does(tmp_path):
    """save() after close() wrote the whole file (write-through), then raised RuntimeError('cannot schedule new
    futures after shutdown') and kept the directory's lock: no other writer, even in this process, could save."""
    run = tmp_path / "run"
    for async_save in (False, True):
        ck = torchckpt.Checkpointer(run, async_save=async_save, keep_last=None)
        ck.save(1, model=_model())
        ck.close()
        ck.save(2, model=_model())  # the lock is taken again, and a writer's thread started
        ck.close()
        with torchckpt.Checkpointer(run) as other:  # released by close()
            other.save(3, model=_model())
        assert [c.step for c in torchckpt.Checkpointer(run).checkpoints()] == [1, 2, 3], async_save
        assert _listing(run).count(".torchckpt.lock") == 1 and not [n for n in _listing(run) if ".tmp-" in n]
        for name in _listing(run):
            if name.startswith("ckpt-"):
                os.remove(run / name)


class _RefusesPickling:
    def __reduce__(self):
        raise TypeError("this object cannot be pickled")


def test_after_a_first_save_that_failed_the_next_one_writes_through_again(tmp_path):
    """A first save whose write failed (here an object pickle refuses; Ctrl-C or a full disk alike) kept the buffers
    it had laid out, untouched and never warmed: the next save took them for reusable ones and copied the whole
    state into cold memory on the caller's thread (the slow first save the write-through avoids)."""
    model = _model(512, 8)
    with torchckpt.Checkpointer(tmp_path / "run", async_save=True) as ck:
        with pytest.raises(TypeError, match="cannot be pickled"):
            ck.save(1, model=model, extra={"bad": _RefusesPickling()})
        assert not ck._buffers
        ck.save(2, model=model)
        assert ck._warming is not None  # written through, its buffers being warmed
        ck.wait()
    assert _listing(tmp_path / "run") == [".torchckpt.lock", "ckpt-0000000002.pt", "ckpt-0000000002.pt.meta.json"]


@pytest.mark.slow
def test_a_forked_child_does_not_keep_the_directory_locked_after_close(tmp_path):
    """The writer's flock belongs to the open file, and a forked child (a persistent DataLoader worker) kept its
    copy open: after close() the directory stayed locked while the child lived, and the next Checkpointer, even in
    the same process, got 'another writer holds this checkpoint directory'."""
    script = textwrap.dedent("""
        import multiprocessing as mp, sys, time, torch, torchckpt

        def worker(gate):
            gate.wait(60)

        if __name__ == "__main__":
            ck = torchckpt.Checkpointer(sys.argv[1], async_save=True)
            ck.save(1, model=torch.nn.Linear(64, 64))
            gate = mp.get_context("fork").Event()
            proc = mp.get_context("fork").Process(target=worker, args=(gate,))
            proc.start()
            ck.close()
            try:
                with torchckpt.Checkpointer(sys.argv[1]) as other:
                    other.save(2, model=torch.nn.Linear(64, 64))
                print("next writer saved", flush=True)
            finally:
                gate.set()
                proc.join(60)
    """)
    path = tmp_path / "probe.py"
    path.write_text(script)
    proc = subprocess.run([sys.executable, str(path), str(tmp_path / "run")], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1"), timeout=180)
    assert proc.returncode == 0 and "next writer saved" in proc.stdout, proc.stderr[-3000:]
    assert [c.step for c in torchckpt.Checkpointer(tmp_path / "run").checkpoints()] == [1, 2]
