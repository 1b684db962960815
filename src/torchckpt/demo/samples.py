"""Writers for sample checkpoints of every era, used by ``torchckpt tour``, the tests and the benchmarks.

Modern torch can still write the zip and legacy stream formats; this module adds what it cannot:
files laid out exactly as Python 2 + torch 0.4 wrote them (``str`` as BINSTRING byte strings, numpy
scalars carrying raw bytes, ``numpy.core`` module paths), and storages tagged with a device such as
``cuda:3`` on a machine without one.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import struct
import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Iterator

from ..read.sniff import LEGACY_MAGIC

__all__ = ["write_py2_legacy", "saved_on_device"]


class _Global:
    """Pickles as a bare GLOBAL opcode with the given module and name."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> Any:  # pickle requires reduce functions to be callable
        raise TypeError("a pickling placeholder")


class _StorageRef:
    def __init__(self, key: str, storage: Any, location: str) -> None:
        self.key, self.storage, self.location = key, storage, location


class _Py2Pickler(pickle._Pickler):  # the Python pickler: its dispatch table is ours to extend
    """Protocol 2 pickler that writes every str and bytes as a Python 2 ``str`` (BINSTRING)."""

    if TYPE_CHECKING:  # undocumented internals of the pure-Python pickler that typeshed leaves out
        def write(self, data: bytes) -> Any: ...

        def memoize(self, obj: Any) -> None: ...

    def __init__(self, file: Any, storages: dict[str, Any], location: str) -> None:
        super().__init__(file, protocol=2)
        self.storages = storages
        self.location = location
        dispatch: dict[type, Any] = dict(pickle._Pickler.dispatch)
        dispatch[str] = dispatch[bytes] = _Py2Pickler._save_py2_str
        self.dispatch = dispatch  # type: ignore[misc]  # a per-instance copy; typeshed declares a ClassVar

    def _save_py2_str(self, obj: Any) -> None:
        raw = obj.encode("utf-8") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:  # noqa: D102
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)  # type: ignore[misc]  # typeshed omits _Pickler.save

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageRef):
            untyped, dtype = obj.storage
            return ("storage", _Global("torch", _storage_class_name(dtype)), obj.key, obj.location,
                    untyped.nbytes() // dtype.itemsize, None)
        return None

    def reducer_override(self, obj: Any) -> Any:
        import numpy as np
        import torch

        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = str(id(storage))
            self.storages.setdefault(key, (storage, obj.dtype))
            ref = _StorageRef(key, self.storages[key], self.location)
            rebuild = "_rebuild_parameter" if isinstance(obj, torch.nn.Parameter) else None
            tensor_args: tuple[Any, ...] = (ref, obj.storage_offset(), tuple(obj.size()), obj.stride(), False, OrderedDict())
            tensor = (_Global("torch._utils", "_rebuild_tensor_v2"), tensor_args)
            if rebuild:
                return _Global("torch._utils", rebuild), (_Reduced(*tensor), obj.requires_grad, OrderedDict())
            return tensor
        if isinstance(obj, np.generic):
            return _Global("numpy.core.multiarray", "scalar"), (obj.dtype, obj.tobytes())
        if isinstance(obj, np.ndarray):
            state = (1, obj.shape, obj.dtype, False, np.ascontiguousarray(obj).tobytes())
            return (_Global("numpy.core.multiarray", "_reconstruct"),
                    (_Global("numpy", "ndarray"), (0,), b"b"), state)
        if isinstance(obj, OrderedDict):
            return _Global("collections", "OrderedDict"), (), None, None, iter(obj.items())
        return NotImplemented


class _Reduced:
    """A precomputed (callable, args) pair pickled through REDUCE."""

    def __init__(self, func: Any, args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> Any:
        return self.func, self.args


def _storage_class_name(dtype: Any) -> str:
    """``"HalfStorage"`` for ``torch.float16``: the name torch itself pickles for that dtype."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "TypedStorage is deprecated": it is what old files hold
        name: str = torch.TypedStorage(0, dtype=dtype).pickle_storage_type()
        return name


def write_py2_legacy(obj: Any, file: Any, *, location: str = "cpu") -> None:
    """Write ``obj`` as Python 2 with torch 0.4 would have: legacy stream format, byte-string ``str``.

    ``file`` is a path or a binary file. Tensors become storages tagged with ``location``.
    """
    buf = io.BytesIO()
    _Py2Pickler(buf, {}, location).dump(LEGACY_MAGIC)
    _Py2Pickler(buf, {}, location).dump(1001)
    _Py2Pickler(buf, {}, location).dump({"protocol_version": 1001, "little_endian": True,
                                          "type_sizes": {"short": 2, "int": 4, "long": 8}})
    storages: dict[str, Any] = {}
    _Py2Pickler(buf, storages, location).dump(obj)
    keys = sorted(storages)
    _Py2Pickler(buf, {}, location).dump(keys)
    import torch

    for key in keys:
        untyped, dtype = storages[key]
        raw = torch.empty(0, dtype=torch.uint8).set_(untyped.cpu()).numpy().tobytes()
        buf.write(struct.pack("<q", len(raw) // dtype.itemsize))
        buf.write(raw)
    _write(file, buf.getvalue())


def _write(file: Any, data: bytes) -> None:
    if hasattr(file, "write"):
        file.write(data)
    else:
        with open(file, "wb") as fh:
            fh.write(data)


@contextlib.contextmanager
def saved_on_device(location: str) -> Iterator[None]:
    """Within the block, ``torch.save`` tags CPU storages as if they lived on ``location`` (e.g. ``cuda:3``)."""
    import torch.serialization as ser

    def tagger(storage: Any) -> str | None:
        return location if storage.device.type == "cpu" else None

    entry = (-100, tagger, lambda storage, loc: None)
    ser._package_registry.append(entry)
    ser._package_registry.sort(key=lambda e: e[0])
    try:
        yield
    finally:
        ser._package_registry.remove(entry)
