"""Run a function on N real processes joined in a gloo process group (CPU), for the distributed tests.

Processes are forked (torch is already imported, so a launch costs well under a second), each one
runs ``fn(rank, world, *args)`` with a process group initialised, and the parent waits with a
bounded timeout: a hang kills every rank and fails the test instead of blocking CI.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import traceback
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn: Callable, rank: int, world: int, port: int, pg_timeout: float, args: tuple, queue: Any) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        result = fn(rank, world, *args)
        dist.barrier()
        dist.destroy_process_group()
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        queue.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1)


def launch(fn: Callable, world: int, *args: Any, timeout: float = 60.0, pg_timeout: float = 30.0,
           expect_ok: bool = True) -> dict[int, Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` forked ranks; returns {rank: result} (or error text).

    With ``expect_ok`` any rank failing (an exception, a signal, the timeout) raises AssertionError
    with every rank's traceback. Otherwise the outcome per rank is returned: the result, the error
    text, or ``("signal", n)`` / ``("exit", code)`` for a rank that died without reporting.
    """
    # Imported once here rather than in every child: forked ranks start in a fraction of a second.
    import torch._dynamo  # noqa: F401 - DTensor imports it on first use (seconds)
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.tensor  # noqa: F401

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, pg_timeout, args, queue), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    outcome: dict[int, Any] = {}
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(outcome) < world and time.monotonic() < deadline:
            try:
                rank, status, value = queue.get(timeout=0.2)
                outcome[rank] = value if status == "ok" else ("error", value)
            except Exception:  # noqa: BLE001 - queue.Empty: check for ranks that died silently
                if all(not p.is_alive() for p in procs):
                    break
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    finally:
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)
    for r, p in enumerate(procs):
        if r not in outcome:
            outcome[r] = ("timeout", timeout) if r in hung else (
                ("signal", -p.exitcode) if (p.exitcode or 0) < 0 else ("exit", p.exitcode))
    if expect_ok:
        bad = {r: v for r, v in outcome.items() if isinstance(v, tuple) and v and v[0] in
               ("error", "timeout", "signal", "exit")}
        if bad:
            raise AssertionError("ranks failed:\n" + "\n".join(f"rank {r}: {v}" for r, v in sorted(bad.items())))
    return outcome
