"""Every ``map_location`` form ``torch.load`` accepts, turned into one callable at the boundary.

Forms: ``None`` (where it was saved, or the CPU when that device is missing), a string or
``torch.device`` (everything there), a dict ``{"cuda:3": "cpu"}`` (per saved location), or a
callable ``(storage, location) -> storage | None`` (torch semantics: ``None`` means default).
Storages arrive on the CPU; the returned function moves them and records what it did.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import DeviceUnavailableError

__all__ = ["Relocator", "MapLocation"]

MapLocation = Any  # None | str | torch.device | dict | Callable


class Relocator:
    """Moves a freshly read CPU storage to where ``map_location`` says. Records every move."""

    def __init__(self, map_location: MapLocation = "cpu") -> None:
        self.map_location = map_location
        self.moves: dict[str, str] = {}  # saved location -> where it went
        self.fallbacks: set[str] = set()  # saved locations not available here, loaded to the CPU
        self._fn = self._build(map_location)

    def __call__(self, storage: Any, location: str) -> Any:
        result = self._fn(storage, location)
        dest = str(result.device)
        if dest != location:
            self.moves.setdefault(location, dest)
        return result

    def _build(self, ml: MapLocation) -> Callable[[Any, str], Any]:
        if ml is None:
            return self._default
        if isinstance(ml, dict):
            table = {str(k): v for k, v in ml.items()}
            return lambda s, loc: self._to(s, str(table.get(loc, loc)), loc)
        if isinstance(ml, (str, bytes)):
            dest = ml.decode() if isinstance(ml, bytes) else ml
            return lambda s, loc: self._to(s, dest, loc)
        if type(ml).__name__ == "device":
            return lambda s, loc: self._to(s, str(ml), loc)
        if callable(ml):
            def call(storage: Any, location: str) -> Any:
                out = ml(storage, location)
                return self._default(storage, location) if out is None else out
            return call
        raise TypeError(f"map_location must be None, a string, a torch.device, a dict or a callable, "
                        f"not {type(ml).__name__}")

    def _default(self, storage: Any, location: str) -> Any:
        if _available(location):
            return self._to(storage, location, location)
        self.fallbacks.add(location)
        return storage

    def _to(self, storage: Any, dest: str, location: str) -> Any:
        import torch  # lazy: structure-only reads never relocate

        device = torch.device(dest)
        if device.type == "cpu":
            return storage
        if device.type == "meta":
            return torch.UntypedStorage(storage.nbytes(), device="meta")
        if not _available(dest):
            raise DeviceUnavailableError(
                f"map_location sends tensors saved on {location} to {dest}, which this machine does not have "
                f"({_missing(device)})", device=dest, saved_on=location,
                hint=f"Map {location} to a device this machine has, e.g. map_location={{{location!r}: 'cpu'}}, "
                     "or pass map_location='cpu' (the default) or None (saved devices, the CPU where missing).")
        return storage.to(device=device) if hasattr(storage, "to") else storage.cuda(device)


def _missing(device: Any) -> str:
    import torch  # lazy: only called when relocating

    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return f"it has {torch.cuda.device_count()} CUDA device(s)"
    return f"{device.type} is not available"


def _available(location: str) -> bool:
    import torch

    try:
        device = torch.device(location)
    except (RuntimeError, TypeError):
        return False
    if device.type in ("cpu", "meta"):
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    if device.type == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    module = getattr(torch, device.type, None)
    return bool(module is not None and getattr(module, "is_available", lambda: False)())
