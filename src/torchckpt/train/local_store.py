"""The :class:`~torchckpt.train.store.Store` of a local directory: rename, fsync and ``flock``.

Files are published with :class:`~torchckpt.storage.atomic.AtomicFiles` (temp name, fsync, rename,
sidecar last); the writer lock is an ``flock`` on ``.torchckpt.lock`` that the kernel drops when the
holder exits or is killed, so a stale lock cannot block a new run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from typing import Any

from ..errors import CheckpointWriteError, CorruptCheckpointError
from ..storage import interrupts
from ..storage.atomic import clean_temp_files, fsync_dir, write_error
from . import sidecar
from .restore import resume_file
from .store import LOCK_NAME, Entry, commit_problem, file_name, marker_path, step_of
from .training import StagedPayload, TrainingState, discard, verify

__all__ = ["LocalStore", "DirectoryLock"]


class LocalStore:
    """Single-file checkpoints in a local directory (:class:`~torchckpt.train.store.FileStore`)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def lock(self) -> "DirectoryLock":
        return DirectoryLock(self.directory)

    def path_for(self, step: int) -> str:
        return os.path.join(self.directory, file_name(step))

    # ------------------------------------------------------------------ listing
    def entries(self) -> list[Entry]:
        """Every step that has a data file, a sidecar or a marker, oldest first, with what is wrong with it."""
        try:
            names = set(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        steps = dict(found for found in map(step_of, names) if found is not None)
        out = []
        for step in sorted(steps):
            name = steps[step]
            path = os.path.join(self.directory, name)
            unfinished = os.path.basename(marker_path(path)) in names
            meta, problem = None, None
            try:
                meta = sidecar.read(path, strict=True)
            except CorruptCheckpointError as exc:
                problem = exc.reason
            if problem is None:
                problem = commit_problem(name, meta, names, lambda: os.path.getsize(path))
            out.append(Entry(step, path, meta, problem, unfinished, store=self))
        return out

    # ------------------------------------------------------------------ writing steps
    def begin(self, path: str) -> None:
        """Record the intent to create or remove the files of ``path`` (before any of them changes).

        Not fsynced on its own: the save's one directory fsync makes it durable together with the files,
        and metadata changes of one directory reach the disk in order (see
        :class:`~torchckpt.storage.atomic.AtomicFiles`), so after any crash a file this step renamed or
        removed has its marker beside it. A marker alone, or one beside a committed checkpoint, is harmless.
        """
        marker = marker_path(path)
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))

    def end(self, path: str) -> None:
        """The step begun on ``path`` is complete (committed or deleted)."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(marker_path(path))

    def stage(self, path: str) -> StagedPayload:
        """A save of ``path``: its files under temp names beside it; ``publish`` fsyncs and renames them, the sidecar last."""
        return StagedPayload(path)

    def delete(self, path: str) -> None:
        """Remove a committed checkpoint: marker first, then the sidecar (it stops being a checkpoint), data, marker.

        No fsync: a crash may bring back a prefix of these steps, each of which is safe (a committed
        checkpoint, or leftovers with their marker that :meth:`reclaim` removes); the next save's directory
        fsync makes the removal durable.
        """
        self.begin(path)
        discard(path)
        self.end(path)

    def reclaim(self) -> list[str]:
        """Finish what killed writers left (call under the lock); returns the names of files removed.

        A marker beside a committed checkpoint is dropped (the save finished, or a delete had not yet
        begun removing); a marker beside an uncommitted one means its files are leftovers: they go.
        """
        removed: list[str] = []
        for entry in self.entries():
            if not entry.unfinished:
                continue
            if entry.problem is not None:
                for victim in (sidecar.path_of(entry.path), entry.path, entry.path + ".safetensors"):
                    if os.path.exists(victim):
                        removed.append(os.path.basename(victim))
                discard(entry.path)
                fsync_dir(self.directory)
            self.end(entry.path)
        return removed

    def remove_temp_files(self) -> list[str]:
        """Remove the temp files of dead writers (call under the lock); returns their names."""
        return clean_temp_files(self.directory, is_ours=lambda n: n.startswith(".ckpt-"))

    # ------------------------------------------------------------------ resuming
    def resume(self, entry: Entry, **objects: Any) -> TrainingState:
        verify(entry.path, entry.meta)
        return resume_file(entry.path, verified=True, **objects)


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
        with interrupts.deferred():  # a Ctrl-C waits until the lock is taken and recorded, or not taken
            self._acquire()

    def _acquire(self) -> None:
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(self.path, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._fd = fd  # at once: interrupted later (Ctrl-C), release() still drops the lock
        except BaseException as exc:
            if not isinstance(exc, OSError):  # interrupted: neither the descriptor nor the lock stays behind
                if self._fd is None:
                    os.close(fd)
                raise
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

    def try_acquire(self) -> bool:
        try:
            self.acquire()
        except CheckpointWriteError:
            return False
        return True

    def release(self) -> None:
        with interrupts.deferred():  # never forgotten but still open (the lock held until the process ends)
            self._drop()

    def _drop(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    def __del__(self) -> None:
        self._drop()  # (no signal handlers swapped inside a finalizer)


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    if text.startswith("pid ") and text.split()[1].isdigit():
        pid = int(text.split()[1])
        return f"{text}{' (this process)' if pid == os.getpid() else ''}"
    return ""
