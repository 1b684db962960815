"""Benchmark: ``torchckpt.scan`` of a ~1 GiB checkpoint (zip and legacy formats), against a baseline tree.

    python bench/bench_scan.py [--size-mib 1024] [--repeats 3] [--baseline-src /path/to/old/src]

Scan runs the loader's readers in record mode: it reads every pickle and checks every storage range
against the file, but reads no tensor data. Target (issue 9): within 1.1x of the scan time before
"scan is load" (pass that tree as --baseline-src, e.g. ``git archive 8cd9303 src | tar -x -C /tmp/old``).
Each measurement is a fresh process (median time, peak RSS over the process's start).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from common import CHILD_PRELUDE, HERE, print_table, transformer_state_dict

SRC = os.path.join(HERE, os.pardir, "src")


def measure(path: str, src: str, repeats: int) -> dict:
    code = CHILD_PRELUDE.format(here=HERE) + f"""
t0 = time.perf_counter()
report = torchckpt.scan({path!r})
result = time.perf_counter() - t0
assert report.exit_code == 0, report.to_dict()
print(json.dumps({{"seconds": result, "peak_mib": rss_mib() - base}}))
"""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src))
    times, peaks = [], []
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or [f"rc {proc.returncode}"])[-1]}
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        times.append(out["seconds"])
        peaks.append(out["peak_mib"])
    return {"seconds": statistics.median(times), "peak_mib": max(peaks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--baseline-src", default=None, help="a src/ tree of the version to compare against")
    args = ap.parse_args()
    import torch

    folder = tempfile.mkdtemp(prefix="torchckpt-bench-scan-", dir=args.dir)
    try:
        sd = transformer_state_dict(args.size_mib)
        files = {"zip": os.path.join(folder, "model.pt"), "legacy": os.path.join(folder, "model.pth")}
        torch.save(sd, files["zip"])
        torch.save(sd, files["legacy"], _use_new_zipfile_serialization=False)
        print(f"{len(sd)} tensors, {os.path.getsize(files['zip']) / 2**20:.0f} MiB; medians of {args.repeats} "
              "fresh processes")
        del sd
        for kind, path in files.items():
            ours = measure(path, SRC, args.repeats)
            rows = [(f"torchckpt.scan ({kind}) this tree", ours, None)]
            if args.baseline_src:
                base = measure(path, args.baseline_src, args.repeats)
                rows = [(f"torchckpt.scan ({kind}) baseline tree   [baseline]", base, None),
                        (f"torchckpt.scan ({kind}) this tree", ours, base)]
            print_table(f"scan of a {args.size_mib} MiB {kind} checkpoint", rows)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
