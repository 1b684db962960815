"""Benchmark: sharded checkpoints under 2 ranks (gloo, CPU) and DCP -> safetensors conversion memory.

    nice python bench/bench_distributed.py [--size-mib 256] [--repeats 5]

1. Time the training loop is blocked by one save of the same FSDP2 state (model + AdamW, each
   rank half of it): ``Checkpointer.save`` with ``async_save=True`` vs ``dcp.async_save`` vs
   ``dcp.save``. Saves alternate, each one waited for before the next; medians over ``--repeats``
   saves after one warm-up save of each. Goal (issue 12): Checkpointer <= 1.0x dcp.async_save.
2. Peak RSS (above the interpreter with torch imported) of converting a DCP directory of
   ``--size-mib`` to one file: ``torchckpt.convert(dir, "x.safetensors")`` (streamed) vs
   ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``. Goal: <= 0.3x.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import tempfile
import time

from common import bench_args, measure, print_table


def _rank(rank: int, world: int, port: int, folder: str, size_mib: int, repeats: int, queue) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    import torchckpt

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    d = 1024
    layers = max(1, size_mib * 2**20 // (4 * d * d * 4))  # fp32 square layers of 4 MiB
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(d, d, bias=False) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, d)).sum().backward()
    opt.step()
    group = dist.new_group(backend="gloo")  # what DCP recommends for async saves (and what Checkpointer uses)
    ckpt = torchckpt.Checkpointer(os.path.join(folder, "ours"), keep_last=1, async_save=True)
    times: dict[str, list[float]] = {"checkpointer": [], "dcp_async": [], "dcp_sync": []}

    def state():
        return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}

    for i in range(repeats + 1):
        for case in times:
            dist.barrier()
            t0 = time.perf_counter()
            if case == "checkpointer":
                ckpt.save(i, model=model, optimizer=opt)
                blocked = time.perf_counter() - t0
                ckpt.wait()
            elif case == "dcp_async":
                fut = dcp.async_save(state(), checkpoint_id=os.path.join(folder, f"async-{i}"), process_group=group)
                blocked = time.perf_counter() - t0
                fut.result()
            else:
                dcp.save(state(), checkpoint_id=os.path.join(folder, f"sync-{i}"))
                blocked = time.perf_counter() - t0
            if i:  # the first round warms up each path
                times[case].append(blocked)
            dist.barrier()
            if rank == 0:
                for name in os.listdir(folder):
                    if name.startswith(("async-", "sync-")):
                        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    ckpt.close()
    queue.put((rank, times))
    dist.destroy_process_group()


def blocking(size_mib: int, repeats: int, folder: str) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, folder, size_mib, repeats, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    merged: dict[str, list[float]] = {}
    for _, times in results:  # the loop waits for the slower rank: take the max per save
        for case, values in times.items():
            merged[case] = [max(a, b) for a, b in zip(merged.get(case, values), values)]
    return {case: statistics.median(values) for case, values in merged.items()}


def main() -> None:
    args = bench_args(__doc__, size_mib=256)
    folder = tempfile.mkdtemp(prefix="torchckpt-bench-dist-", dir=args.dir)
    try:
        state_mib = args.size_mib * 3  # weights + two AdamW moments
        med = blocking(args.size_mib, args.repeats, folder)
        print(f"\nBlocking time of one save, 2 ranks (gloo, CPU), FSDP2 model {args.size_mib} MiB + AdamW "
              f"(~{state_mib} MiB state, half per rank); median of {args.repeats} saves")
        print(f"{'case':58s} {'median s':>9s} {'vs dcp.async_save':>18s}")
        for case, label in (("checkpointer", "torchckpt Checkpointer.save(async_save=True)"),
                            ("dcp_async", "torch.distributed.checkpoint.async_save"),
                            ("dcp_sync", "torch.distributed.checkpoint.save (all of it blocks)")):
            print(f"{label:58s} {med[case]:9.3f} {med[case] / med['dcp_async']:17.2f}x")
        print(json.dumps({"blocking_median_s": med}))

        src = os.path.join(folder, "model.dcp")
        setup = f"""
from common import transformer_state_dict
import torch.distributed.checkpoint as dcp
dcp.save(transformer_state_dict({args.size_mib}), checkpoint_id={src!r}, no_dist=True)
"""
        measure(setup + "result = 0.0\n", 1)
        convert_case = f"""
import os
out = {os.path.join(folder, "out.safetensors")!r}
if os.path.exists(out): os.remove(out)
t0 = time.perf_counter()
report = torchckpt.convert({src!r}, out)
assert report.verified
result = time.perf_counter() - t0
"""
        baseline_case = f"""
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
t0 = time.perf_counter()
dcp_to_torch_save({src!r}, {os.path.join(folder, "out.pt")!r})
result = time.perf_counter() - t0
"""
        r = max(1, min(args.repeats, 3))
        base = measure(baseline_case, r)
        ours = measure(convert_case, r)
        print_table(f"DCP directory ({args.size_mib} MiB) -> one file: time and peak RSS above the interpreter",
                    [("dcp_to_torch_save (baseline)", base, None),
                     ("torchckpt.convert -> .safetensors (streamed, verified)", ours, base)])
        if "peak_mib" in ours and "peak_mib" in base:
            print(f"peak RSS ratio: {ours['peak_mib'] / base['peak_mib']:.2f}x (goal <= 0.3x)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
