"""Benchmark: convert a ~1 GiB legacy checkpoint to safetensors.

    python bench/bench_convert.py [--size-mib 1024] [--repeats 3]

Baseline: safetensors.torch.save_file(torch.load(src)). Target (issue 5): peak RSS under 0.3x of the
baseline's, time no slower. torchckpt.convert also reloads and verifies every tensor; its time includes that.
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
          f"medians of {args.repeats} fresh processes")
    del sd
    dst = os.path.join(folder, "out.safetensors")
    r = args.repeats
    base = measure(f"""
from safetensors.torch import save_file
t0 = time.perf_counter()
save_file(torch.load({src!r}), {dst!r})
result = time.perf_counter() - t0
""", r)
    ours = measure(f"""
t0 = time.perf_counter()
torchckpt.convert({src!r}, {dst!r})
result = time.perf_counter() - t0
""", r)
    print_table("legacy .pth -> .safetensors", [
        ("safetensors.save_file(torch.load(src))         [baseline]", base, None),
        ("torchckpt.convert(src, dst) (streamed, verified)", ours, base),
    ])
    if "peak_mib" in base and "peak_mib" in ours:
        print(f"  peak RSS ratio (torchckpt / baseline): {ours['peak_mib'] / base['peak_mib']:.2f}x")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
