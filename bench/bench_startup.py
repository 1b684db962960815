"""Benchmark: cold start. ``import torchckpt`` and ``torchckpt inspect|scan small-file`` in fresh processes,
against a bare ``python3 -c "import json, zipfile, struct"`` in the same run.

    python bench/bench_startup.py [--repeats 9] [--baseline-src /path/to/old/src]

Goals (issue 27): ``import torchckpt`` at most 3x the bare interpreter, ``inspect``, ``scan`` of a small file
and ``--help`` at most 4x. Every case is a fresh process; the cases run in turn (case 1, 2, ..., case 1, 2, ...)
so a change in machine load hits all of them alike; medians of wall time, peak RSS of each child (``wait4``'s
ru_maxrss). The src tree (and ``--baseline-src``, e.g. ``git archive main src | tar -x -C /tmp/old``) is
byte-compiled first, as an installed package is. The modules each case imported are
checked too: a cold start that pulls in torch, numpy, rich or click where it need not is listed.

A second table times the first ``torchckpt.load`` of a 3 MiB zip state dict (bench_load's ``--size-mib 4``) in
a fresh process that has imported torch, as a training script has, against the first
``torch.load(weights_only=True)`` (goal: within ~10 ms), and the second call of each (once every module is
imported), runs alternated, medians of at least 10 processes.
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.abspath(os.path.join(HERE, os.pardir, "src"))
HEAVY = ("torch", "numpy", "rich", "click", "fsspec", "safetensors")


WRITE = """
import sys, torch
from safetensors.torch import save_file
sd = {"fc.weight": torch.randn(16, 8), "fc.bias": torch.zeros(16), "step": 3}
torch.save(sd, sys.argv[1])
save_file({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, sys.argv[2])
torch.save(sd, sys.argv[3], _use_new_zipfile_serialization=False)
sys.path.insert(0, sys.argv[5])
from common import transformer_state_dict
torch.save(transformer_state_dict(4), sys.argv[4])
"""

# The first load in a process that has imported torch (as a training script has): seconds of the first and the
# second call, wall and CPU. torchckpt's first call includes ``import torchckpt`` and every module it imports.
FIRST_LOAD = """
import sys, time, torch
def timed(call):
    t0, c0 = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - t0, time.process_time() - c0
if sys.argv[2] == "torch":
    runs = [timed(lambda: torch.load(sys.argv[1], weights_only=True)) for _ in range(2)]
else:
    def first():
        import torchckpt
        torchckpt.load(sys.argv[1])
    runs = [timed(first)]
    import torchckpt
    runs.append(timed(lambda: torchckpt.load(sys.argv[1])))
print(*(x for run in runs for x in run))
"""


def write_small_files(folder: str) -> dict[str, str]:
    """A small zip state dict (torch.save), a small safetensors file, a small legacy file and a 3 MiB zip
    state dict (bench/common.py's transformer layout).

    Written by a child process: this one stays small, so its children's peak RSS (which counts from the
    fork) is their own.
    """
    files = {"zip": os.path.join(folder, "small.pt"), "safetensors": os.path.join(folder, "small.safetensors"),
             "legacy": os.path.join(folder, "small_legacy.pt"), "zip4": os.path.join(folder, "model_4mib.pt")}
    subprocess.run([sys.executable, "-c", WRITE, *files.values(), HERE], check=True)
    return files


def cases(files: dict[str, str]) -> dict[str, list[str]]:
    py = [sys.executable]
    return {
        "bare: import json, zipfile, struct (baseline)": py + ["-c", "import json, zipfile, struct"],
        "import torchckpt": py + ["-c", "import torchckpt"],
        "torchckpt inspect small.pt (zip)": py + ["-m", "torchckpt", "inspect", files["zip"]],
        "torchckpt scan small.pt (zip)": py + ["-m", "torchckpt", "scan", files["zip"]],
        "torchckpt inspect small.safetensors": py + ["-m", "torchckpt", "inspect", files["safetensors"]],
        "torchckpt scan small.safetensors": py + ["-m", "torchckpt", "scan", files["safetensors"]],
        "torchckpt inspect small_legacy.pt": py + ["-m", "torchckpt", "inspect", files["legacy"]],
        "torchckpt inspect --json small.pt": py + ["-m", "torchckpt", "inspect", "--json", files["zip"]],
        "torchckpt --help": py + ["-m", "torchckpt", "--help"],
    }


def run_once(argv: list[str], src: str) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system: steadier on a loaded machine) and peak RSS (MiB) of one
    fresh process."""
    env = dict(os.environ, PYTHONPATH=src)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv)}: exit {proc.returncode}\n{err}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def first_load(path: str, who: str, src: str) -> list[float]:
    """[first wall, first cpu, second wall, second cpu] seconds of ``who``'s loads of ``path`` in a fresh
    process that imported torch first."""
    env = dict(os.environ, PYTHONPATH=src)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    proc = subprocess.run([sys.executable, "-c", FIRST_LOAD, path, who], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"first load ({who}): exit {proc.returncode}\n{proc.stderr}")
    return [float(x) for x in proc.stdout.split()]


def first_load_table(path: str, trees: dict[str, str], repeats: int) -> None:
    """torchckpt.load against torch.load(weights_only=True), first and second call, runs alternated."""
    who = {("torch.load(weights_only=True)  [baseline]", "this tree"): "torch"}
    who.update({("torchckpt.load", tree): "ours" for tree in trees})
    runs: dict[tuple[str, str], list[list[float]]] = {key: [] for key in who}
    for _ in range(repeats):
        for key, name in who.items():
            runs[key].append(first_load(path, name, trees[key[1]]))
    med = {key: [statistics.median(r[i] for r in rs) for i in range(4)] for key, rs in runs.items()}
    base = med[next(iter(who))]
    print(f"\nfirst load of a {os.path.getsize(path) / 2**20:.1f} MiB zip state dict in a fresh process that imported "
          f"torch, medians of {repeats} processes (load average {os.getloadavg()[0]:.2f})")
    print(f"{'case':42s} {'tree':14s} {'1st s':>7s} {'- base':>8s} {'1st cpu':>8s} {'2nd s':>7s} {'2nd x':>6s}")
    for (label, tree), (first, first_cpu, second, _) in med.items():
        print(f"{label:42s} {tree:14s} {first:7.4f} {(first - base[0]) * 1000:+6.1f}ms {first_cpu:8.4f} "
              f"{second:7.4f} {second / base[2]:5.2f}x")


def imported_heavy(argv: list[str], src: str) -> list[str]:
    """Which of HEAVY the case imported (one extra run under ``-X importtime``)."""
    env = dict(os.environ, PYTHONPATH=src)
    proc = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], env=env, capture_output=True, text=True)
    names = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return [h for h in HEAVY if h in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--baseline-src", default=None, help="a src/ tree of the version to compare against")
    args = ap.parse_args()
    folder = tempfile.mkdtemp(prefix="torchckpt-bench-startup-")
    files = write_small_files(folder)
    trees = {"this tree": SRC}
    if args.baseline_src:
        trees["baseline tree"] = os.path.abspath(args.baseline_src)
    for src in trees.values():
        compileall.compile_dir(src, quiet=1)
    table = cases({k: v for k, v in files.items() if k != "zip4"})
    runs: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for _ in range(args.repeats):
        for label, argv in table.items():
            for tree, src in trees.items():
                if label.endswith("(baseline)") and tree != "this tree":
                    continue
                runs.setdefault((label, tree), []).append(run_once(argv, src))
    base = statistics.median(s for s, _, _ in runs[(next(iter(table)), "this tree")])
    base_cpu = statistics.median(c for _, c, _ in runs[(next(iter(table)), "this tree")])
    goals = {"import torchckpt": 3.0, "torchckpt --help": 4.0}
    print(f"\ncold start, medians of {args.repeats} fresh processes (load average {os.getloadavg()[0]:.2f})")
    print(f"{'case':46s} {'tree':14s} {'median s':>9s} {'x bare':>7s} {'cpu s':>7s} {'cpu x':>6s} {'goal':>5s} "
          f"{'peak MiB':>9s}  heavy imports")
    for (label, tree), rs in runs.items():
        med = statistics.median(s for s, _, _ in rs)
        cpu = statistics.median(c for _, c, _ in rs)
        goal = goals.get(label, 4.0 if ("inspect" in label or "scan" in label) else None)
        heavy = ",".join(imported_heavy(table[label], trees[tree])) or "-"
        print(f"{label:46s} {tree:14s} {med:9.3f} {med / base:6.2f}x {cpu:7.3f} {cpu / base_cpu:5.2f}x "
              f"{f'{goal:.0f}x' if goal else '-':>5s} {max(r for _, _, r in rs):9.1f}  {heavy}")
    first_load_table(files["zip4"], trees, max(args.repeats, 10))
    for path in files.values():
        os.remove(path)
    os.rmdir(folder)


if __name__ == "__main__":
    main()
