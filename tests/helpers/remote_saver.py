"""Saves checkpoints to an S3 URL in a loop until killed; prints 'committed STEP' after each save.

argv: URL ENDPOINT. Used by test_remote_train.py to kill -9 a process in the middle of an upload.
"""

import sys

import torch

import torchckpt
from remote_servers import s3_options

url, endpoint = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)])  # ~32 MiB per checkpoint
opts = s3_options(endpoint, default_block_size=5 << 20)  # multipart uploads of 5 MiB parts
ckpt = torchckpt.Checkpointer(url, keep_last=2, storage_options=opts)
latest = ckpt.latest()
step = latest.step if latest else 0
while True:
    step += 1
    with torch.no_grad():
        model[0].bias.fill_(step)
    print(f"saving {step}", flush=True)
    ckpt.save(step, model=model, metrics={"loss": 1.0 / step})
    print(f"committed {step}", flush=True)
