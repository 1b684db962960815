"""A training loop that survives being killed: run it, interrupt it (Ctrl-C or kill -9), run it again.

    python examples/train_and_resume.py runs/demo
"""

import sys

import torch
import torch.nn.functional as F

import torchckpt

directory = sys.argv[1] if len(sys.argv) > 1 else "runs/demo"
torch.manual_seed(0)
data = torch.utils.data.TensorDataset(torch.randn(512, 20), torch.randint(0, 3, (512,)))
sampler = torchckpt.ResumableSampler(data, seed=0)
loader = torch.utils.data.DataLoader(data, batch_size=32, sampler=sampler, generator=torch.Generator())
model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 3))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
total = 400
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=total)

ckpt = torchckpt.Checkpointer(directory, keep_last=2, keep_best=1, monitor="loss", every_n_steps=50)
step = 0
if ckpt.latest() is not None:
    state = ckpt.resume(model=model, optimizer=opt, scheduler=sched, stateful={"sampler": sampler})
    step = state.step
    print(f"resumed at step {step}", *state.notes)
while step < total:
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        ckpt.save(step, model=model, optimizer=opt, scheduler=sched, metrics={"loss": loss.item()},
                  stateful={"sampler": sampler})
        if step == total:
            break
ckpt.close()
print(f"done at step {step}; best checkpoint: {ckpt.best().path}")
