"""Ctrl-C (a real SIGINT) at many points of a save, a wait and a close; every run in a child process under a
hard timeout. Used by tests/train/test_ctrl_c_bookkeeping.py (bounded) and by hand (long):

    python3 tests/helpers/ctrl_c_stress.py runs 20 [--points 180] [--mode timer|trace] [--timeout 300]

Two ways to pick the points (``--mode``):

* ``trace``: deterministic. A trace function counts the lines the main thread runs in CPython's
  threading, concurrent.futures and signal modules and in torchckpt's bookkeeping modules, and sends
  SIGINT (``os.kill``) at the N-th, for every N (``--every`` k: every k-th) until the operation ends
  first. This lands exactly in ``Condition.wait``, ``Thread.start``, ``ThreadPoolExecutor.submit`` and
  between any two lines of the directory lock, the hand-off to the writer, the publish and retention.
* ``timer``: real timing. ``setitimer`` fires SIGALRM after a delay spread over the measured duration of
  the operation, and its handler sends SIGINT: it lands wherever the process is then.

After every interrupted operation the child checks: no exception but KeyboardInterrupt came out (a
``RuntimeError("release unlocked lock")`` from CPython is a failure); the previous checkpoint is still
complete and loadable; the interrupted one is complete or absent, never half there; no temp file is
left; ``wait()``, a later ``save()`` and ``close()`` of the same object work; a new Checkpointer in the
same process can take the directory (the lock was not leaked). A child that runs past its timeout is a
hang: its Python stacks (faulthandler) and, with gdb, every thread's stack are printed.

Kinds of operation (all by default): ``file`` (torchckpt.save over an existing file), ``sync`` and
``async`` (Checkpointer.save), ``wait`` and ``close`` (an async Checkpointer waiting for its write).
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

KINDS = ("file", "sync", "async", "wait", "close")


# --------------------------------------------------------------------------- the child
def _model() -> Any:
    import torch

    torch.manual_seed(0)  # ~9 MiB: an async snapshot is copied in a few chunks
    return torch.nn.Sequential(*[torch.nn.Linear(768, 768) for _ in range(4)])


def _traced_files() -> set[str]:
    import importlib

    names = ("threading", "signal", "concurrent.futures._base", "concurrent.futures.thread", "torchckpt.storage.atomic",
             "torchckpt.storage.interrupts", "torchckpt.storage.reclaim", "torchckpt.train.checkpointer",
             "torchckpt.train.exit_guard", "torchckpt.train.local_store", "torchckpt.train.snapshot",
             "torchckpt.train.store")
    files = set()
    for name in names:
        try:
            files.add(os.path.abspath(importlib.import_module(name).__file__ or ""))
        except ImportError:  # (an older torchckpt, to see these points fail there)
            pass
    return files


class _Trace:
    """Send SIGINT at the N-th line the main thread runs in the traced files (see the module)."""

    files: set[str] = set()

    def __init__(self, n: int) -> None:
        self.n, self.seen, self.fired = n, 0, False

    def arm(self) -> None:
        sys.settrace(self._call)

    def disarm(self) -> None:
        sys.settrace(None)

    def _call(self, frame: Any, event: str, arg: Any) -> Any:
        if self.fired or os.path.abspath(frame.f_code.co_filename) not in self.files:
            return None
        return self._line(frame, event, arg)

    def _line(self, frame: Any, event: str, arg: Any) -> Any:
        if self.fired:
            return None
        if event == "line":
            if self.seen == self.n:
                self.fired = True
                sys.settrace(None)
                os.kill(os.getpid(), signal.SIGINT)  # raised here (into the traced frame), unless deferred
                time.sleep(0)
                return None
            self.seen += 1
        return self._line


class _Timer:
    """SIGINT after ``delay`` seconds, from a SIGALRM handler (a real asynchronous signal)."""

    def __init__(self, delay: float) -> None:
        self.delay, self.fired, self.started, self.elapsed = delay, False, 0.0, 0.0

    def arm(self) -> None:
        self.started = time.perf_counter()

        def resend(*_: Any) -> None:
            self.fired = True
            os.kill(os.getpid(), signal.SIGINT)

        signal.signal(signal.SIGALRM, resend)
        signal.setitimer(signal.ITIMER_REAL, max(self.delay, 1e-6))

    def disarm(self) -> None:
        self.elapsed = time.perf_counter() - self.started
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def _interrupted(op: Callable[[], Any], trigger: Any) -> bool:
    """Run ``op`` with ``trigger`` armed; True when it raised KeyboardInterrupt. Any other exception fails."""
    try:
        try:
            trigger.arm()
            op()
        finally:
            trigger.disarm()
        if getattr(trigger, "fired", False):
            time.sleep(0.002)  # a SIGINT sent just as op returned is raised here (then the op completed)
    except KeyboardInterrupt:
        return True
    return False


def _no_temp_files(directory: Path) -> None:
    left = [n for n in os.listdir(directory) if ".tmp-" in n]
    assert not left, f"temp files left in {directory}: {left}"


def scenario(kind: str, directory: Path, trigger: Any) -> bool:
    """One interrupted operation of ``kind`` in the fresh ``directory``, then every check; True if interrupted."""
    import torchckpt
    from torchckpt import Checkpointer

    model = _model()
    directory.mkdir(parents=True)
    if kind == "file":
        path = str(directory / "m.pt")
        torchckpt.save(path, model=model, step=1)
        hit = _interrupted(lambda: torchckpt.save(path, model=model, step=2), trigger)
        state = torchckpt.resume(path, model=_model())  # verified against its sidecar: complete, old or new
        assert state.step in (1, 2) and (state.step == 2 or hit), (hit, state.step)
        _no_temp_files(directory)
        torchckpt.save(path, model=model, step=3)
        assert torchckpt.resume(path, model=_model()).step == 3
        return hit
    ck = Checkpointer(str(directory), async_save=kind != "sync", keep_last=5)
    ck.save(1, model=model)
    ck.wait()
    if kind in ("sync", "async"):
        hit = _interrupted(lambda: ck.save(2, model=model), trigger)
    else:
        ck.save(2, model=model)
        hit = _interrupted(ck.wait if kind == "wait" else ck.close, trigger)
    if kind != "close":
        if hit:
            ck.wait()  # an abandoned write is not reported; a write still going on is waited for
        ck.save(3, model=model)
    ck.close()  # (again, after an interrupted close: it finishes what that one left)
    ck.close()
    steps = [c.step for c in Checkpointer(str(directory)).checkpoints()]
    if kind in ("sync", "async"):
        assert steps in ([1, 2, 3], [1, 3]) and (steps == [1, 2, 3] or hit), (hit, steps)
    else:  # wait and close never lose the write they wait for
        assert steps == ([1, 2] if kind == "close" else [1, 2, 3]), (hit, steps)
    _no_temp_files(directory)
    with Checkpointer(str(directory), keep_last=5) as again:  # the lock was released, not leaked
        again.save(4, model=model)
    assert torchckpt.resume(str(directory), model=_model()).step == 4
    return hit


def child(args: argparse.Namespace) -> None:
    root = Path(args.dir)
    rng = random.Random(args.seed)
    kinds = args.kinds.split(",")
    faulthandler.enable()
    hits = total = 0
    if args.mode == "trace":
        _Trace.files = _traced_files()
        for kind in kinds:
            n = 0
            while True:
                trace = _Trace(n)
                faulthandler.dump_traceback_later(args.step_timeout, exit=True)
                hit = scenario(kind, root / f"{kind}-{n}", trace)
                faulthandler.cancel_dump_traceback_later()
                shutil.rmtree(root / f"{kind}-{n}", ignore_errors=True)
                if not trace.fired:
                    break  # the operation ended before the N-th line: every point was tried
                hits += hit
                total += 1
                n += args.every
            print(f"{kind}: {n // args.every} points (every {args.every} of {n} lines)", flush=True)
    else:
        durations = {}
        for kind in kinds:  # how long the operation takes, uninterrupted (the timer's delays spread over it)
            timer = _Timer(3600)
            scenario(kind, root / f"{kind}-calibrate", timer)
            durations[kind] = timer.elapsed
            shutil.rmtree(root / f"{kind}-calibrate", ignore_errors=True)
        print("durations (ms): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in durations.items()), flush=True)
        for i in range(args.points):
            kind = kinds[i % len(kinds)]
            delay = rng.uniform(0, durations[kind] * 1.1)
            faulthandler.dump_traceback_later(args.step_timeout, exit=True)
            hits += scenario(kind, root / f"{kind}-{i}", _Timer(delay))
            faulthandler.cancel_dump_traceback_later()
            shutil.rmtree(root / f"{kind}-{i}", ignore_errors=True)
            total += 1
    print(f"ok: {total} points, {hits} interrupted", flush=True)
    faulthandler.dump_traceback_later(args.step_timeout, exit=True)  # a hang at interpreter exit is shown too


# --------------------------------------------------------------------------- the runner
def run_child(mode: str, directory: str, *, seed: int = 0, points: int = 180, every: int = 1,
              kinds: str = ",".join(KINDS), timeout: float = 300,
              env: dict[str, str] | None = None) -> tuple[int | None, str]:
    """One child process; returns (exit code or None when it hung and was killed, its output)."""
    cmd = [sys.executable, os.path.abspath(__file__), "child", "--mode", mode, "--seed", str(seed), "--points",
           str(points), "--every", str(every), "--kinds", kinds, "--step-timeout", str(max(10, int(timeout / 2))),
           directory]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        stacks = _gdb_stacks(proc.pid)
        proc.kill()
        out, _ = proc.communicate()
        return None, f"{out}\n--- hung after {timeout} s; gdb:\n{stacks}"


def _gdb_stacks(pid: int) -> str:
    gdb = shutil.which("gdb")
    if gdb is None:
        return "(no gdb)"
    helper = os.path.join(os.path.dirname(os.path.realpath(sys.executable)), "python3.11-gdb.py")
    try:
        done = subprocess.run([gdb, "-p", str(pid), "-batch", "-iex", f"add-auto-load-safe-path {helper}",
                               "-ex", "thread apply all py-bt"], capture_output=True, text=True, timeout=60)
        return done.stdout[-20000:] + done.stderr[-2000:]
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(gdb failed: {exc})"


def runs(args: argparse.Namespace) -> None:
    failed = hung = 0
    for r in range(args.runs):
        directory = tempfile.mkdtemp(prefix="ctrl-c-stress-", dir=args.dir)
        start = time.monotonic()
        code, out = run_child(args.mode, directory, seed=r, points=args.points, every=args.every, kinds=args.kinds,
                              timeout=args.timeout)
        shutil.rmtree(directory, ignore_errors=True)
        last = out.strip().splitlines()[-1] if out.strip() else ""
        print(f"run {r}: exit {code} in {time.monotonic() - start:.1f} s: {last}", flush=True)
        if code != 0:
            failed += 1
            hung += code is None
            print(out[-6000:], flush=True)
    print(f"{args.runs} runs, {failed} failed, {hung} hung")
    sys.exit(1 if failed else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("runs", "child"):
        p = sub.add_parser(name)
        p.add_argument("--mode", choices=("timer", "trace"), default="timer")
        p.add_argument("--points", type=int, default=180)
        p.add_argument("--every", type=int, default=1)
        p.add_argument("--kinds", default=",".join(KINDS))
        if name == "runs":
            p.add_argument("count", type=int, nargs="?", default=20)
            p.add_argument("--timeout", type=float, default=300)
            p.add_argument("--dir", default=None)
        else:
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--step-timeout", type=int, default=60)
            p.add_argument("dir")
    args = parser.parse_args()
    if args.command == "runs":
        args.runs = args.count
        runs(args)
    else:
        child(args)


if __name__ == "__main__":
    main()
