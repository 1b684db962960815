"""Async saves write what a synchronous save of the same call writes: every value as it was when ``save()``
was called, whatever the caller changes afterwards, and the containers as they were built."""

from __future__ import annotations

import argparse
import collections
import copyreg
import dataclasses
import datetime
import decimal
import enum
import fractions
import functools
import pickle
import errno
import os
import signal
import threading

import numpy as np
import pytest
import torch

from torchckpt.errors import CheckpointWriteError
from torchckpt.train.checkpointer import Checkpointer
from torchckpt.train.restore import load_payload
from torchckpt.train.snapshot import Copies, start_snapshot

Pair = collections.namedtuple("Pair", "first second")


class Gate(torch.Tensor):
    """A tensor that holds the background writer's pickler until the test opens it. The snapshot copies it
    as a tensor (its class kept), so its ``__reduce_ex__`` runs only in the writer's thread, not in save()."""

    opened = threading.Event()

    def __reduce_ex__(self, protocol):
        if threading.current_thread() is not threading.main_thread():
            assert Gate.opened.wait(60)
        return super().__reduce_ex__(protocol)


def gate() -> Gate:
    return torch.zeros(1).as_subclass(Gate)


def _save(directory, extra, *, async_save, mutate=None):
    with Checkpointer(str(directory), async_save=async_save) as ck:
        if async_save:  # a run's later save: the snapshot copies into the buffers of the first (which wrote
            ck.save(0, extra=extra)  # through on this thread, test_async_write_through.py)
            ck.wait()
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
    extra = {"gate": gate(), "arr": arr, "raw": raw, "seen": seen}
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


@dataclasses.dataclass
class Hparams:  # an object of the caller's own class, as people put in ``extra``
    lr: float
    layers: list
    table: torch.Tensor


def test_objects_of_the_callers_classes_changed_after_save_returns_are_not_written(tmp_path):
    weight = torch.ones(3)
    extra = {"gate": gate(), "hp": Hparams(0.1, [1, 2], weight), "weight": weight}
    Gate.opened.clear()

    def mutate() -> None:  # while the writer is held before it pickles the object (it pickled it then)
        extra["hp"].lr = 9.0
        extra["hp"].layers.append(3)
        weight.fill_(5)
        Gate.opened.set()

    got = _save(tmp_path / "async", extra, async_save=True, mutate=mutate)
    state = got["hp"].stub_state  # a class torchckpt does not import loads as a placeholder holding its state
    assert state["lr"] == 0.1 and state["layers"] == [1, 2] and torch.equal(state["table"], torch.ones(3))
    # the tensor the object shares with the rest of the state is one storage in the file, as in a sync save
    assert state["table"].untyped_storage().data_ptr() == got["weight"].untyped_storage().data_ptr()
    sync = _save(tmp_path / "sync", {"hp": Hparams(0.1, [1], weight), "weight": weight}, async_save=False)
    assert sync["hp"].stub_state["table"].untyped_storage().data_ptr() == sync["weight"].untyped_storage().data_ptr()


class Made:
    """Pickles as a call of ``make`` (its own reduce value), which a snapshot must never call."""

    calls = 0

    def __init__(self, sizes: list) -> None:
        self.sizes = sizes

    def __reduce__(self):
        return (make, (self.sizes,), {"note": list(self.sizes)})


def make(sizes):
    Made.calls += 1
    return Made(sizes)


def test_an_object_with_its_own_reduce_value_is_taken_at_save_time_and_not_rebuilt(tmp_path):
    made = Made([1, 2])
    extra = {"gate": gate(), "made": made, "again": made}
    Gate.opened.clear()

    def mutate() -> None:
        made.sizes.append(3)
        Gate.opened.set()

    Made.calls = 0
    got = _save(tmp_path, extra, async_save=True, mutate=mutate)
    assert Made.calls == 0  # the reconstructor is named in the file, never called by the save
    assert got["made"].stub_args == ([1, 2],) and got["made"].stub_state == {"note": [1, 2]}
    assert got["made"] is got["again"]  # one object, pickled once, as a sync save writes it


def test_a_module_in_extra_is_saved_as_it_was_when_save_returned(tmp_path):
    ema = torch.nn.Linear(2, 2)  # an EMA copy of the model, passed whole: once pickled later with live weights
    want = ema.weight.detach().clone()
    Gate.opened.clear()

    def mutate() -> None:  # the optimizer step after save() returned, while the writer is held
        with torch.no_grad():
            ema.weight.fill_(7)
        Gate.opened.set()

    got = _save(tmp_path, {"gate": gate(), "ema": ema}, async_save=True, mutate=mutate)["ema"]
    assert type(got.weight) is torch.nn.Parameter and torch.equal(got.weight, want)


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


def test_tensors_of_every_kind_are_saved_async_as_sync(tmp_path):
    extra = {"meta": torch.empty(3, 2, device="meta"),  # async raised "Cannot copy out of meta tensor"
             "f8": torch.randn(4).to(torch.float8_e4m3fn), "conj": torch.randn(2, dtype=torch.cfloat).conj(),
             "transposed": torch.randn(4, 3).t(), "empty_view": torch.randn(10)[3:3], "expanded": torch.ones(1).expand(5)}
    sync = _save(tmp_path / "sync", extra, async_save=False)
    got = _save(tmp_path / "async", extra, async_save=True)
    for key, want in sync.items():
        assert got[key].device == want.device and got[key].dtype == want.dtype and got[key].shape == want.shape, key
        if want.device.type != "meta":
            assert torch.equal(got[key].view(torch.uint8) if want.dtype == torch.float8_e4m3fn else got[key],
                               want.view(torch.uint8) if want.dtype == torch.float8_e4m3fn else want), key


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


class FailsWhenOpened(torch.Tensor):
    """A tensor (copied by save() with its class kept) whose pickling holds the background writer until the
    test opens it, then fails like a full disk."""

    opened = threading.Event()

    def __reduce_ex__(self, protocol):
        if threading.current_thread() is threading.main_thread():
            return super().__reduce_ex__(protocol)
        assert FailsWhenOpened.opened.wait(60)
        raise OSError(errno.ENOSPC, "No space left on device")


def fails_when_opened() -> FailsWhenOpened:
    return torch.zeros(1).as_subclass(FailsWhenOpened)


def test_ctrl_c_while_save_waits_for_the_previous_write_keeps_that_write_pending(tmp_path):
    """Ctrl-C (a real SIGINT, sent by a SIGALRM handler) in save() while it waits for the previous background
    write: that write was forgotten (its failure never reported, and the next save reused the buffers it was
    still writing)."""
    FailsWhenOpened.opened.clear()
    ck = Checkpointer(str(tmp_path), async_save=True)
    try:
        ck.save(0, extra={"held": fails_when_opened()})  # the first save writes through on this thread: it fits
        ck.wait()
        ck.save(1, extra={"held": fails_when_opened()})  # a snapshot: returns; the writer waits in the pickler

        def interrupt(*_):  # a real Ctrl-C (SIGINT): the wait stops within 50 ms
            os.kill(os.getpid(), signal.SIGINT)

        previous = signal.signal(signal.SIGALRM, interrupt)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(KeyboardInterrupt):
                ck.save(2, model=torch.nn.Linear(2, 2))  # waits for write 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        FailsWhenOpened.opened.set()
        with pytest.raises(CheckpointWriteError):
            ck.wait()  # write 1's failure is reported, not lost
        assert ck.latest().step == 0
    finally:
        FailsWhenOpened.opened.set()
        ck.close()


def test_lightning_plugin_ctrl_c_while_waiting_keeps_the_previous_write_pending(tmp_path):
    pytest.importorskip("lightning")
    from torchckpt.integrations.lightning import TorchckptIO

    FailsWhenOpened.opened.clear()
    io = TorchckptIO(async_save=True)

    def interrupt(*_):  # a real Ctrl-C (SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    try:
        io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, tmp_path / "first.ckpt")  # writes through
        io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "held": fails_when_opened()}, tmp_path / "a.ckpt")
        previous = signal.signal(signal.SIGALRM, interrupt)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(KeyboardInterrupt):
                io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "b.ckpt")  # waits for a.ckpt
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        FailsWhenOpened.opened.set()
        with pytest.raises(CheckpointWriteError):
            io.teardown()  # a.ckpt's failure is reported, not lost
    finally:
        FailsWhenOpened.opened.set()
    assert not (tmp_path / "a.ckpt").exists()


class Slotted:
    __slots__ = ("a", "b")

    def __init__(self) -> None:
        self.a, self.b = [1], {"k": 2}


class OwnState:
    def __init__(self) -> None:
        self.items = [3, 4]

    def __getstate__(self):
        return {"items": list(self.items), "version": 2}

    def __setstate__(self, state):
        self.items = state["items"]


class Color(enum.Enum):
    RED = 1


@dataclasses.dataclass(frozen=True)
class Frozen:
    name: str
    sizes: tuple


def test_a_snapshot_pickles_to_the_bytes_the_original_pickles_to():
    """Whatever an object of the caller's class becomes in the snapshot (rebuilt, or its reduce value kept),
    pickle writes the same stream for it as for the original at that moment: the file is the sync save's."""
    values = {"namespace": argparse.Namespace(lr=0.1, layers=[1, 2]), "hp": Hparams(0.1, [1], None),
              "deque": collections.deque([1, [2]], maxlen=5), "partial": functools.partial(max, 1, key=abs),
              "when": datetime.datetime(2026, 12, 7, 20, 0), "fraction": fractions.Fraction(1, 3),
              "decimal": decimal.Decimal("1.5"), "slotted": Slotted(), "own": OwnState(), "color": Color.RED,
              "frozen": Frozen("x", (1, 2)), "made": Made([5]), "np_scalar": np.float32(2.5),
              "device": torch.device("cpu"), "dtype": torch.bfloat16, "counter": collections.Counter("abca"),
              "frozenset": frozenset({1, 2}), "complex": 1 + 2j, "function": len, "type": dict}
    values["same_twice"] = values["namespace"]
    snapshot, copies = start_snapshot(values, {})
    copies.run()
    for key in values:
        assert pickle.dumps(snapshot[key], protocol=2) == pickle.dumps(values[key], protocol=2), key
    assert pickle.dumps(snapshot, protocol=2) == pickle.dumps(values, protocol=2)
    values["namespace"].layers.append(3)  # the snapshot is not the live object
    assert snapshot["namespace"].layers == [1, 2] and snapshot["same_twice"] is snapshot["namespace"]


class ClaimsDict:
    """Reports dict as its class, as an async snapshot's stand-in reports the original's (pickle checks it)."""

    @property
    def __class__(self):
        return dict


def test_the_disk_full_size_estimate_walks_a_dag_once_and_skips_stand_ins():
    from torchckpt.train.training import _payload_nbytes

    shared: list = [torch.ones(256)]  # 1 KiB
    for _ in range(64):  # 2^64 paths to the tensor: walked once each
        shared = [shared, shared]
    assert _payload_nbytes({"a": shared, "b": ClaimsDict(), "c": (torch.zeros(2),)}) == 1024 + 8


class NeedsArgs:
    """``__new__`` needs an argument that pickle (no ``__getnewargs__``) does not give: pickle.dumps writes it,
    only loading it would fail."""

    def __new__(cls, size):
        return super().__new__(cls)

    def __init__(self, size) -> None:
        self.sizes = [size]


class Reconnects:
    """Drops its connection when pickled and opens a new one in ``__setstate__`` (a logger, a client): a save
    must not open one. Its ``__setstate__`` is not the inverse of ``__getstate__`` byte for byte."""

    opened = 0

    def __init__(self) -> None:
        self.url, self.connection = "tcp://x", object()

    def __getstate__(self):
        return {"url": self.url}

    def __setstate__(self, state):
        Reconnects.opened += 1
        self.__dict__.update(state, connection=object(), restored=True)


def test_objects_whose_class_code_would_run_are_pickled_as_at_save_time_without_running_it():
    """A ``__new__`` that needs arguments (the object was kept live: a change after save() reached the file) and
    a ``__setstate__`` (it ran in save(), and the rebuilt object pickled to other bytes) are kept as their reduce
    values: the same bytes as the original at save() time, no code of the class run."""
    values = {"needs_args": NeedsArgs(3), "reconnects": Reconnects()}
    want = {key: pickle.dumps(value, protocol=2) for key, value in values.items()}
    Reconnects.opened = 0
    snapshot, copies = start_snapshot(values, {})
    copies.run()
    values["needs_args"].sizes.append(4)  # after save() returned
    assert Reconnects.opened == 0
    for key in values:
        assert pickle.dumps(snapshot[key], protocol=2) == want[key], key


class WrongClass:
    def __reduce_ex__(self, protocol):
        return (copyreg.__newobj__, (dict,), None)  # pickle refuses: __newobj__ of another class


def test_an_async_save_refuses_the_reduce_value_a_sync_save_refuses(tmp_path):
    with pytest.raises(pickle.PicklingError, match="wrong class"):
        _save(tmp_path / "sync", {"w": WrongClass()}, async_save=False)
    with pytest.raises(pickle.PicklingError, match="wrong class"):  # async wrote {} for it
        _save(tmp_path / "async", {"w": WrongClass()}, async_save=True)


class Span(tuple):
    """A tuple subclass whose ``__new__`` takes its elements as arguments (not a namedtuple)."""

    def __new__(cls, start, stop):
        return super().__new__(cls, (start, stop))

    def __getnewargs__(self):
        return tuple(self)


class Tag:
    def __init__(self) -> None:
        self.names = ["a"]


def test_tuple_subclasses_and_sets_of_objects_are_taken_at_save_time():
    """A tuple subclass holding a list made save() raise a raw TypeError (rebuilt as ``Span(items)``; a sync save
    writes it); a set holding an object of the caller's class kept the live object (a change after save()
    returned reached the file)."""
    tag = Tag()
    values = {"span": Span([1], 2), "tags": {tag}}
    want = {key: pickle.dumps(value, protocol=2) for key, value in values.items()}
    snapshot, copies = start_snapshot(values, {})
    copies.run()
    tag.names.append("b")
    values["span"][0].append(3)
    for key in values:
        assert pickle.dumps(snapshot[key], protocol=2) == want[key], key


class Pair2(tuple):
    """A tuple subclass that pickle cannot rebuild by its ``__new__`` (no ``__getnewargs__``): kept as its reduce value."""

    def __new__(cls, first, second):
        return super().__new__(cls, (first, second))


def test_the_disk_full_estimate_walks_a_snapshot_holding_a_reduce_value():
    """The size a disk-full error quotes is summed over the snapshot; an object kept as its reduce value reports its
    original's class (a tuple subclass here) for pickle's sake, and summing iterated it (TypeError instead of the
    disk-full error)."""
    from torchckpt.train.training import _payload_nbytes

    snapshot, copies = start_snapshot({"pair": Pair2([torch.ones(2)], 2), "w": torch.ones(8)}, {})
    copies.run()
    assert isinstance(snapshot["pair"], tuple)  # what pickle checks
    assert _payload_nbytes(snapshot) == 32


def test_tensors_and_objects_as_dict_keys_are_copied_and_shared_as_pickle_keeps_them():
    """An optimizer's ``state`` is keyed by its Parameters, which its ``param_groups`` list too. Keys were kept as
    the live objects while the lists got copies: the file held each parameter twice, its state keyed by tensors
    that are not its parameters (a pickled optimizer came back with its state detached), with values written
    after save() returned."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tag = Tag()
    values = {"state": opt.state, "groups": opt.param_groups, "by_tag": collections.OrderedDict([(tag, 1)])}
    want = model.weight.detach().clone()
    snapshot, copies = start_snapshot(values, {})
    copies.run()
    with torch.no_grad():
        model.weight.fill_(7)  # the next optimizer step, after save() returned
    tag.names.append("b")
    keys = list(snapshot["state"])
    assert keys[0] is snapshot["groups"][0]["params"][0] and len(keys) == 2  # one object, as in the original
    assert torch.equal(keys[0], want) and type(keys[0]) is torch.nn.Parameter
    (key,) = snapshot["by_tag"]
    assert key.names == ["a"]
