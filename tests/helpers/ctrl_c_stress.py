"""Ctrl-C (a real SIGINT) at many points of a save, a wait and a close; every run in a child process under a
hard timeout. Used by tests/train/test_ctrl_c_bookkeeping.py (bounded) and by hand (long):

    python3 tests/helpers/ctrl_c_stress.py runs 20 [--mode timer|trace] [--points N] [--timeout 300]

Two ways to pick the points (``--mode``):

* ``trace``: deterministic. A trace function counts the points where CPython can raise a signal's
  KeyboardInterrupt (after a call, at a function's start, at a loop's jump back, in a blocking call) that
  the main thread passes in CPython's threading, concurrent.futures and signal modules and in torchckpt's
  bookkeeping modules, and sends SIGINT (``os.kill``) at the N-th: at every point of each operation
  (``--points 0``), or at ``--points`` points evenly spread over it (the run's seed shifts them). This lands exactly in ``Condition.wait``, ``Thread.start``, ``ThreadPoolExecutor.submit`` and
  anywhere in the directory lock, the hand-off to the writer, the publish and retention.
* ``timer``: real timing. ``setitimer`` fires SIGALRM after a random delay within the measured duration
  of the operation, and its handler sends SIGINT: it lands wherever the process is then (``--points``
  operations in all, the kinds in turn).

After every interrupted operation the child checks: no exception but KeyboardInterrupt came out (a
``RuntimeError("release unlocked lock")`` from CPython is a failure); the previous checkpoint is still
complete and loadable; the interrupted one is complete or absent, never half there; no temp file is
left; ``wait()``, a later ``save()`` and ``close()`` of the same object work; a new Checkpointer in the
same process can take the directory (the lock was not leaked). A child that runs past its timeout is a
hang: its Python stacks (faulthandler) and, with gdb, every thread's stack are printed.

Kinds of operation (all by default): ``file`` (torchckpt.save over an existing file), ``sync`` and
``async`` (Checkpointer.save), ``first`` (the first save of an async Checkpointer: written through on the
caller's thread), ``wait`` and ``close`` (an async Checkpointer waiting for its write). By hand only:
``lightning`` (the first save of Lightning's ``TorchckptIO(async_save=True)``, written through the same way).
"""

from __future__ import annotations

import argparse
import dis
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

KINDS = ("file", "sync", "async", "first", "wait", "close")


# --------------------------------------------------------------------------- the child
_WIDTH = 768  # 4 layers of 768x768: ~9 MiB, an async snapshot is copied in a few chunks (trace mode: 256, faster)
_models: dict[tuple[int, int], Any] = {}


def _model(copy: int = 0) -> Any:
    """The model saved (``copy`` 0) or one to resume into (1); made once per process."""
    import torch

    if (_WIDTH, copy) not in _models:
        torch.manual_seed(copy)
        _models[_WIDTH, copy] = torch.nn.Sequential(*[torch.nn.Linear(_WIDTH, _WIDTH) for _ in range(4)])
    return _models[_WIDTH, copy]


def _traced_files(kinds: list[str]) -> set[str]:
    import importlib

    plugin = ("torchckpt.integrations.lightning", "torchckpt.train.training", "torchckpt.train.warming") \
        if "lightning" in kinds else ()
    names = (*plugin, "threading", "signal", "concurrent.futures._base", "concurrent.futures.thread", "torchckpt.storage.atomic",
             "torchckpt.storage.interrupts", "torchckpt.storage.reclaim", "torchckpt.train.checkpointer",
             "torchckpt.train.exit_guard", "torchckpt.train.local_store", "torchckpt.train.snapshot",
             "torchckpt.train.store")
    files = set()
    for name in names:
        try:
            files.add(importlib.import_module(name).__file__ or "")
        except ImportError:  # (an older torchckpt, to see these points fail there)
            pass
    return files


def _points(code: Any, cache: dict[Any, frozenset[int]] = {}) -> frozenset[int]:  # noqa: B006 - a cache
    """Offsets in ``code`` before which CPython 3.11 can raise a signal's KeyboardInterrupt: after a call
    returns (its eval-breaker check), at a function's start, at a loop's jump back, and a blocking call or
    ``with`` acquisition raising it (an interrupted lock wait), except the call of a ``with``'s ``__exit__``
    (between three ``LOAD_CONST None`` and it there is no check: a line trace would stop there, falsely)."""
    found = cache.get(code)
    if found is None:
        ins = list(dis.get_instructions(code))
        points: set[int] = set()
        for i, x in enumerate(ins):
            after = ins[i + 1].offset if i + 1 < len(ins) else None
            if x.opname in ("CALL", "CALL_FUNCTION_EX"):
                exiting = i >= 4 and [y.opname for y in ins[i - 4:i]] == ["LOAD_CONST"] * 3 + ["PRECALL"] \
                    and all(y.argval is None for y in ins[i - 4:i - 1])
                if not exiting:
                    points.add(x.offset)
                if after is not None:
                    points.add(after)
            elif x.opname == "BEFORE_WITH":
                points.add(x.offset)
            elif x.opname == "RESUME" and (x.arg or 0) < 2 and after is not None:
                points.add(after)
            elif x.opname == "JUMP_BACKWARD":
                points.add(x.argval)
        found = cache[code] = frozenset(points)
    return found


class _Trace:
    """Send SIGINT at the N-th interrupt point (:func:`_points`) the main thread reaches in the traced files."""

    files: set[str] = set()

    def __init__(self, n: int) -> None:
        self.n, self.seen, self.fired = n, 0, False

    def arm(self) -> None:
        sys.settrace(self._call)

    def disarm(self) -> None:
        sys.settrace(None)

    def _call(self, frame: Any, event: str, arg: Any) -> Any:
        if self.fired or frame.f_code.co_filename not in self.files:
            return None
        frame.f_trace_opcodes, frame.f_trace_lines = True, False
        return self._opcode

    def _opcode(self, frame: Any, event: str, arg: Any) -> Any:
        if self.fired:
            return None
        if event == "opcode" and frame.f_lasti in _points(frame.f_code):
            if self.seen == self.n:  # (never for n = -1: only counts)
                self.fired = True
                sys.settrace(None)
                os.kill(os.getpid(), signal.SIGINT)  # raised here (into the traced frame), unless deferred
                time.sleep(0)
                return None
            self.seen += 1
        return self._opcode


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
        state = torchckpt.resume(path, model=_model(1))  # verified against its sidecar: complete, old or new
        assert state.step in (1, 2) and (state.step == 2 or hit), (hit, state.step)
        _no_temp_files(directory)
        torchckpt.save(path, model=model, step=3)
        assert torchckpt.resume(path, model=_model(1)).step == 3
        return hit
    if kind == "lightning":
        return _lightning_first(directory, trigger)
    ck = Checkpointer(str(directory), async_save=kind != "sync", keep_last=5)
    if kind == "first":  # the first async save: written through on this thread, committed by the writer
        hit = _interrupted(lambda: ck.save(1, model=model), trigger)
        if hit:
            ck.wait()
        ck.save(2, model=model)
    else:
        ck.save(1, model=model)
    ck.wait()
    if kind in ("sync", "async"):
        hit = _interrupted(lambda: ck.save(2, model=model), trigger)
    elif kind != "first":
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
    elif kind == "first":
        assert steps in ([1, 2, 3], [2, 3]) and (steps == [1, 2, 3] or hit), (hit, steps)
    else:  # wait and close never lose the write they wait for
        assert steps == ([1, 2] if kind == "close" else [1, 2, 3]), (hit, steps)
    _no_temp_files(directory)
    with Checkpointer(str(directory), keep_last=5) as again:  # the lock was released, not leaked
        again.save(4, model=model)
    assert torchckpt.resume(str(directory), model=_model(1)).step == 4
    return hit


def _lightning_first(directory: Path, trigger: Any) -> bool:
    """Lightning's first async save, interrupted: its file complete (verified) or absent, the next saves work."""
    from torchckpt.integrations.lightning import TorchckptIO
    from torchckpt.train.training import verify

    model = _model()
    io = TorchckptIO(async_save=True)
    first, second = str(directory / "a.ckpt"), str(directory / "b.ckpt")
    hit = _interrupted(lambda: io.save_checkpoint({"state_dict": model.state_dict()}, first), trigger)
    io.save_checkpoint({"state_dict": model.state_dict()}, second)  # waits for the first, if handed over
    io.teardown()
    io.teardown()
    names = sorted(os.listdir(directory))
    assert names in (["a.ckpt", "a.ckpt.meta.json", "b.ckpt", "b.ckpt.meta.json"], ["b.ckpt", "b.ckpt.meta.json"]) \
        and (len(names) == 4 or hit), (hit, names)
    for path in (first, second)[4 - len(names) >> 1:]:
        verify(path)
        assert os.path.exists(path + ".meta.json")
    return hit


def _one(kind: str, directory: Path, trigger: Any, args: argparse.Namespace, failures: list[str]) -> bool:
    """:func:`scenario` under faulthandler's timeout; with ``--keep-going`` a failure is listed, not raised."""
    faulthandler.dump_traceback_later(args.step_timeout, exit=True)
    try:
        return scenario(kind, directory, trigger)
    except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt out of a check is a failure too
        if not args.keep_going or isinstance(exc, SystemExit):
            raise
        failures.append(f"{kind} point {getattr(trigger, 'n', '?')}: {type(exc).__name__}: {exc}")
        print(f"FAIL {failures[-1]}", flush=True)
        return True
    finally:
        faulthandler.cancel_dump_traceback_later()
        shutil.rmtree(directory, ignore_errors=True)


def child(args: argparse.Namespace) -> None:
    global _WIDTH
    root = Path(args.dir)
    rng = random.Random(args.seed)
    kinds = args.kinds.split(",")
    faulthandler.enable()
    hits = total = 0
    failures: list[str] = []
    if args.mode == "trace":
        _WIDTH = 256
        _Trace.files = _traced_files(kinds)
        for kind in kinds:
            counter = _Trace(-1)  # counts the points of the operation, uninterrupted
            _one(kind, root / f"{kind}-count", counter, args, failures)
            count = counter.seen
            every = max(1, -(-count // args.points)) if args.points else 1
            tried = 0
            for n in range(args.seed % every, count, every):
                trace = _Trace(n)
                hit = _one(kind, root / f"{kind}-{n}", trace, args, failures)
                if not trace.fired:
                    break  # the operation ended sooner than when counted
                hits += hit
                tried += 1
            print(f"{kind}: SIGINT at {tried} of its {count} points (every {every})", flush=True)
            total += tried
    else:
        durations = {}
        for kind in kinds:  # how long the operation takes, uninterrupted (the timer's delays spread over it)
            timer = _Timer(3600)
            _one(kind, root / f"{kind}-calibrate", timer, args, failures)
            durations[kind] = timer.elapsed
        print("durations (ms): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in durations.items()), flush=True)
        for i in range(args.points):
            kind = kinds[i % len(kinds)]
            delay = rng.uniform(0, durations[kind] * 1.1)
            hits += _one(kind, root / f"{kind}-{i}", _Timer(delay), args, failures)
            total += 1
    if failures:
        print(f"failed: {len(failures)} of {total} points", flush=True)
        sys.exit(1)
    print(f"ok: {total} points, {hits} interrupted", flush=True)
    faulthandler.dump_traceback_later(args.step_timeout, exit=True)  # a hang at interpreter exit is shown too


# --------------------------------------------------------------------------- the runner
def run_child(mode: str, directory: str, *, seed: int = 0, points: int = 180, kinds: str = ",".join(KINDS),
              timeout: float = 300, env: dict[str, str] | None = None) -> tuple[int | None, str]:
    """One child process; returns (exit code or None when it hung and was killed, its output)."""
    cmd = [sys.executable, os.path.abspath(__file__), "child", "--mode", mode, "--seed", str(seed), "--points",
           str(points), "--kinds", kinds, "--step-timeout", str(max(10, int(timeout / 2))),
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
    failed = hung = points = 0
    for r in range(args.runs):
        directory = tempfile.mkdtemp(prefix="ctrl-c-stress-", dir=args.dir)
        start = time.monotonic()
        code, out = run_child(args.mode, directory, seed=args.first_seed + r, points=args.points, kinds=args.kinds,
                              timeout=args.timeout)
        shutil.rmtree(directory, ignore_errors=True)
        last = out.strip().splitlines()[-1] if out.strip() else ""
        print(f"run {r}: exit {code} in {time.monotonic() - start:.1f} s: {last}", flush=True)
        if last.startswith("ok: "):
            points += int(last.split()[1])
        if code != 0:
            failed += 1
            hung += code is None
            print(out[-6000:], flush=True)
    print(f"{args.runs} runs ({args.mode}), {points} interrupt points in the runs that passed, {failed} failed, "
          f"{hung} hung")
    sys.exit(1 if failed else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("runs", "child"):
        p = sub.add_parser(name)
        p.add_argument("--mode", choices=("timer", "trace"), default="timer")
        p.add_argument("--points", type=int, default=180)
        p.add_argument("--kinds", default=",".join(KINDS))
        if name == "runs":
            p.add_argument("count", type=int, nargs="?", default=20)
            p.add_argument("--timeout", type=float, default=300)
            p.add_argument("--dir", default=None)
            p.add_argument("--first-seed", type=int, default=0)
        else:
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--step-timeout", type=int, default=60)
            p.add_argument("--keep-going", action="store_true", help="list failures and go on (to survey old code)")
            p.add_argument("dir")
    args = parser.parse_args()
    if args.command == "runs":
        args.runs = args.count
        runs(args)
    else:
        child(args)


if __name__ == "__main__":
    main()
