"""Benchmark: torchckpt.load_into against what a user would write, for every format and model device.

    python bench/bench_load_into.py [--size-mib 1024] [--repeats 5] [--threads 1] [--groups "meta safetensors"]

Every case runs in a fresh process, and the runs of each baseline alternate with those of its cases. Peak
RSS is measured from the moment the model exists (built on the CPU, or on ``meta``) until the load is
done, so "x size" is the extra memory as a multiple of the checkpoint: ~0 when tensors are copied into an allocated model and their file pages released, ~1 for a
model placed from ``meta`` (the model itself). Rows on ``meta`` touch every page of every parameter
after loading (mapped data is read lazily; the time includes reading it once).

Targets (issue 14): zip <= 1.05x of mmap + load_state_dict at ~0.02x memory; meta <= 1.1x of
torch.load(mmap=True) + load_state_dict(assign=True) with peak <= 1.05x; safetensors peak <= 0.05x.
Issue 22: on ``meta`` the default reads each tensor into its own memory (the model never maps the file),
so its baseline is torch.load() + load_state_dict(assign=True); peak <= 1.05x of the checkpoint.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from common import bench_args, measure_alternated, print_table, transformer_state_dict

TOUCH = """
for p in model.parameters():  # read every page once (4 KiB = 1024 fp32 values)
    float(p.detach().reshape(-1)[::1024].sum())
"""


def main() -> None:
    def extra(ap):  # noqa: ANN001
        ap.add_argument("--groups", default="zip legacy meta mmap safetensors",
                        help="which baselines and their cases to run (space separated)")

    args = bench_args(__doc__, extra=extra)
    import torch
    from safetensors.torch import save_file

    folder = tempfile.mkdtemp(prefix="torchckpt-bench-", dir=args.dir)
    sd = transformer_state_dict(args.size_mib)
    files = {"zip": os.path.join(folder, "model.pt"), "legacy": os.path.join(folder, "model_legacy.pth"),
             "st": os.path.join(folder, "model.safetensors")}
    torch.save(sd, files["zip"])
    torch.save(sd, files["legacy"], _use_new_zipfile_serialization=False)
    save_file(sd, files["st"])
    size_mib = os.path.getsize(files["zip"]) / 2**20
    print(f"checkpoint: {len(sd)} tensors, {size_mib:.0f} MiB; medians of {args.repeats} fresh processes; "
          f"threads: {args.threads or 'default'}; torch {torch.__version__}")
    del sd

    def case(expr: str, device: str = "cpu", touch: bool = False) -> str:
        return f"""
from common import model_like
import torch
shapes = torch.load({files['zip']!r}, map_location="meta", weights_only=True, mmap=True)
with torch.device({device!r}):
    model = model_like(shapes)
del shapes
import safetensors.torch, torchckpt.fit.load_into, torchckpt.read.formats.torch_zip  # imports are not the load
import torchckpt.read.formats.torch_legacy, torchckpt.read.formats.simple, torchckpt.read.unpickle.machine
torchckpt.load_into  # the facade imports the module behind it on first use (train.runs_load_into)
base = reset_peak()  # the model exists (allocated, or on meta)
t0 = time.perf_counter()
{expr}
{TOUCH if touch else ''}
result = time.perf_counter() - t0
assert float(model.get_submodule("layers.0.attn.q").weight.abs().sum()) > 0
"""

    f = files
    # Each baseline and its cases alternate (base, a, b, base, a, b, ...): on a shared or VM machine, load and
    # the host taking free memory back change over minutes, and cases timed in blocks met different machines.
    groups = {
        "zip": [("zip: model.load_state_dict(torch.load(f, mmap=True)) [base]",
                 f"model.load_state_dict(torch.load({f['zip']!r}, mmap=True, weights_only=True))", "cpu"),
                ("zip: torchckpt.load_into(model, f)", f"torchckpt.load_into(model, {f['zip']!r})", "cpu"),
                ("zip: model.load_state_dict(torch.load(f))", f"model.load_state_dict(torch.load({f['zip']!r}))", "cpu")],
        "legacy": [("legacy: model.load_state_dict(torch.load(f))   [base]",
                    f"model.load_state_dict(torch.load({f['legacy']!r}))", "cpu"),
                   ("legacy: torchckpt.load_into(model, f)", f"torchckpt.load_into(model, {f['legacy']!r})", "cpu")],
        "meta": [("meta: load_state_dict(torch.load(f), assign)  [base]",
                  f"model.load_state_dict(torch.load({f['zip']!r}, weights_only=True), assign=True)", "meta"),
                 ("meta: torchckpt.load_into(meta_model, zip)", f"torchckpt.load_into(model, {f['zip']!r})", "meta"),
                 ("meta: torchckpt.load_into(meta_model, legacy)", f"torchckpt.load_into(model, {f['legacy']!r})", "meta"),
                 ("meta: torchckpt.load_into(meta_model, safetensors)", f"torchckpt.load_into(model, {f['st']!r})",
                  "meta")],
        "mmap": [("mmap: load_state_dict(torch.load(mmap), assign) [base]",
                  f"model.load_state_dict(torch.load({f['zip']!r}, mmap=True, weights_only=True), assign=True)", "meta"),
                 ("mmap: torchckpt.load_into(meta_model, zip, mmap=True)",
                  f"torchckpt.load_into(model, {f['zip']!r}, mmap=True)", "meta")],
        "safetensors": [("safetensors: safetensors.torch.load_model(model, f) [base]",
                         f"import safetensors.torch; safetensors.torch.load_model(model, {f['st']!r})", "cpu"),
                        ("safetensors: torchckpt.load_into(model, f)", f"torchckpt.load_into(model, {f['st']!r})", "cpu")],
    }
    table = []
    for group, cases in groups.items():
        if group not in args.groups.split():
            continue
        print(f"  {group}:", file=sys.stderr, flush=True)
        res = measure_alternated({label: case(expr, device, device == "meta") for label, expr, device in cases},
                                 args.repeats)
        base = res[cases[0][0]]
        table += [(label, res[label], None if "[base]" in label else base) for label, _, _ in cases]
    print_table("load a checkpoint into a model (peak: above the process with its model)", table, size_mib)
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
