"""The storage layer that writers and listers use: the same few operations on a local path or a URL.

Local paths go to :mod:`.atomic` (temp file, fsync, rename). URLs go to fsspec (:mod:`.remote`):

* **Writes are atomic.** On object stores (s3, gs, azure, memory ...) an object becomes visible
  only once its upload completes, so data is written straight to its final key; a failed or
  interrupted upload is discarded (multipart upload aborted), never completed. Elsewhere (sftp,
  ...) the data goes to a temporary name and is moved into place. Every write is checked against
  the size the store reports afterwards: a write that did not arrive is an error, never a success.
* **Commit records.** A checkpoint is trusted only once its small commit record (the sidecar)
  exists and matches the data, so listing a prefix never returns a half-written checkpoint.

Nothing here writes to the local disk for a URL.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from typing import IO, Any, Callable, Iterator, TypeVar

from ..errors import CheckpointNotFoundError, CheckpointWriteError
from . import atomic
from .remote import StorageOptions, filesystem, is_url, join, remote_errors, strip_file_scheme

__all__ = ["write_whole", "read_bytes", "size_of", "list_sizes", "remove", "makedirs", "sync_dir", "local_copy", "join",
           "is_url", "exists", "isdir"]

T = TypeVar("T")

# Stores whose uploads are all-or-nothing: an object is visible only after its upload completed.
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "oss", "r2"}


def _protocol(url: str) -> str:
    return url.split("://", 1)[0].lower()


def _local(path: Any) -> str:
    return strip_file_scheme(os.fspath(path))


class _CountingWriter:
    """The upload's file object: counts the bytes written; a failure of ``write`` or ``flush`` (a part
    uploaded from inside ``write``) is a typed error naming the URL."""

    def __init__(self, fh: Any, url: str, storage_options: StorageOptions | None) -> None:
        self._fh = fh
        self._url, self._options = url, storage_options
        self.written = 0

    def write(self, data: Any) -> int:
        with remote_errors(self._url, "write", self._options):
            n = self._fh.write(data)
        self.written += len(memoryview(data).cast("B")) if n is None else n
        return n if n is not None else len(data)

    def flush(self) -> None:
        with remote_errors(self._url, "write", self._options):
            self._fh.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


@contextlib.contextmanager
def write_whole(path: Any, storage_options: StorageOptions | None = None) -> Iterator[IO[bytes]]:
    """Yield a binary file; when the block succeeds the whole content appears under ``path`` at once
    (a local path: :func:`.atomic.atomic_write`, durable; a URL: uploaded whole, or not at all).

    If the block raises, nothing is published (the previous object, if any, is untouched).
    """
    path = os.fspath(path)
    if not is_url(path):
        with atomic.atomic_write(_local(path)) as fh:
            yield fh
        return
    fs, inner = filesystem(path, storage_options)
    direct = _protocol(path) in _OBJECT_STORES
    target = inner if direct else _temp_name(inner)
    with remote_errors(path, "write", storage_options):
        raw = fs.open(target, "wb")
    counted = _CountingWriter(raw, path, storage_options)
    try:
        yield counted  # type: ignore[misc]
    except BaseException:
        _discard(fs, raw, target, direct)
        raise
    with remote_errors(path, "write", storage_options):
        try:
            raw.close()  # the last part and CompleteMultipartUpload
            if not direct:
                fs.mv(target, inner)
        except BaseException:
            _discard(fs, raw, target, direct)  # a failed completion leaves no multipart upload open
            raise
        fs.invalidate_cache(inner)
        arrived = fs.info(inner).get("size")
    if arrived != counted.written:
        raise CheckpointWriteError(f"the upload did not arrive whole: wrote {counted.written} bytes, the store holds "
                                   f"{arrived}", path=path, hint="Retry the save; the previous checkpoints are intact.")


def _temp_name(inner: str) -> str:
    folder, _, name = inner.rpartition("/")
    return f"{folder}/.{name}{atomic.TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def _discard(fs: Any, raw: Any, target: str, direct: bool) -> None:
    with contextlib.suppress(Exception):
        raw.discard()  # s3fs: drops the buffer and aborts the multipart upload
    with contextlib.suppress(Exception):
        raw.closed = True  # so that garbage collection never completes (publishes) the upload
    if not direct:
        with contextlib.suppress(Exception):
            fs.rm(target)


def read_bytes(path: Any, storage_options: StorageOptions | None = None) -> bytes:
    """The whole content of a small file (a sidecar, an index). Raises CheckpointNotFoundError."""
    path = os.fspath(path)
    if not is_url(path):
        try:
            with open(_local(path), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            raise CheckpointNotFoundError("no such file", path=path) from None
    fs, inner = filesystem(path, storage_options)
    with remote_errors(path, "read", storage_options):
        return bytes(fs.cat_file(inner))


def _stat(path: Any, storage_options: StorageOptions | None, action: str, local: Callable[[str], T],
          remote: Callable[[Any, str], T]) -> T:
    """One question about a path: ``local(path)`` on disk, ``remote(fs, inner)`` on a store (its listing
    cache dropped first, so the answer is the store's now), remote failures as typed errors."""
    path = os.fspath(path)
    if not is_url(path):
        return local(_local(path))
    fs, inner = filesystem(path, storage_options)
    with remote_errors(path, action, storage_options):
        fs.invalidate_cache(inner)
        return remote(fs, inner)


def exists(path: Any, storage_options: StorageOptions | None = None) -> bool:
    return _stat(path, storage_options, "read", os.path.exists, lambda fs, inner: bool(fs.exists(inner)))


def isdir(path: Any, storage_options: StorageOptions | None = None) -> bool:
    """A directory (a URL: a prefix with objects under it)."""
    return _stat(path, storage_options, "list", os.path.isdir, lambda fs, inner: bool(fs.isdir(inner)))


def size_of(path: Any, storage_options: StorageOptions | None = None) -> int:
    return _stat(path, storage_options, "read", os.path.getsize, lambda fs, inner: int(fs.info(inner)["size"]))


def list_sizes(directory: Any, storage_options: StorageOptions | None = None) -> dict[str, int]:
    """``{name: size}`` of the files directly in ``directory`` (fresh from the store, never cached)."""
    directory = os.fspath(directory)
    if not is_url(directory):
        out = {}
        with os.scandir(_local(directory)) as it:
            for entry in it:
                with contextlib.suppress(OSError):
                    if entry.is_file():
                        out[entry.name] = entry.stat().st_size
        return out
    fs, inner = filesystem(directory, storage_options)
    with remote_errors(directory, "list", storage_options):
        fs.invalidate_cache(inner)
        try:
            entries = fs.ls(inner, detail=True)
        except FileNotFoundError:
            return {}
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
            for e in entries if e.get("type") == "file"}


def remove(path: Any, storage_options: StorageOptions | None = None) -> None:
    """Delete a file; a missing one is not an error."""
    path = os.fspath(path)
    if not is_url(path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(_local(path))
        return
    fs, inner = filesystem(path, storage_options)
    with remote_errors(path, "delete", storage_options):
        try:
            fs.rm_file(inner)
        except FileNotFoundError:
            pass
        fs.invalidate_cache(inner)


def makedirs(directory: Any, storage_options: StorageOptions | None = None) -> None:
    """Create a directory and its missing parents (durably: each new entry's parent is fsynced); on object
    stores (no directories) nothing is created."""
    directory = os.fspath(directory)
    if not is_url(directory):
        created, here = [], os.path.abspath(_local(directory))
        while not os.path.isdir(here) and os.path.dirname(here) != here:
            created.append(here)
            here = os.path.dirname(here)
        try:
            os.makedirs(_local(directory), exist_ok=True)
        except OSError as exc:  # a file where a directory should be, no permission, a full disk
            raise atomic.write_error(directory, exc) from None
        for new in created:
            atomic.fsync_dir(os.path.dirname(new))
        return
    if _protocol(directory) in _OBJECT_STORES:
        return
    fs, inner = filesystem(directory, storage_options)
    with remote_errors(directory, "write", storage_options):
        fs.makedirs(inner, exist_ok=True)


def sync_dir(directory: Any, storage_options: StorageOptions | None = None) -> None:
    """Make renames and deletions in ``directory`` durable (object stores: already durable)."""
    if not is_url(os.fspath(directory)):
        atomic.fsync_dir(_local(directory))


@contextlib.contextmanager
def local_copy(path: Any, storage_options: StorageOptions | None = None,
               companions: tuple[str, ...] = ()) -> Iterator[str]:
    """A local path holding ``path``'s content: the path itself when local, else a temporary download.

    ``companions`` are suffixes of files beside it to fetch too when they exist (``.safetensors``).
    The download is removed when the block ends.
    """
    path = os.fspath(path)
    if not is_url(path):
        yield _local(path)
        return
    fs, inner = filesystem(path, storage_options)
    folder = tempfile.mkdtemp(prefix="torchckpt-")
    try:
        name = inner.rstrip("/").rsplit("/", 1)[-1]
        local = os.path.join(folder, name)
        with remote_errors(path, "download", storage_options):
            fs.get_file(inner, local)
            for suffix in companions:
                if fs.exists(inner + suffix):
                    fs.get_file(inner + suffix, local + suffix)
        yield local
    finally:
        shutil.rmtree(folder, ignore_errors=True)
