"""Benchmark: checkpoints of N parts read by 1 and by 2+ threads (``torchckpt.load(path, workers=W,
mmap=False)``), warm page cache: an index over N safetensors shards (as save_pretrained writes it) and a
torch.distributed.checkpoint directory of the same state dict in N data files (``__0_<i>.distcp``).

    python bench/bench_shards.py [--size-mib 1024] [--shards 8] [--repeats 5] [--workers "1 2"] [--no-dcp]

Target (issue 27): 2 threads at least 1.6x faster than 1 thread on 8 shards with a warm page cache, at
the same peak memory. Also in the same run: what a user writes without torchckpt (safetensors'
``load_file`` over the shards, one after another, each tensor copied out of the mapping; DCP's own ``dcp.load`` into tensors allocated from the
metadata), the index mapped (``mmap=True``: nothing is read until used), and the DCP data files read by
``os.preadv`` into fresh tensors with no parsing at all (the I/O alone: how much 2 threads can gain at most
on this machine). Each case is a fresh process;
runs alternate between the cases; the files are read once before the first run so the page cache is
warm. Medians, peak RSS above the process before the load.

Threads can only be faster when the machine has a free core: before and after the cases, two processes
spinning in pure Python for a moment measure the cores this run could get (their CPU seconds / wall
seconds: 2.0 on an idle 2-core machine); the "cpu s" column is what the read itself used.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

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


def write_dcp(folder: str, size_mib: int, n: int) -> str:
    """The same state dict as a DCP directory with ``n`` data files (one process, ``n`` writer threads)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    path = os.path.join(folder, "dcp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(transformer_state_dict(size_mib), storage_writer=dcp.FileSystemWriter(path, thread_count=n))
    return path


SPIN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass"


def free_cores(n: int = 2) -> float:
    """CPU seconds / wall seconds of ``n`` processes spinning 0.5 CPU seconds each: the cores free now."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(n)]
    for p in procs:
        p.wait()
    return 0.5 * n / (time.perf_counter() - t0)


def load_code(path: str, workers: int) -> str:
    """A measured ``torchckpt.load(path, workers=...)`` that reads every byte."""
    return f"""
import torchckpt.read.formats.simple, torchckpt.read.formats.sharded, torchckpt.read.formats.dcp
import torchckpt.read.opener  # imports are not the load
base = reset_peak()
t0 = time.perf_counter()
sd = torchckpt.load({path!r}, workers={workers}, mmap=False)
result = time.perf_counter() - t0
assert len(sd) > 10
"""


def io_code(folder: str, workers: int) -> str:
    """The I/O alone, the ceiling for any reader: every data file of ``folder`` read with ``os.preadv`` into
    fresh 4 MiB tensors by ``workers`` threads (files split between them), no parsing."""
    return f"""
import threading
folder = {folder!r}
files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith('.distcp'))
def read(paths, keep):
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        size, off = os.fstat(fd).st_size, 0
        while off < size:
            t = torch.empty(min(4 << 20, size - off), dtype=torch.uint8)
            off += os.preadv(fd, [t.numpy()], off)
            keep.append(t)
        os.close(fd)
keep = []
threads = [threading.Thread(target=read, args=(files[i::{workers}], keep)) for i in range({workers})]
base = reset_peak()
t0 = time.perf_counter()
for t in threads:
    t.start()
for t in threads:
    t.join()
result = time.perf_counter() - t0
"""


def main() -> None:
    args = bench_args(__doc__, extra=lambda ap: (
        ap.add_argument("--shards", type=int, default=8),
        ap.add_argument("--workers", default="1 2", help="pool sizes to compare (the first is the baseline)"),
        ap.add_argument("--no-dcp", action="store_true", help="only the safetensors index")))
    folder = tempfile.mkdtemp(prefix="torchckpt-bench-shards-", dir=args.dir)
    try:
        index = write_shards(folder, args.size_mib, args.shards)
        dcp_dir = None if args.no_dcp else write_dcp(folder, args.size_mib, args.shards)
        for dirpath, _, names in os.walk(folder):  # warm the page cache
            for name in names:
                with open(os.path.join(dirpath, name), "rb") as fh:
                    while fh.read(64 << 20):
                        pass
        pools = [int(w) for w in args.workers.split()]
        codes = {f"workers={w}": load_code(index, w) for w in pools}
        codes["safetensors.load_file per shard"] = f"""
import json, safetensors.torch
base = reset_peak()
t0 = time.perf_counter()
folder = os.path.dirname({index!r})
names = dict.fromkeys(json.load(open({index!r}))["weight_map"].values())
sd = {{}}
for name in names:
    # load_file maps the shard (nothing read yet): each tensor copied, the work mmap=False does
    sd.update({{k: v.clone() for k, v in safetensors.torch.load_file(os.path.join(folder, name)).items()}})
result = time.perf_counter() - t0
"""
        codes["mmap=True (nothing read yet)"] = f"""
import torchckpt.read.formats.simple, torchckpt.read.formats.sharded, torchckpt.read.opener
base = reset_peak()
t0 = time.perf_counter()
sd = torchckpt.load({index!r}, mmap=True)
result = time.perf_counter() - t0
"""
        if dcp_dir is not None:
            codes.update({f"dcp workers={w}": load_code(dcp_dir, w) for w in pools})
            codes.update({f"io workers={w}": io_code(dcp_dir, w) for w in pools})
            codes["dcp.load"] = f"""
import warnings
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
warnings.simplefilter("ignore")
base = reset_peak()
t0 = time.perf_counter()
meta = dcp.FileSystemReader({dcp_dir!r}).read_metadata()
sd = {{k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()
      if isinstance(m, TensorStorageMetadata)}}
dcp.load(sd, checkpoint_id={dcp_dir!r})
result = time.perf_counter() - t0
"""
        before = free_cores()
        res = measure_alternated(codes, args.repeats)
        after = free_cores()
        first = f"workers={pools[0]}"
        print(f"{args.shards} parts, ~{args.size_mib} MiB in all, warm page cache; medians of "
              f"{args.repeats} alternated fresh processes; load average {os.getloadavg()[0]:.1f}; "
              f"{len(os.sched_getaffinity(0))} cores, free cores measured before/after: {before:.2f}/{after:.2f}")
        print_table("sharded load (mmap=False: every byte read into the process's memory)",
                    [(f"torchckpt.load(index, workers={pools[0]})          [baseline]", res[first], None)]
                    + [(f"torchckpt.load(index, workers={w})", res[f"workers={w}"], res[first]) for w in pools[1:]]
                    + [("safetensors load_file + clone, shard by shard", res["safetensors.load_file per shard"],
                        res[first]),
                       ("torchckpt.load(index, mmap=True) (not read yet)", res["mmap=True (nothing read yet)"],
                        res[first])], size_mib=args.size_mib)
        if dcp_dir is not None:
            base = res[f"dcp workers={pools[0]}"]
            print_table(f"DCP directory ({args.shards} data files), mmap=False",
                        [(f"torchckpt.load(dcp, workers={pools[0]})            [baseline]", base, None)]
                        + [(f"torchckpt.load(dcp, workers={w})", res[f"dcp workers={w}"], base) for w in pools[1:]]
                        + [("dcp.load into tensors allocated from .metadata", res["dcp.load"], base)]
                        + [(f"I/O alone: preadv of the data files, {w} thread(s), no parsing", res[f"io workers={w}"],
                            base) for w in pools], size_mib=args.size_mib)
        for w in pools[1:]:
            for label, key in (("index", "workers="), ("dcp", "dcp workers="), ("I/O alone (the ceiling)", "io workers=")):
                one, many = res.get(f"{key}{pools[0]}", {}), res.get(f"{key}{w}", {})
                if "seconds" in one and "seconds" in many and many.get("cpu"):
                    print(f"{label}: {w} threads {one['seconds'] / many['seconds']:.2f}x faster than {pools[0]}; "
                          f"the read used {many['cpu'] / many['seconds']:.2f} cores on average (cpu s / wall s)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
