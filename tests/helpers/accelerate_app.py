"""Writes accelerate save_state folders with the real library (run as a script by tests/read/test_folders.py).

    python accelerate_app.py OUT_DIR  -> OUT_DIR/safe (model.safetensors), OUT_DIR/bin (pytorch_model.bin),
                                         OUT_DIR/next.json: the random numbers drawn right after saving.
"""

from __future__ import annotations

import json
import os
import random
import sys

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed


def make_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def make_training(net: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    return opt, torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)


if __name__ == "__main__":
    out = sys.argv[1]
    set_seed(0)
    accelerator = Accelerator(cpu=True)
    net = make_net()
    opt, sched = make_training(net)
    net, opt, sched = accelerator.prepare(net, opt, sched)
    for _ in range(3):
        opt.zero_grad()
        accelerator.backward(net(torch.randn(8, 4)).pow(2).mean())
        opt.step()
        sched.step()
    accelerator.save_state(os.path.join(out, "safe"))
    accelerator.save_state(os.path.join(out, "bin"), safe_serialization=False)
    with open(os.path.join(out, "next.json"), "w") as fh:
        json.dump({"python": random.random(), "numpy": float(np.random.rand()), "torch": torch.rand(3).tolist()}, fh)
