"""Inert stand-ins for classes and functions a pickle names but torchckpt does not import.

A stub class is created per (module, qualname). Calling it, ``__new__``-ing it, BUILD-ing and
SETITEM-ing into it only *records* what the pickle asked for: no user code ever runs. Stubs of
``nn.Module`` subclasses keep their ``_parameters``/``_buffers``/``_modules`` in ``stub_state``,
which is what :func:`torchckpt.state_dict_of` reads; attribute access falls through to those
dicts the way ``nn.Module.__getattr__`` does, so ``model.fc.weight`` works on a stub tree.
"""

from __future__ import annotations

import threading
from typing import Any, SupportsIndex

from ...errors import LimitExceededError

__all__ = ["Stub", "stub_class", "is_stub_class", "stub_name", "stub_to_plain"]


class Stub:
    """An object of a class torchckpt did not import. Records, never executes."""

    _stub_module: str = "?"
    _stub_qualname: str = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Stub":
        self = object.__new__(cls)
        d = self.__dict__
        d["stub_args"] = args
        d["stub_kwargs"] = kwargs
        d["stub_state"] = None
        d["stub_items"] = None
        d["stub_list"] = None
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # never runs user code
        pass

    # Pickle protocol hooks used by the unpickler -----------------------------------------
    def __setstate__(self, state: Any) -> None:
        self.__dict__["stub_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        items = self.__dict__["stub_items"]
        if items is None:
            items = self.__dict__["stub_items"] = {}
        items[key] = value

    def append(self, value: Any) -> None:
        lst = self.__dict__["stub_list"]
        if lst is None:
            lst = self.__dict__["stub_list"] = []
        lst.append(value)

    def extend(self, values: Any) -> None:
        for v in values:
            self.append(v)

    def add(self, value: Any) -> None:  # ADDITEMS on a set subclass
        self.append(value)

    # Read access ---------------------------------------------------------------------------
    @property
    def stub_fullname(self) -> str:
        return f"{self._stub_module}.{self._stub_qualname}"

    def stub_attributes(self) -> dict[str, Any]:
        """The instance dictionary the pickle restored (the state's dict part), or {}."""
        state = self.__dict__.get("stub_state")
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            merged = dict(state[0] or {})
            if isinstance(state[1], dict):
                merged.update(state[1])
            return merged
        return state if isinstance(state, dict) else {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("stub_") or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        attrs = self.stub_attributes()
        if name in attrs:
            return attrs[name]
        for bucket in ("_parameters", "_buffers", "_modules"):
            d = attrs.get(bucket)
            if isinstance(d, dict) and name in d:
                return d[name]
        raise AttributeError(f"stub of {self.stub_fullname} has no attribute {name!r}")

    def __getitem__(self, key: Any) -> Any:
        items = self.__dict__.get("stub_items")
        if items is not None and not isinstance(key, int):
            return items[key]
        lst = self.__dict__.get("stub_list")
        if lst is not None:
            return lst[key]
        if items is not None:
            return items[key]
        raise KeyError(key)

    def __repr__(self) -> str:
        return f"<stub {self.stub_fullname}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        name = self.stub_fullname
        raise TypeError(
            f"{self!r} is an inert stand-in for {name}: torchckpt did not import that class, so the object "
            f"has its saved attributes but none of its code. To run it, import the real class: "
            f"torchckpt.load(path, allow=[{name!r}]) (only for a file you trust), or build the model "
            "yourself and load its weights with torchckpt.load_into(model, path).")

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        raise TypeError(f"{self!r} is a torchckpt stub; convert it with torchckpt.stub_to_plain() first")


_classes: dict[tuple[str, str], type] = {}
_lock = threading.Lock()


def stub_class(module: str, qualname: str) -> type:
    """The (cached) stub class standing in for ``module.qualname``."""
    key = (module, qualname)
    cls = _classes.get(key)
    if cls is None:
        with _lock:
            cls = _classes.get(key)
            if cls is None:
                name = qualname.rsplit(".", 1)[-1] or "stub"
                cls = type(name, (Stub,), {"_stub_module": module, "_stub_qualname": qualname,
                                           "__module__": "torchckpt.stubs", "__qualname__": name})
                _classes[key] = cls
    return cls


def is_stub_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, Stub) and obj is not Stub


def stub_name(obj: Any) -> str:
    """Dotted name of a stub instance or stub class."""
    cls: Any = obj if isinstance(obj, type) else type(obj)
    return f"{cls._stub_module}.{cls._stub_qualname}"


MAX_PLAIN_DEPTH = 200


def stub_to_plain(obj: Any, max_depth: int = MAX_PLAIN_DEPTH) -> Any:
    """A stub turned into plain data: ``{"__class__": name, "args": ..., "state": ...}``.

    Non-stub values are returned unchanged (containers are converted recursively). A shared object is
    converted once and stays shared, so the work is linear in the size of the graph; nesting deeper
    than ``max_depth`` raises :class:`~torchckpt.errors.LimitExceededError`, never ``RecursionError``.
    """
    done: dict[int, Any] = {}
    keep: list[Any] = []

    def convert(o: Any, depth: int) -> Any:
        if isinstance(o, (str, bytes, int, float, type(None))):
            return o
        if depth > max_depth:
            raise LimitExceededError(f"object nesting deeper than {max_depth} levels while converting stubs "
                                     "to plain data",
                                     hint=f"Pass a larger max_depth to stub_to_plain (now {max_depth}) if the "
                                          "data is really that deep.")
        key = id(o)
        if key in done:
            return done[key]
        keep.append(o)
        d = depth + 1
        if is_stub_class(o):
            out: Any = {"__class__": stub_name(o)}
        elif isinstance(o, Stub):
            out = done[key] = {"__class__": stub_name(o)}
            for label, attr in (("args", "stub_args"), ("kwargs", "stub_kwargs"), ("state", "stub_state"),
                                ("items", "stub_items"), ("list", "stub_list")):
                value = o.__dict__.get(attr)
                if value:
                    out[label] = convert(value, d)
        elif isinstance(o, dict):
            out = done[key] = {}
            for k, v in o.items():
                out[k] = convert(v, d)
        elif isinstance(o, list):
            out = done[key] = []
            out.extend(convert(v, d) for v in o)
        elif isinstance(o, tuple):
            done[key] = o  # a cycle through a tuple resolves to the original
            out = tuple(convert(v, d) for v in o)
        else:
            out = o
        done[key] = out
        return out

    try:
        return convert(obj, 0)
    except RecursionError:  # a max_depth above what Python's stack allows
        raise LimitExceededError(f"object nesting too deep to convert stubs to plain data (max_depth={max_depth} "
                                 "is beyond Python's recursion limit)",
                                 hint="Pass a smaller max_depth, or raise sys.setrecursionlimit.") from None
