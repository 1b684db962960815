"""Benchmark: torchckpt.save (atomic + fsync + sha256) vs plain torch.save, and async save blocking time.

    python bench/bench_save.py [--size-mib 1024] [--repeats 3]

Targets (issue 4): durable save within 1.2x of torch.save; async blocking time under 25% of a sync save.
"""

from __future__ import annotations

import tempfile

from common import bench_args, measure, print_table


def main() -> None:
    args = bench_args(__doc__)
    folder = tempfile.mkdtemp(prefix="torchckpt-bench-", dir=args.dir)
    # Cases alternate (plain, ours, plain, ours, ...) in fresh processes, each starting after os.sync().
    setup = f"""
from common import transformer_state_dict, model_like
import os, shutil
sd = transformer_state_dict({args.size_mib})
model = model_like(sd)
del sd
opt = None
folder = {folder!r}
shutil.rmtree(folder, ignore_errors=True)
os.makedirs(folder)
os.sync()  # every case starts without dirty pages left by the previous one
base = reset_peak()  # peak RSS is measured above the process with its model
"""
    r = args.repeats
    plain = measure(setup + """
t0 = time.perf_counter()
torch.save({"model": model.state_dict(), "step": 1}, os.path.join(folder, "plain.pt"))
result = time.perf_counter() - t0
""", r)
    plain_fsync = measure(setup + """
t0 = time.perf_counter()
with open(os.path.join(folder, "plain2.pt"), "wb") as fh:
    torch.save({"model": model.state_dict(), "step": 1}, fh)
    fh.flush(); os.fsync(fh.fileno())
result = time.perf_counter() - t0
""", r)
    ours = measure(setup + """
t0 = time.perf_counter()
torchckpt.save(os.path.join(folder, "ours.pt"), model=model, step=1)
result = time.perf_counter() - t0
""", r)
    ckpt_sync = measure(setup + """
ck = torchckpt.Checkpointer(os.path.join(folder, "sync"), keep_last=1)
t0 = time.perf_counter()
ck.save(1, model=model)
result = time.perf_counter() - t0
""", r)
    ckpt_async = measure(setup + """
ck = torchckpt.Checkpointer(os.path.join(folder, "async"), keep_last=1, async_save=True)
t0 = time.perf_counter()
ck.save(1, model=model)
result = time.perf_counter() - t0
ck.close()
""", r)
    ckpt_async_steady = measure(setup + """
ck = torchckpt.Checkpointer(os.path.join(folder, "async"), keep_last=1, async_save=True)
ck.save(1, model=model)
ck.wait()  # training continues; the next save comes after the previous write finished
t0 = time.perf_counter()
ck.save(2, model=model)
result = time.perf_counter() - t0
ck.close()
""", r)
    print(f"model of ~{args.size_mib} MiB; medians of {r} fresh processes")
    print_table("durable save", [
        ("torch.save(obj, path)                          [baseline]", plain, None),
        ("torch.save + fsync (what durability costs)", plain_fsync, plain),
        ("torchckpt.save (temp, writeback, fsync, rename, sidecar)", ours, plain),
    ])
    print_table("async save: time the training loop is blocked", [
        ("Checkpointer.save, sync                        [baseline]", ckpt_sync, None),
        ("Checkpointer.save, async, first save (blocking part)", ckpt_async, ckpt_sync),
        ("Checkpointer.save, async, later saves (blocking part)", ckpt_async_steady, ckpt_sync),
    ])
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
