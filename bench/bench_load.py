"""Benchmark for torchckpt.load and torchckpt inspect against torch.load, on a ~1 GiB checkpoint.

    python bench/bench_load.py [--size-mib 1024] [--repeats 3] [--dir /tmp]

Prints median seconds, the ratio to the baseline row above it and peak RSS above the process
baseline. Targets (issue 2): zip load within 1.1x of torch.load(mmap=True); legacy and
Python-2 files no slower than torch.load; inspect under 0.5 s. Issue 22: the default reads into
memory (like torch.load), peak RSS <= 1.0x of torch.load's; mmap=True maps like torch.load(mmap=True).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from common import bench_args, measure, measure_alternated, print_table, transformer_state_dict


def main() -> None:
    args = bench_args(__doc__)

    import torch

    from torchckpt.demo.samples import write_py2_legacy

    folder = tempfile.mkdtemp(prefix="torchckpt-bench-", dir=args.dir)
    sd = transformer_state_dict(args.size_mib)
    files = {"zip": os.path.join(folder, "model.pt"), "legacy": os.path.join(folder, "model_legacy.pth"),
             "py2": os.path.join(folder, "model_py2.pth")}
    torch.save(sd, files["zip"])
    torch.save(sd, files["legacy"], _use_new_zipfile_serialization=False)
    write_py2_legacy(sd, files["py2"])
    n = len(sd)
    size = os.path.getsize(files["zip"]) / 2**20
    del sd
    print(f"checkpoint: {n} tensors, {size:.0f} MiB; medians of {args.repeats} fresh processes; "
          f"torch {torch.__version__}")

    def load(expr: str, touch: bool = False) -> str:
        touch_code = "\n    s = sum(float(t.view(-1)[-1]) for t in obj.values())" if touch else ""
        return f"""
t0 = time.perf_counter()
obj = {expr}{touch_code.replace(chr(10) + '    ', chr(10))}
result = time.perf_counter() - t0
"""

    r = args.repeats
    zip_mmap = measure(load(f"torch.load({files['zip']!r}, mmap=True, weights_only=True)"), r)
    ours_zip = measure(load(f"torchckpt.load({files['zip']!r}, mmap=True)"), r)
    warm = f"""
torchckpt.load({files['zip']!r}); torch.load({files['zip']!r}, mmap=True, weights_only=True)  # imports done
"""
    # the default (read into memory) against torch.load, runs alternated: first call and warm process
    # (imports done, the peak RSS measured from there)
    read_in = measure_alternated({
        "torch": load(f"torch.load({files['zip']!r}, weights_only=True)"),
        "ours": load(f"torchckpt.load({files['zip']!r})"),
        "torch_warm": warm + "base = reset_peak()" + load(f"torch.load({files['zip']!r}, weights_only=True)"),
        "ours_warm": warm + "base = reset_peak()" + load(f"torchckpt.load({files['zip']!r})")}, r)
    zip_wo, ours_zip_default = read_in["torch"], read_in["ours"]
    zip_mmap_warm = measure(warm + load(f"torch.load({files['zip']!r}, mmap=True, weights_only=True)"), r)
    ours_zip_warm = measure(warm + load(f"torchckpt.load({files['zip']!r}, mmap=True)"), r)
    leg_torch = measure(load(f"torch.load({files['legacy']!r}, weights_only=True)"), r)
    ours_leg = measure(load(f"torchckpt.load({files['legacy']!r})"), r)
    ours_py2 = measure(load(f"torchckpt.load({files['py2']!r})"), r)
    touched_torch = measure(load(f"torch.load({files['zip']!r}, mmap=True, weights_only=True)", touch=True), r)
    touched_ours = measure(load(f"torchckpt.load({files['zip']!r}, mmap=True)", touch=True), r)
    print_table("zip format (torch >= 1.6)", [
        ("torch.load(weights_only=True)               [baseline]", zip_wo, None),
        ("torchckpt.load (default: read into memory)", ours_zip_default, zip_wo),
        ("torch.load(weights_only=True), warm process [baseline]", read_in["torch_warm"], None),
        ("torchckpt.load (default), warm process (modules imported)", read_in["ours_warm"], read_in["torch_warm"]),
        ("torch.load(mmap=True, weights_only=True)   [baseline]", zip_mmap, None),
        ("torchckpt.load(mmap=True), first call in process", ours_zip, zip_mmap),
        ("torch.load(mmap=True), warm process          [baseline]", zip_mmap_warm, None),
        ("torchckpt.load(mmap=True), warm process (modules imported)", ours_zip_warm, zip_mmap_warm),
        ("torch.load(mmap=True) + read one value per tensor [base]", touched_torch, None),
        ("torchckpt.load(mmap=True) + read one value per tensor", touched_ours, touched_torch),
    ], size)
    print_table("legacy stream format and Python 2 files", [
        ("torch.load(weights_only=True) legacy       [baseline]", leg_torch, None),
        ("torchckpt.load legacy", ours_leg, leg_torch),
        ("torchckpt.load Python 2 file (torch.load cannot)", ours_py2, leg_torch),
    ])
    api = {k: measure(f"""
t0 = time.perf_counter()
rep = torchckpt.inspect({path!r})
result = time.perf_counter() - t0
""", r) for k, path in files.items()}
    cli = {}
    for k, path in files.items():
        times = []
        for _ in range(r):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "torchckpt", "inspect", "--json", path], check=True,
                           capture_output=True)
            times.append(time.perf_counter() - t0)
        cli[k] = {"seconds": sorted(times)[len(times) // 2], "peak_mib": float("nan")}
    print_table("inspect (no tensor data read; target < 0.5 s)", [
        *((f"torchckpt.inspect() {k}", v, None) for k, v in api.items()),
        *((f"`torchckpt inspect --json` {k} (whole process)", v, None) for k, v in cli.items()),
    ])
    for path in files.values():
        os.remove(path)
    os.rmdir(folder)


if __name__ == "__main__":
    main()
