"""A small sample of the generated VM programs (tests/vm_programs.py; the long run is
``python tests/vm_programs.py 50000``): random opcode programs over every allowlisted global with hostile
arguments, in a bare pickle, a torch zip or a legacy stream. For each, load (path and bytes), inspect and
scan agree and end in a value or a CheckpointError within the time bound."""

from __future__ import annotations

import os
import random
import time

import pytest
from agreement import check
from vm_programs import _globals, program

PROGRAMS = int(os.environ.get("VM_PROGRAMS", "200"))
NAMES = _globals()


def test_generated_programs_end_in_a_value_or_a_checkpoint_error(tmp_path):
    import torch  # noqa: F401 - imported before the clock runs

    outcomes: dict[str, int] = {}
    for seed in range(PROGRAMS):
        outcome = check(program(random.Random(seed), NAMES), str(tmp_path))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert set(outcomes) <= {"ok", "error", "unsafe"}
    if PROGRAMS >= 100:  # the sample reaches all three outcomes (the generator is not degenerate)
        assert len(outcomes) == 3, outcomes


# ----------------------------------------------------------------------------- found by the long run
def _case(data: bytes):
    from agreement import Case

    return Case("pickle", {"f": data})


@pytest.mark.parametrize("args", [b"K\x01", b"X\x01\x00\x00\x00aK\x00", b"K\x01K\x00NN}"])
def test_structure_rebuilders_refuse_what_build_refuses(tmp_path, args):
    """scan (structure) read ``_rebuild_parameter[_with_state]`` calls that load (build) refuses: too few
    arguments, or data that is not a tensor. Both now take the build rebuilder's arguments and checks."""
    from pickle_asm import PROTO2, STOP, glob

    for name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
        data = PROTO2 + glob("torch._utils", name) + b"(" + args + b"tR" + STOP
        assert check(_case(data), str(tmp_path)) == "error"


def test_flat_tuples_of_a_long_string_are_walked_fast(tmp_path):
    """tuple(<70k-char str>) ten times: the depth walk took seconds per file (one Python step per element);
    a container of leaves is now recognised from its element types at C speed."""
    from pickle_asm import PROTO2, STOP

    big = b"X" + (70_000).to_bytes(4, "little") + b"x" * 70_000 + b"q\x00"
    repeat = b"(" + b"cbuiltins\ntuple\n(h\x00tR" * 10 + b"l"
    start = time.perf_counter()
    assert check(_case(PROTO2 + big + b"0" + repeat + STOP), str(tmp_path)) == "ok"
    assert time.perf_counter() - start < 3


@pytest.mark.parametrize("ctor", [("builtins", "str"), ("builtins", "set"), ("builtins", "float"), ("builtins", "int"),
                                  ("pathlib", "PosixPath"), ("collections", "deque"), ("decimal", "Decimal")])
@pytest.mark.parametrize("value", ["device", "dtype"])
def test_torch_values_are_not_text_to_any_constructor(tmp_path, ctor, value):
    """scan stands for torch.device/dtype with str subclasses; str(device), set(dtype), Path(device) were
    text to scan and refused by load. Found by the VM fuzz run."""
    from pickle_asm import PROTO2, STOP, call, glob, s

    arg = call(glob("torch", "device"), s("cpu")) if value == "device" else glob("torch", "float32")
    assert check(_case(PROTO2 + call(glob(*ctor), arg) + STOP), str(tmp_path)) == "error"


def test_whole_model_whose_parameter_is_a_stub(tmp_path):
    """Found by the agreement run (50,000 inputs): a whole-model pickle whose parameter rebuilder is an unknown
    global loads (the parameter is a stub) but inspect raised AttributeError on the stub's ``shape``; now
    state_dict_of refuses the module with a CheckpointError (front's fix in fit/tree.py)."""
    import io
    import zipfile

    import torch

    buf = io.BytesIO()
    torch.save(torch.nn.Linear(2, 2), buf)
    out = io.BytesIO()
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                assert b"torch._utils\n_rebuild_parameter" in data
                data = data.replace(b"torch._utils\n_rebuild_parameter", b"torch._utilz\n_rebuild_parameter")
            dst.writestr(info, data)
    from agreement import Case

    assert check(Case("whole", {"f": out.getvalue()}), str(tmp_path)) == "ok"  # inspect: value or CheckpointError
    import torchckpt

    with pytest.raises(torchckpt.CheckpointError, match="not a tensor"):
        torchckpt.inspect(tmp_path / "input.bin")
