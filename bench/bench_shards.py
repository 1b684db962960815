"""Benchmark: a sharded checkpoint (an index over N safetensors shards, as save_pretrained writes it) read by
1 and by 2+ threads (``torchckpt.load(index, workers=W, mmap=False)``), warm page cache.

    python bench/bench_shards.py [--size-mib 1024] [--shards 8] [--repeats 5] [--workers "1 2"]

Target (issue 27): 2 threads at least 1.6x faster than 1 thread on 8 shards with a warm page cache, at
the same peak memory. Also in the same run: what a user writes without torchckpt (safetensors'
``load_file`` over the shards, one after another), and the index mapped (``mmap=True``: nothing is read
until used). Each case is a fresh process; runs alternate between the cases; the files are read once
before the first run so the page cache is warm. Medians, peak RSS above the process before the load.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from common import bench_args, measure_alternated, print_table, transformer_state_dict


def write_shards(folder: str, size_mib: int, n: int) -> str:
    import torch
    from safetensors.torch import save_file

    sd = transformer_state_dict(size_mib)
    keys = list(sd)
    per = -(-len(keys) // n)
    weight_map = {}
    for s in range(n):
        name = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in keys[s * per:(s + 1) * per]}
        if part:
            save_file(part, os.path.join(folder, name))
            weight_map.update(dict.fromkeys(part, name))
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index, "w") as fh:
        json.dump({"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                   "weight_map": weight_map}, fh)
    del sd, torch
    return index


def main() -> None:
    args = bench_args(__doc__, extra=lambda ap: (
        ap.add_argument("--shards", type=int, default=8),
        ap.add_argument("--workers", default="1 2", help="pool sizes to compare (the first is the baseline)")))
    folder = tempfile.mkdtemp(prefix="torchckpt-bench-shards-", dir=args.dir)
    try:
        index = write_shards(folder, args.size_mib, args.shards)
        for name in os.listdir(folder):  # warm the page cache
            with open(os.path.join(folder, name), "rb") as fh:
                while fh.read(64 << 20):
                    pass
        pools = [int(w) for w in args.workers.split()]
        codes = {f"workers={w}": f"""
import torchckpt.read.formats.simple, torchckpt.read.formats.sharded, torchckpt.read.opener  # imports are not the load
base = reset_peak()
t0 = time.perf_counter()
sd = torchckpt.load({index!r}, workers={w}, mmap=False)
result = time.perf_counter() - t0
assert len(sd) > 100
""" for w in pools}
        codes["safetensors.load_file per shard"] = f"""
import json, safetensors.torch
base = reset_peak()
t0 = time.perf_counter()
folder = os.path.dirname({index!r})
names = dict.fromkeys(json.load(open({index!r}))["weight_map"].values())
sd = {{}}
for name in names:
    sd.update(safetensors.torch.load_file(os.path.join(folder, name)))
result = time.perf_counter() - t0
"""
        codes["mmap=True (nothing read yet)"] = f"""
import torchckpt.read.formats.simple, torchckpt.read.formats.sharded, torchckpt.read.opener
base = reset_peak()
t0 = time.perf_counter()
sd = torchckpt.load({index!r}, mmap=True)
result = time.perf_counter() - t0
"""
        res = measure_alternated(codes, args.repeats)
        first = f"workers={pools[0]}"
        print(f"{args.shards} safetensors shards, ~{args.size_mib} MiB in all, warm page cache; medians of "
              f"{args.repeats} alternated fresh processes; load average {os.getloadavg()[0]:.1f}; "
              f"{len(os.sched_getaffinity(0))} cores")
        print_table("sharded load (mmap=False: every byte read into the process's memory)",
                    [(f"torchckpt.load(index, workers={pools[0]})          [baseline]", res[first], None)]
                    + [(f"torchckpt.load(index, workers={w})", res[f"workers={w}"], res[first]) for w in pools[1:]]
                    + [("safetensors.torch.load_file, shard by shard", res["safetensors.load_file per shard"],
                        res[first]),
                       ("torchckpt.load(index, mmap=True) (not read yet)", res["mmap=True (nothing read yet)"],
                        res[first])], size_mib=args.size_mib)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
