"""A sampler whose position survives a checkpoint, so the data order resumes mid-epoch.

A shuffling ``DataLoader`` draws a new permutation from the global torch RNG at the start of every
epoch; once that moment has passed, no RNG state restores the order of the epoch in progress.
``ResumableSampler`` derives each epoch's permutation from ``seed + epoch`` and counts the indices it
has handed out; pass it to ``torchckpt.save(..., stateful={"sampler": sampler})`` and to ``resume``.

For a run that resumes bit-for-bit, the DataLoader needs two things:

* ``sampler=ResumableSampler(dataset, seed=...)``: the order of the epoch in progress is restored;
* ``generator=torch.Generator()``: every new DataLoader iterator draws a base seed from the
  loader's generator, or from the *global* torch RNG when it has none. A resumed run creates its
  iterator at a different moment than the uninterrupted run did, so without its own generator
  that draw shifts every random number after it (dropout, augmentation).

With ``num_workers > 0`` the loader prefetches ahead of the training loop: set
``sampler.consumed = batches_done_this_epoch * batch_size`` before saving, and seed the workers
from the epoch (``worker_init_fn``) if they use randomness.
"""

from __future__ import annotations

from typing import Any, Iterator, Sized

import torch

__all__ = ["ResumableSampler"]


class ResumableSampler(torch.utils.data.Sampler[int]):
    def __init__(self, data_source: Sized | int, *, shuffle: bool = True, seed: int = 0) -> None:
        self.length = data_source if isinstance(data_source, int) else len(data_source)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.consumed = 0

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.length))
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        return torch.randperm(self.length, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        for i in range(self.consumed, self.length):
            self.consumed = i + 1
            yield order[i]
        self.epoch += 1
        self.consumed = 0

    def __len__(self) -> int:
        return self.length - self.consumed

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "length": self.length,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("length", self.length) != self.length:
            raise ValueError(f"the saved sampler covered {state['length']} samples, this one {self.length}")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self.seed, self.shuffle = int(state.get("seed", self.seed)), bool(state.get("shuffle", self.shuffle))
