"""References to torch functions stored in whole models (an activation kept as an attribute), as inert values.

``self.act = torch.sigmoid`` pickles as ``getattr(torch._C._VariableFunctionsClass, "sigmoid")``;
``torch.nn.functional.relu`` and ``torch._C._nn.gelu`` pickle as plain globals. Each becomes a
:class:`FunctionRef` that names the function and refuses to be called: the weights around it load and
nothing runs. ``builtins.getattr`` is allowed only in that one shape (a torch function namespace and a
public function name); any other use of it is refused as unsafe by ``load`` and reported by ``scan``.
"""

from __future__ import annotations

import re
from typing import Any

from .stubs import is_stub_class, stub_name

__all__ = ["FunctionRef", "torch_function_ref", "safe_getattr", "FUNCTION_NAMESPACES"]

# where torch's public functions live, as a pickle names them: namespace -> the dotted prefix users know
FUNCTION_NAMESPACES = {
    "torch": "torch", "torch._C._VariableFunctions": "torch", "torch._C._VariableFunctionsClass": "torch",
    "torch.functional": "torch", "torch.nn.functional": "torch.nn.functional", "torch._C._nn": "torch._C._nn",
    "torch.special": "torch.special", "torch._C._special": "torch.special", "torch.linalg": "torch.linalg",
    "torch._C._linalg": "torch.linalg", "torch.fft": "torch.fft", "torch._C._fft": "torch.fft",
}
_FUNCTION = re.compile(r"[a-z][a-z0-9_]{0,63}")  # a public function (classes are CamelCase)


class FunctionRef:
    """A torch function a checkpoint refers to (``torch.sigmoid``), not imported and never called."""

    __slots__ = ("module", "name")
    module: str
    name: str

    def __init__(self, module: str, name: str) -> None:
        object.__setattr__(self, "module", module)
        object.__setattr__(self, "name", name)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("FunctionRef is immutable")

    @property
    def qualified_name(self) -> str:
        return f"{self.module}.{self.name}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FunctionRef) and (self.module, self.name) == (other.module, other.name)

    def __hash__(self) -> int:
        return hash((self.module, self.name))

    def __repr__(self) -> str:
        return f"<function {self.qualified_name} (a reference; not imported)>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"{self!r} is an inert reference torchckpt read from a checkpoint: it names "
                        f"{self.qualified_name} but is not that function. Use {self.qualified_name} itself, or load "
                        "the model with trust=True (only for a file you trust).")

    def __reduce__(self) -> Any:
        raise TypeError(f"{self!r} cannot be pickled; it stands for {self.qualified_name}")


def torch_function_ref(module: str, name: str) -> FunctionRef | None:
    """The reference a global names when it is a public torch function (lowercase name in a function
    namespace), else None."""
    prefix = FUNCTION_NAMESPACES.get(module)
    if prefix is None or not _FUNCTION.fullmatch(name) or module == "torch" and name in _NOT_FUNCTIONS:
        return None
    return FunctionRef(prefix, name)


_NOT_FUNCTIONS = frozenset({"device", "dtype", "layout", "memory_format", "qscheme", "finfo", "iinfo", "storage",
                            "load", "save", "compile", "from_file"})  # values or loaders, never references


def safe_getattr(u: Any, obj: Any, name: Any = None, *default: Any) -> Any:
    """``builtins.getattr`` as torch pickles a function of ``torch._C._VariableFunctionsClass``: a
    :class:`FunctionRef`. Anything else reaches attributes by name, which a checkpoint may not do."""
    namespace = stub_name(obj) if is_stub_class(obj) else None
    if namespace is None and u.trusted_class(obj):
        namespace = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
    if namespace in FUNCTION_NAMESPACES and isinstance(name, str) and not default:
        ref = torch_function_ref(namespace, name)
        if ref is not None:
            if u.trusted_class(obj):  # the caller imported the namespace for real: give the real function
                return getattr(obj, name)
            return ref
    return u.unsafe(f"the pickle reaches an attribute by name (builtins.getattr({obj!r:.60}, {name!r:.60})); only "
                    "getattr(torch._C._VariableFunctionsClass, <function>) is read, as a reference",
                    "builtins.getattr")
