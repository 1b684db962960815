"""A pickle virtual machine in pure Python: the parser behind ``load``, ``inspect`` and ``scan``.

Why not ``pickle.Unpickler``? Four reasons, all about hostile or old input:

* every global goes through :class:`~.policy.Policy` with its exact byte offset;
* Python 2 ``str`` (BINSTRING) is handled per value instead of by one global ``encoding=``: ASCII
  becomes ``str``, anything else stays raw bytes for numpy and is decoded afterwards (see py2.py);
* work is bounded by the input: no pre-allocated memo (``LONG_BINPUT 0xffffffff`` costs nothing),
  capped nesting and integer sizes, declared lengths checked against the data before slicing;
* in *record* mode (``scan``) it constructs nothing, walks every opcode, and reports the globals
  it met, so the scanner and the loader cannot disagree about what a stream contains.

Any failure surfaces as a :class:`~torchckpt.errors.CheckpointError` naming the byte offset.
"""

from __future__ import annotations

import codecs
import struct
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import CheckpointError, CorruptCheckpointError, LimitExceededError, TruncatedCheckpointError, \
    UnsafeCheckpointError, UnsupportedFormatError
from . import safe_globals
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


_S_I = struct.Struct("<i")
_S_H = struct.Struct("<H")
_S_I_U = struct.Struct("<I")
_S_Q = struct.Struct("<Q")
_S_D = struct.Struct(">d")


class Unpickler:
    """Run one pickle stream from ``data[start:]`` (bytes, bytearray or mmap) to its STOP.

    Args:
        policy: what globals may become (see :class:`Policy`).
        persistent_load: the container's handler for persistent ids (storages), or None.
        record_only: scan mode. Nothing is constructed (every global becomes a stub) and a
            dangerous global is recorded instead of raised.
        meta: structure only, without torch: tensors become :class:`~.meta.TensorMeta`.
        member: name of the zip/tar member or stream, for messages.
    """

    def __init__(self, data: Any, *, policy: Policy, persistent_load: Callable[[Any], Any] | None = None,
                 start: int = 0, end: int | None = None, member: str | None = None, record_only: bool = False,
                 meta: bool = False, limits: Limits = DEFAULT_LIMITS) -> None:
        self.data = data
        self.pos = start
        self.start = start
        self.end = len(data) if end is None else min(end, len(data))
        self.policy = policy
        self.persistent_load = persistent_load
        self.member = member
        self.record_only = record_only
        self.meta = meta
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
                    handler = _DISPATCH.get(op)
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
            if self.record_only:
                return stub_class(module, name)
            raise UnsafeCheckpointError(
                f"the pickle imports {module}.{name} (at byte {offset}"
                + (f" of member {self.member}" if self.member else "") + "), which can run code",
                global_name=f"{module}.{name}", offset=offset, member=self.member)
        if self.record_only or not self.policy.construct:
            return stub_class(module, name)
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
        if self.record_only:
            return func(*args) if isinstance(func, type) and issubclass(func, Stub) else Stub()
        if not callable(func):
            raise self._error(f"REDUCE on a non-callable {type(func).__name__}", offset)
        return func(*args)


def _op(code: str) -> Callable[[Callable[[Unpickler], None]], Callable[[Unpickler], None]]:
    def register(fn: Callable[[Unpickler], None]) -> Callable[[Unpickler], None]:
        _DISPATCH[ord(code) if len(code) == 1 else int(code, 16)] = fn
        return fn
    return register


_DISPATCH: dict[int, Callable[[Unpickler], None]] = {}


@_op("\x80")
def _proto(u: Unpickler) -> None:
    proto = u._take(1)[0]
    if proto > u.limits.max_protocol:
        raise UnsupportedFormatError(f"pickle protocol {proto} is newer than this Python understands")
    u.protocol = proto


@_op("\x95")
def _frame(u: Unpickler) -> None:
    u._take(8)  # frames are an I/O hint; the data is contiguous here


@_op("0")
def _pop(u: Unpickler) -> None:
    if u._stack:
        u._stack.pop()
    else:
        u._pop_mark()


@_op("1")
def _pop_mark(u: Unpickler) -> None:
    u._pop_mark()


@_op("2")
def _dup(u: Unpickler) -> None:
    u._stack.append(u._stack[-1])


@_op("N")
def _none(u: Unpickler) -> None:
    u._stack.append(None)


@_op("\x88")
def _true(u: Unpickler) -> None:
    u._stack.append(True)


@_op("\x89")
def _false(u: Unpickler) -> None:
    u._stack.append(False)


@_op("I")
def _int(u: Unpickler) -> None:
    line = u._line()
    if line == b"00":
        u._stack.append(False)
    elif line == b"01":
        u._stack.append(True)
    else:
        u._stack.append(int(line, 0) if line[:2] in (b"0x", b"0X") else int(line))


@_op("J")
def _binint(u: Unpickler) -> None:
    u._stack.append(_S_I.unpack(u._take(4))[0])


@_op("M")
def _binint2(u: Unpickler) -> None:
    u._stack.append(_S_H.unpack(u._take(2))[0])


@_op("L")
def _long(u: Unpickler) -> None:
    line = u._line()
    if line.endswith(b"L"):
        line = line[:-1]
    u._stack.append(int(line))


@_op("\x8a")
def _long1(u: Unpickler) -> None:
    n = u._take(1)[0]
    u._stack.append(int.from_bytes(u._take(n), "little", signed=True))


@_op("\x8b")
def _long4(u: Unpickler) -> None:
    (n,) = _S_I.unpack(u._take(4))
    if n < 0 or n > u.limits.max_long_bytes:
        raise LimitExceededError(f"LONG4 of {n} bytes at offset {u.pos - 5} exceeds the limit "
                                 f"of {u.limits.max_long_bytes}", offset=u.pos - 5)
    u._stack.append(int.from_bytes(u._take(n), "little", signed=True))


@_op("F")
def _float(u: Unpickler) -> None:
    u._stack.append(float(u._line()))


@_op("G")
def _binfloat(u: Unpickler) -> None:
    u._stack.append(_S_D.unpack(u._take(8))[0])


@_op("S")
def _string(u: Unpickler) -> None:
    line = u._line()
    if len(line) >= 2 and line[0] == line[-1] and line[:1] in (b"'", b'"'):
        line = line[1:-1]
    else:
        raise u._error("the STRING opcode argument must be quoted", u.pos)
    u.push_py2_str(codecs.escape_decode(line)[0])


@_op("T")
def _binstring(u: Unpickler) -> None:
    (n,) = _S_I.unpack(u._take(4))
    u.push_py2_str(bytes(u._take(n)))


@_op("U")
def _short_binstring(u: Unpickler) -> None:
    n = u._take(1)[0]
    u.push_py2_str(bytes(u._take(n)))


@_op("B")
def _binbytes(u: Unpickler) -> None:
    (n,) = _S_I_U.unpack(u._take(4))
    u._stack.append(bytes(u._take(n)))


@_op("C")
def _short_binbytes(u: Unpickler) -> None:
    n = u._take(1)[0]
    u._stack.append(bytes(u._take(n)))


@_op("\x8e")
def _binbytes8(u: Unpickler) -> None:
    (n,) = _S_Q.unpack(u._take(8))
    u._stack.append(bytes(u._take(n)))


@_op("\x96")
def _bytearray8(u: Unpickler) -> None:
    (n,) = _S_Q.unpack(u._take(8))
    u._stack.append(bytearray(u._take(n)))


@_op("V")
def _unicode(u: Unpickler) -> None:
    u._stack.append(str(u._line(), "raw-unicode-escape"))


@_op("\x8d")
def _binunicode8(u: Unpickler) -> None:
    (n,) = _S_Q.unpack(u._take(8))
    u._stack.append(str(u._take(n), "utf-8", "surrogatepass"))


@_op(")")
def _empty_tuple(u: Unpickler) -> None:
    u._stack.append(())


@_op("t")
def _tuple(u: Unpickler) -> None:
    items = u._pop_mark()
    u._stack.append(tuple(items))


@_op("\x85")
def _tuple1(u: Unpickler) -> None:
    u._stack[-1] = (u._stack[-1],)


@_op("\x86")
def _tuple2(u: Unpickler) -> None:
    s = u._stack
    s[-2:] = [(s[-2], s[-1])]


@_op("\x87")
def _tuple3(u: Unpickler) -> None:
    s = u._stack
    s[-3:] = [(s[-3], s[-2], s[-1])]


@_op("]")
def _empty_list(u: Unpickler) -> None:
    u._stack.append([])


@_op("l")
def _list(u: Unpickler) -> None:
    items = u._pop_mark()
    u._stack.append(items)


@_op("}")
def _empty_dict(u: Unpickler) -> None:
    u._stack.append({})


@_op("d")
def _dict(u: Unpickler) -> None:
    items = u._pop_mark()
    if len(items) % 2:
        raise u._error("DICT with an odd number of items", u.pos - 1)
    u._stack.append({items[i]: items[i + 1] for i in range(0, len(items), 2)})


@_op("\x8f")
def _empty_set(u: Unpickler) -> None:
    u._stack.append(set())


@_op("\x91")
def _frozenset(u: Unpickler) -> None:
    u._stack.append(frozenset(u._pop_mark()))


@_op("a")
def _append(u: Unpickler) -> None:
    value = u._stack.pop()
    safe_globals.extend(u._stack[-1], [value], u.policy, u.record_only)


@_op("e")
def _appends(u: Unpickler) -> None:
    items = u._pop_mark()
    safe_globals.extend(u._stack[-1], items, u.policy, u.record_only)


@_op("s")
def _setitem(u: Unpickler) -> None:
    s = u._stack
    value = s.pop()
    key = s.pop()
    safe_globals.set_items(s[-1], [key, value], u.policy, u.record_only)


@_op("u")
def _setitems(u: Unpickler) -> None:
    items = u._pop_mark()
    if len(items) % 2:
        raise u._error("SETITEMS with an odd number of items", u.pos - 1)
    safe_globals.set_items(u._stack[-1], items, u.policy, u.record_only)


@_op("\x90")
def _additems(u: Unpickler) -> None:
    items = u._pop_mark()
    safe_globals.add_items(u._stack[-1], items, u.policy, u.record_only)


@_op("g")
def _get(u: Unpickler) -> None:
    u._stack.append(u._memo[int(u._line())])


@_op("j")
def _long_binget(u: Unpickler) -> None:
    u._stack.append(u._memo[_S_I_U.unpack(u._take(4))[0]])


@_op("p")
def _put(u: Unpickler) -> None:
    idx = int(u._line())
    if idx < 0:
        raise u._error("negative PUT index", u.pos)
    u._memo[idx] = u._stack[-1]


@_op("r")
def _long_binput(u: Unpickler) -> None:
    u._memo[_S_I_U.unpack(u._take(4))[0]] = u._stack[-1]


@_op("c")
def _global(u: Unpickler) -> None:
    offset = u.pos - 1
    module = u._line().decode("utf-8", "replace")
    name = u._line().decode("utf-8", "replace")
    u._stack.append(u.find_class(module, name, offset))


@_op("\x93")
def _stack_global(u: Unpickler) -> None:
    s = u._stack
    name = s.pop()
    module = s.pop()
    u._stack.append(u.find_class(module, name, u.pos - 1))


@_op("i")
def _inst(u: Unpickler) -> None:
    offset = u.pos - 1
    module = u._line().decode("utf-8", "replace")
    name = u._line().decode("utf-8", "replace")
    cls = u.find_class(module, name, offset)
    args = tuple(u._pop_mark())
    u._stack.append(u.call(cls, args, offset))


@_op("o")
def _obj(u: Unpickler) -> None:
    offset = u.pos - 1
    items = u._pop_mark()
    if not items:
        raise u._error("OBJ without a class", offset)
    u._stack.append(u.call(items[0], tuple(items[1:]), offset))


@_op("R")
def _reduce(u: Unpickler) -> None:
    s = u._stack
    args = s.pop()
    func = s[-1]
    s[-1] = u.call(func, args, u.pos - 1)


@_op("\x81")
def _newobj(u: Unpickler) -> None:
    s = u._stack
    args = s.pop()
    cls = s.pop()
    s.append(safe_globals.new_object(cls, args, {}, u.policy, u.record_only))


@_op("\x92")
def _newobj_ex(u: Unpickler) -> None:
    s = u._stack
    kwargs = s.pop()
    args = s.pop()
    cls = s.pop()
    s.append(safe_globals.new_object(cls, args, kwargs, u.policy, u.record_only))


@_op("b")
def _build(u: Unpickler) -> None:
    state = u._stack.pop()
    safe_globals.build(u._stack[-1], state, u.policy, u.record_only)


@_op("P")
def _persid(u: Unpickler) -> None:
    pid = u._line().decode("ascii", "replace")
    _push_persistent(u, pid)


@_op("Q")
def _binpersid(u: Unpickler) -> None:
    pid = u._stack.pop()
    _push_persistent(u, pid)


def _push_persistent(u: Unpickler, pid: Any) -> None:
    if u.record_only:
        u._stack.append(Stub(pid))
        return
    if u.persistent_load is None:
        raise u._error("persistent id in a pickle that is not inside a checkpoint container", u.pos - 1)
    u._stack.append(u.persistent_load(pid))


def _unsupported(what: str) -> Callable[[Unpickler], None]:
    def handler(u: Unpickler) -> None:
        raise UnsupportedFormatError(f"the pickle uses {what} (at offset {u.pos - 1}), which checkpoints "
                                     "never need", hint="This is not a PyTorch checkpoint written by torch.save.")
    return handler


for _code, _what in ((0x82, "the copyreg extension registry (EXT1)"), (0x83, "the copyreg extension registry (EXT2)"),
                     (0x84, "the copyreg extension registry (EXT4)"), (0x97, "out-of-band buffers (NEXT_BUFFER)"),
                     (0x98, "out-of-band buffers (READONLY_BUFFER)")):
    _DISPATCH[_code] = _unsupported(_what)
