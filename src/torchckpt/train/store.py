"""The on-disk protocol of a checkpoint directory, as small functions a Checkpointer composes.

A checkpoint ``ckpt-<step>.pt`` exists once its sidecar ``ckpt-<step>.pt.meta.json`` (the commit
record, written last) exists and matches its data file. Everything else is crash safety:

* **one writer**: a writer holds an exclusive ``flock`` on ``.torchckpt.lock`` (holding its pid) for
  as long as it writes; a second writer gets :class:`~torchckpt.errors.CheckpointWriteError` naming
  the holder. Readers take no lock.
* **intent markers**: before a checkpoint's files are created (save) or removed (retention), an
  empty marker ``.ckpt-<step>.pt.uncommitted`` is written; it is removed when the step is done.
  A kill at any moment leaves either a committed checkpoint or a marker that names the leftovers,
  so :func:`reclaim` (run under the lock) removes exactly the files this protocol wrote and never
  a file it did not (a ``ckpt-7.pt`` copied in by hand has no marker and is left alone).

The local file system implements these with rename and fsync; another store (an object store, a
rank-aware writer) keeps the same steps: begin, write data, commit, list committed, delete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping

from ..errors import CheckpointWriteError, CorruptCheckpointError
from ..storage.atomic import fsync_dir, write_error
from . import sidecar
from .training import FORMAT, discard

__all__ = ["DirectoryLock", "Entry", "NAME", "path_for", "entries", "begin", "end", "delete", "reclaim",
           "LOCK_NAME", "MARKER_SUFFIX"]

NAME = re.compile(r"^ckpt-(\d+)\.pt$")
LOCK_NAME = ".torchckpt.lock"
MARKER_SUFFIX = ".uncommitted"
_MARKER = re.compile(r"^\.(ckpt-\d+\.pt)" + re.escape(MARKER_SUFFIX) + "$")


def path_for(directory: str, step: int) -> str:
    return os.path.join(directory, f"ckpt-{step:010d}.pt")


def marker_path(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}{MARKER_SUFFIX}")


# --------------------------------------------------------------------------- listing
@dataclass(frozen=True)
class Entry:
    """One step found in the directory. ``problem`` is None for a committed checkpoint."""

    step: int
    path: str
    meta: Mapping[str, Any] | None
    problem: str | None
    unfinished: bool = False  # an intent marker is present: a save or delete did not finish (yet)


def entries(directory: str) -> list[Entry]:
    """Every step that has a data file, a sidecar or a marker, oldest first, with what is wrong with it."""
    try:
        names = set(os.listdir(directory))
    except FileNotFoundError:
        return []
    steps: dict[int, str] = {}
    for name in names:
        base = sidecar.base_name(name)
        marker = _MARKER.match(name)
        m = NAME.match(base) or (NAME.match(marker.group(1)) if marker else None)
        if m:
            steps[int(m.group(1))] = os.path.join(directory, m.group(0))
    out = []
    for step in sorted(steps):
        path = steps[step]
        name = os.path.basename(path)
        unfinished = os.path.basename(marker_path(path)) in names
        meta, problem = None, None
        try:
            meta = sidecar.read(path, strict=True)
        except CorruptCheckpointError as exc:
            problem = exc.reason
        if problem is None:
            problem = commit_problem(name, meta, names, lambda: os.path.getsize(path))
        out.append(Entry(step, path, meta, problem, unfinished))
    return out


def commit_problem(name: str, meta: Mapping[str, Any] | None, names: Collection[str],
                   size_of: Callable[[], int]) -> str | None:
    """What is wrong with checkpoint ``name`` (None: committed), given its sidecar ``meta``, the names
    present beside it and ``size_of()`` its data file's size (may raise OSError). Local and remote
    stores judge a commit by this one rule."""
    if meta is None:
        return "it has no sidecar (its save or upload never finished, or the sidecar was removed)" \
            if name in names else "its files are gone"
    if meta.get("format") != FORMAT or meta.get("file") != name:
        return "its sidecar was not written by torchckpt for this file"
    if name not in names:
        return "its data file is missing"
    try:
        size = size_of()
    except OSError as exc:
        return f"its data file cannot be read ({exc.strerror})"
    if size != meta.get("size"):
        return f"its data file is {size} bytes but {meta.get('size')} were written (truncated?)"
    return None


# --------------------------------------------------------------------------- writing steps
def begin(path: str) -> None:
    """Record the intent to create or remove the files of ``path`` (before any of them changes).

    Not fsynced on its own: the save's one directory fsync makes it durable together with the files,
    and metadata changes of one directory reach the disk in order (see
    :class:`~torchckpt.storage.atomic.AtomicFiles`), so after any crash a file this step renamed or
    removed has its marker beside it. A marker alone, or one beside a committed checkpoint, is harmless.
    """
    marker = marker_path(path)
    os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))


def end(path: str) -> None:
    """The step begun on ``path`` is complete (committed or deleted)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(marker_path(path))


def delete(path: str) -> None:
    """Remove a committed checkpoint: marker first, then the sidecar (it stops being a checkpoint), data, marker.

    No fsync: a crash may bring back a prefix of these steps, each of which is safe (a committed
    checkpoint, or leftovers with their marker that :func:`reclaim` removes); the next save's directory
    fsync makes the removal durable.
    """
    begin(path)
    discard(path)
    end(path)


def reclaim(directory: str) -> list[str]:
    """Finish what killed writers left (call under the lock): returns the names of files removed.

    A marker beside a committed checkpoint is dropped (the save finished, or a delete had not yet
    begun removing); a marker beside an uncommitted one means its files are leftovers: they go.
    """
    removed: list[str] = []
    for entry in entries(directory):
        if not entry.unfinished:
            continue
        if entry.problem is not None:
            for victim in (sidecar.path_of(entry.path), entry.path, entry.path + ".safetensors"):
                if os.path.exists(victim):
                    removed.append(os.path.basename(victim))
            discard(entry.path)
            fsync_dir(directory)
        end(entry.path)
    return removed


# --------------------------------------------------------------------------- the writer's lock
class DirectoryLock:
    """An exclusive, inter-process lock on a checkpoint directory (``flock`` on ``.torchckpt.lock``).

    The kernel drops it when the holder exits or is killed, so a stale lock cannot block a new run.
    """

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise CheckpointWriteError naming the process that holds it."""
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(self.path, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise write_error(self.path, exc) from None
            raise CheckpointWriteError(
                f"another writer holds this checkpoint directory ({holder or 'holder unknown'})",
                path=os.path.dirname(self.path),
                hint="Two runs saving into one directory would delete each other's checkpoints. Stop the other "
                     "run, close() its Checkpointer, or give this run its own directory.") from None
        try:  # who holds it, for the error a second writer gets; the lock itself does not need it
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError:  # a full disk: the save that follows reports it
            pass
        self._fd = fd

    def try_acquire(self) -> bool:
        try:
            self.acquire()
        except CheckpointWriteError:
            return False
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    def __del__(self) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    if text.startswith("pid ") and text.split()[1].isdigit():
        pid = int(text.split()[1])
        return f"{text}{' (this process)' if pid == os.getpid() else ''}"
    return ""
