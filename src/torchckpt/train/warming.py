"""The pages of a snapshot's fresh buffers, mapped ahead of the save that will copy into them (see
:mod:`.snapshot`: the first async save writes through and leaves its buffers untouched)."""

from __future__ import annotations

import os
import threading
from typing import Any

from ..storage import interrupts
from ..storage.prefault import prefault_pages

__all__ = ["Warming", "warming", "start_warming"]


class Warming:
    """Maps the pages of a snapshot's fresh buffers (:attr:`Copies.fresh`) in a thread of its own, started by a
    write-through save while the writer's thread makes the file durable, so that the next save copies into
    warm memory.

    Fresh memory costs a page fault per 4 KiB page when first written (on a VM that gives freed memory back
    to its host, a host fault: 6-13 us each, 512 MiB in ~1 s); in the copy of a snapshot those faults are
    the caller's time. Here they are taken by ``madvise(MADV_POPULATE_WRITE)``
    (:func:`~torchckpt.storage.prefault.prefault_pages`), piece by piece, which never changes the content: a save
    may copy into the same buffers meanwhile. :meth:`cancel` stops it before its next piece; a save, a
    ``close()`` and the interpreter's exit cancel it, and none of them waits for it. Where the kernel has no
    ``MADV_POPULATE_WRITE`` (Linux < 5.14) nothing is mapped ahead, and the next save's copy takes the faults.
    """

    PIECE = 2 << 20  # another thread's mmap()/munmap() waits for one piece at most (the madvise holds mmap_lock)

    def __init__(self, buffers: list[Any]) -> None:
        self._buffers = list(buffers)
        self._stop = False
        self.done = threading.Event()  # set when it ended (complete or cancelled)
        with _warming_lock:
            _warmings.add(self)

    def run(self) -> None:
        """Map every buffer's pages (a thread of its own); returns early when cancelled."""
        try:
            for buf in self._buffers:
                address, nbytes = buf.data_ptr(), buf.nbytes()
                for at in range(0, nbytes, self.PIECE):
                    if self._stop or not prefault_pages(address + at, min(self.PIECE, nbytes - at)):
                        return
        finally:
            self._buffers = []
            with _warming_lock:
                _warmings.discard(self)
            self.done.set()

    def cancel(self) -> None:
        """Stop before the next piece (never waits)."""
        self._stop = True


_warming_lock = threading.Lock()
_warmings: set[Warming] = set()  # created and not ended: cancelled when the interpreter exits
_exit_hook: list[bool] = []


def warming(buffers: list[Any]) -> Warming | None:
    """A :class:`Warming` of ``buffers``, or None when it could not be stopped at exit (the interpreter is
    already shutting down): Python joins the thread that runs it, so a warming left running would hold the
    exit for as long as it takes."""
    with _warming_lock:
        if not _exit_hook:
            try:  # runs before the interpreter joins threads (and after exit_guard's wait, registered before it)
                threading._register_atexit(_cancel_all)  # type: ignore[attr-defined]
            except (AttributeError, RuntimeError):  # no such hook, or already shutting down
                return None
            _exit_hook.append(True)
    return Warming(buffers)


def _forget_in_child() -> None:
    """A forked child has none of its parent's warming threads (and the lock may have been held at the fork)."""
    global _warming_lock
    _warming_lock = threading.Lock()
    _warmings.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _cancel_all() -> None:
    with _warming_lock:
        for w in _warmings:
            w.cancel()


def start_warming(buffers: list[Any]) -> Warming | None:
    """Map the pages of ``buffers`` in a thread of its own (a write-through save's untouched snapshot buffers: a
    Checkpointer's and the Lightning plugin's); nobody waits for it. Returns it, to :meth:`~Warming.cancel` at the
    next save or close, or None when the interpreter is exiting (no warming started)."""
    with interrupts.deferred():  # (a Ctrl-C inside Thread.start() can leave a thread that never runs)
        warm = warming(buffers)
        if warm is None:
            return None
        try:
            threading.Thread(target=warm.run, name="torchckpt-warm").start()
        except RuntimeError:  # the interpreter is shutting down: no warming (run() now ends it at once)
            warm.cancel()
            warm.run()
            return None
        return warm
