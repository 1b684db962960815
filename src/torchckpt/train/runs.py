"""A Checkpointer run directory wherever one checkpoint is read: ``torchckpt.load`` and ``load_into``.

``resume("runs/exp1")`` restores the newest committed checkpoint of a directory; ``load`` and
``load_into`` accept the same directory and read that same checkpoint (chosen by the same listing
the Checkpointer uses, without taking its lock or tidying anything), and say which one in
``info.notes`` / ``report.notes``. Every other source goes through unchanged. The functions here
are what the facade exports; their signatures are those of :func:`torchckpt.read.load.load` and
:func:`torchckpt.fit.load_into.load_into`.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import CheckpointNotFoundError
from ..read import deepspeed_kind, folder_kind, is_dcp_dir
from ..read.load import load as _load
from ..storage import files
from ..storage.remote import is_url

# ``fit.load_into`` (matching, reports) and ``.checkpointer`` (stores, distributed) are imported where
# they are used: a plain ``torchckpt.load(file)`` needs neither, and importing them took ~0.3-0.5 s of
# its first call.

__all__ = ["load", "latest_committed", "run_directory"]


def latest_committed(directory: str, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The newest committed checkpoint of a Checkpointer directory (a file, or a ``.dcp`` folder);
    ``None`` when ``directory`` holds no checkpoint of that protocol at all. Nothing is written."""
    from .checkpointer import stores_for  # lazy: only a directory needs the Checkpointer's listing

    kept = stores_for(directory, dict(storage_options) if storage_options else None)
    found = sorted((e for s in kept if s is not None for e in s.entries()), key=lambda e: e.step)
    if not found:
        return None
    committed = [e for e in found if e.problem is None]
    if not committed:
        problems = "; ".join(f"{os.path.basename(e.path)}: {e.problem}" for e in found[-3:])
        raise CheckpointNotFoundError(f"no complete checkpoint in this run directory ({problems})", path=directory,
                                      hint="Pass one checkpoint file, or wait for a save to finish.")
    return committed[-1].path


def run_directory(source: Any, storage_options: Mapping[str, Any] | None) -> tuple[Any, str | None]:
    """``(what to read, note)``: a Checkpointer directory becomes its newest committed checkpoint (``load``,
    ``load_into`` and ``torchckpt inspect`` read the same one); any other source comes back as it is."""
    if not isinstance(source, (str, os.PathLike)):
        return source, None
    path = os.fspath(source)
    so = dict(storage_options) if storage_options else None
    if is_url(path):
        # http(s) has no directories: asking fsspec would download the file once more to parse it as a listing
        if path.split("://", 1)[0].lower() in ("http", "https") or not files.isdir(path, so) or is_dcp_dir(path, so):
            return source, None
    elif not os.path.isdir(path) or is_dcp_dir(path) or folder_kind(path) or deepspeed_kind(path):
        # (a DeepSpeed folder: not asking the Checkpointer's listing saves importing it, ~50 ms)
        return source, None
    latest = latest_committed(path, storage_options)
    if latest is None:
        return source, None
    return latest, f"{path} is a Checkpointer run directory: read its newest committed checkpoint, " \
                   f"{os.path.basename(latest.rstrip('/'))}"


if TYPE_CHECKING:  # type checkers see the real signature (overloads included); the wrapper only adds a directory
    from ..read.load import load as load
else:
    @functools.wraps(_load)
    def load(source: Any, *args: Any, **kwargs: Any) -> Any:
        source, note = run_directory(source, kwargs.get("storage_options"))
        result = _load(source, *args, **kwargs)
        if note is not None and kwargs.get("return_info"):
            result[1].notes.append(note)
        return result
