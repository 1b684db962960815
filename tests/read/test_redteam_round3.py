"""Red-team round 3: attacks on the code that landed last (modules under allow=, ...), one test per technique.

Each file is written by torch.save from a real model the test tampers with, the way a hostile file's state
says it; each must be refused with a typed CheckpointError naming the file (or load as something inert).
"""

from __future__ import annotations

import time

import pytest
import torch

import torchckpt

USER = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.features(x))
'''


@pytest.fixture
def mypkg(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg_rt3"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(USER)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    return importlib.import_module("mypkg_rt3.models")


def _refused(path, error, match):
    t0 = time.monotonic()
    with pytest.raises(error, match=match) as info:
        torchckpt.load(path, allow=["mypkg_rt3.*"])
    assert str(path) in str(info.value)
    assert time.monotonic() - t0 < 30
    return info.value


@pytest.mark.parametrize("where", ["own_child", "through_a_grandchild"])
def test_module_that_contains_itself(tmp_path, mypkg, where):
    """A cycle in _modules (the module as its own child, or a grandchild's child) loaded fine and made
    state_dict() die with RecursionError."""
    net = mypkg.Net()
    (net if where == "own_child" else net.features)._modules["up"] = net
    path = tmp_path / "cycle.pt"
    torch.save(net, path)
    _refused(path, torchckpt.CorruptCheckpointError, "contains itself")


def test_module_dag_of_2_to_the_40_shared_children(tmp_path, mypkg):
    """40 levels of Sequential(c, c): loads in a second, then state_dict() walks 2^40 modules (hangs)."""
    c = torch.nn.Linear(1, 1)
    for _ in range(40):
        c = torch.nn.Sequential(c, c)
    net = mypkg.Net()
    net._modules["dag"] = c
    path = tmp_path / "dag.pt"
    torch.save(net, path)
    _refused(path, torchckpt.LimitExceededError, "visits")


def test_module_tree_deep_through_memo_refs(tmp_path, mypkg):
    """Children pickled first (a flat list), each the parent of the one before: deep without deep pickle."""
    mods = [torch.nn.Sequential()]
    for _ in range(1000):
        s = torch.nn.Sequential()
        s._modules["c"] = mods[-1]
        mods.append(s)
    net = mypkg.Net()
    net._modules["deep"] = mods[-1]
    path = tmp_path / "deep.pt"
    torch.save([*mods, net], path)
    _refused(path, torchckpt.LimitExceededError, "nests too deep")


@pytest.mark.parametrize("table,name", [("_parameters", "a.b"), ("_parameters", ""), ("_buffers", "x.y"),
                                        ("_modules", "sub.m")])
def test_module_names_that_register_refuses(tmp_path, mypkg, table, name):
    """A dotted or empty name makes state_dict keys ambiguous (head.a.b is a parameter of head.a?)."""
    net = mypkg.Net()
    value = torch.nn.ReLU() if table == "_modules" else torch.nn.Parameter(torch.ones(1))
    getattr(net.head, table)[name] = value
    path = tmp_path / "names.pt"
    torch.save(net, path)
    _refused(path, torchckpt.CorruptCheckpointError, "no '.'")


def test_module_attribute_shadowing_a_parameter(tmp_path, mypkg):
    """__dict__['weight'] beside _parameters['weight']: forward uses one tensor, state_dict shows the other."""
    net = mypkg.Net()
    net.head.__dict__["weight"] = torch.zeros(3, 4)
    path = tmp_path / "shadow.pt"
    torch.save(net, path)
    _refused(path, torchckpt.UnsafeCheckpointError, "hide it from forward")


def test_module_state_given_twice(tmp_path, mypkg):
    """A second BUILD after the parent checked the child would add the parent under it (a late cycle)."""
    import io
    import pickletools
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "helpers"))
    from pickle_asm import torch_zip

    lin = "torch.nn.modules.container\nSequential\n"
    empty_state = b"}(X\x08\x00\x00\x00_modules}u"
    body = (b"\x80\x02" + b"c" + lin.encode() + b")\x81" + empty_state + b"b" + b"\x940"  # child: memo 0
            + b"c" + lin.encode() + b")\x81" + b"}(X\x08\x00\x00\x00_modules}(X\x01\x00\x00\x00ch\x00uub"
            + b"\x940"  # parent: memo 1
            + b"h\x00" + b"}(X\x08\x00\x00\x00_modules}(X\x01\x00\x00\x00ph\x01uub0" + b"h\x01.")
    pickletools.dis(body, out=io.StringIO())  # a well-formed stream
    path = tmp_path / "twice.pt"
    path.write_bytes(torch_zip(body))
    with pytest.raises(torchckpt.CorruptCheckpointError, match="given twice") as info:
        torchckpt.load(path, allow=["torch.nn.modules.container.Sequential", "mypkg_rt3.*"])
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- a blocked callable by another name
def _helpers():
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "helpers"))
    import pickle_asm
    return pickle_asm


@pytest.mark.parametrize("module,name", [("torch._C", "_VariableFunctions.from_file"),
                                         ("torch.functional", "torch.from_file"),
                                         ("torch", "_C._VariableFunctions.from_file"),
                                         ("torch._C._VariableFunctions", "from_file")])
@pytest.mark.parametrize("allow", [None, ["torch.*"]])
def test_blocked_function_through_an_alias_path(tmp_path, module, name, allow):
    """torch.from_file is blocked by name; under allow=["torch.*"] its other spellings were imported for real
    and called (the file created a file on disk), and scan called them clean."""
    a = _helpers()
    target = tmp_path / "created"
    body = a.PROTO4 + a.call(a.glob(module, name), a.s(str(target)), b"\x88", a.i(16)) + a.STOP
    path = tmp_path / "alias.pkl"
    path.write_bytes(body)
    with pytest.raises(torchckpt.UnsafeCheckpointError) as info:
        torchckpt.load(path, allow=allow)
    assert str(path) in str(info.value) and not target.exists()
    assert torchckpt.scan(path).status == "findings"


@pytest.mark.parametrize("allow", [None, ["torch.*"]])
def test_getattr_of_a_blocked_function(tmp_path, allow):
    """getattr(torch._C._VariableFunctionsClass, "from_file") gave an inert reference (scan: clean) or, under
    allow=["torch.*"], the real function; torch.load would call it."""
    a = _helpers()
    ff = a.call(a.glob("builtins", "getattr"), a.glob("torch._C", "_VariableFunctionsClass"), a.s("from_file"))
    path = tmp_path / "getattr.pkl"
    path.write_bytes(a.PROTO2 + a.call(ff, a.s(str(tmp_path / "created")), b"\x88", a.i(16)) + a.STOP)
    with pytest.raises(torchckpt.UnsafeCheckpointError, match="getattr") as info:
        torchckpt.load(path, allow=allow)
    assert str(path) in str(info.value) and not (tmp_path / "created").exists()
    assert torchckpt.scan(path).status == "findings"


def test_allowed_package_aliasing_a_dangerous_callable(tmp_path, monkeypatch):
    """allow=["mypkg.*"] imports mypkg's names for real; mypkg.tools.run = os.system is os.system."""
    pkg = tmp_path / "mypkg_rt3b"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tools.py").write_text("import os\nrun = os.system\nimport torch\nread = torch.from_file\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    a = _helpers()
    marker = tmp_path / "ran"
    for name, args in [("run", a.s(f"touch {marker}")), ("read", a.s(str(marker)) + b"\x88" + a.i(16))]:
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(a.PROTO2 + a.call(a.glob("mypkg_rt3b.tools", name), args) + a.STOP)
        with pytest.raises(torchckpt.UnsafeCheckpointError) as info:
            torchckpt.load(path, allow=["mypkg_rt3b.*"])
        assert str(path) in str(info.value) and not marker.exists()


_EMPTY_MODULES = b"}(X\x08\x00\x00\x00_modules}u"


@pytest.mark.parametrize("attack", ["append_itself_after_build", "append_before_build", "parameterlist_append",
                                    "moduledict_setitem"])
def test_container_methods_on_a_module_built_as_a_value(tmp_path, mypkg, attack):
    """APPENDS/SETITEMS called ModuleList.append / ModuleDict.__setitem__ with the file's items: a list that holds
    itself after build_module checked the tree (repr() and state_dict() of the model recursed until RecursionError), raw AttributeErrors on unbuilt modules."""
    a = _helpers()
    cont = "torch.nn.modules.container"
    new = {"ml": a.glob(cont, "ModuleList") + b")\x81", "pl": a.glob(cont, "ParameterList") + b")\x81",
           "md": a.glob(cont, "ModuleDict") + b")\x81"}
    body = {"append_itself_after_build": new["ml"] + _EMPTY_MODULES + b"b\x94(h\x00e",
            "append_before_build": new["ml"] + b"(" + new["ml"] + b"e",
            "parameterlist_append": new["pl"] + _EMPTY_MODULES + b"b(" + a.glob("collections", "OrderedDict") + b"e",
            "moduledict_setitem": new["md"] + _EMPTY_MODULES + b"b(" + a.s("a") + new["md"] + _EMPTY_MODULES
            + b"bu"}[attack]
    path = tmp_path / "container.pkl"
    path.write_bytes(a.PROTO2 + body + a.STOP)
    _refused(path, torchckpt.CorruptCheckpointError, "APPENDS|SETITEMS")


# --------------------------------------------------------------------------- DeepSpeed folders
def test_deepspeed_rank_number_of_10_to_the_14(tmp_path):
    """A rank file named zero_pp_rank_99999999999999_...: listing the missing ranks built a set of 10^14
    numbers (MemoryError, or all the machine's memory)."""
    step = tmp_path / "run" / "global_step1"
    step.mkdir(parents=True)
    (tmp_path / "run" / "latest").write_text("global_step1")
    for rank in (0, 99_999_999_999_999):
        torch.save({"x": 1}, step / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
    t0 = time.monotonic()
    with pytest.raises(torchckpt.CorruptCheckpointError, match=r"ranks \[1\] are missing") as info:
        torchckpt.load(str(tmp_path / "run"))
    assert str(step) in str(info.value) and "99999999999999" in str(info.value)
    assert time.monotonic() - t0 < 10
    report = torchckpt.scan(str(tmp_path / "run"))
    assert report.status != "clean"


_UNIVERSAL = {"module": {"w": torch.zeros(2, 2)}, "buffer_names": [], "param_shapes": [{"w": [2, 2]}]}


@pytest.mark.parametrize("attack,fields", [
    ("int_module_key", {"module": {5: torch.zeros(2, 2)}}),
    ("unhashable_buffer_name", {"buffer_names": [[1]]}),
    ("param_shapes_group_not_a_dict", {"param_shapes": [[1, 2]]}),
    ("frozen_shapes_a_list", {"module": {"w": torch.zeros(2, 2), "v": torch.zeros(1)}, "frozen_param_shapes": ["v"]}),
    ("escape_in_parameter_name", {"module": {"w": torch.zeros(2, 2), "\x1b[31mevil": torch.zeros(1)}}),
])
def test_deepspeed_universal_forged_model_states(tmp_path, attack, fields):
    """Forged model-state fields of a universal folder made load and scan raise raw ValueError/TypeError/
    AttributeError from inside the reader; a parameter name's ESC reached the message raw."""
    folder = tmp_path / "universal"
    (folder / "zero" / "w").mkdir(parents=True)
    torch.save({"param": torch.ones(2, 2)}, folder / "zero" / "w" / "fp32.pt")
    torch.save({**_UNIVERSAL, **fields}, folder / "mp_rank_00_model_states.pt")
    with pytest.raises(torchckpt.CorruptCheckpointError) as info:
        torchckpt.load(str(folder))
    assert str(folder) in str(info.value) and "\x1b" not in str(info.value)
    assert torchckpt.scan(str(folder)).status == "unreadable"


# --------------------------------------------------------------------------- TorchScript < 1.2
def test_torchscript_v1_chain_of_long_module_names(tmp_path):
    """300 nested submodules named with 20,000 characters, each with a parameter: a 6 MB model.json built
    900 MB of state-dict keys (each key repeats every ancestor's name; quadratic), 2 GB peak."""
    import resource

    from test_torchscript_v1 import _module, _param, tensor_def, write_archive

    t = torch.ones(1)
    mod = _module("leaf", parameters=[_param("w", 0)])
    for _ in range(300):
        mod = _module("n" * 20_000, parameters=[_param("w", 0)], submodules=[mod])
    model = {"protoVersion": "1", "mainModule": _module("", submodules=[mod]),
             "tensors": [tensor_def(t, "tensors/0")], "producerVersion": "1.1"}
    path = tmp_path / "chain.pt"
    write_archive(path, model, {"tensors/0": t.numpy().tobytes()})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(torchckpt.LimitExceededError, match="module paths") as info:
        torchckpt.load(path)
    assert str(path) in str(info.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 600 << 10  # KiB: well under 900 MB
    assert torchckpt.scan(path).status == "unreadable"


# --------------------------------------------------------------------------- terminal escapes
@pytest.mark.parametrize("how", ["uncaught_traceback", "printed_error", "warning_with_the_error"])
def test_error_text_from_the_file_through_a_pty(tmp_path, how):
    """A global named builtins.<ESC>[31m...: the UnsafeCheckpointError quoted it raw, and a script's traceback
    (or print(err), or a warning built from it) wrote the escape sequence to the user's terminal."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tools"))
    from test_terminal_escapes import run_on_pty

    a = _helpers()
    path = tmp_path / "esc.pkl"
    path.write_bytes(a.PROTO2 + a.call(a.glob("builtins", "\x1b]8;;http://evil/\x07x\x1b[2J"), a.s("x")) + a.STOP)
    code = {"uncaught_traceback": f"import torchckpt\ntorchckpt.load({str(path)!r})\n",
            "printed_error": f"import torchckpt\ntry:\n    torchckpt.load({str(path)!r})\n"
                             "except torchckpt.CheckpointError as e:\n    print(e)\n",
            "warning_with_the_error": f"import torchckpt, warnings\ntry:\n    torchckpt.load({str(path)!r})\n"
                                      "except torchckpt.CheckpointError as e:\n    warnings.warn(f'skipped: {e}')\n"}[how]
    rc, output = run_on_pty([], python=["-c", code], timeout=60)
    assert b"UnsafeCheckpointError" in output or b"imports builtins" in output, output[-500:]
    assert b"\x1b]8" not in output and b"\x1b[2J" not in output, output[-800:]
    assert b"\\x1b" in output


# --------------------------------------------------------------------------- numpy object arrays
@pytest.mark.parametrize("shape", ["itself", "each_other", "itself_in_a_list"])
def test_numpy_object_array_that_contains_itself(tmp_path, shape):
    """numpy pickles an array holding itself with a reference to its unbuilt placeholder: load gave
    array([array([], dtype=int8), 1]), a silently different value, and scan called it clean."""
    np = pytest.importorskip("numpy")
    a = np.empty(2, dtype=object)
    a[1] = 1
    if shape == "itself":
        a[0] = a
    elif shape == "each_other":
        b = np.empty(1, dtype=object)
        b[0], a[0] = a, b
    else:
        a[0] = [a]
    path = tmp_path / "self.pt"
    torch.save({"a": a}, path)
    with pytest.raises(torchckpt.CorruptCheckpointError, match="contains itself") as info:
        torchckpt.load(path)
    assert str(path) in str(info.value)
    assert torchckpt.scan(path).status == "unreadable"
