"""Benchmark: consolidate a DeepSpeed ZeRO-2 and ZeRO-3 folder (N ranks) into an fp32 state dict.

    python bench/bench_deepspeed.py [--size-mib 256] [--ranks 2] [--repeats 3] [--workers "1 2"] [--keep DIR]

The folders are written by DeepSpeed itself (tests/helpers/deepspeed_app.py, torchrun on CPU/gloo, ``--ranks``
processes; needs ``pip install deepspeed``). ``--keep DIR`` writes them there once and reuses them in later
runs (write them under ``flock -s``, then time under ``flock -x``: ``--generate-only`` stops after writing).
Baseline: DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (what ``zero_to_fp32`` runs) on the same
folder. Goal (issue 28): peak RSS <= 0.5x of it at <= 1.2x its time; (issue 27) 2 workers >= 1.6x of 1.
Each case runs in fresh processes (page cache warm for both: the folder is read once before timing), the
cases alternated. ``torchckpt.load`` reads the rank files side by side (``workers=``): each pool size is a row,
the first the one compared with the baseline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from bench_shards import free_cores
from common import bench_args, measure_alternated, print_table

HERE = os.path.dirname(os.path.abspath(__file__))
APP = os.path.join(HERE, os.pardir, "tests", "helpers", "deepspeed_app.py")
CONFIGS = ("2-fp32", "3-fp32")

OURS = """
    import time, torchckpt
    import torchckpt.read.opener, torchckpt.read.formats.deepspeed, torchckpt.read.formats.torch_zip  # not the load
    base = reset_peak()
    t0 = time.perf_counter()
    sd = torchckpt.load({folder!r}, workers={workers})
    result = time.perf_counter() - t0
    assert len(sd)
"""
THEIRS = """
    import time, logging
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    base = reset_peak()
    t0 = time.perf_counter()
    sd = get_fp32_state_dict_from_zero_checkpoint({folder!r})
    result = time.perf_counter() - t0
    assert len(sd)
"""


def generate(folder: str, size_mib: int, ranks: int) -> None:
    """DeepSpeed writes ``folder/<config>`` for every config missing there (torchrun, ``ranks`` processes)."""
    missing = [c for c in CONFIGS if not os.path.isfile(os.path.join(folder, c, "latest"))]
    if not missing:
        return
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", DS_APP_BIG_MIB=str(size_mib))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
                    "127.0.0.1", "--master_port", "29571", APP, folder, *missing], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)


def main() -> None:
    args = bench_args(__doc__, size_mib=256, extra=lambda ap: (
        ap.add_argument("--workers", default="1 2", help="pool sizes of torchckpt.load (the first is compared "
                                                         "with zero_to_fp32)"),
        ap.add_argument("--ranks", type=int, default=2, help="data-parallel ranks DeepSpeed writes (torchrun)"),
        ap.add_argument("--keep", default=None, help="write the folders here once and reuse them (not deleted)"),
        ap.add_argument("--generate-only", action="store_true", help="write the folders (--keep) and stop")))
    pools = [int(w) for w in args.workers.split()]
    folder = args.keep or tempfile.mkdtemp(prefix="torchckpt-bench-ds-", dir=args.dir)
    try:
        os.makedirs(folder, exist_ok=True)
        generate(folder, args.size_mib, args.ranks)
        if args.generate_only:
            return
        os.environ["DS_ACCELERATOR"] = "cpu"  # for the baseline's children
        rows = []
        before = free_cores()
        for config in CONFIGS:
            run = os.path.join(folder, config)
            size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(run) for f in fs) / 2**20
            for dirpath, _, names in os.walk(run):  # warm the page cache
                for name in names:
                    with open(os.path.join(dirpath, name), "rb") as fh:
                        while fh.read(64 << 20):
                            pass
            codes = {"theirs": THEIRS.format(folder=run)}
            codes.update({f"workers={w}": OURS.format(folder=run, workers=w) for w in pools})
            res = measure_alternated(codes, args.repeats)
            theirs, first = res["theirs"], res[f"workers={pools[0]}"]
            rows += [(f"ZeRO-{config[0]}: zero_to_fp32 ({size:.0f} MiB folder)", theirs, None),
                     (f"ZeRO-{config[0]}: torchckpt.load(workers={pools[0]})", first, theirs)]
            rows += [(f"ZeRO-{config[0]}: torchckpt.load(workers={w}) vs workers={pools[0]}", res[f"workers={w}"], first)
                     for w in pools[1:]]
        after = free_cores()
        print(f"load average {os.getloadavg()[0]:.1f}; {len(os.sched_getaffinity(0))} cores, free cores measured "
              f"before/after: {before:.2f}/{after:.2f}")
        print_table(f"DeepSpeed consolidation, {args.size_mib} MiB of fp32 weights, {args.ranks} ranks, medians of "
                    f"{args.repeats} alternated fresh processes, warm page cache", rows, size_mib=args.size_mib)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
