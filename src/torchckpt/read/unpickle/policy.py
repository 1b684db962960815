"""What a pickle may import: the policy of torchckpt's one safe unpickler.

Every global a pickle names (GLOBAL, STACK_GLOBAL, INST, OBJ) is decided in this order:

1. **Blocklist** -> ``DANGEROUS``. Callables that run code, spawn processes, touch files or the
   network, import modules, reach attributes by name (``getattr``, ``operator.attrgetter``), or
   unpickle further data (``pickle.loads``, ``torch.load``, ``torch.storage._load_from_bytes``).
   Loading raises :class:`~torchckpt.errors.UnsafeCheckpointError`; ``scan`` reports a finding.
   No option lifts it: no legitimate checkpoint imports ``os.system``.
2. **Allowlist** -> ``ALLOWED``. Tensor and storage rebuilders, numpy arrays/scalars/dtypes (under
   both ``numpy.core`` and ``numpy._core``), ``OrderedDict``, ``argparse.Namespace``, pathlib paths,
   set/frozenset, datetime ... Each maps to a reimplementation in :mod:`.safe_globals` that checks
   its arguments (sizes against the file, views inside their storage) before doing anything.
3. Everything else -> ``UNKNOWN``: an inert stub class (:mod:`.stubs`) that records what the pickle
   asked for. This is how whole-model pickles load without their source code. The caller can
   import real classes instead with ``Policy(trust=True)`` (everything not blocklisted) or
   ``Policy(allow={"mypkg.MyModel"})`` (named ones); nothing falls back to an unsafe load by itself.

The policy is an immutable value passed to the unpickler; there is no global switch.
"""

from __future__ import annotations

import enum
import functools
import sys
from dataclasses import dataclass, field
from typing import Iterable

from .budget import Budget

__all__ = ["Policy", "Verdict", "Budget", "canonical_global"]


class Verdict(enum.Enum):
    ALLOWED = "allowed"
    UNKNOWN = "unknown"
    DANGEROUS = "dangerous"


# Whole modules (and their submodules) that a checkpoint has no business importing.
_BLOCKED_MODULES = frozenset("""
os posix nt posixpath ntpath sys subprocess _posixsubprocess _winapi socket _socket ssl select selectors
shutil importlib imp runpy pickle _pickle cPickle pickletools shelve marshal ctypes _ctypes cffi
multiprocessing _multiprocessing concurrent threading _thread thread asyncio code codeop codecs cProfile
profile pstats pdb bdb trace tracemalloc timeit webbrowser pty tty commands popen2 platform
http urllib urllib2 urllib3 requests httplib httpx aiohttp ftplib smtplib telnetlib poplib imaplib nntplib
xmlrpc xmlrpclib socketserver SocketServer tempfile glob fileinput zipimport pkgutil site sysconfig
distutils setuptools pip ensurepip venv signal resource mmap gc inspect dis ast compileall py_compile
types dill cloudpickle joblib io _io builtins_io zipfile tarfile gzip bz2 lzma sqlite3 dbm
numpy.testing numpy.f2py numpy.distutils numpy.ctypeslib numpy.lib.npyio numpy.lib.format
torch.hub torch.utils.cpp_extension torch.jit torch.package torch.multiprocessing torch.distributed.rpc
torch.distributed.elastic torch.distributed.launcher torch.distributed.run torch.distributed.launch
torch.distributed.distributed_c10d torch.serialization torch._dynamo torch._inductor torch.utils.data.datapipes
logging.config logging.handlers pkg_resources importlib_metadata importlib_resources jinja2 IPython
pydoc idlelib lib2to3 _pyrepl _aix_support _osx_support doctest pdb test.support unittest pexpect pipes ptyprocess
sched atexit syslog linecache filecmp difflib shelve dbm cgi cgitb mailcap imghdr sndhdr turtle tkinter
_tkinter turtledemo ensurepip pty zipapp modulefinder tabnanny trace pyclbr uu binhex
_interpreters _xxsubinterpreters interpreters _posixshmem _io _pyio _socket _ssl _ctypes _pickle _thread
_signal _multiprocessing _posixsubprocess _winapi _frozen_importlib _frozen_importlib_external _imp
_bootsubprocess _lsprof _tracemalloc _sqlite3 _dbm _gdbm _curses _sitebuiltins _compat_pickle
torch.utils.collect_env torch.utils.bottleneck torch.utils.model_zoo torch.utils._config_module
torch.utils.data.datapipes torch.utils.benchmark torch.export torch._export torch.onnx torch.compiler
torch.fx.experimental.symbolic_shapes torch.utils.tensorboard
numpy.lib._npyio_impl numpy.lib._datasource numpy._pytesttester sympy.parsing
uuid test curses wsgiref smtpd asyncore asynchat jsonpickle
""".split())

# Private (leading underscore) stdlib modules are implementation details: only these are plain data.
_PRIVATE_STDLIB_OK = frozenset("_codecs _operator _collections _collections_abc _datetime _decimal _pydecimal "
                               "_random _struct _bisect _heapq _functools _abc _weakrefset _strptime "
                               "_zoneinfo _sre _locale _string _statistics _json _csv _stat _uuid".split())
_STDLIB_MODULES = frozenset(getattr(sys, "stdlib_module_names", ()))

# Exceptions inside blocked modules: (module, name) pairs that are plain data.
_BLOCK_EXEMPT = frozenset({
    ("torch.serialization", "_get_layout"),
    *(("torch.jit._pickle", n) for n in ("build_intlist", "build_tensorlist", "build_doublelist",
                                         "build_boollist", "restore_type_tag", "build_tensor_from_id",
                                         "build_class")),
    ("types", "SimpleNamespace"),
    ("codecs", "encode"),
    ("builtins", "getattr"),  # only as getattr(torch._C._VariableFunctionsClass, <function>): see functions.py
    ("uuid", "UUID"), ("uuid", "SafeUUID"),
    ("numpy.core.memmap", "memmap"), ("numpy._core.memmap", "memmap"), ("numpy", "memmap"),
})

# Individual callables that are dangerous in otherwise ordinary modules.
_BLOCKED_NAMES = frozenset({
    ("operator", "attrgetter"), ("operator", "methodcaller"), ("_operator", "attrgetter"),
    ("_operator", "methodcaller"),
    ("torch", "load"), ("torch", "save"), ("torch", "from_file"), ("torch.storage", "_load_from_bytes"),
    ("torch._weights_only_unpickler", "load"), ("torch._C", "_import_ir_module"),
    ("torch._C", "import_ir_module"), ("torch._C", "_load_for_lite_interpreter"),
    ("numpy", "load"), ("numpy", "save"), ("numpy", "savez"), ("numpy", "savetxt"), ("numpy", "loadtxt"),
    ("numpy", "genfromtxt"), ("numpy", "fromfile"), ("numpy", "fromregex"),
    ("numpy", "DataSource"), ("numpy", "loadtxt"), ("numpy", "recfromcsv"), ("numpy", "recfromtxt"),
    ("logging", "FileHandler"), ("logging", "basicConfig"),
    ("imaplib", "IMAP4_stream"), ("torch._inductor.codecache", "compile_file"),
    ("torch.utils.cpp_extension", "load_inline"), ("torch", "compile"), ("torch", "from_numpy_file"),
    ("torch._dynamo.guards", "GuardBuilder"), ("torch.fx.graph_module", "_exec_with_source"),
    ("torch.fx.graph_module", "_forward_from_src"), ("torch.fx.graph_module", "_format_import_block"),
    ("torch.nn.modules.module", "register_module_forward_hook"), ("torch.library", "Library"),
    ("torch.ops", "load_library"), ("torch.classes", "load_library"), ("torch._ops", "_OpNamespace"),
    ("uuid", "_get_command_stdout"), ("uuid", "_popen"), ("uuid", "_ifconfig_getnode"),
})

# The leaves of _BLOCKED_NAMES under each top-level package, blocked wherever in that package they are reached:
# torch re-exports its functions under several paths (torch._C._VariableFunctions.from_file is torch.from_file).
_BLOCKED_LEAVES = {root: frozenset(n for m, n in _BLOCKED_NAMES if m.partition(".")[0] == root)
                   for root in ("torch", "numpy")}

# Leaf names that execute code, spawn processes or unpickle, in whatever module they appear.
_DANGEROUS_LEAVES = frozenset("""
eval exec execfile system popen popen2 popen3 popen4 spawnl spawnle spawnlp spawnv spawnve spawnvp execl execle
execlp execv execve execvp fork forkpty __import__ import_module run_path run_module runstring runsource runcode
runctx runcall sympify parse_expr _exec_with_source _forward_from_src reduce_graph_module
reduce_package_graph_module reduce_deploy_graph_module load_source load_module load loads unsafe_load full_load
load_all unsafe_load_all open check_output check_call getoutput getstatusoutput read_pickle load_entry_point
write_text write_bytes unlink rmtree rmdir removedirs touch chmod chown symlink_to hardlink_to kill killpg startfile
putenv unsetenv spawnlpe spawnvpe posix_spawn posix_spawnp execvpe system_call run_command runcommand runcode
run_cprofile run_autograd_prof pipepager tempfilepager pipe_pager tempfile_pager pager plainpager getpager
debug_script debug_src testsource script_from_examples _run_pip _read_cmd_output _read_output _find_build_tool
_get_command_stdout compile_file load_config load_library load_inline load_url load_state_dict_from_url
execWrapper evaluate_guards_expression evaluate_guards_for_args get_entity fetch_completions fetch_tip
resolve_name locate safeimport importfile find_spec exec_module spawn fromfile tofile load_npz savez memmap
get_server_certificate urlopen urlretrieve Popen getoutput read_text read_bytes mkdir rename iterdir rglob
""".split())

# builtins is allowlist-only: every other name in it is treated as dangerous.
_SAFE_BUILTINS = frozenset(
    "set frozenset list dict tuple int float complex bool str bytes bytearray slice range object "
    "NotImplemented Ellipsis".split()
)

# Allowlisted (module, name) pairs. Values are keys into safe_globals.FACTORIES.
_TORCH_REBUILDERS = {
    ("torch._utils", "_rebuild_tensor"): "rebuild_tensor",
    ("torch._utils", "_rebuild_tensor_v2"): "rebuild_tensor_v2",
    ("torch._utils", "_rebuild_tensor_v3"): "rebuild_tensor_v3",
    ("torch._utils", "_rebuild_parameter"): "rebuild_parameter",
    ("torch._utils", "_rebuild_parameter_with_state"): "rebuild_parameter_with_state",
    ("torch._utils", "_rebuild_device_tensor_from_numpy"): "rebuild_device_tensor_from_numpy",
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): "rebuild_meta_tensor_no_storage",
    ("torch._utils", "_rebuild_qtensor"): "rebuild_qtensor",
    ("torch._tensor", "_rebuild_from_type_v2"): "rebuild_from_type_v2",
    ("torch._tensor", "_rebuild_from_type"): "rebuild_from_type",
    ("torch.serialization", "_get_layout"): "get_layout",
    ("torch", "Size"): "torch_size",
    ("torch", "device"): "torch_device",
    ("torch", "Tensor"): "torch_tensor_class",
    ("torch.nn.parameter", "Parameter"): "torch_parameter_class",
    ("torch.autograd.variable", "Variable"): "torch_variable_class",
    ("torch.torch_version", "TorchVersion"): "torch_version",
    **{("torch.jit._pickle", n): "jit_list" for n in ("build_intlist", "build_tensorlist", "build_doublelist",
                                                       "build_boollist")},
    ("torch.jit._pickle", "restore_type_tag"): "jit_type_tag",
    ("torch.jit._pickle", "build_tensor_from_id"): "jit_tensor_from_id",  # model.json's tensor table (torch < 1.2)
    ("torch.jit._pickle", "build_class"): "jit_build_class",  # an object of a TorchScript class: a stub
    ("torch", "ScriptObject"): "script_object",
    ("builtins", "getattr"): "builtin_getattr",  # a TorchScript custom-class object in a whole-model pickle
    **{("__torch__.torch.classes.quantized", n): "packed_" + n for n in (
        "LinearPackedParamsBase", "Conv1dPackedParamsBase", "Conv2dPackedParamsBase", "Conv3dPackedParamsBase")},
}
_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMPY = {
    **{(m, "_reconstruct"): "np_reconstruct" for m in _NUMPY_CORE},
    **{(m, "scalar"): "np_scalar" for m in _NUMPY_CORE},
    ("numpy.core.numeric", "_frombuffer"): "np_frombuffer",
    ("numpy._core.numeric", "_frombuffer"): "np_frombuffer",
    ("numpy", "ndarray"): "np_ndarray",
    ("numpy", "dtype"): "np_dtype",
    ("numpy", "matrix"): "np_matrix", ("numpy.matrixlib.defmatrix", "matrix"): "np_matrix",
    **{(m, "recarray"): "np_recarray" for m in ("numpy", "numpy.rec", "numpy.core.records", "numpy._core.records")},
    **{(m, "memmap"): "np_memmap" for m in ("numpy", "numpy.core.memmap", "numpy._core.memmap")},
    ("numpy.random._pickle", "__randomstate_ctor"): "np_randomstate_ctor",
    ("numpy.random._pickle", "__generator_ctor"): "np_generator_ctor",
    ("numpy.random._pickle", "__bit_generator_ctor"): "np_bit_generator_ctor",
}
_STDLIB = {
    ("collections", "OrderedDict"): "ordered_dict",
    ("collections", "defaultdict"): "defaultdict",
    ("collections", "Counter"): "counter",
    ("collections", "deque"): "deque",
    ("_codecs", "encode"): "codecs_encode",
    ("codecs", "encode"): "codecs_encode",
    ("copyreg", "_reconstructor"): "copyreg_reconstructor",
    ("copyreg", "__newobj__"): "copyreg_newobj",
    ("copyreg", "__newobj_ex__"): "copyreg_newobj_ex",
    ("argparse", "Namespace"): "argparse_namespace",
    ("types", "SimpleNamespace"): "simple_namespace",
    ("datetime", "datetime"): "datetime", ("datetime", "date"): "date", ("datetime", "time"): "time",
    ("datetime", "timedelta"): "timedelta", ("datetime", "timezone"): "timezone",
    ("decimal", "Decimal"): "decimal", ("fractions", "Fraction"): "fraction", ("uuid", "UUID"): "uuid",
    **{("pathlib", n): "path_" + n for n in ("Path", "PosixPath", "WindowsPath", "PurePath",
                                            "PurePosixPath", "PureWindowsPath")},
    **{("pathlib._local", n): "path_" + n for n in ("Path", "PosixPath", "WindowsPath")},
    **{("pathlib._local", n): "path_" + n for n in ("PurePath", "PurePosixPath", "PureWindowsPath")},
    **{("builtins", n): "builtin_" + n for n in _SAFE_BUILTINS},
}
ALLOWLIST: dict[tuple[str, str], str] = {**_TORCH_REBUILDERS, **_NUMPY, **_STDLIB}

# Python 2 names, as pickle's fix_imports maps them (only the ones that matter for checkpoints
# are needed for the allowlist; the blocklist is checked on both spellings).
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg", "cPickle": "pickle",
                "exceptions": "builtins", "UserDict": "collections", "cStringIO": "io", "StringIO": "io",
                "urllib2": "urllib.request", "httplib": "http.client", "commands": "subprocess",
                "Queue": "queue", "thread": "_thread"}
_PY2_NAMES = {("__builtin__", "xrange"): ("builtins", "range"), ("__builtin__", "unicode"): ("builtins", "str"),
              ("__builtin__", "long"): ("builtins", "int"), ("__builtin__", "basestring"): ("builtins", "str"),
              ("__builtin__", "reduce"): ("functools", "reduce"), ("__builtin__", "intern"): ("sys", "intern"),
              ("__builtin__", "execfile"): ("builtins", "exec"), ("__builtin__", "raw_input"): ("builtins", "input"),
              ("__builtin__", "apply"): ("builtins", "eval")}


def canonical_global(module: str, name: str) -> tuple[str, str]:
    """Map Python 2 spellings (``__builtin__``, ``copy_reg``) to their Python 3 names."""
    mapped = _PY2_NAMES.get((module, name))
    if mapped:
        return mapped
    return _PY2_MODULES.get(module, module), name


def _module_blocked(module: str) -> bool:
    parts = module.split(".")
    return any(".".join(parts[: i + 1]) in _BLOCKED_MODULES for i in range(len(parts)))


def _private_stdlib(module: str) -> bool:
    top = module.split(".", 1)[0]
    return top.startswith("_") and top in _STDLIB_MODULES and top not in _PRIVATE_STDLIB_OK


def _classify_one(module: str, name: str) -> Verdict:
    if (module, name) in _BLOCK_EXEMPT:
        return Verdict.ALLOWED if (module, name) in ALLOWLIST else Verdict.UNKNOWN
    if (module, name) in _BLOCKED_NAMES or _module_blocked(module) or name in _DANGEROUS_LEAVES \
            or _private_stdlib(module) or name in _BLOCKED_LEAVES.get(module.partition(".")[0], ()):
        return Verdict.DANGEROUS
    if module == "builtins":
        return Verdict.ALLOWED if name in _SAFE_BUILTINS else Verdict.DANGEROUS
    if (module, name) in ALLOWLIST or _is_torch_value(module, name) or _is_numpy_type(module, name):
        return Verdict.ALLOWED
    return Verdict.UNKNOWN


@functools.lru_cache(maxsize=4096)  # a pure function of the text; the parts of a read ask about the same few
def _verdict(module: str, name: str) -> Verdict:
    """:meth:`Policy.classify` of two plain strings."""
    if _has_dunder_component(module, name) and (module, name) not in ALLOWLIST:
        return Verdict.DANGEROUS
    if any(_module_blocked(part) for part in name.split(".")[:-1]):
        return Verdict.DANGEROUS  # ("pathlib", "os.system"): a blocked module reached as an attribute
    verdicts = {_classify_one(module, n) for n in _name_prefixes(name)}
    verdicts.add(_classify_one(*canonical_global(module, name)))
    parts = name.split(".")
    for i in range(1, len(parts)):  # ("torch", "storage._load_from_bytes") is torch.storage._load_from_bytes
        verdicts.add(_classify_one(".".join([module, *parts[:i]]), ".".join(parts[i:])))
        verdicts.add(_classify_one(".".join([module, *parts[:i]]), parts[i]))
    if Verdict.DANGEROUS in verdicts:
        return Verdict.DANGEROUS
    if "." in name:  # attribute chains: only exact allowlist entries are allowed
        return Verdict.ALLOWED if (module, name) in ALLOWLIST else Verdict.UNKNOWN
    return _classify_one(*canonical_global(module, name))


_TORCH_DTYPE_NAMES = frozenset("""
float32 float float64 double float16 half bfloat16 complex32 complex64 cfloat complex128 cdouble uint8 int8
int16 short int32 int int64 long bool qint8 quint8 qint32 quint4x2 quint2x4 float8_e4m3fn float8_e5m2
float8_e4m3fnuz float8_e5m2fnuz uint16 uint32 uint64 float8_e8m0fnu float4_e2m1fn_x2
strided sparse_coo sparse_csr sparse_csc sparse_bsr sparse_bsc _mkldnn
contiguous_format channels_last channels_last_3d preserve_format
per_tensor_affine per_channel_affine per_channel_affine_float_qparams per_tensor_symmetric per_channel_symmetric
""".split())


def _is_torch_value(module: str, name: str) -> bool:
    """dtype / layout / memory-format constants and legacy storage classes."""
    if module == "torch" and name in _TORCH_DTYPE_NAMES:
        return True
    return (module in ("torch", "torch.cuda") and name.endswith("Storage") and name.isidentifier()) or \
        (module, name) == ("torch.storage", "UntypedStorage")  # torch.save's storages of uint16..64 and float8


_NUMPY_SCALAR_TYPES = frozenset("""
bool_ bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 intp uintp float16 float32 float64 longdouble
complex64 complex128 clongdouble str_ bytes_ void record datetime64 timedelta64 half single double
byte ubyte short ushort intc uintc int_ uint longlong ulonglong csingle cdouble generic number
""".split())


def _is_numpy_type(module: str, name: str) -> bool:
    return module in ("numpy", "numpy.dtypes") and (name in _NUMPY_SCALAR_TYPES or name.endswith("DType"))


@dataclass(frozen=True)
class Policy:
    """Which globals a pickle may import.

    Args:
        trust: import the real object for every global that is not blocklisted. Dangerous:
            importing a module runs its code, and a class's ``__setstate__`` runs too. Use it only
            for files you would also ``exec``.
        allow: dotted names (``"mypkg.models.Net"``) or module prefixes (``"mypkg.*"``) to import
            for real while everything else stays stubbed. Cannot lift the blocklist.
        budget: the limits on the work a file may cause (:class:`Budget`); a file over any of them
            raises :class:`~torchckpt.errors.LimitExceededError`.

    Command runners and other blocklisted globals stay refused under ``trust`` and ``allow``.
    """

    trust: bool = False
    allow: frozenset[str] = field(default_factory=frozenset)
    budget: Budget = field(default_factory=Budget)

    @classmethod
    def make(cls, trust: bool = False, allow: Iterable[str] | str | None = None,
             budget: Budget | None = None) -> "Policy":
        if isinstance(allow, str):
            allow = [allow]
        return cls(trust=bool(trust), allow=frozenset(allow or ()), budget=budget or Budget())

    def classify(self, module: str, name: str) -> Verdict:
        """Verdict for a global as written in the pickle (Python 2 spellings included)."""
        if not isinstance(module, str) or not isinstance(name, str):
            return Verdict.DANGEROUS
        return _verdict(str.__str__(module), str.__str__(name))  # plain str: the text is what is judged and cached

    def classify_object(self, obj: object) -> Verdict:
        """Verdict for an object imported for real, by where it says it was defined (``__module__`` and
        ``__qualname__``): a name the file spelled as an alias (``mypkg.utils.run = os.system``,
        ``torch.functional.torch.from_file``) is judged as what it is."""
        module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
            return Verdict.UNKNOWN
        return self.classify(module, qualname)

    def imports_real(self, module: str, name: str) -> bool:
        """Whether an UNKNOWN global is imported for real under this policy."""
        if self.trust:
            return True
        full = f"{module}.{name}"
        return any(full == a or (a.endswith(".*") and full.startswith(a[:-1])) for a in self.allow)


def _name_prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _has_dunder_component(module: str, name: str) -> bool:
    for part in name.split("."):
        if part.startswith("__") and part.endswith("__"):
            return True
    return any(p.startswith("__") and p.endswith("__") and p not in ("__main__", "__builtin__", "__torch__")
               for p in module.split("."))

