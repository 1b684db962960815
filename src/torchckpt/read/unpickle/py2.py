"""Python 2 byte strings in pickles.

Python 2 pickled ``str`` with the BINSTRING opcodes, the same way for text (dict keys, device
names) and for raw data (the bytes inside numpy scalars and arrays). Python 3 has to guess, which is
where ``UnicodeDecodeError: 'ascii' codec can't decode byte 0x8c`` comes from. torchckpt decides per
value: ASCII becomes ``str`` at once; anything else is kept as :class:`Py2Bytes` so that numpy gets
its exact bytes, and whatever is left in the tree afterwards is decoded as text (UTF-8, else Latin-1).
"""

from __future__ import annotations

from typing import Any

from ...errors import LimitExceededError
from .stubs import Stub

__all__ = ["Py2Bytes", "decode_py2_text"]


class Py2Bytes(bytes):
    """A Python 2 ``str`` that was not ASCII: raw bytes until we know it is text."""

    __slots__ = ()


def _as_text(raw: Py2Bytes) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return bytes(raw).decode("latin-1")


def decode_py2_text(root: Any, max_depth: int = 1_000) -> tuple[Any, int]:
    """Replace every :class:`Py2Bytes` left in dicts/lists/tuples/sets by ``str``.

    Returns ``(new_root, count)``. Containers are rebuilt only when something inside changed, and
    shared containers stay shared. Nesting is capped at ``max_depth``.
    """
    count = 0
    done: dict[int, Any] = {}

    def convert(obj: Any, depth: int) -> Any:
        nonlocal count
        if isinstance(obj, Py2Bytes):
            count += 1
            return _as_text(obj)
        if depth > max_depth:
            raise LimitExceededError(f"object nesting deeper than {max_depth} levels")
        if isinstance(obj, (str, bytes, int, float, bool)) or obj is None:
            return obj
        key = id(obj)
        if key in done:
            return done[key]
        done[key] = obj  # cycles resolve to the original object
        if isinstance(obj, dict):
            changed = {convert(k, depth + 1): convert(v, depth + 1) for k, v in obj.items()}
            if any(a is not b for a, b in zip(changed.keys(), obj.keys())):
                if type(obj) is dict:
                    result: Any = changed
                else:
                    obj.clear()
                    obj.update(changed)
                    result = obj
            else:
                for k, v in changed.items():
                    if obj[k] is not v:
                        obj[k] = v
                result = obj
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                nv = convert(v, depth + 1)
                if nv is not v:
                    obj[i] = nv
            result = obj
        elif type(obj) is tuple:
            items = tuple(convert(v, depth + 1) for v in obj)
            result = obj if all(a is b for a, b in zip(items, obj)) else items
        elif isinstance(obj, (set, frozenset)):
            members = {convert(v, depth + 1) for v in obj}
            result = obj if members == obj else type(obj)(members)
        elif isinstance(obj, Stub):
            d = obj.__dict__
            for attr in ("stub_args", "stub_state", "stub_items", "stub_list"):
                if d.get(attr) is not None:
                    d[attr] = convert(d[attr], depth + 1)
            result = obj
        elif hasattr(obj, "__dict__") and type(obj).__module__ in ("argparse", "types"):
            for k, v in list(vars(obj).items()):
                setattr(obj, k, convert(v, depth + 1))
            result = obj
        else:
            result = obj
        done[key] = result
        return result

    import sys

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, max_depth * 3 + 1000))
    try:
        return convert(root, 0), count
    finally:
        sys.setrecursionlimit(old)
