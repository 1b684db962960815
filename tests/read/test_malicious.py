"""The malicious corpus: every sample tries to create a canary file, in every container kind.

Each must raise UnsafeCheckpointError naming the global, and the canary must never appear.
One test per technique (named after it) x container (raw pickle, zip data.pkl, legacy object
pickle, legacy magic-number pickle, legacy sys_info pickle).
"""

from __future__ import annotations

import io
import pickle
import zipfile

import pytest
from pickle_asm import (EMPTY_DICT, MARK, MEMOIZE, OBJ, PROTO2, PROTO4, REDUCE, SETITEM, STACK_GLOBAL, STOP, TUPLE,
                        b, call, glob, legacy, s, torch_zip)

import torchckpt
from torchckpt import UnsafeCheckpointError


def _cmd(canary) -> str:
    return f"touch {canary}"


def _py(canary) -> str:
    return f"open({str(canary)!r}, 'w').write('pwned')"


def technique_os_system(c):
    return call(glob("os", "system"), s(_cmd(c)))


def technique_posix_system(c):
    return call(glob("posix", "system"), s(_cmd(c)))


def technique_nt_system(c):
    return call(glob("nt", "system"), s(_cmd(c)))


def technique_subprocess_popen(c):
    return call(glob("subprocess", "Popen"), MARK + s("touch") + s(str(c)) + b"l")


def technique_subprocess_check_output(c):
    return call(glob("subprocess", "check_output"), MARK + s("touch") + s(str(c)) + b"l")


def technique_builtins_eval(c):
    return call(glob("builtins", "eval"), s(_py(c)))


def technique_py2_builtin_eval(c):
    return call(glob("__builtin__", "eval"), s(_py(c)))


def technique_builtins_exec(c):
    return call(glob("builtins", "exec"), s(_py(c)))


def technique_builtins_open(c):
    return call(glob("builtins", "open"), s(str(c)), s("w"))


def technique_import_getattr_chain(c):
    os_mod = call(glob("builtins", "__import__"), s("os"))
    system = call(glob("builtins", "getattr"), os_mod, s("system"))
    return call(system, s(_cmd(c)))


def technique_importlib_import_module(c):
    os_mod = call(glob("importlib", "import_module"), s("os"))
    return call(call(glob("builtins", "getattr"), os_mod, s("system")), s(_cmd(c)))


def technique_runpy(c):
    return call(glob("runpy", "_run_code"), s(_py(c)), EMPTY_DICT)


def technique_nested_pickle_loads(c):
    inner = PROTO2 + technique_os_system(c) + STOP
    return call(glob("pickle", "loads"), b(inner))


def technique_nested_torch_load_from_bytes(c):
    inner = PROTO2 + technique_os_system(c) + STOP
    return call(glob("torch.storage", "_load_from_bytes"), b(inner))


def technique_nested_torch_load(c):
    inner = PROTO2 + technique_os_system(c) + STOP
    return call(glob("torch", "load"), call(glob("io", "BytesIO"), b(inner)))


def technique_functools_partial(c):
    part = call(glob("functools", "partial"), glob("os", "system"), s(_cmd(c)))
    return part + EMPTY_TUPLE_ + REDUCE


EMPTY_TUPLE_ = b")"


def technique_operator_attrgetter(c):
    os_mod = call(glob("builtins", "__import__"), s("os"))
    getter = call(glob("operator", "attrgetter"), s("system"))
    return call(call(getter, os_mod), s(_cmd(c)))


def technique_operator_methodcaller(c):
    os_mod = call(glob("builtins", "__import__"), s("os"))
    caller = call(glob("operator", "methodcaller"), s("system"), s(_cmd(c)))
    return call(caller, os_mod)


def technique_stack_global_memoised_strings(c):
    # protocol 4: the module and name come from the memo, not from a GLOBAL opcode
    return (s("os") + MEMOIZE + s("system") + MEMOIZE + b"0" + b"0" + b"h\x00" + b"h\x01" + STACK_GLOBAL
            + MARK + s(_cmd(c)) + TUPLE + REDUCE)


def technique_stack_global_dotted_name(c):
    return s("torch") + s("storage._load_from_bytes") + STACK_GLOBAL + MARK + b(b"x") + TUPLE + REDUCE


def technique_inst_opcode(c):
    return MARK + s(_cmd(c)) + b"ios\nsystem\n"


def technique_obj_opcode(c):
    return MARK + glob("os", "system") + s(_cmd(c)) + OBJ


def technique_copyreg_reconstructor(c):
    popen = glob("subprocess", "Popen")
    return call(glob("copyreg", "_reconstructor"), popen, popen, MARK + s("touch") + s(str(c)) + b"l")


def technique_numpy_runstring(c):
    return call(glob("numpy.testing._private.utils", "runstring"), s(_py(c)), EMPTY_DICT)


def technique_cprofile_run(c):
    return call(glob("cProfile", "run"), s(_py(c)))


def technique_timeit(c):
    return call(glob("timeit", "timeit"), s(_py(c)), s("pass"), i1())


def i1():
    return b"K\x01"


def technique_logging_dictconfig(c):
    return call(glob("logging.config", "dictConfig"), EMPTY_DICT)


def technique_types_functiontype_compile(c):
    code = call(glob("builtins", "compile"), s(_py(c)), s("<x>"), s("exec"))
    return call(call(glob("types", "FunctionType"), code, EMPTY_DICT), )


def technique_code_interactive_interpreter(c):
    interp = call(glob("code", "InteractiveInterpreter"))
    return call(call(glob("builtins", "getattr"), interp, s("runsource")), s(_py(c)))


def technique_torch_fx_exec(c):
    return call(glob("torch.fx.graph_module", "_forward_from_src"), s(_py(c)), EMPTY_DICT)


def technique_webbrowser(c):
    return call(glob("webbrowser", "open"), s("file:///etc/passwd"))


TECHNIQUES = {name[len("technique_"):]: fn for name, fn in globals().items() if name.startswith("technique_")}


def _payload_pickle(value: bytes, proto: bytes = PROTO2) -> bytes:
    return proto + EMPTY_DICT + s("state_dict") + value + SETITEM + STOP


def _container(kind: str, technique: str, canary) -> bytes:
    proto = PROTO4 if "stack_global" in technique else PROTO2
    evil = _payload_pickle(TECHNIQUES[technique](canary), proto)
    if kind == "pickle":
        return evil
    if kind == "zip":
        return torch_zip(evil)
    if kind == "legacy":
        return legacy(evil)
    if kind == "legacy-magic":
        return legacy(pickle.dumps({}, protocol=2), magic=evil)
    if kind == "legacy-sysinfo":
        return legacy(pickle.dumps({}, protocol=2), sys_info=evil)
    if kind == "broken-stream":  # payload, then garbage instead of the rest of the stream
        return evil[:-1] + b"\xff\xfe garbage"
    raise AssertionError(kind)


CONTAINERS = ["pickle", "zip", "legacy", "legacy-magic", "legacy-sysinfo", "broken-stream"]


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("technique", sorted(TECHNIQUES))
def test_attack_is_refused(tmp_path, technique, container):
    canary = tmp_path / "canary"
    path = tmp_path / "evil.pth"
    path.write_bytes(_container(container, technique, canary))
    with pytest.raises(UnsafeCheckpointError) as info:
        torchckpt.load(path)
    assert not canary.exists(), f"{technique} in {container} ran its payload"
    assert info.value.global_name and str(path) in str(info.value)
    with pytest.raises(UnsafeCheckpointError):
        torchckpt.inspect(path)
    with pytest.raises(UnsafeCheckpointError):
        torchckpt.load(path, trust=True)  # trust imports classes; it never lifts the blocklist
    assert not canary.exists()


def test_unsafe_error_names_global_and_offset(tmp_path):
    data = _payload_pickle(technique_os_system(tmp_path / "c"))
    with pytest.raises(UnsafeCheckpointError) as info:
        torchckpt.load(data)
    err = info.value
    assert err.global_name == "os.system" and err.offset == data.index(b"cos\nsystem")
    assert isinstance(err, pickle.UnpicklingError) and isinstance(err, torchckpt.CheckpointError)


def test_real_reduce_payload_made_by_pickle(tmp_path):
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):
            import os
            return os.system, (f"touch {canary}",)

    for protocol in range(0, 6):
        with pytest.raises(UnsafeCheckpointError):
            torchckpt.load(pickle.dumps({"w": Evil()}, protocol=protocol))
    assert not canary.exists()


def test_payload_in_torch_save_zip(tmp_path):
    import torch

    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):
            import os
            return os.system, (f"touch {canary}",)

    for zip_format in (True, False):
        path = tmp_path / f"evil{zip_format}.pt"
        torch.save({"w": torch.ones(2), "x": Evil()}, path, _use_new_zipfile_serialization=zip_format)
        with pytest.raises(UnsafeCheckpointError):
            torchckpt.load(path)
    assert not canary.exists()


def test_zip_member_compressed_payload_still_checked(tmp_path):
    evil = _payload_pickle(technique_os_system(tmp_path / "canary"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", evil)
    with pytest.raises(UnsafeCheckpointError):
        torchckpt.load(buf.getvalue())


@pytest.mark.parametrize("module,name", [("pathlib", "Path.write_text"), ("pandas.io.pickle", "read_pickle"),
                                         ("shutil", "rmtree"), ("pkg_resources", "load_entry_point"),
                                         ("os", "kill"), ("yaml", "unsafe_load")])
def test_file_and_process_side_effects_are_dangerous(tmp_path, module, name):
    data = _payload_pickle(call(glob(module, name), s(str(tmp_path / "canary"))))
    with pytest.raises(UnsafeCheckpointError):
        torchckpt.load(data)
    assert not (tmp_path / "canary").exists()
