"""Saves checkpoints in a loop until killed; prints 'committed STEP' after each save returns."""

import sys

import torch

import torchckpt

directory = sys.argv[1]
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(16)])  # ~4 MiB per checkpoint
ckpt = torchckpt.Checkpointer(directory, keep_last=2)
latest = ckpt.latest()
step = latest.step if latest else 0
print("ready", flush=True)
while True:
    step += 1
    with torch.no_grad():
        model[0].bias.fill_(step)
    ckpt.save(step, model=model, metrics={"loss": 1.0 / step})
    print(f"committed {step}", flush=True)
