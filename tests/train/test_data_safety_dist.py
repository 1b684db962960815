"""A hung rank under torchrun (2 ranks, gloo, SIGSTOP) fails every live rank's save with a typed error
naming the step, within the caller's process-group timeout, and the live rank exits (issue 22, item 3).

Before the fix the background save's group was created without the caller's timeout: the live rank's
writer thread waited 30 minutes in DCP's all_gather and the process never exited.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from dist_launch import free_port

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGSTOP, torchrun")]

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")
PG_TIMEOUT = 8

WORKER = textwrap.dedent("""
    import datetime, json, os, signal, sys, time
    import torch, torch.distributed as dist
    import torchckpt
    directory, async_save = sys.argv[1], sys.argv[2] == "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds={timeout}))
    rank = dist.get_rank()
    with open(os.path.join(directory, f"pid{{rank}}"), "w") as fh:
        fh.write(str(os.getpid()))
    model = torch.nn.Linear(64, 64)
    ckpt = torchckpt.Checkpointer(os.path.join(directory, "run"), async_save=async_save)
    ckpt.save(1, model=model)
    ckpt.wait()
    dist.barrier()
    t0 = time.monotonic()
    try:
        if rank == 1:
            if async_save:
                ckpt.save(2, model=model)  # its background write starts...
            os.kill(os.getpid(), signal.SIGSTOP)  # ...and the whole rank hangs
        ckpt.save(2, model=model)
        ckpt.wait()
        outcome = {{"rank": rank, "type": None}}
    except torchckpt.CheckpointError as exc:
        outcome = {{"rank": rank, "type": type(exc).__name__, "message": str(exc)}}
    outcome["seconds"] = time.monotonic() - t0
    print("OUTCOME " + json.dumps(outcome), flush=True)
    sys.exit(3 if outcome["type"] else 0)  # an ordinary interpreter exit: it must not hang
""").format(timeout=PG_TIMEOUT)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_stopped_rank_gives_every_live_rank_a_typed_error_and_they_exit(tmp_path, async_save):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "--monitor-interval", "0.5", str(script), str(tmp_path), "1" if async_save else "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    rank0 = None
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()  # type: ignore
    try:
        deadline = time.monotonic() + 150
        while rank0 is None:  # rank 0's outcome (rank 1 is stopped); a hang fails here, bounded
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("the live rank never reported: its save hangs on the stopped rank")
            if line.startswith("OUTCOME "):
                rank0 = json.loads(line[len("OUTCOME "):])
        t_outcome = time.monotonic()
        # the live rank exits on its own (torchrun then ends the stopped one)
        pid0 = int((tmp_path / "pid0").read_text())
        while time.monotonic() < t_outcome + 60:
            try:
                os.kill(pid0, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("rank 0 reported its error but did not exit")
    finally:
        for rank in (1, 0):  # the ranks run in sessions of their own: end each, then torchrun
            try:
                os.kill(int((tmp_path / f"pid{rank}").read_text()), signal.SIGKILL)  # a stopped one dies too
            except (FileNotFoundError, ValueError, ProcessLookupError):
                pass
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert rank0 is not None
    assert rank0["type"] == "CheckpointWriteError", rank0
    assert "step 2" in rank0["message"] and "ckpt-0000000002.dcp" in rank0["message"], rank0
    assert rank0["seconds"] < PG_TIMEOUT * 4 + 20, rank0  # the caller's timeout, not gloo's 30 minutes
