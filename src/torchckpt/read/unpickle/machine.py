"""A pickle virtual machine in pure Python: the parser behind ``load``, ``inspect`` and ``scan``.

Why not ``pickle.Unpickler``? Four reasons, all about hostile or old input:

* every global goes through :class:`~.policy.Policy` with its exact byte offset;
* Python 2 ``str`` (BINSTRING) is handled per value instead of by one global ``encoding=``: ASCII
  becomes ``str``, anything else stays raw bytes for numpy and is decoded afterwards (see py2.py);
* work is bounded by the input: no pre-allocated memo (``LONG_BINPUT 0xffffffff`` costs nothing),
  capped nesting and integer sizes, declared lengths checked against the data before slicing;
* in *record* mode (``scan``) it runs exactly as ``load`` does (same constructors, same checks) but
  records a blocklisted global instead of refusing it, so scanner and loader cannot disagree.

Any failure surfaces as a :class:`~torchckpt.errors.CheckpointError` naming the byte offset.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from typing import Any, Callable

from ...errors import CheckpointError, CorruptCheckpointError, LimitExceededError, TruncatedCheckpointError, \
    UnsafeCheckpointError
from . import safe_globals
from .budget import Meter
from .functions import FunctionRef
from .keys import KeyGuard, graph_depth
from .meta import MetaStorage, TensorMeta
from .opcodes import DISPATCH
from .mode import Mode
from .policy import Policy, Verdict
from .py2 import Py2Bytes
from .safe_globals import SafeCallable, StorageType
from .modules import torch_module_class
from .stubs import Stub, stub_class
from .torch_rebuild import Marker

__all__ = ["Unpickler", "GlobalRef", "MISSING"]

MAX_GLOBAL_NAME = 1024


@dataclass(frozen=True)
class GlobalRef:
    """A global a pickle imports, where, and what the policy says of it."""

    module: str
    name: str
    verdict: Verdict
    offset: int
    member: str | None = None

    @property
    def fullname(self) -> str:
        return f"{self.module}.{self.name}"


class _Missing:
    """An unused memo slot (the memo is a dense list; PUT may skip a few indices)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<unused memo slot>"


MISSING = _Missing()
_S_I_U = struct.Struct("<I")
_LEAVES = (TensorMeta, MetaStorage, StorageType, SafeCallable, Marker)


class Unpickler:
    """Run one pickle stream from ``data[start:]`` (bytes, bytearray or mmap) to its STOP.

    Args:
        policy: what globals may become, and the :class:`~.budget.Budget` of work (see :class:`Policy`).
        persistent_load: the container's handler for persistent ids (storages), or None.
        mode: :class:`~.policy.Mode` ``BUILD`` (real values), ``STRUCTURE`` (no torch: tensors become
            :class:`~.meta.TensorMeta`) or ``RECORD`` (scan: like STRUCTURE, and a dangerous global is
            recorded in :attr:`globals` instead of raised).
        meter: the budget meter shared by every stream of one file (a fresh one by default).
        member: name of the zip/tar member or stream, for messages.
        tensor_table: the tensor of an id, for ``torch.jit._pickle.build_tensor_from_id`` (the attributes of a
            TorchScript archive of torch < 1.2 name tensors of ``model.json`` by number); None elsewhere.
    """

    def __init__(self, data: Any, *, policy: Policy, persistent_load: Callable[[Any], Any] | None = None,
                 start: int = 0, end: int | None = None, member: str | None = None, mode: Mode = Mode.BUILD,
                 meter: Meter | None = None, tensor_table: Callable[[int], Any] | None = None) -> None:
        self.data: bytes = data  # or a buffer that slices the same way (mmap, memoryview)
        self.pos = start
        self.start = start
        self.end = len(data) if end is None else min(end, len(data))
        self.policy = policy
        self.persistent_load = persistent_load
        self.tensor_table = tensor_table
        self.member = member
        self.mode = mode
        self.meter = meter if meter is not None else Meter(policy.budget)
        self.meter.add_input(self.end - self.start)
        self.keys = KeyGuard(self.meter)
        self.globals: list[GlobalRef] = []
        self.py2_strings = False  # saw a Python 2 str that was not ASCII
        self.saw_binstring = False  # saw any Python 2 str
        self.protocol = 0
        self._resolved: dict[tuple[str, str], tuple[Verdict, Any]] = {}
        self._real: dict[int, Any] = {}  # objects imported for real (trust / allow), by id
        self.built_modules: dict[int, tuple[Any, int, int]] = {}  # by modules.build_module: id -> (module, size, height)
        self._fresh: dict[int, tuple[Any, Callable[..., Any], list[int]]] = {}  # BUILD-able values, by id

    @property
    def meta(self) -> bool:
        return self.mode is not Mode.BUILD

    # ------------------------------------------------------------------ reading primitives
    def _take(self, n: int) -> bytes:
        pos = self.pos
        end = pos + n
        if n < 0 or end > self.end:
            raise TruncatedCheckpointError(
                f"pickle stream ends inside an opcode at offset {pos} (needs {n} more bytes, "
                f"{max(self.end - pos, 0)} left)", offset=pos, member=self.member)
        self.pos = end
        return self.data[pos:end]

    def _line(self) -> bytes:
        data, pos = self.data, self.pos
        limit = self.end  # a line is consumed as it is scanned, so scanning stays linear in the input
        i = data.find(b"\n", pos, limit) if hasattr(data, "find") else bytes(data[pos:limit]).find(b"\n") + pos
        if i < 0 or i < pos:
            raise TruncatedCheckpointError(f"unterminated text argument at offset {pos}", offset=pos,
                                           member=self.member)
        self.pos = i + 1
        return bytes(data[pos:i])

    def _error(self, message: str, offset: int) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"malformed pickle at offset {offset}: {message}", offset=offset,
                                      member=self.member)

    # ------------------------------------------------------------------ the run loop
    def load(self) -> Any:
        """Execute until STOP and return the result. ``self.pos`` is left after the STOP opcode."""
        data = self.data
        stack: list[Any] = []
        metastack: list[list[Any]] = []
        memo: list[Any] = []
        fresh = self._fresh
        self._stack, self._metastack, self._memo = stack, metastack, memo
        max_nesting = self.policy.budget.depth + 64
        end = self.end
        offset = self.pos
        try:
            while True:
                offset = self.pos
                if offset >= end:
                    raise TruncatedCheckpointError(
                        f"pickle stream ends at offset {offset} without its STOP opcode", offset=offset,
                        member=self.member)
                op = data[offset]
                self.pos = offset + 1
                # The hot opcodes of torch pickles first; the rest through the table.
                if op == 0x71:  # BINPUT
                    idx = data[self.pos]
                    self.pos += 1
                    if idx < len(memo):
                        value = memo[idx] = stack[-1]
                        if fresh and id(value) in fresh:
                            fresh[id(value)][2].append(idx)
                    else:
                        self.memo_put(idx)
                elif op == 0x72 or op == 0x6A:  # LONG_BINPUT, LONG_BINGET (every memo index past 255)
                    pos = self.pos
                    if pos + 4 > end:
                        self._take(4)
                    idx = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16 | data[pos + 3] << 24
                    self.pos = pos + 4
                    if op == 0x6A:
                        value = memo[idx] if idx < len(memo) else MISSING
                        if value is MISSING:
                            raise self._error(f"GET of the unused memo slot {idx}", self.pos)
                        stack.append(value)
                    elif idx == len(memo):
                        value = stack[-1]
                        memo.append(value)
                        if fresh and id(value) in fresh:
                            fresh[id(value)][2].append(idx)
                    else:
                        self.memo_put(idx)
                elif op == 0x68:  # BINGET
                    value = memo[data[self.pos]]
                    if value is MISSING:
                        raise self._error(f"BINGET of the unused memo slot {data[self.pos]}", offset)
                    stack.append(value)
                    self.pos += 1
                elif op == 0x58:  # BINUNICODE
                    (n,) = _S_I_U.unpack(self._take(4))
                    stack.append(str(self._take(n), "utf-8", "surrogatepass"))
                elif op == 0x8C:  # SHORT_BINUNICODE
                    n = data[self.pos]
                    self.pos += 1
                    stack.append(str(self._take(n), "utf-8", "surrogatepass"))
                elif op == 0x94:  # MEMOIZE
                    value = stack[-1]
                    memo.append(value)
                    if fresh and id(value) in fresh:
                        fresh[id(value)][2].append(len(memo) - 1)
                elif op == 0x4B:  # BININT1
                    stack.append(data[self.pos])
                    self.pos += 1
                elif op == 0x85:  # TUPLE1
                    stack[-1] = (stack[-1],)
                elif op == 0x29:  # EMPTY_TUPLE
                    stack.append(())
                elif op == 0x28:  # MARK
                    if len(metastack) >= max_nesting:
                        raise self.policy.budget.exceeded("depth", len(metastack) + 1, max_nesting,
                                                          f"pickle MARKs nest too deep at offset {offset}")
                    metastack.append(stack)
                    stack = self._stack = []
                elif op == 0x2E:  # STOP
                    if not stack:
                        raise self._error("STOP with an empty stack", offset)
                    result = stack[-1]
                    graph_depth(self.meter, result, self._leaf_types())
                    return result
                else:
                    handler = DISPATCH.get(op)
                    if handler is None:
                        raise self._error(f"unknown opcode 0x{op:02x}", offset)
                    handler(self)
                    stack = self._stack
        except CheckpointError as exc:
            if isinstance(exc, (CorruptCheckpointError, UnsafeCheckpointError)):
                if exc.member is None:
                    exc.member = self.member
                if getattr(exc, "offset", None) is None:
                    exc.offset = offset
            raise
        except (IndexError, KeyError) as exc:
            kind = "memo key" if isinstance(exc, KeyError) else "stack or memo access"
            raise self._error(f"invalid {kind} ({exc!r})", offset) from None
        except RecursionError:
            raise LimitExceededError(f"object graph too deep at offset {offset}", offset=offset,
                                     member=self.member) from None
        except MemoryError:
            raise LimitExceededError(f"out of memory while unpickling at offset {offset}", offset=offset,
                                     member=self.member) from None
        except Exception as exc:  # any constructor or container failure on malformed data
            raise self._error(f"{type(exc).__name__}: {exc}", offset) from None

    def _leaf_types(self) -> tuple[type, ...]:
        leaves: tuple[type, ...] = _LEAVES
        torch = sys.modules.get("torch")
        if torch is not None:
            leaves += (torch.Tensor, torch.dtype, torch.device, torch.Size)
        np = sys.modules.get("numpy")
        if np is not None:
            leaves += (np.ndarray, np.generic, np.dtype)
        return leaves

    # ------------------------------------------------------------------ memo
    def memo_put(self, idx: int) -> None:
        """PUT at ``idx``: the memo is a dense list; a few skipped indices are allowed, absurd ones refused."""
        memo = self._memo
        value = self._stack[-1]
        if idx < 0:
            raise self._error("negative memo index", self.pos)
        if idx < len(memo):
            memo[idx] = value
        else:
            gap = idx - len(memo)
            if gap > self.policy.budget.memo_gap:
                raise self.policy.budget.exceeded(
                    "memo_gap", gap, self.policy.budget.memo_gap,
                    f"memo index {idx} lies {gap} slots beyond the {len(memo)} entries stored so far")
            if gap:
                self.meter.materialise(8 * gap, "memo")
                memo.extend([MISSING] * gap)
            memo.append(value)
        fresh = self._fresh
        if fresh and id(value) in fresh:
            fresh[id(value)][2].append(idx)

    def memo_get(self, idx: int) -> Any:
        value = self._memo[idx] if 0 <= idx < len(self._memo) else MISSING
        if value is MISSING:
            raise self._error(f"GET of the unused memo slot {idx}", self.pos)
        return value

    # ------------------------------------------------------------------ stack helpers
    def _pop_mark(self) -> list[Any]:
        items = self._stack
        if not self._metastack:
            raise self._error("MARK expected but the stack has none", self.pos - 1)
        self._stack = self._metastack.pop()
        return items

    # ------------------------------------------------------------------ globals
    def find_class(self, module: Any, name: Any, offset: int) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise self._error("STACK_GLOBAL needs two strings", offset)
        # A computed string (memo, allowlisted str()) resolves exactly like a literal one; str subclasses
        # are reduced to plain str so the policy judges the text it will import.
        module, name = str.__str__(module), str.__str__(name)
        if len(module) + len(name) > MAX_GLOBAL_NAME:
            raise self._error(f"global name of {len(module) + len(name)} characters", offset)
        key = (module, name)
        cached = self._resolved.get(key)
        if cached is None:
            verdict = self.policy.classify(module, name)
            if verdict is Verdict.DANGEROUS:
                obj = stub_class(module, name)
            else:
                obj = safe_globals.resolve(module, name, verdict, self.policy, self.mode)
                if verdict is Verdict.UNKNOWN and not isinstance(obj, FunctionRef) \
                        and not (isinstance(obj, type) and issubclass(obj, Stub)):
                    if self.policy.classify_object(obj) is Verdict.DANGEROUS:  # an alias of a blocked callable
                        verdict, obj = Verdict.DANGEROUS, stub_class(module, name)
                    else:
                        self._real[id(obj)] = obj
            cached = self._resolved[key] = (verdict, obj)
        verdict, obj = cached
        self.globals.append(GlobalRef(module, name, verdict, offset, self.member))
        if verdict is Verdict.DANGEROUS and self.mode is not Mode.RECORD:
            raise UnsafeCheckpointError(
                f"the pickle imports {module}.{name} (at byte {offset}"
                + (f" of member {self.member}" if self.member else "") + "), which can run code",
                global_name=f"{module}.{name}", offset=offset, member=self.member)
        return obj

    def unsafe(self, message: str, name: str) -> Any:
        """Something the pickle does can change the process (not only a global it names): raise, or in
        RECORD mode record it as a dangerous global and carry on with an inert stub."""
        offset = self.pos - 1
        if self.mode is Mode.RECORD:
            module, _, leaf = name.rpartition(".")
            self.globals.append(GlobalRef(module, leaf, Verdict.DANGEROUS, offset, self.member))
            return Stub()
        raise UnsafeCheckpointError(f"{message} (at byte {offset}" + (f" of member {self.member}" if self.member
                                                                      else "") + ")",
                                    global_name=name, offset=offset, member=self.member)

    def trusted_class(self, cls: Any) -> bool:
        """Whether ``cls`` was imported for real because the caller trusted it (``trust`` / ``allow``)."""
        return self._real.get(id(cls)) is cls

    def value_only(self, cls: Any) -> bool:
        """A torch.nn class made real because the caller allowed their own classes (not this one): it is
        built as a value (NEWOBJ, then a checked BUILD), never called (its ``__init__`` would allocate
        whatever sizes the file asks for)."""
        return not self.policy.imports_real(getattr(cls, "__module__", ""), getattr(cls, "__qualname__", "")) \
            and torch_module_class(getattr(cls, "__module__", ""), getattr(cls, "__qualname__", "")) is cls

    def trusted_instance(self, obj: Any) -> bool:
        return self._real.get(id(type(obj))) is type(obj)

    # ------------------------------------------------------------------ strings
    def push_py2_str(self, raw: bytes) -> None:
        self.saw_binstring = True
        try:
            self._stack.append(raw.decode("ascii"))
        except UnicodeDecodeError:
            self.py2_strings = True
            self._stack.append(Py2Bytes(raw))

    # ------------------------------------------------------------------ construction
    def call(self, func: Any, args: Any, offset: int, kwargs: dict[str, Any] | None = None) -> Any:
        """REDUCE / INST / OBJ (and NEWOBJ of an allowlisted class): only validating constructors run."""
        if type(args) is not tuple:
            raise self._error(f"call arguments must be a tuple, got {type(args).__name__}", offset)
        meter = self.meter
        meter.steps += 1 + len(args)
        if meter.steps > meter._max_steps:
            meter.step(0)
        if type(func) is SafeCallable:
            if func.plain is not None and not kwargs:
                return func.plain(*args)
            result = func.fn(self, *args, **kwargs) if kwargs else func.fn(self, *args)
            if func.finish is not None and not isinstance(result, Stub):
                self._fresh[id(result)] = (result, func.finish, [])
            return result
        if isinstance(func, type) and issubclass(func, Stub):
            return func(*args, **kwargs) if kwargs else func(*args)
        if isinstance(func, Stub):
            raise self._error(f"the pickle calls {func!r}, an inert stand-in, not a function", offset)
        if isinstance(func, Marker):
            return func(*args)
        if isinstance(func, FunctionRef):  # a torch function called by the pickle: recorded, as for any stub
            return stub_class(func.module, func.name)(*args, **(kwargs or {}))
        if self.trusted_class(func) and not self.value_only(func) or (self.policy.trust and self.mode is not Mode.RECORD
                                                                    and callable(func)
                                        and not isinstance(func, (MetaStorage, TensorMeta))):
            return func(*args, **kwargs) if kwargs else func(*args)
        raise self._error(f"the pickle calls a {type(func).__name__}, which this policy does not call", offset)

    def new_object(self, cls: Any, args: Any, kwargs: Any) -> Any:
        return safe_globals.new_object(self, cls, args, kwargs)

    def build(self, state: Any) -> None:
        """BUILD on the top of the stack: a fresh allowlisted value is replaced by the value its finisher
        makes (on the stack and in every memo slot it was stored in); see :func:`safe_globals.build`."""
        stack = self._stack
        inst = stack[-1]
        entry = self._fresh.pop(id(inst), None)
        if entry is not None and entry[0] is inst:
            new = entry[1](self, inst, state)
            if new is not inst:
                stack[-1] = new
                memo = self._memo
                for idx in entry[2]:
                    if memo[idx] is inst:
                        memo[idx] = new
            return
        new = safe_globals.build(self, inst, state)
        if new is not inst:
            stack[-1] = new

    def consume(self, value: Any) -> None:
        """``value`` (a dtype) is now used by another value: it can no longer be BUILD-ed."""
        self._fresh.pop(id(value), None)
