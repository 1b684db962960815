"""Text built from a checkpoint's values: bounded in size, and safe to show on a terminal.

Two rules for every string that came from a file (keys, class names, metadata, ``config.json``
values, shard names, and error messages that quote them):

- :func:`summary` describes a value in at most ``limit`` characters without ever calling ``repr()`` or
  ``str()`` on a whole container (a 400-byte pickle can hold a tuple with 2^48 leaves; a 5000-digit
  integer has no ``str()`` in Python >= 3.11). It looks at no more nodes than characters it may write.
- :func:`escape_terminal` makes text safe to print: C0 and C1 control characters, ESC, DEL and the
  bidirectional overrides and isolates (U+202A-U+202E, U+2066-U+2069) become visible escapes
  (``\\x1b``, ``\\u202e``), so a file cannot set the window title, write the clipboard, clear the
  screen or reorder what a line says. Newlines (and tabs) are kept: they are layout, not commands.
  Every human-readable output of the command line goes through it; ``--json`` output is exact
  (``json.dumps`` escapes these characters itself).

Stdlib only, importable without torch.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["escape_terminal", "summary", "clip", "key_text"]

_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029\ufeff]")
_UNSAFE_ALL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029\ufeff]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_terminal(text: str, *, keep_newlines: bool = True) -> str:
    """``text`` with every control character (C0, C1, ESC, DEL) and bidi override shown as an escape.

    With ``keep_newlines`` (the default) ``\\n`` and ``\\t`` stay: they are the layout of a report.
    A string from a file that is shown inside one line should pass ``keep_newlines=False``.
    """
    pattern = _UNSAFE if keep_newlines else _UNSAFE_ALL
    return pattern.sub(_escape_char, text) if pattern.search(text) else text


def clip(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters (an ellipsis marks the cut), control characters escaped."""
    if len(text) > limit:
        text = text[:max(limit - 3, 0)] + "..."
    return escape_terminal(text, keep_newlines=False)


def key_text(key: Any, limit: int = 1 << 16) -> str:
    """A dict key or list index as it appears in a dotted path: strings as they are, anything else
    summarised (never ``str()`` of a whole object; a huge integer is described, not converted)."""
    if isinstance(key, str):
        return key
    if isinstance(key, bool) or key is None:
        return str(key)
    if isinstance(key, int):
        return _int_text(key, limit)
    return summary(key, limit)


def _int_text(value: int, limit: int) -> str:
    bits = value.bit_length()
    if bits <= 3 * min(limit, 4000):  # ~0.3 decimal digits per bit: str() is cheap and allowed
        text = str(value)
        if len(text) <= limit:
            return text
    return f"<int with about {int(bits * 0.30103) + 1} digits>"


class _Writer:
    """Appends pieces until ``limit`` characters; then everything further is dropped."""

    __slots__ = ("parts", "room")

    def __init__(self, limit: int) -> None:
        self.parts: list[str] = []
        self.room = limit

    def put(self, text: str) -> bool:
        if self.room <= 0:
            return False
        if len(text) > self.room:
            text = text[:self.room]
        self.parts.append(text)
        self.room -= len(text)
        return self.room > 0


def summary(value: Any, limit: int = 120) -> str:
    """A ``repr``-like description of ``value`` in at most ``limit`` characters (``...`` marks a cut).

    Containers are opened breadth-limited: no more elements are looked at than characters fit, so
    shared or deeply nested values cost O(limit). Unknown objects show their type, never their own
    ``repr()`` (which could be anything). Control characters are escaped.
    """
    out = _Writer(limit + 1)
    _put(value, out, 0)
    text = "".join(out.parts)
    if len(text) > limit:
        text = text[:max(limit - 3, 0)] + "..."
    return escape_terminal(text, keep_newlines=False)


_OPEN = {list: ("[", "]"), tuple: ("(", ")"), set: ("{", "}"), frozenset: ("frozenset({", "})"), dict: ("{", "}")}


def _put(value: Any, out: _Writer, depth: int) -> bool:
    if out.room <= 0:
        return False
    if value is None or isinstance(value, (bool, float, complex)):
        return out.put(repr(value))
    if isinstance(value, int):
        return out.put(_int_text(value, out.room + 10))
    if isinstance(value, str):
        return out.put(repr(value[:out.room + 2]) if len(value) > out.room + 2 else repr(value))
    if isinstance(value, (bytes, bytearray)):
        head = bytes(value[:out.room + 2])
        return out.put(repr(head) if len(value) == len(head) else repr(head) + f"...<{len(value)} bytes>")
    kind = next((t for t in _OPEN if isinstance(value, t)), None)
    if kind is None:
        return out.put(_object_text(value))
    opening, closing = _OPEN[kind]
    if type(value) is not kind:
        opening = f"{type(value).__name__}({opening}"
        closing = f"{closing})"
    if depth >= 8:
        return out.put(f"{opening}...{closing}")
    if not out.put(opening):
        return False
    items = value.items() if isinstance(value, dict) else value
    for index, item in enumerate(items):
        if index and not out.put(", "):
            return False
        if isinstance(value, dict):
            if not (_put(item[0], out, depth + 1) and out.put(": ") and _put(item[1], out, depth + 1)):
                return False
        elif not _put(item, out, depth + 1):
            return False
    if kind is tuple and len(value) == 1 and type(value) is tuple:
        out.put(",")
    return out.put(closing)


def _object_text(value: Any) -> str:
    """An object we do not open: its class, and the length when it has one (no ``repr()`` of it)."""
    cls = type(value)
    name = cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    fullname = getattr(value, "stub_fullname", None)  # an inert stub of a class we did not import
    if isinstance(fullname, str):
        return f"<stub {fullname}>"
    shape = getattr(value, "shape", None)
    if shape is not None and cls.__module__.startswith(("torch", "numpy", "torchckpt")):
        try:
            return f"<{name} shape {list(shape)[:16]}>"
        except Exception:  # noqa: BLE001 - a shape that is not a sequence is described by the class alone
            pass
    if cls.__module__ in ("decimal", "fractions", "datetime", "pathlib", "uuid", "argparse", "types",
                          "collections", "enum") or cls.__module__.startswith("torch"):
        try:
            text = repr(value) if cls.__module__ not in ("decimal", "fractions") else _number_text(value)
        except Exception:  # noqa: BLE001 - describe the class when its repr fails
            text = ""
        if text and len(text) <= 200:
            return text
    return f"<{name}>"


def _number_text(value: Any) -> str:
    """A Decimal or Fraction without converting a huge exponent or numerator to digits."""
    if type(value).__name__ == "Fraction":
        return f"Fraction({_int_text(value.numerator, 40)}, {_int_text(value.denominator, 40)})"
    sign, digits, exponent = value.as_tuple()
    if isinstance(exponent, str) or len(digits) <= 40:
        return f"Decimal('{value}')"
    return f"<Decimal with {len(digits)} digits, exponent {exponent}>"
