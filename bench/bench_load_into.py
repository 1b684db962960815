"""Benchmark: torchckpt.load_into against what a user would write, for every format and model device.

    python bench/bench_load_into.py [--size-mib 1024] [--repeats 5] [--threads 1]

Every case runs in a fresh process. Peak RSS is measured from the moment the model exists (built on
the CPU, or on ``meta``) until the load is done, so "x size" is the extra memory as a multiple of the
checkpoint: ~0 when tensors are copied into an allocated model and their file pages released, ~1 for a
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
import tempfile

from common import bench_args, measure, print_table, transformer_state_dict

TOUCH = """
for p in model.parameters():  # read every page once (4 KiB = 1024 fp32 values)
    float(p.detach().reshape(-1)[::1024].sum())
"""


def main() -> None:
    args = bench_args(__doc__)
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
base = reset_peak()  # the model exists (allocated, or on meta)
t0 = time.perf_counter()
{expr}
{TOUCH if touch else ''}
result = time.perf_counter() - t0
assert float(model.get_submodule("layers.0.attn.q").weight.abs().sum()) > 0
"""

    r, f = args.repeats, files
    m = lambda expr, device="cpu", touch=False: measure(case(expr, device, touch), r)  # noqa: E731
    rows = [
        ("zip: model.load_state_dict(torch.load(f, mmap=True)) [base]",
         m(f"model.load_state_dict(torch.load({f['zip']!r}, mmap=True, weights_only=True))")),
        ("zip: torchckpt.load_into(model, f)", m(f"torchckpt.load_into(model, {f['zip']!r})")),
        ("zip: model.load_state_dict(torch.load(f))", m(f"model.load_state_dict(torch.load({f['zip']!r}))")),
        ("legacy: model.load_state_dict(torch.load(f))   [base]",
         m(f"model.load_state_dict(torch.load({f['legacy']!r}))")),
        ("legacy: torchckpt.load_into(model, f)", m(f"torchckpt.load_into(model, {f['legacy']!r})")),
        ("meta: load_state_dict(torch.load(f), assign)  [base]",
         m(f"model.load_state_dict(torch.load({f['zip']!r}, weights_only=True), assign=True)", "meta", True)),
        ("meta: torchckpt.load_into(meta_model, zip)", m(f"torchckpt.load_into(model, {f['zip']!r})", "meta", True)),
        ("mmap: load_state_dict(torch.load(mmap), assign) [base]",
         m(f"model.load_state_dict(torch.load({f['zip']!r}, mmap=True, weights_only=True), assign=True)",
           "meta", True)),
        ("mmap: torchckpt.load_into(meta_model, zip, mmap=True)",
         m(f"torchckpt.load_into(model, {f['zip']!r}, mmap=True)", "meta", True)),
        ("meta: torchckpt.load_into(meta_model, legacy)",
         m(f"torchckpt.load_into(model, {f['legacy']!r})", "meta", True)),
        ("meta: torchckpt.load_into(meta_model, safetensors)",
         m(f"torchckpt.load_into(model, {f['st']!r})", "meta", True)),
        ("safetensors: safetensors.torch.load_model(model, f) [base]",
         m(f"import safetensors.torch; safetensors.torch.load_model(model, {f['st']!r})")),
        ("safetensors: torchckpt.load_into(model, f)", m(f"torchckpt.load_into(model, {f['st']!r})")),
    ]
    bases = {"zip": rows[0][1], "legacy": rows[3][1], "meta": rows[5][1], "mmap": rows[7][1],
             "safetensors": rows[11][1]}
    print_table("load a checkpoint into a model (peak: above the process with its model)",
                [(label, res, None if "[base]" in label else bases[label.split(":")[0]]) for label, res in rows],
                size_mib)
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
