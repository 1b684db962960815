"""trust=True imports real classes; it never lifts the blocklist of command runners (issue 9 item 6).

One test per gadget family the peers' unsafe-global tables list (picklescan, modelscan, fickling), each a
real file that would leave a canary behind if the gadget ran. Every one is refused under ``trust=True``
naming the global, scans as a finding, and leaves no canary.
"""

from __future__ import annotations

import pytest
from pickle_asm import PROTO2, STOP, call, glob, s

import torchckpt
from torchckpt import Policy
from torchckpt.errors import UnsafeCheckpointError
from torchckpt.read.unpickle.policy import Verdict

CANARY = "CANARY"


def _command(tmp_path) -> str:
    return f"touch {tmp_path / CANARY}"


def _python(tmp_path) -> str:
    return f"open({str(tmp_path / CANARY)!r}, 'w').close()"


# family -> (module, name, args as a function of tmp_path)
GADGETS = {
    "torch_collect_env_run": ("torch.utils.collect_env", "run", lambda t: [_command(t)]),
    "torch_bottleneck": ("torch.utils.bottleneck.__main__", "run_cprofile", lambda t: [_python(t), "x"]),
    "pydoc_pipepager": ("pydoc", "pipepager", lambda t: ["text", _command(t)]),
    "pydoc_locate": ("pydoc", "locate", lambda t: ["os.system"]),
    "pyrepl_pager": ("_pyrepl.pager", "pipe_pager", lambda t: ["text", _command(t)]),
    "uuid_command_stdout": ("uuid", "_get_command_stdout", lambda t: ["touch", str(t / CANARY)]),
    "uuid_find_mac": ("uuid", "_find_mac_near_keyword", lambda t: ["touch", str(t / CANARY)]),
    "uuid_getnode": ("uuid", "getnode", lambda t: []),
    "aix_support": ("_aix_support", "_read_cmd_output", lambda t: [_command(t)]),
    "osx_support_read_output": ("_osx_support", "_read_output", lambda t: [_command(t)]),
    "osx_support_build_tool": ("_osx_support", "_find_build_tool", lambda t: [_command(t)]),
    "idlelib_runcommand": ("idlelib.pyshell", "ModifiedInterpreter.runcommand", lambda t: [_python(t)]),
    "idlelib_calltip": ("idlelib.calltip", "get_entity", lambda t: [_python(t)]),
    "idlelib_autocomplete": ("idlelib.autocomplete", "AutoComplete.get_entity", lambda t: [_python(t)]),
    "logging_filehandler": ("logging", "FileHandler", lambda t: [str(t / CANARY)]),
    "logging_basicconfig": ("logging", "basicConfig", lambda t: []),
    "lib2to3_grammar": ("lib2to3.pgen2.grammar", "Grammar.loads", lambda t: ["x"]),
    "doctest_debug_script": ("doctest", "debug_script", lambda t: [_python(t)]),
    "code_runcode": ("code", "InteractiveInterpreter.runcode", lambda t: [_python(t)]),
    "cprofile_run": ("cProfile", "run", lambda t: [_python(t)]),
    "profile_run": ("profile", "run", lambda t: [_python(t)]),
    "timeit": ("timeit", "timeit", lambda t: [_python(t)]),
    "trace_run": ("trace", "Trace.run", lambda t: [_python(t)]),
    "numpy_runstring": ("numpy.testing._private.utils", "runstring", lambda t: [_python(t), "x"]),
    "numpy_f2py": ("numpy.f2py", "compile", lambda t: [_python(t)]),
    "ensurepip": ("ensurepip", "_run_pip", lambda t: [_command(t)]),
    "pip": ("pip", "main", lambda t: ["--version"]),
    "imaplib_stream": ("imaplib", "IMAP4_stream", lambda t: [_command(t)]),
    "inductor_compile_file": ("torch._inductor.codecache", "compile_file", lambda t: ["", "", _command(t)]),
    "dynamo_guards": ("torch._dynamo.guards", "GuardBuilder.get", lambda t: [_python(t)]),
    "symbolic_shapes": ("torch.fx.experimental.symbolic_shapes", "ShapeEnv.evaluate_guards_expression",
                        lambda t: [_python(t)]),
    "jit_exec_wrapper": ("torch.jit.unsupported_tensor_ops", "execWrapper", lambda t: [_python(t)]),
    "config_module": ("torch.utils._config_module", "ConfigModule.load_config", lambda t: ["x"]),
    "datapipes_decoder": ("torch.utils.data.datapipes.utils.decoder", "basichandlers", lambda t: ["pickle", "x"]),
    "nested_torch_load": ("torch.serialization", "load", lambda t: [str(t / CANARY)]),
    "nested_load_from_bytes": ("torch.storage", "_load_from_bytes", lambda t: ["x"]),
    "pickle_loads": ("pickle", "loads", lambda t: ["x"]),
    "cloudpickle_subimport": ("cloudpickle.cloudpickle", "subimport", lambda t: ["os"]),
    "types_codetype": ("types", "CodeType", lambda t: ["x"]),
    "pkgutil_resolve_name": ("pkgutil", "resolve_name", lambda t: ["os:system"]),
    "importlib": ("importlib", "import_module", lambda t: ["os"]),
    "builtins_getattr": ("builtins", "getattr", lambda t: ["os", "system"]),
    "builtins_breakpoint": ("builtins", "breakpoint", lambda t: []),
    "builtins_compile": ("builtins", "compile", lambda t: [_python(t), "x", "exec"]),
    "operator_attrgetter": ("operator", "attrgetter", lambda t: ["system"]),
    "operator_methodcaller": ("_operator", "methodcaller", lambda t: ["system", _command(t)]),
    "os_system": ("os", "system", lambda t: [_command(t)]),
    "posix_system": ("posix", "system", lambda t: [_command(t)]),
    "subprocess": ("subprocess", "check_output", lambda t: [_command(t)]),
    "pty_spawn": ("pty", "spawn", lambda t: [_command(t)]),
    "runpy": ("runpy", "_run_code", lambda t: [_python(t), "x"]),
    "shutil": ("shutil", "copyfile", lambda t: ["/etc/hostname", str(t / CANARY)]),
    "pathlib_write": ("pathlib", "Path.write_text", lambda t: [str(t / CANARY), "x"]),
    "pathlib_read": ("pathlib", "Path.read_text", lambda t: ["/etc/hostname"]),
    "io_fileio": ("_io", "FileIO", lambda t: [str(t / CANARY), "w"]),
    "distutils_write_file": ("distutils.file_util", "write_file", lambda t: [str(t / CANARY), "x"]),
    "ctypes": ("ctypes", "CDLL", lambda t: ["libc.so.6"]),
    "webbrowser": ("webbrowser", "open", lambda t: ["http://127.0.0.1:9/"]),
    "urllib_urlopen": ("urllib.request", "urlopen", lambda t: ["http://127.0.0.1:9/"]),
    "requests": ("requests.api", "get", lambda t: ["http://127.0.0.1:9/"]),
    "ssl_certificate": ("ssl", "get_server_certificate", lambda t: [("127.0.0.1", 9)]),
    "socket": ("socket", "create_connection", lambda t: [("127.0.0.1", 9)]),
    "asyncio": ("asyncio", "create_subprocess_shell", lambda t: [_command(t)]),
    "multiprocessing": ("multiprocessing.util", "spawnv_passfds", lambda t: ["/bin/sh", ["sh"], []]),
    "venv": ("venv", "create", lambda t: [str(t / CANARY)]),
    "test_support": ("test.support.script_helper", "assert_python_ok", lambda t: ["-c", _python(t)]),
    "pdb_run": ("pdb", "run", lambda t: [_python(t)]),
    "bdb": ("bdb", "Bdb.run", lambda t: [_python(t)]),
    "sys_modules": ("sys", "modules", lambda t: []),
    "hub": ("torch.hub", "load", lambda t: ["x", "y"]),
    "cpp_extension": ("torch.utils.cpp_extension", "load_inline", lambda t: ["x", _python(t)]),
    "torch_compile": ("torch", "compile", lambda t: ["x"]),
    "jsonpickle": ("jsonpickle", "decode", lambda t: ["{}"]),
    "yaml_unsafe_load": ("yaml", "unsafe_load", lambda t: ["x"]),
    "dill": ("dill", "loads", lambda t: ["x"]),
    "joblib": ("joblib", "load", lambda t: ["x"]),
    "wsgiref": ("wsgiref.simple_server", "make_server", lambda t: ["127.0.0.1", 0, "x"]),
    "curses": ("curses", "wrapper", lambda t: ["x"]),
    "smtpd": ("smtpd", "SMTPServer", lambda t: [("127.0.0.1", 0), None]),
    "idlelib_debugobj": ("idlelib.debugobj", "ObjectTreeItem.SetText", lambda t: [_python(t)]),
    "idlelib_executive": ("idlelib.run", "Executive.runcode", lambda t: [_python(t)]),
    "lib2to3_pgen": ("lib2to3.pgen2.pgen", "ParserGenerator.make_label", lambda t: ["x", _python(t)]),
    "asyncio_transport": ("asyncio.unix_events", "_UnixSubprocessTransport", lambda t: [_command(t)]),
    "f2py_getlincoef": ("numpy.f2py.crackfortran", "getlincoef", lambda t: [_python(t), {}]),
    "http_client": ("http.client", "HTTPSConnection", lambda t: ["127.0.0.1", 9]),
    "pip_internal": ("pip._internal.cli.main", "main", lambda t: [["--version"]]),
    "magic_number_eval": ("builtins", "eval", lambda t: ["0x1950A86A20F9469CFC6C"]),
}


def _arg(value) -> bytes:
    if isinstance(value, str):
        return s(value)
    if isinstance(value, int):
        return b"J" + value.to_bytes(4, "little", signed=True)
    if isinstance(value, tuple):
        return b"(" + b"".join(_arg(v) for v in value) + b"t"
    if isinstance(value, list):
        return b"(" + b"".join(_arg(v) for v in value) + b"l"
    if isinstance(value, dict):
        return b"}"
    assert value is None
    return b"N"


@pytest.mark.parametrize("family", sorted(GADGETS))
def test_command_runner_is_refused_under_trust(tmp_path, family):
    module, name, args = GADGETS[family]
    # getattr is decided where it is called: only getattr(torch._C._VariableFunctionsClass, <function>) is
    # read (as an inert reference); every other call is refused, as below
    assert Policy(trust=True).classify(module, name) is (Verdict.ALLOWED if family == "builtins_getattr"
                                                         else Verdict.DANGEROUS)
    data = PROTO2 + call(glob(module, name), *(_arg(a) for a in args(tmp_path))) + STOP
    path = tmp_path / f"{family}.pkl"
    path.write_bytes(data)
    with pytest.raises(UnsafeCheckpointError) as info:
        torchckpt.load(path, trust=True)
    assert info.value.global_name == f"{module}.{name}"
    assert path.name in str(info.value)
    with pytest.raises(UnsafeCheckpointError):
        torchckpt.load(path, allow=[f"{module}.{name}", f"{module.split('.')[0]}.*"])
    report = torchckpt.scan(path)
    assert report.files[0].status == "findings", report.files[0].findings
    assert any(f"{module}.{name}" in str(f.to_dict()) for f in report.files[0].findings)
    assert not (tmp_path / CANARY).exists()


@pytest.mark.parametrize("module,name", [("uuid", "UUID"), ("collections", "OrderedDict"), ("argparse", "Namespace"),
                                         ("functools", "partial"), ("logging", "getLogger"),
                                         ("torch.nn.modules.linear", "Linear"), ("pathlib", "PosixPath")])
def test_ordinary_classes_are_not_blocked(module, name):
    """Blocking what merely composes would refuse benign files (Lightning hparams, whole-model pickles)."""
    assert Policy(trust=True).classify(module, name) is not Verdict.DANGEROUS


def test_trusted_uuid_still_loads(tmp_path):
    import pickle
    import uuid

    value = {"run": uuid.UUID(int=12345)}
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(value, protocol=2))
    assert torchckpt.load(path, trust=True) == value
    assert torchckpt.load(path) == value
