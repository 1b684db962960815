"""Validating constructors for the allowlisted Python values: builtins, collections, datetime, numbers,
uuid, pathlib and namespaces.

Each takes the unpickler (for its budget meter) and the pickled arguments, checks their types and sizes,
charges the work it is about to do, and returns a finished value. Containers accept materialised data,
never iterators, ranges or generators; numbers are bounded in digits and exponent, so nothing here can
loop or allocate far beyond the size of the file. Finishers (``finish_*``) turn a BUILD state into a new
value; they never call a real ``__setstate__`` and never set an attribute on a class.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import pathlib
import re
import sys
import types
import uuid
from typing import TYPE_CHECKING, Any, Callable

from ...errors import CorruptCheckpointError
from .meta import MetaDevice, MetaDType
from .stubs import Stub

if TYPE_CHECKING:  # at run time imported by the Decimal and Fraction constructors (see _exact_numbers)
    import decimal
    import fractions

__all__ = ["CONSTRUCTORS", "LAZY_CONSTRUCTORS"]

_SCALARS = (str, bytes, int, float, bool, complex, type(None))
_MATERIAL = (list, tuple, dict, set, frozenset, str, bytes, bytearray)


def _bad(message: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(message)


def _material(u: Any, args: tuple[Any, ...], what: str, max_args: int = 1) -> None:
    """Accept at most ``max_args`` arguments, the first materialised data; charge its size."""
    if len(args) > max_args or any(not isinstance(a, _MATERIAL) for a in args[:1]):
        raise _bad(f"{what}() called with {', '.join(type(a).__name__ for a in args)}: only materialised "
                   "data is accepted")
    if args:
        n = len(args[0])
        u.meter.step(n)
        u.meter.materialise(n * (64 if isinstance(args[0], str) and what != "str" else 8) + 64, f"{what}()")


def _keys_of(u: Any, kind: type, data: Any) -> None:
    """Check the keys a dict/set made of ``data`` would hash."""
    if kind in (set, frozenset, collections.Counter) and not isinstance(data, (str, bytes, bytearray, dict)):
        u.keys.check_all(data)
    elif isinstance(data, dict):
        u.keys.check_all(data.keys())
    elif kind in (dict, collections.OrderedDict) and isinstance(data, (list, tuple)):
        for pair in data:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise _bad(f"{kind.__name__}() from a sequence that is not of pairs")
        u.keys.check_all([p[0] for p in data])


def _container(kind: type) -> Any:
    def make(u: Any, *args: Any) -> Any:
        _material(u, args, kind.__name__, max_args=2 if kind is collections.deque else 1)
        if args:
            _keys_of(u, kind, args[0])
        if kind is collections.deque and len(args) == 2 and not (args[1] is None or type(args[1]) is int):
            raise _bad("deque maxlen must be an int")
        return kind(*args)
    return make


def _defaultdict(u: Any, default_factory: Any = None, *args: Any) -> Any:
    factory = getattr(default_factory, "target", None)
    if isinstance(default_factory, type) and issubclass(default_factory, Stub):
        factory = default_factory
    elif factory not in (list, dict, set, int, float, str, tuple, collections.OrderedDict):
        factory = None
    _material(u, args, "defaultdict")
    if args:
        _keys_of(u, dict, args[0])
    return collections.defaultdict(factory, *args)


# --------------------------------------------------------------------------- numbers and text
_NUMBER = re.compile(r"\s*[+-]?(?:(\d[\d_]*)?(?:\.(\d[\d_]*)?)?)(?:[eE]([+-]?\d[\d_]*))?\s*\Z")
_RATIO = re.compile(r"\s*[+-]?(\d[\d_]*)\s*/\s*(\d[\d_]*)\s*\Z")
_SPECIAL = frozenset({"inf", "+inf", "-inf", "infinity", "+infinity", "-infinity", "nan", "+nan", "-nan",
                      "snan", "+snan", "-snan"})


def _check_number_text(u: Any, text: Any, what: str) -> str:
    """A numeric literal in text form: digits and exponent within the budget."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("ascii", "replace")
    if not isinstance(text, str):
        raise _bad(f"{what} from a {type(text).__name__}")
    if len(text) > 4 * u.meter.budget.digits + 64:
        u.meter.digits(len(text), what)
    if text.strip().lower() in _SPECIAL:
        return text
    m = _RATIO.match(text)
    if m:
        u.meter.digits(max(len(m.group(1)), len(m.group(2))), what)
        return text
    m = _NUMBER.match(text)
    if not m or not (m.group(1) or m.group(2)):
        raise _bad(f"{what} from the text {text!r:.60}")
    u.meter.digits(len(m.group(1) or "") + len(m.group(2) or ""), what)
    if m.group(3):
        exp = m.group(3).replace("_", "")
        if len(exp.lstrip("+-")) > 12:
            u.meter.digits(len(exp), f"{what} exponent")
        u.meter.digits(abs(int(exp)), f"{what} exponent")
    return text


def _check_decimal(u: Any, value: decimal.Decimal, what: str) -> decimal.Decimal:
    if value.is_finite():
        t = value.as_tuple()
        u.meter.digits(len(t.digits), what)
        u.meter.digits(abs(value.adjusted()), f"{what} exponent")
    return value


def _instance_of(value: Any, module: str, name: str) -> bool:
    """``isinstance(value, module.name)`` without importing ``module``: no instance exists before it is imported."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(value, getattr(loaded, name))


def _exact(value: Any) -> bool:
    """A ``decimal.Decimal`` or a ``fractions.Fraction``."""
    return _instance_of(value, "decimal", "Decimal") or _instance_of(value, "fractions", "Fraction")


def _check_int_value(u: Any, value: int, what: str) -> int:
    if value.bit_length() > u.meter.budget.digits * 3.33 + 4:
        u.meter.digits(int(value.bit_length() / 3.32), what)
    return value


def _int(u: Any, x: Any = 0, base: Any = None) -> int:
    if base is not None:
        if type(base) is not int or not (base == 0 or 2 <= base <= 36):
            raise _bad(f"int() with base {base!r:.20}")
        if not isinstance(x, (str, bytes, bytearray)):
            raise _bad("int() with a base needs text")
        if len(x) > u.meter.budget.digits + 8:
            u.meter.digits(len(x), "int() literal")
        return int(x, base)
    if isinstance(x, (str, bytes, bytearray)):
        text = bytes(x).decode("ascii", "replace") if not isinstance(x, str) else x
        if len(text.strip()) > u.meter.budget.digits + 8:
            u.meter.digits(len(text.strip()), "int() literal")
        return int(text)
    if type(x) in (int, bool, float):
        return int(x)
    if _instance_of(x, "decimal", "Decimal"):
        return int(_check_decimal(u, x, "int(Decimal)"))
    if _instance_of(x, "fractions", "Fraction"):
        return int(x)
    raise _bad(f"int() of a {type(x).__name__}")


def _float(u: Any, x: Any = 0.0) -> float:
    if isinstance(x, (str, bytes, bytearray)):
        return float(_check_number_text(u, x, "float() literal"))
    if type(x) in (int, bool, float) or _exact(x):
        return float(x)
    raise _bad(f"float() of a {type(x).__name__}")


def _complex(u: Any, real: Any = 0.0, imag: Any = 0.0) -> complex:
    if isinstance(real, str):
        if len(real) > 256:
            raise _bad("complex() literal too long")
        return complex(real)
    if type(real) not in (int, float, bool, complex) or type(imag) not in (int, float, bool):
        raise _bad("complex() of non-numbers")
    return complex(real, imag)


def _bool(u: Any, x: Any = False) -> bool:
    if type(x) not in _SCALARS and not isinstance(x, _MATERIAL):
        raise _bad(f"bool() of a {type(x).__name__}")
    return bool(x)


_CODECS = ("latin1", "latin-1", "iso-8859-1", "utf-8", "utf8", "ascii")


def _str(u: Any, x: Any = "", encoding: Any = None, errors: Any = "strict") -> str:
    if encoding is not None:
        if not isinstance(x, (bytes, bytearray)) or encoding not in _CODECS or errors not in (
                "strict", "replace", "ignore", "surrogateescape", "surrogatepass"):
            raise _bad(f"str() of {type(x).__name__} with {encoding!r:.20}")
        return str(bytes(x), encoding, errors)
    if type(x) in (str, bool, float, type(None)) or isinstance(x, str):
        return str.__str__(x) if isinstance(x, str) else str(x)
    if type(x) is int:
        return str(_check_int_value(u, x, "str() of an int"))
    raise _bad(f"str() of a {type(x).__name__}")


def codecs_encode(u: Any, obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    if not isinstance(obj, str) or encoding not in _CODECS:
        raise _bad(f"_codecs.encode({type(obj).__name__}, {encoding!r:.20})")
    u.meter.materialise(len(obj) * (1 if encoding in ("latin1", "latin-1", "iso-8859-1", "ascii") else 4))
    return obj.encode(encoding)


def _bytes_like(kind: type) -> Any:
    def make(u: Any, *args: Any) -> Any:
        if not args:
            return kind()
        if len(args) in (2, 3) and isinstance(args[0], str):
            return kind(codecs_encode(u, args[0], args[1]))
        if len(args) == 1 and isinstance(args[0], (bytes, bytearray, list, tuple)):
            u.meter.step(len(args[0]))
            u.meter.materialise(len(args[0]), f"{kind.__name__}()")
            return kind(args[0])
        raise _bad(f"{kind.__name__}() called with {', '.join(type(a).__name__ for a in args)}")
    return make


def _decimal(u: Any, value: Any = "0", context: Any = None) -> decimal.Decimal:
    import decimal  # start-up: see _exact_numbers

    if isinstance(value, str):
        _check_number_text(u, value, "Decimal")
        return _check_decimal(u, decimal.Decimal(value), "Decimal")
    if isinstance(value, tuple):
        if len(value) != 3 or not isinstance(value[1], tuple) or len(value[1]) > u.meter.budget.digits:
            raise _bad("malformed Decimal tuple")
        if type(value[2]) is int:
            u.meter.digits(abs(value[2]), "Decimal exponent")
        return _check_decimal(u, decimal.Decimal(value), "Decimal")
    if type(value) in (int, float):
        return _check_decimal(u, decimal.Decimal(_check_int_value(u, value, "Decimal") if type(value) is int
                                                 else value), "Decimal")
    raise _bad(f"Decimal of a {type(value).__name__}")


def _fraction(u: Any, numerator: Any = 0, denominator: Any = None) -> fractions.Fraction:
    import fractions  # start-up: see _exact_numbers

    if isinstance(numerator, str) and denominator is None:
        _check_number_text(u, numerator, "Fraction")
        return fractions.Fraction(numerator)
    for part in (numerator, denominator):
        if part is None or type(part) is int:
            if part is not None:
                _check_int_value(u, part, "Fraction")
        elif type(part) is float or isinstance(part, fractions.Fraction):
            pass
        elif _instance_of(part, "decimal", "Decimal"):
            _check_decimal(u, part, "Fraction")
        else:
            raise _bad(f"Fraction of a {type(part).__name__}")
    parts = [p for p in (numerator, denominator) if isinstance(p, fractions.Fraction)]
    words = sum(p.numerator.bit_length() + p.denominator.bit_length() for p in parts) >> 6
    u.meter.step(words * words // 64 + 1)  # Fraction(a/b, c/d) multiplies and reduces (gcd): charged
    result = fractions.Fraction(numerator, denominator)
    _check_int_value(u, result.numerator, "Fraction numerator")  # nesting cannot double the digits per level
    _check_int_value(u, result.denominator, "Fraction denominator")
    return result


# --------------------------------------------------------------------------- datetime, uuid, paths
def _dt(kind: type) -> Any:
    def make(u: Any, *args: Any) -> Any:
        for a in args:
            if not (type(a) in _SCALARS or isinstance(a, (datetime.tzinfo, datetime.timedelta))):
                raise _bad(f"{kind.__name__}() with a {type(a).__name__}")
            if type(a) is int:
                _check_int_value(u, a, kind.__name__)
            if isinstance(a, (str, bytes)) and len(a) > 64:
                raise _bad(f"{kind.__name__}() with {len(a)} characters of state")
        return kind(*args)
    return make


def _uuid(u: Any, hex: Any = None, *rest: Any) -> uuid.UUID:
    if hex is None:
        return uuid.UUID(int=0)  # NEWOBJ: BUILD sets the value
    if not isinstance(hex, str) or len(hex) > 64:
        raise _bad("UUID from something other than its hex text")
    return uuid.UUID(hex)


def finish_uuid(u: Any, old: Any, state: Any) -> uuid.UUID:
    if isinstance(state, tuple) and len(state) == 2:
        state = state[1] if state[0] is None else state[0]
    value = state.get("int") if isinstance(state, dict) else None
    if type(value) is not int or not 0 <= value < 1 << 128:
        raise _bad(f"UUID state {state!r:.80}")
    return uuid.UUID(int=value)


_PATHS = {n: getattr(pathlib, n) for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath",
                                            "PureWindowsPath")}
if sys.platform == "win32":
    _PATHS["PosixPath"] = pathlib.PurePosixPath
else:
    _PATHS["WindowsPath"] = pathlib.PureWindowsPath


def _path(name: str) -> Any:
    cls = _PATHS[name]

    def make(u: Any, *parts: Any) -> Any:
        if not parts:
            raise _bad(f"pathlib.{name} built without its parts (object.__new__ / copyreg.__newobj__): an "
                       "uninitialised path")
        if not all(isinstance(p, str) for p in parts) or sum(len(p) for p in parts) > 65_536:
            raise _bad(f"pathlib.{name} from {', '.join(type(p).__name__ for p in parts)}")
        u.meter.step(len(parts))
        return cls(*parts)
    return make


def _namespace(kind: type) -> Any:
    def make(u: Any, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise _bad(f"{kind.__name__}() takes keyword state only")
        return kind(**_attributes(u, kwargs, kind.__name__)) if kwargs else kind()
    return make


def _attributes(u: Any, state: Any, what: str) -> dict[str, Any]:
    if not isinstance(state, dict):
        raise _bad(f"{what} state must be a dict, got {type(state).__name__}")
    u.meter.step(len(state))
    for k in state:
        if not isinstance(k, str) or (k.startswith("__") and k.endswith("__")):
            raise _bad(f"{what} attribute name {k!r:.60}")
    return state


def finish_namespace(u: Any, old: Any, state: Any) -> Any:
    if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
        state = state[0]
    attrs = dict(vars(old))
    attrs.update(_attributes(u, state, type(old).__name__))
    return type(old)(**attrs)


def finish_attributes(u: Any, old: Any, state: Any) -> Any:
    """BUILD on a dict subclass we made (``OrderedDict._metadata`` of state dicts): instance attributes
    that shadow nothing of the class, written to the instance dictionary."""
    if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
        state = state[0]
    for k in _attributes(u, state, type(old).__name__):
        if hasattr(type(old), k):
            raise _bad(f"{type(old).__name__} state would shadow its attribute {k!r}")
    vars(old).update(state)
    return old


def _slice(u: Any, *args: Any) -> slice:
    if len(args) > 3 or not all(type(a) in (int, type(None)) for a in args):
        raise _bad("slice() of non-integers")
    return slice(*args)


def _range(u: Any, *args: Any) -> range:
    if not 1 <= len(args) <= 3 or not all(type(a) is int for a in args):
        raise _bad("range() of non-integers")
    for a in args:
        _check_int_value(u, a, "range()")
    return range(*args)


def _object(u: Any, *args: Any) -> object:
    if args:
        raise _bad("object() takes no arguments")
    return object()


def _timezone(u: Any, offset: Any = None, name: Any = None) -> datetime.timezone:
    if not isinstance(offset, datetime.timedelta) or not (name is None or isinstance(name, str) and len(name) < 64):
        raise _bad("timezone() of a non-timedelta")
    return datetime.timezone(offset) if name is None else datetime.timezone(offset, name)


def _no_stand_ins(fn: Any) -> Any:
    """A structure read stands for torch.dtype / torch.device with str subclasses; none of these constructors
    takes a dtype or device (load refuses them), so none takes a stand-in either: scan refuses what load refuses."""
    def make(u: Any, *args: Any, **kwargs: Any) -> Any:
        for a in args:
            if type(a) in _STAND_INS:
                raise _bad(f"a {type(a).__name__[4:].lower()} ({a}) is not a value a constructor takes")
        return fn(u, *args, **kwargs)
    return make


_STAND_INS = (MetaDType, MetaDevice)

# name -> (constructor, NEWOBJ allowed, finisher for BUILD, the class it stands for)
CONSTRUCTORS: dict[str, tuple[Any, bool, Any, Any]] = {
    "ordered_dict": (_container(collections.OrderedDict), True, finish_attributes, collections.OrderedDict),
    "defaultdict": (_defaultdict, True, None, collections.defaultdict),
    "counter": (_container(collections.Counter), True, None, collections.Counter),
    "deque": (_container(collections.deque), True, None, collections.deque),
    "codecs_encode": (codecs_encode, False, None, None),
    "argparse_namespace": (_namespace(argparse.Namespace), True, finish_namespace, argparse.Namespace),
    "simple_namespace": (_namespace(types.SimpleNamespace), True, finish_namespace, types.SimpleNamespace),
    "datetime": (_dt(datetime.datetime), True, None, datetime.datetime),
    "date": (_dt(datetime.date), True, None, datetime.date),
    "time": (_dt(datetime.time), True, None, datetime.time),
    "timedelta": (_dt(datetime.timedelta), True, None, datetime.timedelta),
    "timezone": (_timezone, True, None, datetime.timezone),
    "uuid": (_uuid, True, finish_uuid, uuid.UUID),
    **{f"path_{n}": (_path(n), True, None, _PATHS[n]) for n in _PATHS},
    "builtin_bytes": (_bytes_like(bytes), True, None, bytes),
    "builtin_bytearray": (_bytes_like(bytearray), True, None, bytearray),
    **{f"builtin_{k.__name__}": (_container(k), True, None, k) for k in (list, tuple, dict, set, frozenset)},
    "builtin_int": (_int, True, None, int), "builtin_float": (_float, True, None, float),
    "builtin_complex": (_complex, True, None, complex), "builtin_bool": (_bool, True, None, bool),
    "builtin_str": (_str, True, None, str), "builtin_slice": (_slice, False, None, slice),
    "builtin_range": (_range, False, None, range), "builtin_object": (_object, True, None, object),
}
CONSTRUCTORS = {k: (_no_stand_ins(fn), newobj, finish, target) for k, (fn, newobj, finish, target) in CONSTRUCTORS.items()}


def _exact_numbers(kind: str) -> Callable[[], tuple[Any, bool, Any, Any]]:
    """The entry of ``decimal.Decimal`` or ``fractions.Fraction``, made when a pickle first names one. Start-up:
    ``decimal`` takes ~3 ms to import (more than any module of the pickle VM) and checkpoints rarely hold one, so
    no load pays for it until then."""
    def entry() -> tuple[Any, bool, Any, Any]:
        import decimal
        import fractions

        if kind == "decimal":
            return _no_stand_ins(_decimal), True, None, decimal.Decimal
        return _no_stand_ins(_fraction), True, None, fractions.Fraction
    return entry


# name -> the entry of CONSTRUCTORS' form, made on first use
LAZY_CONSTRUCTORS = {"decimal": _exact_numbers("decimal"), "fraction": _exact_numbers("fraction")}
CONSTANTS = {"builtin_NotImplemented": NotImplemented, "builtin_Ellipsis": Ellipsis}
