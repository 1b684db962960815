"""Benchmark: torchckpt.load_into vs model.load_state_dict(torch.load(f)) on a ~1 GiB checkpoint.

    python bench/bench_load_into.py [--size-mib 1024] [--repeats 3]

Peak RSS is measured above the process baseline taken before the model is built, so the model itself
counts 1x. Target (issue 3): at most 1.2x the checkpoint size (the naive path is about 2x), time no
slower than the naive path.
"""

from __future__ import annotations

import os
import tempfile

from common import bench_args, measure, print_table, transformer_state_dict


def main() -> None:
    args = bench_args(__doc__)
    import torch

    folder = tempfile.mkdtemp(prefix="torchckpt-bench-", dir=args.dir)
    sd = transformer_state_dict(args.size_mib)
    path = os.path.join(folder, "model.pt")
    legacy = os.path.join(folder, "model_legacy.pth")
    torch.save(sd, path)
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    size_mib = os.path.getsize(path) / 2**20
    print(f"checkpoint: {len(sd)} tensors, {size_mib:.0f} MiB; medians of {args.repeats} fresh processes")
    del sd

    def case(expr: str, file: str) -> str:
        return f"""
from common import model_like, transformer_state_dict
import torch
sd_shapes = torch.load({path!r}, map_location="meta", weights_only=True, mmap=True)
base = current_mib()  # baseline: before the model exists
model = model_like(sd_shapes)
del sd_shapes
t0 = time.perf_counter()
{expr}
result = time.perf_counter() - t0
assert float(model.get_submodule("layers.0.attn.q").weight.abs().sum()) > 0
"""

    r = args.repeats
    naive = measure(case(f"model.load_state_dict(torch.load({path!r}))", path), r)
    naive_mmap = measure(case(f"model.load_state_dict(torch.load({path!r}, mmap=True))", path), r)
    ours = measure(case(f"torchckpt.load_into(model, {path!r})", path), r)
    naive_legacy = measure(case(f"model.load_state_dict(torch.load({legacy!r}))", legacy), r)
    ours_legacy = measure(case(f"torchckpt.load_into(model, {legacy!r})", legacy), r)
    print_table("load a checkpoint into a model (peak RSS includes the model itself)", [
        ("model.load_state_dict(torch.load(f))            [baseline]", naive, None),
        ("model.load_state_dict(torch.load(f, mmap=True))", naive_mmap, naive),
        ("torchckpt.load_into(model, f)", ours, naive),
        ("legacy: model.load_state_dict(torch.load(f))    [baseline]", naive_legacy, None),
        ("legacy: torchckpt.load_into(model, f)", ours_legacy, naive_legacy),
    ])
    for label, res in (("naive", naive), ("naive mmap", naive_mmap), ("torchckpt", ours),
                       ("legacy naive", naive_legacy), ("legacy torchckpt", ours_legacy)):
        if "peak_mib" in res:
            print(f"  peak RSS / checkpoint size, {label}: {res['peak_mib'] / size_mib:.2f}x")
    for f in (path, legacy):
        os.remove(f)
    os.rmdir(folder)


if __name__ == "__main__":
    main()
