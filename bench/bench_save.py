"""Benchmark: torchckpt.save (atomic, durable, content digest) vs torch.save + fsync, and async blocking time.

    python bench/bench_save.py [--size-mib 1024] [--repeats 5] [--threads 1]

Targets (issue 14): torchckpt.save and sync Checkpointer.save <= 1.1x of torch.save + fsync (the
durable baseline); async Checkpointer.save blocks <= 0.1x of a sync save (dcp.async_save, the
baseline a user has, is in the same run). The model is zero-filled (content does not change the cost
of an uncompressed write) so that setting up each fresh process is quick.
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
model = model_like(transformer_state_dict({args.size_mib}, device="meta"))
import torchckpt.train.checkpointer, torchckpt.read.formats.torch_zip  # imports are not the save
opt = None
folder = {folder!r}
shutil.rmtree(folder, ignore_errors=True)
os.makedirs(folder)
os.sync()  # every case starts without dirty pages left by the previous one
base = reset_peak()  # peak RSS is measured above the process with its model


def save_fsync(name):  # the baseline a user has: torch.save, then fsync ("wb" truncates an existing file)
    with open(os.path.join(folder, name), "wb") as fh:
        torch.save({{"model": model.state_dict(), "step": 1}}, fh)
        fh.flush(); os.fsync(fh.fileno())
"""
    r = args.repeats
    plain = measure(setup + """
t0 = time.perf_counter()
torch.save({"model": model.state_dict(), "step": 1}, os.path.join(folder, "plain.pt"))
result = time.perf_counter() - t0
""", r)
    plain_fsync = measure(setup + """
t0 = time.perf_counter()
save_fsync("plain2.pt")
result = time.perf_counter() - t0
""", r)
    plain_overwrite = measure(setup + """
save_fsync("last.pt")
os.sync()
t0 = time.perf_counter()
save_fsync("last.pt")
result = time.perf_counter() - t0
""", r)
    plain_retention = measure(setup + """
save_fsync("step1.pt")
os.sync()
t0 = time.perf_counter()
save_fsync("step2.pt")
os.remove(os.path.join(folder, "step1.pt"))  # keep the last one
result = time.perf_counter() - t0
""", r)
    ours = measure(setup + """
t0 = time.perf_counter()
torchckpt.save(os.path.join(folder, "ours.pt"), model=model, step=1)
result = time.perf_counter() - t0
""", r)
    ours_overwrite = measure(setup + """
torchckpt.save(os.path.join(folder, "last.pt"), model=model, step=1)
os.sync()
t0 = time.perf_counter()
torchckpt.save(os.path.join(folder, "last.pt"), model=model, step=2)
result = time.perf_counter() - t0
""", r)
    ckpt_sync = measure(setup + """
ck = torchckpt.Checkpointer(os.path.join(folder, "sync"), keep_last=1)
t0 = time.perf_counter()
ck.save(1, model=model)
result = time.perf_counter() - t0
""", r)
    ckpt_sync_steady = measure(setup + """
ck = torchckpt.Checkpointer(os.path.join(folder, "sync"), keep_last=1)
ck.save(1, model=model)
os.sync()
t0 = time.perf_counter()
ck.save(2, model=model)  # and retention removes step 1
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
    dcp_async = measure(setup + """
import torch.distributed.checkpoint as dcp, warnings
warnings.simplefilter("ignore")
sd = model.state_dict()
dcp.async_save(sd, checkpoint_id=os.path.join(folder, "dcp1")).result()  # later saves, as for ours
t0 = time.perf_counter()
fut = dcp.async_save(sd, checkpoint_id=os.path.join(folder, "dcp2"))
result = time.perf_counter() - t0
fut.result()
""", r)
    print(f"model of ~{args.size_mib} MiB; medians of {r} fresh processes; threads: {args.threads or 'default'}")
    print_table("durable save", [
        ("torch.save(obj, path) (not durable)", plain, plain_fsync),
        ("torch.save + fsync                             [baseline]", plain_fsync, None),
        ("torchckpt.save (temp, writeback, fsync, rename, sidecar)", ours, plain_fsync),
        ("torch.save + fsync, overwriting the file   [baseline 2]", plain_overwrite, None),
        ("torchckpt.save, overwriting the file (vs baseline 2)", ours_overwrite, plain_overwrite),
        ("Checkpointer.save, sync", ckpt_sync, plain_fsync),
        ("torch.save + fsync, then remove the previous [baseline 3]", plain_retention, None),
        ("Checkpointer.save, sync, later saves + retention (vs 3)", ckpt_sync_steady, plain_retention),
    ])
    print_table("async save: time the training loop is blocked", [
        ("Checkpointer.save, sync                        [baseline]", ckpt_sync, None),
        ("Checkpointer.save, async, first save (blocking part)", ckpt_async, ckpt_sync),
        ("Checkpointer.save, async, later saves (blocking part)", ckpt_async_steady, ckpt_sync),
        ("dcp.async_save, later saves (blocking part)", dcp_async, ckpt_sync),
    ])
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
