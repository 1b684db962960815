"""Benchmark: cold start. ``import torchckpt`` and ``torchckpt inspect|scan small-file`` in fresh processes,
against a bare ``python3 -c "import json, zipfile, struct"`` in the same run.

    python bench/bench_startup.py [--repeats 9] [--baseline-src /path/to/old/src]

Goals (issue 27): ``import torchckpt`` at most 3x the bare interpreter, ``inspect`` and ``scan`` of a
small file at most 4x. Every case is a fresh process; the cases run in turn (case 1, 2, ..., case 1, 2,
...) so a change in machine load hits all of them alike; medians of wall time, peak RSS of each child
(``wait4``'s ru_maxrss). The src tree (and ``--baseline-src``, e.g. ``git archive main src | tar -x -C
/tmp/old``) is byte-compiled first, as an installed package is. The modules each case imported are
checked too: a cold start that pulls in torch, numpy, rich or click where it need not is listed.
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
"""


def write_small_files(folder: str) -> dict[str, str]:
    """A small zip state dict (torch.save), a small safetensors file and a small legacy file.

    Written by a child process: this one stays small, so its children's peak RSS (which counts from the
    fork) is their own.
    """
    files = {"zip": os.path.join(folder, "small.pt"), "safetensors": os.path.join(folder, "small.safetensors"),
             "legacy": os.path.join(folder, "small_legacy.pt")}
    subprocess.run([sys.executable, "-c", WRITE, *files.values()], check=True)
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
    table = cases(files)
    runs: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for _ in range(args.repeats):
        for label, argv in table.items():
            for tree, src in trees.items():
                if label.endswith("(baseline)") and tree != "this tree":
                    continue
                runs.setdefault((label, tree), []).append(run_once(argv, src))
    base = statistics.median(s for s, _, _ in runs[(next(iter(table)), "this tree")])
    base_cpu = statistics.median(c for _, c, _ in runs[(next(iter(table)), "this tree")])
    goals = {"import torchckpt": 3.0}
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
    for path in files.values():
        os.remove(path)
    os.rmdir(folder)


if __name__ == "__main__":
    main()
