"""Benchmark: `torchckpt diff --values` against what a user would write, on two ~N MiB checkpoints.

    python bench/bench_diff.py [--size-mib 1024] [--repeats 5] [--threads 1]

B is A after a small update of every weight matrix (a fine-tuning step), so every tensor differs.
Baselines in the same run, fresh process each: mmap both + ``torch.equal`` per tensor, and the fp32
max-abs pass (mmap both + ``(a - b).abs().max()`` per tensor). Target (issue 14): torchckpt.diff within
1.5x of the fp32 pass, memory bounded by the largest tensor pair. Also: identical files, and a
safetensors pair (which the old diff could not compare at all).
"""

from __future__ import annotations

import os
import shutil
import tempfile

from common import bench_args, measure, print_table, transformer_state_dict


def main() -> None:
    args = bench_args(__doc__)
    import torch
    from safetensors.torch import save_file

    folder = tempfile.mkdtemp(prefix="torchckpt-bench-", dir=args.dir)
    sd = transformer_state_dict(args.size_mib)
    a, b, a_st, b_st = (os.path.join(folder, n) for n in ("a.pt", "b.pt", "a.safetensors", "b.safetensors"))
    torch.save(sd, a)
    save_file(sd, a_st)
    g = torch.Generator().manual_seed(1)
    for k, v in sd.items():
        if v.dim() == 2:
            v.add_(torch.randn(v.shape, generator=g), alpha=1e-4)
    torch.save(sd, b)
    save_file(sd, b_st)
    size_mib = os.path.getsize(a) / 2**20
    largest = max(v.numel() * v.element_size() for v in sd.values()) / 2**20
    print(f"two checkpoints of {len(sd)} tensors, {size_mib:.0f} MiB each (largest tensor {largest:.0f} MiB); "
          f"medians of {args.repeats} fresh processes; threads: {args.threads or 'default'}")
    del sd
    r = args.repeats
    warm = "import torchckpt.tools.diffing, torchckpt.read.formats.torch_zip, torchckpt.read.formats.simple\n"

    def baseline(op: str) -> str:
        return warm + f"""
base = reset_peak()
t0 = time.perf_counter()
x = torch.load({a!r}, mmap=True, weights_only=True)
y = torch.load({b!r}, mmap=True, weights_only=True)
out = [{op} for k in x]
result = time.perf_counter() - t0
"""

    def ours(p: str, q: str) -> str:
        return warm + f"""
base = reset_peak()
t0 = time.perf_counter()
rep = torchckpt.diff({p!r}, {q!r}, values=True)
result = time.perf_counter() - t0
"""

    equal = measure(baseline("torch.equal(x[k], y[k])"), r)
    maxabs = measure(baseline("float((x[k] - y[k]).abs().max())"), r)
    rows = [
        ("mmap + torch.equal per tensor                       [base]", equal, None),
        ("fp32 max-abs pass: mmap + (a - b).abs().max()      [base]", maxabs, None),
        ("torchckpt.diff(a, b, values=True), zip", measure(ours(a, b), r), maxabs),
        ("torchckpt.diff(a, a, values=True), identical", measure(ours(a, a), r), maxabs),
        ("torchckpt.diff(a, b, values=True), safetensors", measure(ours(a_st, b_st), r), maxabs),
        ("torchckpt.diff(a, b, values=True), zip vs safetensors", measure(ours(a, b_st), r), maxabs),
    ]
    print_table("diff --values (peak: above the process before reading)", rows, size_mib)
    print(f"  memory bound: the largest tensor pair is {2 * largest:.0f} MiB")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
