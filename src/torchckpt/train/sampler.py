"""A sampler whose position survives a checkpoint, so the data order resumes mid-epoch.

A shuffling ``DataLoader`` draws a new permutation from the global torch RNG at the start of every
epoch; once that moment has passed, no RNG state restores the order of the epoch in progress.
``ResumableSampler`` derives each epoch's permutation from ``seed + epoch`` and records how far the
training loop got; pass it to ``torchckpt.save(..., stateful={"sampler": sampler})`` and to ``resume``.

Its position counts the batches the *training loop* received, not the indices the loader fetched:
with ``num_workers > 0`` a ``DataLoader`` prefetches batches ahead of the loop (and may have
fetched the whole epoch before the loop's last steps). The sampler finds the ``DataLoader`` iterator
that drives it when the first index is taken and reads that iterator's count of batches handed to
the loop, so nothing needs to be counted by hand, mid-epoch or at an epoch boundary, with or
without workers. An epoch counts as done once the loop has left it (its ``for`` ended or broke off
after the last batch); saved at its last batch, inside the loop, it is the current epoch with every
sample consumed, and the resumed run's first pass is empty, exactly as without workers. With
``persistent_workers=True`` the loader does not tell when the loop left an epoch until the next one
starts, so a save between two epochs records the finished one as fully consumed too. Iterated
directly (no ``DataLoader``) or under a custom ``batch_sampler``, the position is the number of
indices handed out.

For a run that resumes bit-for-bit, the DataLoader needs two things:

* ``sampler=ResumableSampler(dataset, seed=...)``: the order of the epoch in progress is restored;
* ``generator=torch.Generator()``: every new DataLoader iterator draws a base seed from the
  loader's generator, or from the *global* torch RNG when it has none. A resumed run creates its
  iterator at a different moment than the uninterrupted run did, so without its own generator
  that draw shifts every random number after it (dropout, augmentation).

Workers that use randomness (augmentation inside the dataset) should seed themselves from the
sampler's epoch in ``worker_init_fn``; their own RNG streams are not part of a checkpoint.
"""

from __future__ import annotations

import sys
import weakref
from types import FrameType
from typing import Any, Iterator, Sized

import torch
from torch.utils.data import BatchSampler

__all__ = ["ResumableSampler"]

# The DataLoader iterator class: its ``_num_yielded`` counts the batches handed to the loop.
_LOADER_ITER = getattr(torch.utils.data.dataloader, "_BaseDataLoaderIter", None)


class _Pass:
    """One pass over an epoch's order from ``start``, and the DataLoader iterator that drives it (if any)."""

    def __init__(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start
        self.handed = 0  # indices handed out by this pass
        self.exhausted = False
        self.batch = 0  # samples per batch the loop receives; 0: no DataLoader iterator found
        self.drop_last = False
        self._state: dict[str, Any] | None = None  # the iterator's __dict__ while it drives this pass
        self._driver: Any = None  # weak reference to the iterator's index iterator of this pass
        self._ref: Any = None
        self._taken: int | None = None  # batches the loop received, fixed once the iterator ends or moves on

    def attach(self, frame: FrameType | None, sampler: "ResumableSampler") -> None:
        """Find the DataLoader iterator among the callers of the first ``next`` (``_next_index``)."""
        for _ in range(3):
            if frame is None or _LOADER_ITER is None:
                return
            if frame.f_code.co_name == "_next_index" and isinstance(frame.f_locals.get("self"), _LOADER_ITER):
                it = frame.f_locals["self"]
                break
            frame = frame.f_back
        else:
            return
        index_sampler = getattr(it, "_index_sampler", None)
        if index_sampler is sampler:  # batch_size=None: one sample per item the loop receives
            batch, drop_last = 1, False
        elif isinstance(index_sampler, BatchSampler) and index_sampler.sampler is sampler:
            batch, drop_last = int(index_sampler.batch_size), bool(index_sampler.drop_last)
        else:  # a custom batch_sampler: batch sizes unknown, count indices
            return
        state = vars(it)
        if not isinstance(state.get("_num_yielded"), int) or state.get("_sampler_iter") is None:
            return
        self.batch, self.drop_last, self._state = batch, drop_last, state
        self._driver = weakref.ref(state["_sampler_iter"])
        # When the iterator is freed (the loop ended or broke off), keep its final count. The
        # callback runs before the iterator's attributes are cleared; holding its __dict__ (not the
        # iterator) keeps the count readable without delaying the workers' shutdown.
        self._ref = weakref.ref(it, lambda _ref: self.freeze())

    def _driving(self) -> bool:
        return self._state is not None and self._state.get("_sampler_iter") is self._driver()

    def freeze(self, *, closing: bool = False) -> None:
        """Keep the loop's batch count and let go of the iterator's state: its loop is over.

        ``closing``: this pass's index iterator is being discarded (a persistent-workers loader starts
        its next epoch, or the loader is freed); the count is still the old one at that moment.
        """
        if self._taken is None and self._state is not None and (closing or self._driving()):
            self._taken = int(self._state["_num_yielded"])
        self._state = None

    def loop(self) -> tuple[int, bool] | None:
        """(batches the loop received, whether the loop was told the pass ended); None: not tracked."""
        if self._taken is None and self._state is not None:
            if not self._driving():
                self._state = None  # the iterator moved on to another pass after this one ran out
                return None
            state = self._state
            if state.get("_num_workers", 0) == 0:  # the loop's next() pulls the indices itself
                ended = getattr(self._driver(), "gi_frame", True) is None  # the index generator finished
            else:  # workers prefetch; a non-persistent iterator shuts down when it raises StopIteration
                ended = bool(state.get("_shutdown", False))
            return int(state["_num_yielded"]), ended
        return None if self._taken is None else (self._taken, True)

    def position(self, length: int) -> tuple[int, int]:
        """(epoch, samples the loop received in it); a pass whose end the loop saw is (epoch + 1, 0).

        Until the loop is told the epoch ended, a pass that delivered its last batch is still the
        current epoch, with every sample consumed (the next pass yields nothing, then the epoch ends),
        exactly as a loader without workers behaves.
        """
        loop = self.loop() if self.batch else None
        if loop is None:
            return (self.epoch + 1, 0) if self.exhausted else (self.epoch, self.start + self.handed)
        taken, ended = loop
        remaining = length - self.start
        batches = remaining // self.batch if self.drop_last else -(-remaining // self.batch)
        if taken >= batches and ended:
            return self.epoch + 1, 0
        return self.epoch, self.start + min(taken * self.batch, remaining)


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Shuffles each epoch from ``seed + epoch`` and resumes the epoch in progress after a checkpoint.

    Args:
        data_source: the dataset (or its length).
        shuffle: ``False`` gives ``0 .. n-1`` every epoch.
        seed: base of every epoch's permutation.

    ``epoch`` and ``consumed`` are the position of the training loop (see the module docstring);
    assigning either sets the position explicitly.
    """

    def __init__(self, data_source: Sized | int, *, shuffle: bool = True, seed: int = 0) -> None:
        self.length = data_source if isinstance(data_source, int) else len(data_source)
        self.shuffle = shuffle
        self.seed = int(seed)
        self._epoch = 0
        self._consumed = 0
        self._pass: _Pass | None = None

    # ------------------------------------------------------------------ position
    def _position(self) -> tuple[int, int]:
        return self._pass.position(self.length) if self._pass is not None else (self._epoch, self._consumed)

    def _settle(self) -> None:
        self._epoch, self._consumed = self._position()
        if self._pass is not None:
            self._pass.freeze()
        self._pass = None

    @property
    def epoch(self) -> int:
        """The epoch the training loop is in."""
        return self._position()[0]

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._settle()
        self._epoch = int(value)

    @property
    def consumed(self) -> int:
        """Samples of the current epoch the training loop received."""
        return self._position()[1]

    @consumed.setter
    def consumed(self, value: int) -> None:
        self._settle()
        self._consumed = int(value)

    # ------------------------------------------------------------------ sampling
    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.length))
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        return torch.randperm(self.length, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        if self._pass is not None:  # a new pass: the loop of the previous one is over
            self._pass.freeze()
        self._settle()
        self._pass = _Pass(self._epoch, self._consumed)
        return self._run(self._pass)

    def _run(self, p: _Pass) -> Iterator[int]:
        p.attach(sys._getframe(1), self)  # the caller of the first next(): the DataLoader, if any
        order = self.order(p.epoch)
        try:
            for i in range(p.start, self.length):
                p.handed = i + 1 - p.start
                yield order[i]
        except GeneratorExit:
            p.freeze(closing=True)
            raise
        p.exhausted = True

    def __len__(self) -> int:
        p = self._pass
        if p is not None and p.position(self.length)[0] == p.epoch:
            return self.length - p.start  # the size of the pass in progress
        return self.length - self.consumed

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles carry the position, not the DataLoader iterator being tracked."""
        state = dict(self.__dict__)
        state["_epoch"], state["_consumed"] = self._position()
        state["_pass"] = None
        return state

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        epoch, consumed = self._position()
        return {"epoch": epoch, "consumed": consumed, "seed": self.seed, "length": self.length,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"a sampler state is a dict, got {type(state).__name__}")
        if state.get("length", self.length) != self.length:
            raise ValueError(f"the saved sampler covered {state['length']} samples, this one {self.length}")
        try:
            epoch, consumed = int(state["epoch"]), int(state["consumed"])
            seed, shuffle = int(state.get("seed", self.seed)), bool(state.get("shuffle", self.shuffle))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed sampler state ({exc!r}): needs integer 'epoch' and 'consumed'") from None
        if epoch < 0 or not 0 <= consumed <= self.length:
            raise ValueError(f"sampler position out of range: epoch {epoch}, consumed {consumed} of {self.length}")
        if self._pass is not None:
            self._pass.freeze()
        self._pass = None
        self._epoch, self._consumed, self.seed, self.shuffle = epoch, consumed, seed, shuffle
