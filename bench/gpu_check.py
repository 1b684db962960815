"""GPU check: load_into onto CUDA from every format (correctness + timings), and async save from CUDA.

    python bench/gpu_check.py [--size-mib 1024] [--repeats 3]

Run on a machine with a CUDA GPU. For zip, legacy and safetensors it loads the same checkpoint into
(a) a model allocated on cuda and (b) a model built on meta with map_location="cuda", checks every
tensor bit for bit against the source, and prints median seconds against the baseline a user would
write (torch.load(map_location="cuda") + load_state_dict; safetensors.torch.load_model(device="cuda")).
Then it times an async Checkpointer.save of the CUDA model (the blocking part: pinned, reused buffers,
asynchronous device-to-host copies) against a sync save, and checks the file it wrote.
Exit status 0 when every check passes, 1 otherwise. Timings are in-process (warm), medians of --repeats.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import bench_args, model_like, transformer_state_dict  # noqa: E402


def main() -> int:
    args = bench_args(__doc__)
    import torch
    from safetensors.torch import load_model, save_file

    import torchckpt

    dev = torch.device(os.environ.get("GPU_CHECK_DEVICE", "cuda"))  # "cpu": a dry run of this script itself
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (dry run)"
    print(f"{name}; torch {torch.__version__}; {args.size_mib} MiB; "
          f"medians of {args.repeats}")
    folder = tempfile.mkdtemp(prefix="torchckpt-gpu-", dir=args.dir)
    sd = transformer_state_dict(args.size_mib)
    sd["layers.0.ln.scale16"] = torch.randn(1024).half()  # a cast on the way (model holds fp32)
    files = {"zip": os.path.join(folder, "m.pt"), "legacy": os.path.join(folder, "m.pth"),
             "safetensors": os.path.join(folder, "m.safetensors")}
    torch.save(sd, files["zip"])
    torch.save(sd, files["legacy"], _use_new_zipfile_serialization=False)
    save_file(sd, files["safetensors"])
    reference = {k: v.float() for k, v in sd.items()}
    shapes = {k: torch.empty(v.shape, dtype=torch.float32, device="meta") for k, v in sd.items()}
    del sd
    failures: list[str] = []

    def check(model: torch.nn.Module, what: str) -> None:
        got = model.state_dict()
        for k, want in reference.items():
            t = got[k]
            if t.device.type != dev.type or t.dtype != torch.float32 or not torch.equal(t.cpu(), want):
                failures.append(f"{what}: {k} differs ({t.device}, {t.dtype})")
                return

    def timed(fn, prepare) -> float:
        times = []
        for _ in range(args.repeats):
            model = prepare()
            sync()
            t0 = time.perf_counter()
            fn(model)
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def on_cuda():
        with torch.device(dev):
            return model_like(shapes)

    def on_meta():
        with torch.device("meta"):
            return model_like(shapes)

    rows = []
    for fmt, path in files.items():
        if fmt == "safetensors":
            base = timed(lambda m: load_model(m, path, strict=False, device=str(dev)), on_cuda)
            base_label = "safetensors.torch.load_model(model, f, device='cuda')"
        else:
            base = timed(lambda m: m.load_state_dict(torch.load(path, map_location=dev, weights_only=True)),
                         on_cuda)
            base_label = "model.load_state_dict(torch.load(f, map_location='cuda'))"
        model = on_cuda()
        torchckpt.load_into(model, path)
        check(model, f"{fmt} -> cuda model")
        model = on_meta()
        torchckpt.load_into(model, path, map_location=dev)
        check(model, f"{fmt} -> meta model, map_location=cuda")
        ours = timed(lambda m: torchckpt.load_into(m, path), on_cuda)
        ours_meta = timed(lambda m: torchckpt.load_into(m, path, map_location=dev), on_meta)
        rows += [(f"{fmt}: {base_label} [base]", base, base), (f"{fmt}: torchckpt.load_into(cuda_model, f)", ours, base),
                 (f"{fmt}: torchckpt.load_into(meta_model, f, map_location='cuda')", ours_meta, base)]

    # async save from CUDA: the blocking part against a sync save
    model = on_cuda()
    torchckpt.load_into(model, files["zip"])
    sync_dir, async_dir = os.path.join(folder, "sync"), os.path.join(folder, "async")
    ck = torchckpt.Checkpointer(sync_dir, keep_last=1)
    sync_times = []
    for step in range(args.repeats):
        t0 = time.perf_counter()
        ck.save(step, model=model)
        sync_times.append(time.perf_counter() - t0)
    ck = torchckpt.Checkpointer(async_dir, keep_last=1, async_save=True)
    ck.save(0, model=model)
    ck.wait()
    block = []
    for step in range(1, args.repeats + 1):
        t0 = time.perf_counter()
        ck.save(step, model=model)
        block.append(time.perf_counter() - t0)
        with torch.no_grad():  # training goes on: the snapshot must not see this
            next(model.parameters()).add_(1.0)
        ck.wait()
    ck.close()
    saved = torchckpt.load(ck.latest().path)["model"]
    first = next(iter(reference))
    expected = reference[first].clone()
    for _ in range(args.repeats - 1):
        expected.add_(1.0)
    if not torch.equal(saved[first].cpu(), expected):
        failures.append("async save from cuda: the snapshot saw a later update (or missed an earlier one)")
    sync_s = statistics.median(sync_times)
    rows += [("Checkpointer.save, sync, cuda model [base]", sync_s, sync_s),
             ("Checkpointer.save, async, cuda model (blocking part, steady)", statistics.median(block), sync_s)]

    print(f"\n{'case':72s} {'median s':>9s} {'ratio':>7s}")
    for label, s, base in rows:
        print(f"{label:72s} {s:9.3f} {s / base:6.2f}x")
    shutil.rmtree(folder, ignore_errors=True)
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
