"""Benchmark: consolidate a DeepSpeed ZeRO-2 and ZeRO-3 folder (2 ranks) into an fp32 state dict.

    python bench/bench_deepspeed.py [--size-mib 512] [--repeats 3] [--dir DIR]

The folders are written by DeepSpeed itself (tests/deepspeed_app.py, torchrun on CPU/gloo; needs
``pip install deepspeed``). Baseline: DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (what
``zero_to_fp32`` runs) on the same folder. Goal (issue 28): peak RSS <= 0.5x of it at <= 1.2x its time.
Each case runs in fresh processes (page cache warm for both: the folder is read once before timing).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from common import bench_args, measure, print_table

HERE = os.path.dirname(os.path.abspath(__file__))
APP = os.path.join(HERE, os.pardir, "tests", "deepspeed_app.py")

OURS = """
    import time, torchckpt
    base = reset_peak()
    t0 = time.perf_counter()
    sd = torchckpt.load({folder!r})
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


def main() -> None:
    args = bench_args(__doc__, size_mib=512)
    folder = tempfile.mkdtemp(prefix="torchckpt-bench-ds-", dir=args.dir)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", DS_APP_BIG_MIB=str(args.size_mib))
    try:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", "29571", APP, folder, "2-fp32", "3-fp32"], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)
        os.environ["DS_ACCELERATOR"] = "cpu"  # for the baseline's children
        rows = []
        for config in ("2-fp32", "3-fp32"):
            run = os.path.join(folder, config)
            size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(run) for f in fs) / 2**20
            theirs = measure(THEIRS.format(folder=run), args.repeats)
            ours = measure(OURS.format(folder=run), args.repeats)
            rows += [(f"ZeRO-{config[0]}: zero_to_fp32 ({size:.0f} MiB folder)", theirs, None),
                     (f"ZeRO-{config[0]}: torchckpt.load", ours, theirs)]
        print_table(f"DeepSpeed consolidation, {args.size_mib} MiB of fp32 weights, 2 ranks, medians of "
                    f"{args.repeats} fresh processes", rows, size_mib=args.size_mib)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
