"""Benchmark: convert a ~1 GiB legacy checkpoint to safetensors.

    python bench/bench_convert.py [--size-mib 1024] [--repeats 5] [--threads 1]

Baseline: safetensors.torch.save_file(torch.load(src)) (not durable, not verified). Target (issue 14):
time <= 1.0x of the baseline with peak RSS well under it (issue 5: under 0.3x). torchckpt.convert
writes durably (fsync) and verifies every tensor bit for bit; its time includes both.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from common import bench_args, measure, print_table, transformer_state_dict


def main() -> None:
    args = bench_args(__doc__)
    import torch

    folder = tempfile.mkdtemp(prefix="torchckpt-bench-", dir=args.dir)
    src = os.path.join(folder, "legacy.pth")
    sd = transformer_state_dict(args.size_mib)
    torch.save(sd, src, _use_new_zipfile_serialization=False)
    print(f"legacy checkpoint: {len(sd)} tensors, {os.path.getsize(src) / 2**20:.0f} MiB; "
          f"medians of {args.repeats} fresh processes; threads: {args.threads or 'default'}")
    del sd
    dst = os.path.join(folder, "out.safetensors")
    r = args.repeats
    base = measure(f"""
from safetensors.torch import save_file
base = reset_peak()
t0 = time.perf_counter()
save_file(torch.load({src!r}), {dst!r})
result = time.perf_counter() - t0
""", r)
    durable = measure(f"""
from safetensors.torch import save_file
base = reset_peak()
t0 = time.perf_counter()
save_file(torch.load({src!r}), {dst!r})
fd = os.open({dst!r}, os.O_RDONLY); os.fsync(fd); os.close(fd)
result = time.perf_counter() - t0
""", r)
    ours = measure(f"""
import torchckpt.tools.convert, torchckpt.read.formats.torch_legacy  # imports are not the conversion
base = reset_peak()
t0 = time.perf_counter()
torchckpt.convert({src!r}, {dst!r})
result = time.perf_counter() - t0
""", r)
    print_table("legacy .pth -> .safetensors (peak: above the fresh process)", [
        ("safetensors.save_file(torch.load(src))         [baseline]", base, None),
        ("save_file(torch.load(src)) + fsync (durable, for reference)", durable, base),
        ("torchckpt.convert(src, dst) (streamed, durable, verified)", ours, base),
    ], os.path.getsize(src) / 2**20)
    if "peak_mib" in base and "peak_mib" in ours:
        print(f"  peak RSS ratio (torchckpt / baseline): {ours['peak_mib'] / base['peak_mib']:.2f}x")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
