"""Background saves: the state is the one at save() time, and a failed or pending save is never lost
silently, even when the program just ends (issue 22, items 2 and 5)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import torchckpt
from torchckpt.train.training import set_rng_state

from test_checkpointer_faults import _mounted_tmpfs

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")


class _SlowNoisyExtra(torch.Tensor):
    """A tensor pickled by the background writer (the snapshot copies it as a tensor, its class kept): takes a
    while and draws from Python's global ``random`` meanwhile (what botocore's retry jitter does in an upload
    thread)."""

    started = threading.Event()

    def __reduce_ex__(self, protocol):  # runs inside torch.save, in the writer thread
        if threading.current_thread() is not threading.main_thread():
            _SlowNoisyExtra.started.set()
            for _ in range(20):
                random.random()
                time.sleep(0.02)
        return super().__reduce_ex__(protocol)


def test_rng_is_captured_when_save_is_called_not_after_waiting_for_the_previous_write(tmp_path):
    model = torch.nn.Linear(8, 8)
    noisy = torch.zeros(1).as_subclass(_SlowNoisyExtra)
    _SlowNoisyExtra.started.clear()
    with torchckpt.Checkpointer(tmp_path / "run", async_save=True, keep_last=None) as ckpt:
        ckpt.save(0, model=model, extra=noisy)  # the first save writes through (on this thread)
        ckpt.wait()
        ckpt.save(1, model=model, extra=noisy)  # a snapshot: `noisy` is pickled by the writer
        assert _SlowNoisyExtra.started.wait(30)  # the first write is under way (and slow)
        random.seed(1234)
        torch.manual_seed(99)
        at_save = (random.getstate(), torch.get_rng_state().clone())
        ckpt.save(2, model=model)  # waits for write 1, which keeps drawing from `random` meanwhile
    state = torchckpt.resume(str(tmp_path / "run" / "ckpt-0000000002.pt"), model=torch.nn.Linear(8, 8),
                             restore_rng=False)
    saved = state.rng
    assert saved is not None
    after = random.getstate()
    set_rng_state(saved)
    assert random.getstate() == at_save[0]
    assert torch.equal(torch.get_rng_state(), at_save[1])
    assert after != at_save[0]  # the writer really did draw from `random` after save() was called


# --------------------------------------------------------------- item 2: a script that just ends
ENDS = textwrap.dedent("""
    import os, signal, sys, torch, torchckpt
    directory, kind, fsize = sys.argv[1], sys.argv[2], sys.argv[3]
    if fsize != "0":  # no small file system to mount: the process's file-size limit is the real fault instead
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(fsize), int(fsize)))
    small, big = torch.nn.Linear(16, 16), torch.nn.Linear(1024, 1024)  # ~1 KiB and 4 MiB of tensors
    if kind == "checkpointer":
        ckpt = torchckpt.Checkpointer(os.path.join(directory, "run"), async_save=True, keep_last=None)
        ckpt.save(1, model=small)
        ckpt.wait()
        ckpt.save(2, model=small, extra=big.weight)  # a snapshot (small's buffers reused) that cannot fit; nobody
        # waits, nobody closes
    elif kind == "lightning":
        from torchckpt.integrations.lightning import TorchckptIO
        io = TorchckptIO(async_save=True)
        io.save_checkpoint({"state_dict": small.state_dict()}, os.path.join(directory, "first.ckpt"))  # writes through
        io.save_checkpoint({"state_dict": small.state_dict(), "big": big.weight},  # a snapshot that cannot fit
                           os.path.join(directory, "last.ckpt"))
    elif kind == "fits":
        ckpt = torchckpt.Checkpointer(os.path.join(directory, "run"), async_save=True, keep_last=None)
        ckpt.save(1, model=small)  # fits; the program ends while it may still be writing
    print("the script ended", flush=True)
""")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["checkpointer", "lightning", "fits"])
def test_a_background_save_is_not_lost_when_the_script_just_ends(tmp_path, kind):
    if kind == "lightning":
        pytest.importorskip("lightning")
    with _mounted_tmpfs(tmp_path / "small", "size=2m") as mounted:
        env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-c", ENDS, str(tmp_path / "small"), kind,
                               "0" if mounted else str(2 << 20)], capture_output=True, text=True, env=env,
                              timeout=240)
        assert "the script ended" in proc.stdout, proc.stderr[-3000:]
        if kind == "fits":
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert torchckpt.Checkpointer(tmp_path / "small" / "run").latest().step == 1
            return
        assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
        assert "CheckpointWriteError" in proc.stderr, proc.stderr[-3000:]
        assert ("the disk is full" if mounted else "file-size limit") in proc.stderr, proc.stderr[-3000:]
        assert "without wait() or close()" in proc.stderr
        if kind == "checkpointer":
            assert [c.step for c in torchckpt.Checkpointer(tmp_path / "small" / "run").checkpoints()] == [1]


# A script whose second save (a snapshot, pickled by the writer thread) never finishes: the first save writes
# through on the main thread, so the hanging object must be in a later save to reach the writer.
HANGING_WRITE = textwrap.dedent("""
    import sys, threading, torch, torchckpt
    class Hangs(torch.Tensor):  # copied by save() as a tensor, its class kept: pickled by the writer only
        def __reduce_ex__(self, protocol):
            if threading.current_thread() is not threading.main_thread():
                threading.Event().wait()  # forever
            return super().__reduce_ex__(protocol)
    ckpt = torchckpt.Checkpointer(sys.argv[1], async_save=True)
    model = torch.nn.Linear(4, 4)
    ckpt.save(1, model=model, extra=torch.zeros(1).as_subclass(Hangs))  # writes through on this thread
    ckpt.wait()
    ckpt.save(2, model=model, extra=torch.zeros(1).as_subclass(Hangs))  # a snapshot: pickled by the writer
    print("the script ended", flush=True)
""")


@pytest.mark.slow
def test_a_background_save_that_hangs_at_exit_is_bounded_and_reported(tmp_path):
    """A write that never finishes (its extra state blocks forever) does not hold the exit forever."""
    script = HANGING_WRITE
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1", TORCHCKPT_EXIT_TIMEOUT="2")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert "the script ended" in proc.stdout
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "still being written 2 s after the program ended" in proc.stderr
    assert torchckpt.Checkpointer(tmp_path / "run").latest().step == 1


@pytest.mark.slow
def test_ctrl_c_while_the_program_waits_at_exit_ends_it_and_says_what_is_lost(tmp_path):
    """Ctrl-C while the program waits at exit for a background write: the wait stops (status 130, the write
    named as not committed). It once landed inside CPython's Condition.wait, was reported as the write's
    own failure, and the interpreter then joined the writer thread forever."""
    script = HANGING_WRITE
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1", TORCHCKPT_EXIT_TIMEOUT="600")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "run")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "the script ended"
        time.sleep(1.0)  # now in the exit wait
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted while waiting at exit for the background save" in err and "not committed" in err, err
    assert "Traceback" not in err, err
    assert torchckpt.Checkpointer(tmp_path / "run").latest().step == 1
