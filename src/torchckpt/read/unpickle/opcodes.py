"""The opcode handlers of the pickle VM (:mod:`.machine`): one small function per opcode.

Handlers touch only the unpickler's stack, memo and reader; everything that constructs objects goes
through :mod:`.safe_globals`, so the policy decides what any opcode can build.
"""

from __future__ import annotations

import codecs
import struct
from typing import Any, Callable

from ...errors import UnsupportedFormatError
from . import safe_globals

Unpickler = Any  # the handlers receive machine.Unpickler; machine imports this module, never the reverse

_MAX_PROTOCOL = 5

__all__ = ["DISPATCH"]

_S_I = struct.Struct("<i")
_S_H = struct.Struct("<H")
_S_I_U = struct.Struct("<I")
_S_Q = struct.Struct("<Q")
_S_D = struct.Struct(">d")


def _op(code: str) -> Callable[[Callable[[Unpickler], None]], Callable[[Unpickler], None]]:
    def register(fn: Callable[[Unpickler], None]) -> Callable[[Unpickler], None]:
        DISPATCH[ord(code) if len(code) == 1 else int(code, 16)] = fn
        return fn
    return register


DISPATCH: dict[int, Callable[[Unpickler], None]] = {}


@_op("\x80")
def _proto(u: Unpickler) -> None:
    proto = u._take(1)[0]
    if proto > _MAX_PROTOCOL:
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


def _digits(u: Unpickler, line: bytes, what: str) -> bytes:
    if len(line) > u.policy.budget.digits + 2:
        u.meter.digits(len(line.strip().lstrip(b"+-")), f"{what} literal at offset {u.pos}")
    return line


@_op("I")
def _int(u: Unpickler) -> None:
    line = _digits(u, u._line(), "INT")
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
    line = _digits(u, u._line(), "LONG")
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
    if n < 0:
        raise u._error("LONG4 with a negative length", u.pos - 5)
    u.meter.digits(int(n * 2.41), f"LONG4 of {n} bytes at offset {u.pos - 5}")
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
    d: dict[Any, Any] = {}
    u.keys.admit(d, items[0::2])
    for i in range(0, len(items), 2):
        d[items[i]] = items[i + 1]
    u._stack.append(d)


@_op("\x8f")
def _empty_set(u: Unpickler) -> None:
    u._stack.append(set())


@_op("\x91")
def _frozenset(u: Unpickler) -> None:
    items = u._pop_mark()
    u.keys.check_all(items)
    u._stack.append(frozenset(items))


@_op("a")
def _append(u: Unpickler) -> None:
    value = u._stack.pop()
    safe_globals.extend(u, u._stack[-1], [value])


@_op("e")
def _appends(u: Unpickler) -> None:
    items = u._pop_mark()
    safe_globals.extend(u, u._stack[-1], items)


@_op("s")
def _setitem(u: Unpickler) -> None:
    s = u._stack
    value = s.pop()
    key = s.pop()
    safe_globals.set_items(u, s[-1], [key, value])


@_op("u")
def _setitems(u: Unpickler) -> None:
    items = u._pop_mark()
    if len(items) % 2:
        raise u._error("SETITEMS with an odd number of items", u.pos - 1)
    safe_globals.set_items(u, u._stack[-1], items)


@_op("\x90")
def _additems(u: Unpickler) -> None:
    items = u._pop_mark()
    safe_globals.add_items(u, u._stack[-1], items)


@_op("g")
def _get(u: Unpickler) -> None:
    u._stack.append(u.memo_get(int(_digits(u, u._line(), "GET"))))


@_op("j")
def _long_binget(u: Unpickler) -> None:
    u._stack.append(u.memo_get(_S_I_U.unpack(u._take(4))[0]))


@_op("p")
def _put(u: Unpickler) -> None:
    u.memo_put(int(_digits(u, u._line(), "PUT")))


@_op("r")
def _long_binput(u: Unpickler) -> None:
    u.memo_put(_S_I_U.unpack(u._take(4))[0])


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
    s.append(u.new_object(cls, args, {}))


@_op("\x92")
def _newobj_ex(u: Unpickler) -> None:
    s = u._stack
    kwargs = s.pop()
    args = s.pop()
    cls = s.pop()
    s.append(u.new_object(cls, args, kwargs))


@_op("b")
def _build(u: Unpickler) -> None:
    u.build(u._stack.pop())


@_op("P")
def _persid(u: Unpickler) -> None:
    pid = u._line().decode("ascii", "replace")
    _push_persistent(u, pid)


@_op("Q")
def _binpersid(u: Unpickler) -> None:
    pid = u._stack.pop()
    _push_persistent(u, pid)


def _push_persistent(u: Unpickler, pid: Any) -> None:
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
    DISPATCH[_code] = _unsupported(_what)
