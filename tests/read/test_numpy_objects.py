"""numpy object arrays (a pickled list of weight arrays) are built from the items their pickle holds, within
the budget, in plain pickles, torch.save files, .npy and .npz; an object dtype never reads bytes."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch

import torchckpt
from torchckpt.errors import CheckpointError, CorruptCheckpointError, LimitExceededError, UnsafeCheckpointError

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct


def weights() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(3), np.arange(5, dtype=np.int64)]


def object_array(items, shape=None) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        arr[i] = item
    return arr if shape is None else arr.reshape(shape)


def assert_same(expected, got) -> None:
    if isinstance(expected, np.ndarray) and expected.dtype == object:
        assert isinstance(got, np.ndarray) and got.dtype == object and got.shape == expected.shape
        for a, b in zip(expected.reshape(-1), got.reshape(-1)):
            assert_same(a, b)
    elif isinstance(expected, np.ndarray):
        assert isinstance(got, np.ndarray) and got.dtype == expected.dtype and np.array_equal(got, expected)
    elif isinstance(expected, (list, tuple)):
        assert type(got) is type(expected) and len(got) == len(expected)
        for a, b in zip(expected, got):
            assert_same(a, b)
    else:
        assert got == expected


CASES = {
    "list_of_weights": lambda: object_array(weights()),
    "ragged_2d_fortran": lambda: np.asfortranarray(object_array(weights() + ["name"], (2, 2))),
    "nested": lambda: object_array([object_array(weights()[:2]), {"lr": 0.1}, None]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pickled_object_array_loads_as_values(tmp_path, case):
    value = CASES[case]()
    path = tmp_path / "w.pkl"
    path.write_bytes(pickle.dumps({"weights": value}, protocol=4))
    oracle = pickle.loads(path.read_bytes())  # our own file: the trusted reference
    got = torchckpt.load(path)
    assert_same(oracle["weights"], got["weights"])
    assert torchckpt.scan(path).status == "clean"


def test_object_array_in_a_torch_save_file(tmp_path):
    value = object_array(weights())
    torch.save({"weights": value, "step": 3}, tmp_path / "w.pt")
    got = torchckpt.load(tmp_path / "w.pt")
    assert_same(value, got["weights"]) and got["step"] == 3
    listing = str(torchckpt.inspect(tmp_path / "w.pt"))
    assert "weights.0" in listing and "weights.2" in listing  # the arrays inside are listed as tensors


@pytest.mark.parametrize("protocol_2d", [False, True])
def test_npy_and_npz_object_arrays(tmp_path, protocol_2d):
    value = object_array(weights(), None)
    if protocol_2d:
        value = object_array(weights() + [None], (2, 2))
    np.save(tmp_path / "w.npy", value, allow_pickle=True)
    assert_same(np.load(tmp_path / "w.npy", allow_pickle=True), torchckpt.load(tmp_path / "w.npy"))
    np.savez(tmp_path / "w.npz", objects=value, plain=np.arange(3.0))
    got = torchckpt.load(tmp_path / "w.npz")
    assert_same(value, got["objects"]) and np.array_equal(got["plain"], np.arange(3.0))
    assert torchckpt.scan([tmp_path / "w.npy", tmp_path / "w.npz"]).status == "clean"


# --------------------------------------------------------------------------- attacks
class _Reduce:
    def __init__(self, fn, args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


def _array(shape, dtype, data):
    return _Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, shape, dtype, False, data))


class _System:
    def __reduce__(self):
        import os
        return os.system, ("true",)


ATTACKS = {
    "object_dtype_over_bytes": (_array((2,), np.dtype(object), b"\x00" * 16), UnsafeCheckpointError),
    "object_field_in_a_struct": (_array((1,), np.dtype([("a", object)]), [None]), UnsafeCheckpointError),
    "item_count_mismatch": (_array((3,), np.dtype(object), [1, 2]), CorruptCheckpointError),
    "huge_shape_few_items": (_array((1 << 40,), np.dtype(object), [1]), CorruptCheckpointError),
    "command_in_an_item": (_array((1,), np.dtype(object), [_System()]), UnsafeCheckpointError),
    "deep_item": (_array((1,), np.dtype(object), [None]), None),  # replaced below (needs its own pickle)
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_object_array_attacks_refused_by_load_and_scan(tmp_path, name):
    value, error = ATTACKS[name]
    path = tmp_path / f"{name}.pkl"
    if name == "deep_item":  # a list 150,000 levels deep as the item, written as opcodes (EMPTY_LIST, APPEND)
        blob = pickle.dumps(_array((1,), np.dtype(object), ["DEEPDEEP"]), protocol=4)
        deep = b"]" * 150_001 + b"a" * 150_000
        path.write_bytes(blob.replace(b"\x8c\x08DEEPDEEP", deep))
        error = LimitExceededError
    else:
        path.write_bytes(pickle.dumps(value, protocol=4))
    with pytest.raises(error):
        torchckpt.load(path)
    status = torchckpt.scan(path).status
    assert status == ("findings" if error is UnsafeCheckpointError else "unreadable")


def test_npy_object_array_whose_pickle_disagrees_with_its_header(tmp_path):
    buf = io.BytesIO()
    np.save(buf, object_array([1, 2, 3]), allow_pickle=True)
    blob = buf.getvalue()
    header_end = blob.index(b"\n") + 1
    forged = blob[:header_end] + pickle.dumps(object_array([1, 2]), protocol=3)  # header says 3 items
    (tmp_path / "x.npy").write_bytes(forged)
    with pytest.raises(CheckpointError):
        torchckpt.load(tmp_path / "x.npy")


def test_convert_an_object_array_of_weights(tmp_path):
    value = object_array(weights())
    torch.save({"weights": value}, tmp_path / "w.pt")
    assert torchckpt.convert(tmp_path / "w.pt", tmp_path / "out.pt").verified
    out = torch.load(tmp_path / "out.pt")  # plain torch, weights_only: the arrays became tensors
    for a, b in zip(value, out["weights"]):
        assert torch.equal(torch.from_numpy(a), b)
