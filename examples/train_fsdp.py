"""Sharded training (FSDP2) whose checkpoints each rank writes in parallel, and that resumes on any
number of ranks. Run it, stop it, run it again (with the same or another --nproc-per-node):

    torchrun --nproc-per-node 2 examples/train_fsdp.py runs/fsdp --steps 40
    torchrun --nproc-per-node 4 examples/train_fsdp.py runs/fsdp --steps 80   # resumes, resharded
    torchrun --nproc-per-node 2 examples/train_fsdp.py runs/ddp --ddp         # replicated: written once

CPU (gloo) works as well as GPUs (nccl). The same script also runs as plain ``python`` in one process.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import torchckpt

parser = argparse.ArgumentParser()
parser.add_argument("directory")
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--every", type=int, default=10, help="save every N steps")
parser.add_argument("--ddp", action="store_true", help="replicate with DistributedDataParallel instead of FSDP2")
args = parser.parse_args()

distributed = "RANK" in os.environ  # started by torchrun
if distributed:
    cuda = torch.cuda.is_available()
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
device = torch.device("cuda", torch.cuda.current_device()) if distributed and torch.cuda.is_available() else "cpu"

torch.manual_seed(0)  # the same initial weights everywhere
model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3)).to(device)
if distributed and args.ddp:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(model, device_ids=[device.index] if device != "cpu" else None)
elif distributed:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
torch.manual_seed(1 + rank)  # each rank its own data stream (its RNG is saved and restored per rank)

# One call for every case: one file per checkpoint in one process; under torchrun each rank writes its
# own shards of ckpt-<step>.dcp/ (replicated DDP weights are written once) and rank 0 commits it once
# every rank has finished.
ckpt = torchckpt.Checkpointer(args.directory, keep_last=2, async_save=True)
step = 0
if ckpt.latest() is not None:
    state = ckpt.resume(model=model, optimizer=opt, scheduler=sched)
    step = state.step
    if rank == 0:
        print(f"resumed at step {step} from {state.path}", *state.notes)
while step < args.steps:
    x = torch.randn(16, 20, device=device)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    step += 1
    if step % args.every == 0 or step == args.steps:
        ckpt.save(step, model=model, optimizer=opt, scheduler=sched, metrics={"loss": loss.item()})
ckpt.close()  # waits for the last background save to be committed
if rank == 0:
    print(f"done at step {step} on {world} rank(s); latest checkpoint: {ckpt.latest().path}")
if distributed:
    dist.destroy_process_group()
