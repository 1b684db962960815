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
from dataclasses import dataclass
from typing import Any, Callable

from ...errors import CheckpointError, CorruptCheckpointError, LimitExceededError, TruncatedCheckpointError, \
    UnsafeCheckpointError
from . import safe_globals
from .mode import Mode
from .policy import Policy, Verdict
from .py2 import Py2Bytes
from .stubs import Stub, stub_class

__all__ = ["Unpickler", "GlobalRef", "Limits"]


@dataclass(frozen=True)
class Limits:
    max_nesting: int = 100_000  # open MARKs at once
    max_long_bytes: int = 65_536  # LONG4 payload
    max_protocol: int = 5


DEFAULT_LIMITS = Limits()


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


class _Mark:
    __slots__ = ()


_S_I_U = struct.Struct("<I")


class Unpickler:
    """Run one pickle stream from ``data[start:]`` (bytes, bytearray or mmap) to its STOP.

    Args:
        policy: what globals may become (see :class:`Policy`).
        persistent_load: the container's handler for persistent ids (storages), or None.
        mode: :class:`~.mode.Mode`. ``STRUCTURE`` and ``RECORD`` build tensors as
            :class:`~.meta.TensorMeta` without torch; ``RECORD`` (``scan``) records a blocklisted
            global (it becomes an inert stub) instead of raising, and is otherwise the same run.
        member: name of the zip/tar member or stream, for messages.
    """

    def __init__(self, data: Any, *, policy: Policy, persistent_load: Callable[[Any], Any] | None = None,
                 start: int = 0, end: int | None = None, member: str | None = None, mode: Mode = Mode.BUILD,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        self.data: bytes = data  # or a buffer that slices the same way (mmap, memoryview)
        self.pos = start
        self.start = start
        self.end = len(data) if end is None else min(end, len(data))
        self.policy = policy
        self.persistent_load = persistent_load
        self.member = member
        self.mode = mode
        self.meta = mode.meta
        self.limits = limits
        self.globals: list[GlobalRef] = []
        self.py2_strings = False  # saw a Python 2 str that was not ASCII
        self.saw_binstring = False  # saw any Python 2 str
        self.protocol = 0
        self._resolved: dict[tuple[str, str], Any] = {}

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
        limit = min(self.end, pos + 65_536)
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
        memo: dict[int, Any] = {}
        self._stack, self._metastack, self._memo = stack, metastack, memo
        max_nesting = self.limits.max_nesting
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
                    memo[data[self.pos]] = stack[-1]
                    self.pos += 1
                elif op == 0x68:  # BINGET
                    stack.append(memo[data[self.pos]])
                    self.pos += 1
                elif op == 0x58:  # BINUNICODE
                    (n,) = _S_I_U.unpack(self._take(4))
                    stack.append(str(self._take(n), "utf-8", "surrogatepass"))
                elif op == 0x8C:  # SHORT_BINUNICODE
                    n = data[self.pos]
                    self.pos += 1
                    stack.append(str(self._take(n), "utf-8", "surrogatepass"))
                elif op == 0x94:  # MEMOIZE
                    memo[len(memo)] = stack[-1]
                elif op == 0x4B:  # BININT1
                    stack.append(data[self.pos])
                    self.pos += 1
                elif op == 0x28:  # MARK
                    if len(metastack) >= max_nesting:
                        raise LimitExceededError(f"pickle nests deeper than {max_nesting} levels",
                                                 offset=offset, member=self.member)
                    metastack.append(stack)
                    stack = self._stack = []
                elif op == 0x2E:  # STOP
                    if not stack:
                        raise self._error("STOP with an empty stack", offset)
                    return stack[-1]
                else:
                    handler = DISPATCH.get(op)
                    if handler is None:
                        raise self._error(f"unknown opcode 0x{op:02x}", offset)
                    handler(self)
                    stack = self._stack
        except CheckpointError as exc:
            if isinstance(exc, (CorruptCheckpointError, UnsafeCheckpointError)) and exc.member is None:
                exc.member = self.member
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
        verdict = self.policy.classify(module, name)
        self.globals.append(GlobalRef(module, name, verdict, offset, self.member))
        if verdict is Verdict.DANGEROUS:
            if self.mode is Mode.RECORD:
                return stub_class(module, name)
            raise UnsafeCheckpointError(
                f"the pickle imports {module}.{name} (at byte {offset}"
                + (f" of member {self.member}" if self.member else "") + "), which can run code",
                global_name=f"{module}.{name}", offset=offset, member=self.member)
        key = (module, name)
        obj = self._resolved.get(key)
        if obj is None:
            obj = self._resolved[key] = safe_globals.resolve(module, name, verdict, self.policy, self.meta)
        return obj

    # ------------------------------------------------------------------ strings
    def push_py2_str(self, raw: bytes) -> None:
        self.saw_binstring = True
        try:
            self._stack.append(raw.decode("ascii"))
        except UnicodeDecodeError:
            self.py2_strings = True
            self._stack.append(Py2Bytes(raw))

    # ------------------------------------------------------------------ construction
    def call(self, func: Any, args: Any, offset: int) -> Any:
        if not isinstance(args, tuple):
            raise self._error(f"REDUCE arguments must be a tuple, got {type(args).__name__}", offset)
        if not callable(func):
            raise self._error(f"REDUCE on a non-callable {type(func).__name__}", offset)
        return func(*args)


from .opcodes import DISPATCH  # noqa: E402 - the handlers need Unpickler's module loaded first
