"""Benchmark: torchckpt.save (atomic, durable, content digest) vs torch.save + fsync, and async blocking time.

    python bench/bench_save.py [--size-mib 1024] [--repeats 5] [--threads 1] [--cases all|core|a,b]

Targets (issues 14, 27): torchckpt.save, sync Checkpointer.save and an async Checkpointer.save until
it is durable (save + wait) <= 1.1x of torch.save + fsync (the durable baseline) at 64 MiB, 512 MiB
and 2 GiB; async Checkpointer.save blocks <= 0.1x of a sync save (dcp.async_save, the baseline a user
has, is in the same run). The first async save of a process writes its file in save() (its blocking part is
about half a sync save) and warms the next save's buffers meanwhile: the blocking rows show the first, the
second (at once after wait(), or after 2 s of training) and the third save. The runs of all cases alternate (fresh processes), medians shown. The model is zero-filled (content does not change the cost
of an uncompressed write) so that setting up each fresh process is quick.
"""

from __future__ import annotations

import tempfile

import os

from common import bench_args, measure_alternated, print_table

# --cases: a named set or a comma-separated list of case names
CASE_SETS = {"all": ["plain", "plain_fsync", "ours", "plain_overwrite", "ours_overwrite", "ckpt_sync", "ckpt_async_total",
                     "plain_retention", "ckpt_sync_steady", "ckpt_async", "ckpt_async_steady", "ckpt_async_second",
                     "ckpt_async_third", "dcp_async",
                     "dcp_async_total"],
             "core": ["plain_fsync", "ours", "ckpt_sync", "ckpt_async_total"],
             # the same four at the third save of a process: the steady state of a training run (see LATER)
             "later": ["plain_fsync_later", "ours_later", "ckpt_sync_later", "ckpt_async_total_later"]}
CASE_SETS["all"] += CASE_SETS["later"]

# The "later" cases time the third save of their process, the first two untimed: a training run saves
# many times, and from the third save on every case writes into memory it had before (the snapshot's
# buffers, the page cache of the file that retention or the overwrite just freed). The first save of a
# process also pays for fresh memory: on a VM whose host takes freed memory back (free page reporting)
# that costs up to 10x more than the copy itself, and the case that allocates more (an async snapshot's
# buffers) is then slower by the host's cost, not by the save's (issue 27's note).
LATER = """
t0 = None
for i in range(3):
    if i == 2:
        os.sync()
        t0 = time.perf_counter()
    {save}
result = time.perf_counter() - t0
"""


SECOND = """
ck = torchckpt.Checkpointer(os.path.join(folder, "async"), keep_last=1, async_save=True)
ck.save(1, model=model)
ck.wait()
{between}
t0 = time.perf_counter()
ck.save(2, model=model)
result = time.perf_counter() - t0
ck.close()
"""


def main() -> None:
    def extra(ap):
        ap.add_argument("--cases", default="all", help="'all', 'core' (the issue-27 rows: baseline, save, sync and "
                                                       "async Checkpointer) or a comma-separated list of case names")
        ap.add_argument("--prewarm", type=float, default=0.0, metavar="X",
                        help="before timing, every case's process touches and frees X times the model's size: on a "
                             "VM with free page reporting, memory the host took back costs a host fault per page "
                             "on first touch, and which case meets it depends on its place in the rotation")

    args = bench_args(__doc__, extra=extra)
    folder = tempfile.mkdtemp(prefix="torchckpt-bench-", dir=args.dir)
    # Cases alternate (plain, ours, plain, ours, ...) in fresh processes, each starting after os.sync().
    setup = f"""
from common import transformer_state_dict, model_like
import os, shutil
model = model_like(transformer_state_dict({args.size_mib}, device="meta"))
import torchckpt.train.checkpointer, torchckpt.train.save, torchckpt.read.formats.torch_zip  # imports are not the save
opt = None
folder = {folder!r}
shutil.rmtree(folder, ignore_errors=True)
os.makedirs(folder)
if {args.prewarm}:  # touched and given back: the timed code's fresh pages are warm ones, for every case alike
    warm = torch.ones(int({args.prewarm} * {args.size_mib}) << 18)
    del warm
os.sync()  # every case starts without dirty pages left by the previous one
base = reset_peak()  # peak RSS is measured above the process with its model


GAP = 2.0  # seconds of training between two saves (ckpt_async_second)


def train(seconds):  # stands for the training steps between two saves: one core busy with matrix products
    x, end = torch.randn(256, 256), time.perf_counter() + seconds
    while time.perf_counter() < end:
        x = torch.tanh(x @ x)


def save_fsync(name):  # the baseline a user has: torch.save, then fsync ("wb" truncates an existing file)
    with open(os.path.join(folder, name), "wb") as fh:
        torch.save({{"model": model.state_dict(), "step": 1}}, fh)
        fh.flush(); os.fsync(fh.fileno())
"""
    codes = {
        "plain": """
t0 = time.perf_counter()
torch.save({"model": model.state_dict(), "step": 1}, os.path.join(folder, "plain.pt"))
result = time.perf_counter() - t0
""",
        "plain_fsync": """
t0 = time.perf_counter()
save_fsync("plain2.pt")
result = time.perf_counter() - t0
""",
        "plain_overwrite": """
save_fsync("last.pt")
os.sync()
t0 = time.perf_counter()
save_fsync("last.pt")
result = time.perf_counter() - t0
""",
        "plain_retention": """
save_fsync("step1.pt")
os.sync()
t0 = time.perf_counter()
save_fsync("step2.pt")
os.remove(os.path.join(folder, "step1.pt"))  # keep the last one
result = time.perf_counter() - t0
""",
        "ours": """
t0 = time.perf_counter()
torchckpt.save(os.path.join(folder, "ours.pt"), model=model, step=1)
result = time.perf_counter() - t0
""",
        "ours_overwrite": """
torchckpt.save(os.path.join(folder, "last.pt"), model=model, step=1)
os.sync()
t0 = time.perf_counter()
torchckpt.save(os.path.join(folder, "last.pt"), model=model, step=2)
result = time.perf_counter() - t0
""",
        "ckpt_sync": """
ck = torchckpt.Checkpointer(os.path.join(folder, "sync"), keep_last=1)
t0 = time.perf_counter()
ck.save(1, model=model)
result = time.perf_counter() - t0
""",
        "ckpt_sync_steady": """
ck = torchckpt.Checkpointer(os.path.join(folder, "sync"), keep_last=1)
ck.save(1, model=model)
os.sync()
t0 = time.perf_counter()
ck.save(2, model=model)  # and retention removes step 1
result = time.perf_counter() - t0
""",
        "ckpt_async": """
ck = torchckpt.Checkpointer(os.path.join(folder, "async"), keep_last=1, async_save=True)
t0 = time.perf_counter()
ck.save(1, model=model)
result = time.perf_counter() - t0
ck.close()
""",
        "ckpt_async_total": """
ck = torchckpt.Checkpointer(os.path.join(folder, "async"), keep_last=1, async_save=True)
t0 = time.perf_counter()
ck.save(1, model=model)
ck.wait()  # until the checkpoint is durable: the whole cost of the save, blocking or not
result = time.perf_counter() - t0
ck.close()
""",
        # the second save: at once (the buffers the first save left may still be being warmed), or after GAP
        # seconds of training (one core busy) while a thread of the first save warms them
        "ckpt_async_steady": SECOND.format(between=""),
        "ckpt_async_second": SECOND.format(between="train(GAP)"),
        "ckpt_async_third": """
ck = torchckpt.Checkpointer(os.path.join(folder, "async"), keep_last=1, async_save=True)
for i in (1, 2):
    ck.save(i, model=model)
    ck.wait()
os.sync()
t0 = time.perf_counter()
ck.save(3, model=model)
result = time.perf_counter() - t0
ck.close()
""",
        "dcp_async_total": """
import torch.distributed.checkpoint as dcp, warnings
warnings.simplefilter("ignore")
t0 = time.perf_counter()
dcp.async_save(model.state_dict(), checkpoint_id=os.path.join(folder, "dcp1")).result()  # first save, + wait
result = time.perf_counter() - t0
""",
        "dcp_async": """
import torch.distributed.checkpoint as dcp, warnings
warnings.simplefilter("ignore")
sd = model.state_dict()
dcp.async_save(sd, checkpoint_id=os.path.join(folder, "dcp1")).result()  # later saves, as for ours
t0 = time.perf_counter()
fut = dcp.async_save(sd, checkpoint_id=os.path.join(folder, "dcp2"))
result = time.perf_counter() - t0
fut.result()
""",
        "plain_fsync_later": LATER.format(save='save_fsync("last.pt")'),
        "ours_later": LATER.format(save='torchckpt.save(os.path.join(folder, "last.pt"), model=model, step=i)'),
        "ckpt_sync_later": "ck = torchckpt.Checkpointer(os.path.join(folder, 'sync'), keep_last=1)"
                           + LATER.format(save="ck.save(i, model=model)"),
        "ckpt_async_total_later": "ck = torchckpt.Checkpointer(os.path.join(folder, 'async'), keep_last=1, async_save=True)"
                                  + LATER.format(save="ck.save(i, model=model); ck.wait()") + "ck.close()\n",
    }
    chosen = CASE_SETS.get(args.cases, args.cases.split(","))
    unknown = [c for c in chosen if c not in codes]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; known: {sorted(codes)} or one of {sorted(CASE_SETS)}")
    res = measure_alternated({name: setup + codes[name] for name in chosen}, args.repeats)
    r = args.repeats
    print(f"model of ~{args.size_mib} MiB; medians of {r} alternated fresh processes; threads: "
          f"{args.threads or 'default'}; load average {os.getloadavg()[0]:.1f}; prewarm {args.prewarm:g}x")

    def rows(table: list[tuple[str, str, str | None]]) -> list[tuple[str, dict, dict | None]]:
        return [(label, res[name], res.get(base) if base else None) for label, name, base in table if name in res]

    print_table("durable save", rows([
        ("torch.save(obj, path) (not durable)", "plain", "plain_fsync"),
        ("torch.save + fsync                             [baseline]", "plain_fsync", None),
        ("torchckpt.save (temp, fsync, rename, sidecar)", "ours", "plain_fsync"),
        ("torch.save + fsync, overwriting the file   [baseline 2]", "plain_overwrite", None),
        ("torchckpt.save, overwriting the file (vs baseline 2)", "ours_overwrite", "plain_overwrite"),
        ("Checkpointer.save, sync", "ckpt_sync", "plain_fsync"),
        ("Checkpointer.save, async, save + wait (total)", "ckpt_async_total", "plain_fsync"),
        ("dcp.async_save + result(), first save (total)", "dcp_async_total", "plain_fsync"),
        ("torch.save + fsync, then remove the previous [baseline 3]", "plain_retention", None),
        ("Checkpointer.save, sync, later saves + retention (vs 3)", "ckpt_sync_steady", "plain_retention"),
    ]))
    print_table("third save of a process (steady state: no fresh memory)", rows([
        ("torch.save + fsync, same path                  [baseline]", "plain_fsync_later", None),
        ("torchckpt.save, same path", "ours_later", "plain_fsync_later"),
        ("Checkpointer.save, sync, keep_last=1", "ckpt_sync_later", "plain_fsync_later"),
        ("Checkpointer.save, async, save + wait (total)", "ckpt_async_total_later", "plain_fsync_later"),
    ]))
    print_table("async save: time the training loop is blocked", rows([
        ("Checkpointer.save, sync                        [baseline]", "ckpt_sync", None),
        ("Checkpointer.save, async, first save (blocking part)", "ckpt_async", "ckpt_sync"),
        ("Checkpointer.save, async, 2nd save right after wait() (blocking)", "ckpt_async_steady", "ckpt_sync"),
        ("Checkpointer.save, async, 2nd save after 2 s of training (blocking)", "ckpt_async_second", "ckpt_sync"),
        ("Checkpointer.save, async, 3rd save (blocking part)", "ckpt_async_third", "ckpt_sync"),
        ("dcp.async_save, later saves (blocking part)", "dcp_async", "ckpt_sync"),
    ]))
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
