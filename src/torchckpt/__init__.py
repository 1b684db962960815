"""torchckpt: load any PyTorch checkpoint into any model, safely and fast; save training
checkpoints that resume bit-for-bit.

``import torchckpt`` is cheap: torch is imported only when tensors are needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (AmbiguousCheckpointError, CheckpointError, CheckpointNotFoundError, CheckpointWriteError,
                     CorruptCheckpointError, DeviceUnavailableError, IntegrityError, LimitExceededError,
                     NotACheckpointError, RemoteAuthError, RemoteConnectionRefusedError, RemoteNotFoundError,
                     RemoteStorageError, RemoteUnreachableError, ResumeError, StateDictMismatchError,
                     TruncatedCheckpointError, UnsafeCheckpointError, UnsupportedFormatError, WeightsNotFoundError)
from ._version import __version__


if TYPE_CHECKING:  # the real names for type checkers; at run time __getattr__ imports them on first use
    from . import transforms
    from .fit.equivalence import check_mapping
    from .fit.report import LoadReport
    from .fit.select import find_state_dicts
    from .fit.tree import state_dict_of
    from .read.load import read_checkpoint
    from .train.runs import load
    from .train.runs_load_into import load_into
    from .storage.cache import download
    from .read import Budget, Policy, Stub, stub_to_plain
    from .tools.convert import convert
    from .tools.diffing import diff
    from .tools.report import report
    from .tools.inspection import inspect
    from .tools.scanning import scan
    from .train.checkpointer import Checkpointer
    from .train.retention import KeepBest, KeepEvery, KeepLast
    from .train.resume import resume
    from .train.optimizer_map import remap_optimizer_state
    from .train.sampler import ResumableSampler
    from .train.save import save
    from .train.training import TrainingState

__all__ = [
    "load", "load_into", "download", "state_dict_of", "find_state_dicts", "inspect", "scan", "save", "resume",
    "Checkpointer", "TrainingState", "remap_optimizer_state", "check_mapping", "KeepLast", "KeepBest", "KeepEvery", "ResumableSampler", "LoadReport",
    "convert", "diff", "report", "Policy", "Budget", "Stub", "stub_to_plain",
    "CheckpointError", "UnsupportedFormatError", "NotACheckpointError", "CorruptCheckpointError",
    "TruncatedCheckpointError", "LimitExceededError", "UnsafeCheckpointError", "WeightsNotFoundError",
    "AmbiguousCheckpointError", "StateDictMismatchError", "ResumeError", "CheckpointWriteError",
    "CheckpointNotFoundError", "DeviceUnavailableError", "RemoteStorageError", "RemoteNotFoundError",
    "RemoteAuthError", "RemoteUnreachableError", "RemoteConnectionRefusedError", "IntegrityError", "__version__",
]

_LAZY = {
    "load": ("train.runs", "load"),  # read.load.load, plus a Checkpointer run directory (its newest checkpoint)
    "download": ("storage.cache", "download"),
    "read_checkpoint": ("read.load", "read_checkpoint"),
    "state_dict_of": ("fit.tree", "state_dict_of"),
    "find_state_dicts": ("fit.select", "find_state_dicts"),
    "inspect": ("tools.inspection", "inspect"),
    "scan": ("tools.scanning", "scan"),
    "load_into": ("train.runs_load_into", "load_into"),  # fit.load_into.load_into, plus a Checkpointer run directory
    "check_mapping": ("fit.equivalence", "check_mapping"),
    "save": ("train.save", "save"),  # a local path or a URL
    "resume": ("train.resume", "resume"),
    "remap_optimizer_state": ("train.optimizer_map", "remap_optimizer_state"),
    "TrainingState": ("train.training", "TrainingState"),
    "Checkpointer": ("train.checkpointer", "Checkpointer"),
    "KeepLast": ("train.retention", "KeepLast"),
    "KeepBest": ("train.retention", "KeepBest"),
    "KeepEvery": ("train.retention", "KeepEvery"),
    "ResumableSampler": ("train.sampler", "ResumableSampler"),
    "LoadReport": ("fit.report", "LoadReport"),
    "convert": ("tools.convert", "convert"),  # .pt / .safetensors or a DCP directory
    "diff": ("tools.diffing", "diff"),
    "report": ("tools.report", "report"),
    "Policy": ("read", "Policy"),
    "Budget": ("read", "Budget"),
    "Stub": ("read", "Stub"),
    "stub_to_plain": ("read", "stub_to_plain"),
}


_SUBMODULES = ("transforms",)  # modules reached as attributes: torchckpt.transforms.InterpolatePosEmbed()


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'torchckpt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{target[0]}", __name__), target[1])
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
