"""The visual report of a fine-tuned checkpoint: plan against a 10-class model, diff against the base.

    python examples/report_demo.py      # writes demo_report.html (docs/report.png is its screenshot)
"""
import torch
from torch import nn

import torchckpt

torch.manual_seed(0)
def net(classes=1000):
    return nn.Sequential(nn.Conv2d(3, 64, 7), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Sequential(nn.Conv2d(64, 128, 3), nn.BatchNorm2d(128), nn.ReLU()),
        nn.Sequential(nn.Conv2d(128, 256, 3), nn.BatchNorm2d(256), nn.ReLU()),
        nn.Sequential(nn.Conv2d(256, 512, 3), nn.BatchNorm2d(512), nn.ReLU()),
        nn.Flatten(), nn.Linear(512, classes))
m = net()
opt = torch.optim.AdamW(m.parameters(), lr=3e-4)
base = {k: v.clone() for k, v in m.state_dict().items()}
sd = m.state_dict()
sd["5.0.weight"].add_(torch.randn_like(sd["5.0.weight"]) * 0.05)
sd["7.weight"].add_(torch.randn_like(sd["7.weight"]) * 0.02)
sd["7.bias"][:3] = float("nan")
torch.save({"epoch": 42, "global_step": 52500, "best_acc1": 0.7613, "arch": "convnet", "state_dict": sd,
            "optimizer": opt.state_dict()}, "demo_ckpt.pth")
torch.save(base, "demo_base.pt")
torchckpt.report("demo_ckpt.pth", against=net(10), diff="demo_base.pt", output="demo_report.html")
