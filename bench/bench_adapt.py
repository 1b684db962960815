"""Benchmark: load_into with a layout change (q, k, v fused into qkv while streaming) against what a user
writes by hand (torch.load(mmap=True), torch.cat per layer, load_state_dict), in fresh processes.

    python bench/bench_adapt.py [--size-mib 512] [--repeats 3]

Peak RSS is measured from the moment the (fused) model exists: "x size" is the extra memory as a multiple
of the checkpoint. Streaming keeps one fused tensor at a time; the hand-written way builds every fused
tensor before loading.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections import OrderedDict

from common import bench_args, measure_alternated, print_table, transformer_state_dict


def main() -> None:
    args = bench_args(__doc__, size_mib=512)
    import torch

    folder = tempfile.mkdtemp(prefix="torchckpt-bench-", dir=args.dir)
    try:
        sd = transformer_state_dict(args.size_mib)
        path = os.path.join(folder, "split.pt")
        torch.save(sd, path)
        fused = OrderedDict()
        for k, v in sd.items():
            m = re.match(r"(layers\.\d+\.attn)\.(q|k|v)\.(weight|bias)$", k)
            if m is None:
                fused[k] = v
            elif m.group(2) == "q":
                fused[f"{m.group(1)}.qkv.{m.group(3)}"] = torch.empty((3 * v.shape[0],) + tuple(v.shape[1:]))
        shapes_path = os.path.join(folder, "fused_shapes.pt")
        torch.save({k: torch.empty(v.shape, device="meta") for k, v in fused.items()}, shapes_path)
        size_mib = os.path.getsize(path) / 2**20
        del sd, fused
        setup = f"""
from common import model_like
import re, torch
model = model_like(torch.load({shapes_path!r}, map_location="meta", weights_only=True))
import torchckpt.fit.load_into
base = reset_peak()
t0 = time.perf_counter()
"""
        done = """
result = time.perf_counter() - t0
assert float(model.get_submodule("layers.0.attn.qkv").weight.abs().sum()) > 0
"""
        by_hand = setup + f"""
sd = torch.load({path!r}, mmap=True, weights_only=True)
out = {{}}
for k, v in sd.items():
    m = re.match(r"(layers\\.\\d+\\.attn)\\.(q|k|v)\\.(weight|bias)$", k)
    if m is None:
        out[k] = v
    elif m.group(2) == "q":
        p, leaf = m.group(1), m.group(3)
        out[f"{{p}}.qkv.{{leaf}}"] = torch.cat([sd[f"{{p}}.{{n}}.{{leaf}}"] for n in "qkv"])
model.load_state_dict(out)
del sd, out
""" + done
        ours = setup + f"""
torchckpt.load_into(model, {path!r}, rename={{(r"\\.q\\.", r"\\.k\\.", r"\\.v\\."): ".qkv."}})
""" + done
        res = measure_alternated({"hand": by_hand, "ours": ours}, args.repeats)
        print(f"checkpoint: {size_mib:.0f} MiB (q, k, v per layer -> qkv); medians of {args.repeats} fresh processes")
        print_table("fuse while loading", [
            ("by hand: torch.load(mmap) + torch.cat + load_state_dict [base]", res["hand"], None),
            ("torchckpt.load_into(model, f, rename={(q, k, v): qkv})", res["ours"], res["hand"])], size_mib)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
