"""The one budget (issue 9 item 2): every limit raises LimitExceededError naming the limit and how to raise it,
``scan`` reports each over-budget file instead of calling it clean, the caller's Budget is honoured by every
reader, and compressed members of one file share one inflation allowance."""

from __future__ import annotations

import fractions
import io
import re
import struct
import time
import zipfile

import numpy as np
import pytest
from pickle_asm import EMPTY_DICT, MARK, NONE, PROTO2, SETITEM, STOP, TUPLE, TUPLE1, call, glob, s

import torchckpt
from torchckpt import Budget, Policy
from torchckpt.errors import LimitExceededError

BINPUT, BINGET = b"q", b"h"

# limit -> a small file that goes over it with the default budget
OVER_BUDGET = {
    "digits": PROTO2 + call(glob("fractions", "Fraction"), s("1e999999999")) + STOP,
    "digits_int": PROTO2 + b"I" + b"9" * 100_000 + b"\n" + STOP,
    "depth": PROTO2 + NONE + TUPLE1 * 50_000 + STOP,
    "depth_marks": PROTO2 + MARK * 50_000 + TUPLE * 50_000 + STOP,
    "depth_dict": PROTO2 + (EMPTY_DICT + s("k")) * 5_000 + NONE + SETITEM * 5_000 + STOP,
    "amplification": PROTO2 + s("x" * 1_000_000) + BINPUT + b"\x00" + b"0"
    + b"".join(call(glob("builtins", "tuple"), BINGET + b"\x00") + b"0" for _ in range(100)) + NONE + STOP,
    "steps": PROTO2 + MARK + b"K\x01" * 100_000 + TUPLE + BINPUT + b"\x00"
    + MARK + b"".join(BINGET + b"\x00" + NONE for _ in range(20_000)) + b"d" + STOP,
    "memo_gap": PROTO2 + NONE + b"r" + struct.pack("<I", 1 << 30) + STOP,
}


def _limit(case: str) -> str:
    return case.split("_int")[0].split("_marks")[0].split("_dict")[0]


@pytest.mark.parametrize("case", sorted(OVER_BUDGET))
def test_limit_is_named_with_how_to_raise_it_and_scan_flags_it(tmp_path, case):
    path = tmp_path / f"{case}.pkl"
    path.write_bytes(OVER_BUDGET[case])
    limit = _limit(case)
    start = time.perf_counter()
    with pytest.raises(LimitExceededError) as info:
        torchckpt.load(path)
    assert time.perf_counter() - start < 20
    text = str(info.value)
    assert path.name in text and f"the {limit} limit" in text
    assert re.search(rf"policy=Policy\(budget=Budget\({limit}=\d+", text), text
    report = torchckpt.scan(path)
    assert report.files[0].status != "clean", report.files[0].findings
    assert any(limit in str(f.to_dict()) for f in report.files[0].findings) or limit in str(report.files[0].error)


@pytest.mark.parametrize("case", ["digits", "depth", "memo_gap"])
def test_the_hinted_budget_loads_the_file(tmp_path, case):
    """The hint is not decoration: the budget it names loads the file (these are bounded, merely big)."""
    path = tmp_path / f"{case}.pkl"
    path.write_bytes({"digits": PROTO2 + call(glob("fractions", "Fraction"), s("1e5000")) + STOP,
                      "depth": PROTO2 + NONE + TUPLE1 * 400 + STOP,
                      "memo_gap": PROTO2 + s("ok") + b"r" + struct.pack("<I", 100_000) + STOP}[case])
    with pytest.raises(LimitExceededError) as info:
        torchckpt.load(path)
    args = re.search(r"Budget\(([^)]*)\)", str(info.value)).group(1)
    budget = Budget(**{k: int(v) for k, v in (kv.split("=") for kv in args.split(", "))})
    value = torchckpt.load(path, policy=Policy(budget=budget))
    assert value == {"digits": fractions.Fraction(10) ** 5000, "depth": _nested(400), "memo_gap": "ok"}[case]


def _nested(n: int):
    value = None
    for _ in range(n):
        value = (value,)
    return value


def _npz(members: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **members)
    return buf.getvalue()


def test_npz_members_share_one_inflation_allowance(tmp_path):
    """Each member alone is within bounds; together they inflate past what the file may take."""
    members = {f"m{k}": np.zeros(2 << 20, np.float32) for k in range(3)}  # 3 x 8 MiB from a few KiB
    path = tmp_path / "bomb.npz"
    path.write_bytes(_npz(members))
    policy = Policy(budget=Budget(inflate_floor=20 << 20))
    with pytest.raises(LimitExceededError, match="inflation") as info:
        torchckpt.load(path, policy=policy)
    assert "bomb.npz" in str(info.value) and "inflate_floor=" in str(info.value)
    assert sorted(torchckpt.load(path)) == sorted(members)  # the default floor (256 MiB) takes it


def test_npz_member_past_the_default_floor_is_refused(tmp_path):
    path = tmp_path / "big.npz"
    path.write_bytes(_npz({"a": np.zeros(72 << 20, np.float32)}))  # 288 MiB of zeros from ~280 KiB
    start = time.perf_counter()
    with pytest.raises(LimitExceededError, match="inflation"):
        torchckpt.load(path)
    assert time.perf_counter() - start < 30
    assert torchckpt.scan(path).files[0].status != "clean"


def test_compressed_torch_zip_pickle_is_charged_to_the_same_budget(tmp_path):
    import torch

    raw = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, raw)
    src = zipfile.ZipFile(io.BytesIO(raw.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    path = tmp_path / "deflated.pt"
    path.write_bytes(out.getvalue())
    assert torch.equal(torchckpt.load(path)["w"], torch.zeros(4))  # a re-compressed file is fine
    with pytest.raises(LimitExceededError, match="inflation"):
        torchckpt.load(path, policy=Policy(budget=Budget(inflation=0, inflate_floor=16)))


def _stub_chain(n: int) -> bytes:
    body = NONE
    for _ in range(n):
        body = call(glob("mymod", "Node"), body)
    return PROTO2 + body + STOP


def test_deep_stub_nesting_in_stub_to_plain(tmp_path):
    path = tmp_path / "chain.pkl"
    path.write_bytes(_stub_chain(120))
    obj = torchckpt.load(path)
    with pytest.raises(LimitExceededError, match="max_depth"):
        torchckpt.stub_to_plain(obj)
    assert torchckpt.stub_to_plain(obj, max_depth=400)["__class__"] == "mymod.Node"
    path.write_bytes(_stub_chain(3000))
    obj = torchckpt.load(path, policy=Policy(budget=Budget(depth=10_000)))
    with pytest.raises(LimitExceededError):  # beyond Python's own stack: still a typed error
        torchckpt.stub_to_plain(obj, max_depth=100_000)


def _deep_checkpoint(tmp_path):
    """A real torch.save file whose metadata nests 300 deep: over the default depth, fine under depth=1024."""
    import torch

    deep: object = "leaf"
    for _ in range(150):
        deep = [deep]  # each level: a list (and its pickle frame)
    path = tmp_path / "deep.pt"
    torch.save({"state_dict": torch.nn.Linear(2, 2).state_dict(), "meta": deep}, path)
    return path


@pytest.mark.parametrize("front_end", ["load", "inspect", "load_into", "convert", "diff", "scan"])
def test_every_front_end_runs_under_the_budget(tmp_path, front_end):
    import torch

    path = _deep_checkpoint(tmp_path)
    model = torch.nn.Linear(2, 2)
    run = {"load": lambda **kw: torchckpt.load(path, **kw),
           "inspect": lambda **kw: torchckpt.inspect(path, **kw),
           "load_into": lambda **kw: torchckpt.load_into(model, path, **kw),
           "convert": lambda **kw: torchckpt.convert(path, str(tmp_path / "out.safetensors"), weights_only=True, **kw),
           "diff": lambda **kw: torchckpt.diff(path, path, **kw)}
    tight = Policy(budget=Budget(depth=100))
    if front_end == "scan":
        assert torchckpt.scan(path).files[0].status == "clean"  # within the default budget
        tight_scan = torchckpt.scan(path, policy=tight).files[0]
        assert tight_scan.status == "unreadable" and "Budget(depth=" in str(tight_scan.to_dict())
        return
    run[front_end]()  # within the default budget
    with pytest.raises(LimitExceededError, match="depth") as info:
        run[front_end](policy=tight)
    assert "deep.pt" in str(info.value) and "Budget(depth=" in str(info.value)


def _colliding_float_keys(n: int) -> bytes:
    """Floats k * (2**61 - 1) all hash to 0 (CPython's numeric hash): a quadratic dict."""
    keys = b"".join(b"G" + struct.pack(">d", float(k * ((1 << 61) - 1))) + NONE for k in range(1, n))
    return PROTO2 + EMPTY_DICT + MARK + keys + b"u" + STOP


# unbounded-work attacks refused by a constructor or the key guard rather than a budget limit
REFUSED = {
    "size_of_range": PROTO2 + call(glob("torch", "Size"), call(glob("builtins", "range"), b"J" + struct.pack(
        "<i", 2 * 10**9))) + STOP,
    "tuple_of_range": PROTO2 + call(glob("builtins", "tuple"), call(glob("builtins", "range"), b"J" + struct.pack(
        "<i", 2 * 10**9))) + STOP,
    "colliding_keys": _colliding_float_keys(3000),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unbounded_work_is_refused_fast_and_scan_flags_it(tmp_path, case):
    path = tmp_path / f"{case}.pkl"
    path.write_bytes(REFUSED[case])
    start = time.perf_counter()
    with pytest.raises(torchckpt.CheckpointError):
        torchckpt.load(path)
    assert time.perf_counter() - start < 5
    assert torchckpt.scan(path).files[0].status != "clean"
