"""Load an ImageNet-style checkpoint (saved with DataParallel, 1000 classes) into a 10-class model.

    python examples/finetune_from_pretrained.py
"""

import os
import tempfile

import torch
from torch import nn

import torchckpt


def build(classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, classes))


with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "imagenet_best.pth.tar")
    torch.save({"epoch": 90, "arch": "tiny", "state_dict": nn.DataParallel(build(1000)).state_dict()}, path)

    model = build(10)
    print(torchckpt.load_into(model, path, dry_run=True, strict=False, on_mismatch="skip"))  # the plan
    report = torchckpt.load_into(model, path, strict=False, on_mismatch="skip")
    print("\nloaded:", len(report.loaded), "kept initial values for:", report.skipped)
