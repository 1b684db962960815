"""ResumableSampler: its position is what the training loop received, with or without prefetching workers."""

from __future__ import annotations

import pytest
import torch

import torchckpt

N = 20  # samples


def _loader(sampler, workers, batch_size=4, drop_last=False, persistent=False):
    extra = {"persistent_workers": persistent} if workers else {}
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(N)), batch_size=batch_size,
                                       drop_last=drop_last, sampler=sampler, num_workers=workers,
                                       generator=torch.Generator(), **extra)


def _items(batch) -> list[int]:
    return batch[0].reshape(-1).tolist()


def _stream(workers, epochs=2, **kw) -> list[tuple[list[int], dict]]:
    """Every batch of an uninterrupted run, with the sampler's state right after the loop received it."""
    sampler = torchckpt.ResumableSampler(N, seed=5)
    loader = _loader(sampler, workers, **kw)
    out = []
    for _ in range(epochs):
        for batch in loader:
            out.append((_items(batch), sampler.state_dict()))
    return out


_SHAPES = [(4, False), (3, False), (3, True), (None, False)]  # (batch_size, drop_last)


@pytest.mark.parametrize("workers,persistent,batch_size,drop_last",
                         [(0, False, *s) for s in _SHAPES] + [(2, False, *s) for s in _SHAPES]
                         + [(2, True, 4, False), (2, True, None, False)])
def test_position_counts_what_the_loop_received(workers, persistent, batch_size, drop_last):
    stream = _stream(workers, batch_size=batch_size, drop_last=drop_last, persistent=persistent)
    size = batch_size or 1
    per_epoch = N // size if drop_last else -(-N // size)
    assert len(stream) == 2 * per_epoch
    for i, (_, state) in enumerate(stream):
        epoch, k = divmod(i, per_epoch)
        # inside the loop, after its (k+1)-th batch of the epoch: that many batches, never the prefetched ones
        assert (state["epoch"], state["consumed"]) == (epoch, min((k + 1) * size, N)), (i, state)


@pytest.mark.parametrize("workers", [0, 2])
def test_after_the_loop_the_next_epoch_begins(workers):
    sampler = torchckpt.ResumableSampler(N, seed=5)
    loader = _loader(sampler, workers, batch_size=3)
    for _ in loader:
        pass
    assert (sampler.epoch, sampler.consumed) == (1, 0)
    assert len(loader) == 7


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("cut", [1, 3, 4, 5, 7])  # 5 batches per epoch: mid, the last one, into the next epoch
def test_resumed_order_continues_exactly(workers, cut):
    stream = _stream(workers, epochs=2)
    state = stream[cut - 1][1]
    resumed = torchckpt.ResumableSampler(N, seed=5)
    resumed.load_state_dict(state)
    loader = _loader(resumed, workers)
    got: list[list[int]] = []
    while len(got) < len(stream) - cut:
        got.extend(_items(b) for b in loader)
    assert got == [items for items, _ in stream[cut:]]


def test_breaking_out_and_iterating_again_continues_where_the_loop_stopped():
    sampler = torchckpt.ResumableSampler(N, seed=5)
    loader = _loader(sampler, 2)
    order = sampler.order(0)
    seen = []
    for batch in loader:
        seen += _items(batch)
        if len(seen) == 8:
            break  # the workers had fetched more than this
    assert (sampler.epoch, sampler.consumed) == (0, 8)
    seen += [i for b in loader for i in _items(b)]
    assert seen == order and (sampler.epoch, sampler.consumed) == (1, 0)


def test_iterated_directly_counts_the_indices_handed_out():
    sampler = torchckpt.ResumableSampler(6, shuffle=False)
    it = iter(sampler)
    assert [next(it), next(it)] == [0, 1] and sampler.consumed == 2
    assert list(it) == [2, 3, 4, 5] and (sampler.epoch, sampler.consumed) == (1, 0)


def test_setting_the_position_by_hand():
    sampler = torchckpt.ResumableSampler(6, shuffle=False)
    sampler.epoch, sampler.consumed = 3, 4
    assert list(sampler) == [4, 5] and sampler.epoch == 4


@pytest.mark.parametrize("state,why", [({"epoch": "x", "consumed": 0}, "malformed"),
                                       ({"consumed": 0}, "malformed"),
                                       ({"epoch": 0, "consumed": 99}, "out of range"),
                                       ({"epoch": -1, "consumed": 0}, "out of range"),
                                       ({"epoch": 0, "consumed": 0, "length": 7}, "covered 7"),
                                       ([0, 0], "a dict")])
def test_malformed_state_is_a_value_error(state, why):
    sampler = torchckpt.ResumableSampler(6)
    with pytest.raises(ValueError, match=why):
        sampler.load_state_dict(state)
    assert (sampler.epoch, sampler.consumed) == (0, 0)


def test_a_sampler_in_use_can_be_copied_and_pickled():
    import copy
    import pickle

    sampler = torchckpt.ResumableSampler(N, seed=5)
    loader = _loader(sampler, 2)
    it = iter(loader)
    next(it)
    for clone in (copy.deepcopy(sampler), pickle.loads(pickle.dumps(sampler))):
        assert (clone.epoch, clone.consumed) == (0, 4)
        assert list(clone) == sampler.order(0)[4:]
    assert (sampler.epoch, sampler.consumed) == (0, 4)  # the original still tracks its loader
    next(it)
    assert sampler.consumed == 8
