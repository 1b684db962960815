"""A small training run used by the resume tests (runs as its own process).

    python train_script.py full N OUT          # N steps uninterrupted, final state to OUT
    python train_script.py first K N CKPT_DIR  # K steps of an N-step schedule, Checkpointer.save inside the loop
    python train_script.py resume N CKPT_DIR OUT  # fresh process: resume and train to N

A trailing ``workers=W`` loads the data with W worker processes (prefetching ahead of the loop).
"""

from __future__ import annotations

import random
import sys

import numpy as np
import torch
import torch.nn.functional as F

import torchckpt


def build(total_steps: int, workers: int = 0):
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    g = torch.Generator().manual_seed(99)
    data = torch.utils.data.TensorDataset(torch.randn(72, 8, generator=g), torch.randint(0, 4, (72,), generator=g))
    sampler = torchckpt.ResumableSampler(data, seed=7)
    # generator=: creating an iterator must not draw from the global RNG (see torchckpt.train.sampler)
    loader = torch.utils.data.DataLoader(data, batch_size=8, sampler=sampler, generator=torch.Generator(),
                                         num_workers=workers)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=total_steps)
    return model, opt, sched, loader, sampler


def train(model, opt, sched, loader, step: int, stop: int, at_stop=None) -> int:
    model.train()
    while step < stop:
        for x, y in loader:
            # randomness from every generator the user might touch
            noise = torch.randn_like(x) * 0.01 + float(np.random.rand()) * 1e-3 + random.random() * 1e-3
            loss = F.cross_entropy(model(x + noise), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step == stop:
                if at_stop is not None:
                    at_stop(step)  # while the loader's iterator is alive (and its workers prefetch)
                break
    return step


def dump(model, opt, out: str) -> None:
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, out)


def main(argv: list[str]) -> None:
    workers = int(argv.pop()[len("workers="):]) if argv[-1].startswith("workers=") else 0
    mode = argv[0]
    if mode == "full":
        n, out = int(argv[1]), argv[2]
        model, opt, sched, loader, _ = build(n, workers)
        train(model, opt, sched, loader, 0, n)
        dump(model, opt, out)
    elif mode == "first":
        k, n, directory = int(argv[1]), int(argv[2]), argv[3]
        model, opt, sched, loader, sampler = build(n, workers)
        ckpt = torchckpt.Checkpointer(directory)
        train(model, opt, sched, loader, 0, k, at_stop=lambda step: ckpt.save(
            step, model=torch.nn.DataParallel(model), optimizer=opt, scheduler=sched, stateful={"sampler": sampler}))
    elif mode == "resume":
        n, directory, out = int(argv[1]), argv[2], argv[3]
        model, opt, sched, loader, sampler = build(n, workers)
        torch.manual_seed(0)  # a fresh process has its own randomness; resume must overwrite it
        state = torchckpt.resume(directory, model=model, optimizer=opt, scheduler=sched,
                                 stateful={"sampler": sampler})
        train(model, opt, sched, loader, state.step, n)
        dump(model, opt, out)


if __name__ == "__main__":
    main(sys.argv[1:])
