"""Fuzz: mutated checkpoints of every format through load, inspect and scan.

The only exceptions allowed are CheckpointError subclasses, and every input finishes within a time
bound. CI runs a short smoke (FUZZ_EXAMPLES, default 60 per format); for a long run:

    FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py -q
"""

from __future__ import annotations

import io
import os
import pickle
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchckpt

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
TIME_BOUND = 5.0


def _seeds() -> dict[str, bytes]:
    from safetensors.torch import save as st_save

    from torchckpt.demo.samples import write_py2_legacy

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    obj = {"epoch": 1, "state_dict": net.state_dict(), "np": np.float32(1.5), "arr": np.arange(3)}
    out = {}
    for name, zip_format in (("zip", True), ("legacy", False)):
        buf = io.BytesIO()
        torch.save(obj, buf, _use_new_zipfile_serialization=zip_format)
        out[name] = buf.getvalue()
    buf = io.BytesIO()
    write_py2_legacy({"state_dict": net.state_dict(), "x": np.float64(2.0)}, buf)
    out["py2"] = buf.getvalue()
    out["safetensors"] = st_save({k: v.contiguous() for k, v in net.state_dict().items()})
    out["pickle"] = pickle.dumps({"blobs": {"w": np.ones((2, 2), np.float32)}, "it": 3}, protocol=2)
    buf = io.BytesIO()
    torch.save(net, buf)
    out["whole"] = buf.getvalue()
    t7 = os.path.join(os.path.dirname(__file__), "data", "t7")
    for name in ("floattensor.t7", "recursive_class.t7", "tds_hash.t7"):
        with open(os.path.join(t7, name), "rb") as fh:
            out[f"t7-{name[:-3]}"] = fh.read()
    return out


SEEDS = _seeds()


@st.composite
def mutated(draw, seed: bytes):
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "splice-int"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        else:  # a huge or negative 4-byte integer somewhere (sizes, lengths, offsets)
            data[i:i + 4] = draw(st.sampled_from([b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80", b"\xff\xff\xff\xff"]))
    return bytes(data)


def _check(data: bytes, tmp_path) -> None:
    path = tmp_path / "fuzzed.bin"
    path.write_bytes(data)
    for fn in (lambda: torchckpt.load(path), lambda: torchckpt.inspect(path), lambda: torchckpt.load(data)):
        start = time.perf_counter()
        try:
            fn()
        except torchckpt.CheckpointError:
            pass
        assert time.perf_counter() - start < TIME_BOUND
    start = time.perf_counter()
    torchckpt.scan(path)  # never raises: problems are findings or 'unreadable'
    assert time.perf_counter() - start < TIME_BOUND


@pytest.mark.parametrize("fmt", sorted(SEEDS))
def test_fuzz_format(fmt, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp(f"fuzz-{fmt}")

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutated(SEEDS[fmt]))
    def run(data: bytes) -> None:
        _check(data, tmp_path)

    run()
