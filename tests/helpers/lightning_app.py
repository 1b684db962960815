"""A tiny Lightning run used by tests/train/test_lightning.py (also run as a script that gets SIGKILLed).

    python lightning_app.py DIR   -> trains with TorchckptIO(async_save=True) and ModelCheckpoint
                                     every 3 steps (save_top_k=2), forever; prints each saved step.
"""

from __future__ import annotations

import sys
import time

import lightning
import torch
from torch.utils.data import DataLoader, TensorDataset

from torchckpt.integrations.lightning import TorchckptIO


def make_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


class LitNet(lightning.LightningModule):
    def __init__(self, slow_after: int | None = None) -> None:
        super().__init__()
        self.net = make_net()
        self.slow_after = slow_after

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.slow_after is not None and self.global_step >= self.slow_after:
            time.sleep(0.05)  # leaves the parent time to kill the run between two checkpoints
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> dict:
        opt = torch.optim.AdamW(self.parameters(), lr=0.01)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 2, 0.5),
                                                   "interval": "step"}}


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 2, generator=g))
    return DataLoader(data, batch_size=8)


def trainer(root: str, max_steps: int, *, async_save: bool, callbacks: list | None = None,
            prefix: str = "", plugin: bool = True) -> lightning.Trainer:
    ckpt = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=2,
                                                       monitor="step", mode="max")
    return lightning.Trainer(max_steps=max_steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             plugins=[TorchckptIO(async_save=async_save, prefix=prefix)] if plugin else [],
                             callbacks=[ckpt, *(callbacks or [])])


class Announce(lightning.Callback):
    def on_train_batch_end(self, trainer: lightning.Trainer, *args: object) -> None:
        print(f"step {trainer.global_step}", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    trainer(sys.argv[1], 10**6, async_save=True, callbacks=[Announce()]).fit(LitNet(slow_after=6), loader())
