"""Async saves write what a synchronous save of the same call writes: every value as it was when ``save()``
was called, whatever the caller changes afterwards, and the containers as they were built."""

from __future__ import annotations

import collections
import threading

import numpy as np
import torch

from torchckpt.train.checkpointer import Checkpointer
from torchckpt.train.restore import load_payload
from torchckpt.train.snapshot import Copies, start_snapshot

Pair = collections.namedtuple("Pair", "first second")


class Gate:
    """Holds the background writer's pickler until the test opens it (the caller's thread passes)."""

    opened = threading.Event()

    def __reduce__(self):
        if threading.current_thread() is not threading.main_thread():
            assert Gate.opened.wait(60)
        return (Gate, ())


def _save(directory, extra, *, async_save, mutate=None):
    with Checkpointer(str(directory), async_save=async_save) as ck:
        path = ck.save(1, extra=extra)
        if mutate is not None:
            mutate()  # right after save() returned, while the writer may still be writing
        ck.wait()
    return load_payload(path, None)["extra"]


def test_two_places_spelling_the_same_name_get_their_own_buffers(tmp_path):
    # ".a.b" names both places, and ".0" both keys: they once shared one snapshot buffer
    extra = {"a.b": torch.full((4,), 1.0), "a": {"b": torch.full((4,), 2.0)},
             0: torch.full((3,), 3.0), "0": torch.full((3,), 4.0)}
    for round_ in range(2):  # the second save reuses the buffers of the first
        got = _save(tmp_path / str(round_), extra, async_save=True)
        assert torch.equal(got["a.b"], extra["a.b"]) and torch.equal(got["a"]["b"], extra["a"]["b"])
        assert torch.equal(got[0], extra[0]) and torch.equal(got["0"], extra["0"])


def test_two_places_spelling_the_same_name_in_one_snapshot_buffers():
    buffers: dict = {}
    for _ in range(2):
        state = {"x.y": torch.ones(8), "x": {"y": torch.zeros(8)}}
        snapshot, copies = start_snapshot(state, buffers)
        copies.run()
        assert snapshot["x.y"].sum() == 8 and snapshot["x"]["y"].sum() == 0
        assert snapshot["x.y"].untyped_storage().data_ptr() != snapshot["x"]["y"].untyped_storage().data_ptr()


def test_values_that_are_not_tensors_changed_after_save_returns_are_not_written(tmp_path):
    arr, raw, seen = np.zeros(3), bytearray(b"abc"), {1}
    extra = {"gate": Gate(), "arr": arr, "raw": raw, "seen": seen}
    Gate.opened.clear()

    def mutate() -> None:  # while the writer is held before it pickles these
        arr[:] = 7
        raw[0] = ord("X")
        seen.add(2)
        Gate.opened.set()

    got = _save(tmp_path, extra, async_save=True, mutate=mutate)
    assert got["arr"].tolist() == [0.0, 0.0, 0.0]
    assert bytes(got["raw"]) == b"abc"
    assert set(got["seen"]) == {1}


def test_async_keeps_the_containers_a_sync_save_keeps(tmp_path):
    shared = [torch.ones(2)]
    extra = {"table": collections.defaultdict(list, a=[torch.ones(1)]), "pair": Pair(torch.ones(1), 2),
             "one": shared, "two": shared, "ordered": collections.OrderedDict([("z", torch.zeros(1)), ("a", 1)])}
    sync = _save(tmp_path / "sync", extra, async_save=False)
    got = _save(tmp_path / "async", extra, async_save=True)  # a defaultdict once raised a raw TypeError here
    for key in extra:
        assert type(got[key]).__name__ == type(sync[key]).__name__, key
    assert got["one"] is got["two"] and sync["one"] is sync["two"]
    assert list(got["ordered"]) == ["z", "a"]


def test_a_list_that_holds_itself_is_saved_async_as_sync(tmp_path):
    loop: list = [torch.ones(1)]
    loop.append(loop)
    for async_save in (False, True):  # async recursed until RecursionError
        got = _save(tmp_path / str(async_save), {"loop": loop}, async_save=async_save)
        assert torch.equal(got["loop"][0], torch.ones(1))


def test_many_tiny_storages_are_copied_in_few_chunks():
    state = {f"p{i}": torch.full((8,), float(i)) for i in range(10_000)}  # 320 KB in all
    snapshot, copies = start_snapshot(state, {})
    assert len(copies._chunks) == 1  # one lock round trip, not 10,000
    helper = threading.Thread(target=copies.wait_all)
    helper.start()
    copies.run()
    helper.join(60)
    assert all(snapshot[k][0] == i for i, k in enumerate(state))


def test_a_snapshot_complete_when_the_caller_is_interrupted_is_still_written():
    snapshot, copies = start_snapshot({"w": torch.ones(4)}, {})
    copies.run()
    assert not copies.abort()  # Ctrl-C after the last chunk: the writer may already be writing it
    copies.wait_all()  # no SnapshotInterrupted: it is complete
    incomplete = Copies([])
    assert not incomplete.abort()  # nothing to copy: complete at once
