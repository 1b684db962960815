"""The VM's inlined opcodes and the depth walk's shortcuts answer exactly as the general paths do: the same
values, the same typed errors at the same limits (dcp29: the .metadata of a DCP folder is ~37k opcodes and
~8k containers, parsed before any data file is read, so these paths set how soon a folder's reads start)."""

from __future__ import annotations

import collections
import pickle
import struct

import pytest
from pickle_asm import EMPTY_TUPLE, MEMOIZE, PROTO2, STOP, TUPLE1

from torchckpt import Budget, Policy
from torchckpt.errors import CorruptCheckpointError, LimitExceededError, TruncatedCheckpointError
from torchckpt.read.unpickle.machine import Unpickler

LONG_BINGET = b"j"


def run(data: bytes, depth: int | None = None):
    policy = Policy(budget=Budget(depth=depth)) if depth is not None else Policy()
    return Unpickler(data, policy=policy).load()


def nested(kind: str, height: int):
    """A chain of ``height`` containers of ``kind``, the innermost holding only scalars (its height is 1)."""
    inner: object = {"list": [1, 2.5, "x"], "tuple": (1, "x"), "dict": {"k": 1}, "odict": collections.OrderedDict(k=1),
                     "empty": {}}[kind]
    for _ in range(height - 1):
        inner = [inner] if kind != "tuple" else (inner, 0)
    return inner


@pytest.mark.parametrize("kind", ["list", "tuple", "dict", "odict", "empty"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_depth_limit_counts_a_container_of_scalars_as_one_level(kind, protocol):
    """The innermost container (only scalars, or empty) has no frame of its own in the walk: a chain exactly
    as high as the budget's depth loads, one level more is refused, as before the shortcut."""
    limit = 40
    assert run(pickle.dumps(nested(kind, limit), protocol=protocol), depth=limit) == nested(kind, limit)
    with pytest.raises(LimitExceededError, match="depth"):
        run(pickle.dumps(nested(kind, limit + 1), protocol=protocol), depth=limit)


def test_depth_walk_of_shared_and_cyclic_containers_of_scalars():
    leaf = [1, 2, 3]
    shared = [[leaf, leaf, {}], [leaf, {}], {}]
    assert run(pickle.dumps(shared, protocol=4)) == shared
    cyclic: list = [leaf]
    cyclic.append(cyclic)
    out = run(pickle.dumps(cyclic, protocol=4))
    assert out[0] == leaf and out[1] is out


def test_long_binget_fast_path_reads_the_memo_and_refuses_unused_slots():
    # memo index 0 holds (); LONG_BINGET 0 pushes it again; TUPLE1 wraps it
    good = PROTO2 + EMPTY_TUPLE + MEMOIZE + LONG_BINGET + struct.pack("<I", 0) + TUPLE1 + TUPLE1 + STOP
    assert run(good) == (((),),)
    # a memo full of values beyond 255 entries, read back with LONG_BINGET as pickle writes it
    values = [str(i) for i in range(300)]
    data = pickle.dumps([values, values[299], values[256]], protocol=2)
    assert b"j" in data and run(data) == [values, values[299], values[256]]
    for idx in (1, 0xFFFFFFFF):
        with pytest.raises(CorruptCheckpointError, match="unused memo slot"):
            run(PROTO2 + EMPTY_TUPLE + MEMOIZE + LONG_BINGET + struct.pack("<I", idx) + STOP)
    with pytest.raises(TruncatedCheckpointError):
        run(PROTO2 + EMPTY_TUPLE + MEMOIZE + LONG_BINGET + b"\x00\x00")
    with pytest.raises(CorruptCheckpointError):
        run(PROTO2 + TUPLE1 + STOP)  # TUPLE1 on an empty stack
