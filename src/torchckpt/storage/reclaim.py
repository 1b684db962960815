"""Remove large files without making the caller pay for freeing them.

Freeing a file's content happens when its last name and last descriptor are gone, in the thread that
drops the last one: for a checkpoint whose pages are cached that is about 0.5 s per GiB of kernel time
(measured on ext4: unlink, rename over it, and open(..., "wb") truncation all pay it). A save that
replaces ``last.pt`` or whose retention deletes the oldest checkpoint paid it before returning.

Here the name goes at once (the directory change is exactly as durable as a plain ``os.remove``), while a
descriptor opened just before keeps the content alive; a background thread closes it, and the kernel
frees the content there. :func:`drain` waits for that: every writer calls it before it writes, so a full
disk never sees more checkpoints than before (the space of the removed ones is free again when the next
one is written). A forked child drops its copies of those descriptors at once, so a DataLoader worker
never keeps a removed checkpoint's space.
"""

from __future__ import annotations

import os
import stat
import threading

from . import interrupts

__all__ = ["remove_file", "replace_file", "free_later", "drain"]

# below this, freeing is cheap: not worth a descriptor and a thread switch
LARGE = 16 << 20
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


class _Closer:
    """One daemon thread closing the descriptors handed to it, and a way to wait until it is idle."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[int] = []
        self._closing: int | None = None
        self._thread: threading.Thread | None = None

    def add(self, fd: int) -> None:
        with interrupts.deferred(), self._cond:  # a Ctrl-C inside Thread.start() could leave no thread running
            self._queue.append(fd)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="torchckpt-reclaim", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def drain(self) -> None:
        interrupts.wait_for(self._cond, lambda: not self._queue and self._closing is None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                fd = self._closing = self._queue.pop(0)
            try:
                os.close(fd)  # the kernel frees the removed file's content here
            except OSError:
                pass
            with self._cond:
                self._closing = None
                self._cond.notify_all()

    def pending(self) -> list[int]:
        """The descriptors not closed yet (read without the lock: only after fork, where no other thread runs)."""
        return [*self._queue, *([self._closing] if self._closing is not None else [])]


_closer = _Closer()


def _after_fork_in_child() -> None:
    """Close the child's copies (cheap: the parent still holds the content); the parent's thread is not here."""
    global _closer
    for fd in _closer.pending():
        try:
            os.close(fd)
        except OSError:
            pass
    _closer = _Closer()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _hold(path: str) -> int | None:
    """A descriptor keeping the content of ``path`` alive when it is a large regular file, else None."""
    if os.name != "posix":
        return None  # elsewhere an open file cannot be removed
    try:
        fd = os.open(path, _OPEN_FLAGS)  # no FIFO blocks it (O_NONBLOCK), no symlink is followed
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size >= LARGE and st.st_nlink == 1:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def remove_file(path: str) -> None:
    """``os.remove(path)`` (same errors), leaving the freeing of a large file's content to a background thread."""
    with interrupts.deferred():  # the descriptor held is handed over, never leaked by a Ctrl-C
        fd = _hold(path)
        try:
            os.remove(path)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        if fd is not None:
            _closer.add(fd)


def replace_file(source: str, target: str) -> int | None:
    """``os.replace(source, target)``; returns a descriptor holding a replaced large file, for :func:`free_later`.

    The caller hands it over once its commit is durable, so that freeing the old content (which journals
    the freed blocks) does not compete with the directory fsync that makes the new name durable.
    """
    with interrupts.deferred():  # the caller's section receives the descriptor (a Ctrl-C cannot drop it on the way)
        fd = _hold(target)
        try:
            os.replace(source, target)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        return fd


def free_later(fd: int | None) -> None:
    """Close ``fd`` (from :func:`replace_file`) on the background thread; the kernel frees the content there."""
    if fd is not None:
        _closer.add(fd)


def drain() -> None:
    """Wait until every file removed here is freed (writers call this before writing)."""
    _closer.drain()
