"""The cost of the safe unpickler's checks (budget, constructors, hash-flood guard): ``torchckpt.load``,
the structure-only read and ``scan`` of a 600-tensor checkpoint, this tree against another one (before the
change), in the same run.

    PYTHONPATH=src python bench/bench_vm.py --before /path/to/old/src [--tensors 600] [--rounds 15]

Each tree runs in its own worker process (so both import their own ``torchckpt``); the workers take
turns, one round of ``--calls`` calls each, so machine load drifts hit both alike. Reported: medians of
CPU time per call (process time, which other processes on a shared machine disturb far less than wall
time), wall-time medians, the ratio this tree / before, and each worker's peak RSS. Without ``--before``
only this tree is timed, against ``torch.load(weights_only=True, mmap=True)`` in the same worker.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

_WORKER = r"""
import json, resource, sys, time
import torch, torchckpt
path = sys.argv[1]
ops = {
    "load": lambda: torchckpt.load(path),
    "structure": lambda: torchckpt.read_checkpoint(path, meta=True),
    "scan": lambda: torchckpt.scan(path),
    "torch.load": lambda: torch.load(path, weights_only=True, mmap=True),
}
for fn in ops.values():
    fn()
print("ready", flush=True)
for line in sys.stdin:
    name, calls = line.split()
    cpu, wall = [], []
    for _ in range(int(calls)):
        c0, w0 = time.process_time(), time.perf_counter()
        ops[name]()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"cpu": cpu, "wall": wall, "rss": rss}), flush=True)
"""


class Worker:
    def __init__(self, src: str, path: str) -> None:
        env = dict(os.environ, PYTHONPATH=src)
        self.src = src
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER, path], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready", f"worker for {src} did not start"
        self.cpu: dict[str, list[float]] = {}
        self.wall: dict[str, list[float]] = {}
        self.rss = 0

    def run(self, name: str, calls: int) -> None:
        self.proc.stdin.write(f"{name} {calls}\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        self.cpu.setdefault(name, []).extend(out["cpu"])
        self.wall.setdefault(name, []).extend(out["wall"])
        self.rss = out["rss"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", help="the src/ directory of the tree to compare with")
    parser.add_argument("--tensors", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()

    import torch

    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    sd = {f"layers.{i // 6}.block.{i % 6}.weight": torch.randn(32, 32) for i in range(args.tensors)}
    path = os.path.join(tempfile.mkdtemp(prefix="torchckpt-bench-vm-", dir=args.dir), "model.pt")
    torch.save(sd, path)

    ops = ["load", "structure", "scan"] + ([] if args.before else ["torch.load"])
    workers = [Worker(here, path)] + ([Worker(args.before, path)] if args.before else [])
    try:
        for _ in range(args.rounds):
            for op in ops:
                for w in (workers if _ % 2 else workers[::-1]):
                    w.run(op, args.calls)
    finally:
        for w in workers:
            w.close()
    n = args.rounds * args.calls
    print(f"{args.tensors} tensors, {os.path.getsize(path) / 2**20:.1f} MiB; medians of {n} calls per op, "
          f"{args.rounds} interleaved rounds")
    med = statistics.median
    for op in ops:
        now = workers[0]
        row = f"  {op:10s} this tree cpu {med(now.cpu[op]) * 1e3:7.2f} ms  wall {med(now.wall[op]) * 1e3:7.2f} ms"
        if args.before:
            old = workers[1]
            row += (f" | before cpu {med(old.cpu[op]) * 1e3:7.2f} ms  wall {med(old.wall[op]) * 1e3:7.2f} ms"
                    f" | ratio cpu {med(now.cpu[op]) / med(old.cpu[op]):.3f}  wall "
                    f"{med(now.wall[op]) / med(old.wall[op]):.3f}")
        print(row)
    print("  peak RSS: " + ", ".join(f"{'this tree' if i == 0 else 'before'} {w.rss / 2**20:.0f} MiB"
                                     for i, w in enumerate(workers)))


if __name__ == "__main__":
    main()
