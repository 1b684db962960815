"""Benchmark: ``torchckpt.scan`` of a ~1 GiB checkpoint (zip and legacy formats), against a baseline tree.

    python bench/bench_scan.py [--size-mib 1024] [--repeats 3] [--baseline-src /path/to/old/src]

Scan runs the loader's readers in record mode: it reads every pickle and checks every storage range
against the file, but reads no tensor data. Target (issue 9): within 1.1x of the scan time before
"scan is load" (pass that tree as --baseline-src, e.g. ``git archive 8cd9303 src | tar -x -C /tmp/old``).
Each measurement is a fresh process that has imported torch, numpy and torchckpt (so the time includes
the scan's own lazy imports); both trees are copied and byte-compiled first, as an installed package
is (a tree without __pycache__ under PYTHONDONTWRITEBYTECODE would compile its sources in every run).
Runs of the two trees alternate, so a change in machine load hits both. Medians of wall time and of the
process's CPU time (on a shared, loaded machine the CPU time is the steadier of the two), peak RSS.
``--dir`` with model.pt/model.pth already there reuses them.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from common import CHILD_PRELUDE, HERE, print_table, transformer_state_dict

SRC = os.path.join(HERE, os.pardir, "src")


def compiled_copy(src: str, folder: str, name: str) -> str:
    """``src`` (a src/ tree) copied under ``folder`` and byte-compiled, as an installed package is."""
    dst = os.path.join(folder, name, "src")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    compileall.compile_dir(dst, quiet=1)
    return dst


CODE = CHILD_PRELUDE.format(here=HERE) + """
c0, t0 = time.process_time(), time.perf_counter()
report = torchckpt.scan(sys.argv[1])
result, cpu = time.perf_counter() - t0, time.process_time() - c0
assert report.status == "clean", report.to_dict()
print(json.dumps({"seconds": result, "cpu": cpu, "peak_mib": rss_mib() - base}))
"""


def measure(path: str, trees: dict[str, str], repeats: int) -> dict[str, dict]:
    """Alternating fresh-process runs of every tree; medians per tree."""
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(repeats):
        for name, src in trees.items():
            env = dict(os.environ, PYTHONPATH=os.path.abspath(src))
            proc = subprocess.run([sys.executable, "-c", CODE, path], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"{name}: " + (proc.stderr.strip().splitlines() or [f"rc {proc.returncode}"])[-1])
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {name: {"seconds": statistics.median(r["seconds"] for r in rs),
                   "cpu": statistics.median(r["cpu"] for r in rs),
                   "peak_mib": max(r["peak_mib"] for r in rs)} for name, rs in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--baseline-src", default=None, help="a src/ tree of the version to compare against")
    args = ap.parse_args()
    import torch

    folder = args.dir or tempfile.mkdtemp(prefix="torchckpt-bench-scan-")
    code_dir = tempfile.mkdtemp(prefix="torchckpt-bench-scan-code-")
    try:
        files = {"zip": os.path.join(folder, "model.pt"), "legacy": os.path.join(folder, "model.pth")}
        if not all(os.path.exists(f) for f in files.values()):
            sd = transformer_state_dict(args.size_mib)
            torch.save(sd, files["zip"])
            torch.save(sd, files["legacy"], _use_new_zipfile_serialization=False)
            del sd
        trees = {"this tree": compiled_copy(SRC, code_dir, "this")}
        if args.baseline_src:
            trees = {"baseline tree": compiled_copy(args.baseline_src, code_dir, "baseline"), **trees}
        print(f"{os.path.getsize(files['zip']) / 2**20:.0f} MiB; medians of {args.repeats} alternating fresh "
              "processes")
        for kind, path in files.items():
            res = measure(path, trees, args.repeats)
            base = res.get("baseline tree")
            rows = [(f"torchckpt.scan ({kind}) {name}" + ("   [baseline]" if name == "baseline tree" else ""), r,
                     base if name != "baseline tree" else None) for name, r in res.items()]
            print_table(f"scan of a {args.size_mib} MiB {kind} checkpoint (wall)", rows)
            if base:
                ours = res["this tree"]
                print(f"  CPU seconds: baseline {base['cpu']:.3f}, this tree {ours['cpu']:.3f} "
                      f"({ours['cpu'] / base['cpu']:.2f}x)")
    finally:
        shutil.rmtree(code_dir, ignore_errors=True)
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
