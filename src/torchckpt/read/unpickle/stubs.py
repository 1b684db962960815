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

__all__ = ["Stub", "stub_class", "is_stub", "is_stub_class", "stub_name", "stub_to_plain"]


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


def is_stub(obj: Any) -> bool:
    return isinstance(obj, Stub)


def is_stub_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, Stub) and obj is not Stub


def stub_name(obj: Any) -> str:
    """Dotted name of a stub instance or stub class."""
    cls: Any = obj if isinstance(obj, type) else type(obj)
    return f"{cls._stub_module}.{cls._stub_qualname}"


def stub_to_plain(obj: Any, _depth: int = 0) -> Any:
    """A stub turned into plain data: ``{"__class__": name, "args": ..., "state": ...}``.

    Non-stub values are returned unchanged (containers are converted recursively).
    """
    if _depth > 200:
        raise RecursionError("object nesting deeper than 200 levels")
    d = _depth + 1
    if is_stub_class(obj):
        return {"__class__": stub_name(obj)}
    if isinstance(obj, Stub):
        out: dict[str, Any] = {"__class__": stub_name(obj)}
        for label, attr in (("args", "stub_args"), ("kwargs", "stub_kwargs"), ("state", "stub_state"),
                            ("items", "stub_items"), ("list", "stub_list")):
            value = obj.__dict__.get(attr)
            if value:
                out[label] = stub_to_plain(value, d)
        return out
    if isinstance(obj, dict):
        return {k: stub_to_plain(v, d) for k, v in obj.items()}
    if isinstance(obj, list):
        return [stub_to_plain(v, d) for v in obj]
    if isinstance(obj, tuple):
        return tuple(stub_to_plain(v, d) for v in obj)
    return obj
