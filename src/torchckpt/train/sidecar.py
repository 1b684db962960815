"""The commit record of a training checkpoint (the sidecar): written and read here, and nowhere else.

A checkpoint ``ckpt-<step>.pt`` (a file) or ``ckpt-<step>.dcp`` (a sharded directory) exists once its
sidecar ``<name>.meta.json`` exists and matches it. The sidecar is written last, as one small JSON
object (step, epoch, metrics, versions, the size and digest of the data); it is the one thing a
lister reads, so a directory or URL prefix is listed without unpickling anything.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from ..storage import files
from ..storage.atomic import AtomicFiles
from ..storage.remote import StorageOptions, is_url

__all__ = ["SUFFIX", "MAX_BYTES", "path_of", "base_name", "encode", "write", "write_into", "read"]

SUFFIX = ".meta.json"
MAX_BYTES = 1 << 20  # a sidecar is a few hundred bytes; more is not read


def path_of(path: str) -> str:
    """The sidecar of the checkpoint at ``path`` (a local path or a URL)."""
    return os.fspath(path) + SUFFIX


def base_name(name: str) -> str:
    """The checkpoint a file name belongs to: ``ckpt-1.pt`` for ``ckpt-1.pt.meta.json``, else ``name``."""
    return name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name


def encode(meta: Mapping[str, Any]) -> bytes:
    """The sidecar document as written to disk."""
    return json.dumps(dict(meta), indent=1, sort_keys=True, default=str).encode()


def write_into(group: AtomicFiles, path: str, meta: Mapping[str, Any]) -> None:
    """Stage the sidecar of ``path`` in ``group`` (the caller publishes it together with the data, last)."""
    with group.write(path_of(path)) as fh:
        fh.write(encode(meta))


def write(path: str, meta: Mapping[str, Any], storage_options: StorageOptions | None = None) -> None:
    """Write the sidecar of ``path`` on its own, atomically (a local path: durably; a URL: uploaded whole)."""
    with files.write_whole(path_of(path), storage_options) as fh:
        fh.write(encode(meta))


def read(path: str, *, strict: bool = False, storage_options: StorageOptions | None = None) -> dict[str, Any] | None:
    """The sidecar of ``path`` (a local path or a URL); None when there is none.

    A sidecar that is unreadable or not a JSON object gives None, or with ``strict`` a
    CorruptCheckpointError saying why. On a URL an unreadable sidecar always raises.
    """
    where = path_of(path)
    if is_url(where):  # a store's failures (unreachable, denied) stay what they are; the content is judged
        try:
            data = files.read_bytes(where, storage_options)[:MAX_BYTES]
        except CheckpointNotFoundError:
            return None
        strict = True
    else:
        try:
            with open(where, "rb") as fh:
                data = fh.read(MAX_BYTES)
        except FileNotFoundError:
            return None
        except OSError as exc:
            _unreadable(where, exc, strict)
            return None
    try:
        meta = json.loads(data.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        _unreadable(where, exc, strict)
        return None
    if not isinstance(meta, dict):
        if strict:
            raise CorruptCheckpointError(f"the sidecar holds a JSON {type(meta).__name__}, not an object", path=where)
        return None
    return meta


def _unreadable(where: str, exc: Exception, strict: bool) -> None:
    """Raise the error for an unreadable sidecar when ``strict`` (else the caller treats it as absent)."""
    if strict:
        raise CorruptCheckpointError(f"the sidecar is unreadable ({type(exc).__name__}: {exc})", path=where,
                                     hint="It was damaged after the checkpoint was saved.") from None
