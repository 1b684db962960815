"""Scanner comparison: torchckpt scan vs picklescan vs modelscan on the project's malicious and benign corpora.

    pip install picklescan modelscan   # dev-only tools, never runtime dependencies
    python bench/bench_scanners.py [--keep DIR]

The malicious corpus is every attack technique of tests/test_malicious.py in every container
(raw pickle, zip data.pkl, legacy object/magic/sys_info pickles, broken stream); the benign corpus is
every checkpoint kind the tests generate. Target: 100% detected, 0 false positives.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir, "tests"))


def build(folder: str) -> tuple[list[str], list[str]]:
    import pathlib

    from conftest import small_net
    from test_malicious import CONTAINERS, TECHNIQUES, _container
    from test_scan import _benign_corpus

    bad_dir, good_dir = os.path.join(folder, "malicious"), os.path.join(folder, "benign")
    os.makedirs(bad_dir)
    os.makedirs(good_dir)
    bad = []
    for technique in sorted(TECHNIQUES):
        for container in CONTAINERS:
            path = os.path.join(bad_dir, f"{technique}__{container}.pt")
            with open(path, "wb") as fh:
                fh.write(_container(container, technique, pathlib.Path(folder) / "canary"))
            bad.append(path)
    good = [str(p) for p in _benign_corpus(pathlib.Path(good_dir), small_net())]
    return bad, good


def torchckpt_flags(path: str) -> bool | None:
    import torchckpt

    return torchckpt.scan(path).status == "findings"


def cli_flags(cmd: list[str]) -> bool | None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if res.returncode == 1:
        return True
    if res.returncode == 0:
        return False
    return None  # the tool failed on the file


SCANNERS = {
    "torchckpt scan": torchckpt_flags,
    "picklescan": lambda p: cli_flags(["picklescan", "-p", p]) if shutil.which("picklescan") else "absent",
    "modelscan": lambda p: cli_flags(["modelscan", "-p", p]) if shutil.which("modelscan") else "absent",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", help="write the corpora here and keep them")
    args = ap.parse_args()
    folder = args.keep or tempfile.mkdtemp(prefix="torchckpt-scanners-")
    bad, good = build(folder)
    print(f"malicious corpus: {len(bad)} files; benign corpus: {len(good)} files")
    print(f"\n{'scanner':16s} {'detected':>9s} {'missed':>7s} {'errors':>7s} {'false pos':>10s} {'seconds':>8s}")
    misses: dict[str, list[str]] = {}
    for name, flags in SCANNERS.items():
        start = time.perf_counter()
        results_bad = [flags(p) for p in bad]
        if "absent" in results_bad:
            print(f"{name:16s} not installed")
            continue
        results_good = [flags(p) for p in good]
        seconds = time.perf_counter() - start
        detected = sum(r is True for r in results_bad)
        errors = sum(r is None for r in results_bad + results_good)
        false_pos = sum(r is True for r in results_good)
        misses[name] = [os.path.basename(p) for p, r in zip(bad, results_bad) if r is not True]
        print(f"{name:16s} {detected:9d} {len(bad) - detected:7d} {errors:7d} {false_pos:10d} {seconds:8.1f}")
        fps = [os.path.basename(p) for p, r in zip(good, results_good) if r is True]
        if fps:
            print(f"  false positives: {', '.join(fps)}")
    for name, missed in misses.items():
        if missed:
            techniques = sorted({m.split("__")[0] for m in missed})
            print(f"\n{name} missed {len(missed)}; techniques: {', '.join(techniques)}")
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
