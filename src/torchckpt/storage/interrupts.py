"""Ctrl-C that waits for a short section of bookkeeping to finish.

A ``KeyboardInterrupt`` is raised wherever the main thread happens to be when SIGINT arrives, including
inside CPython's own threading code (``Thread.start``, ``Condition.wait``, ``ThreadPoolExecutor.submit``):
there it can leave a lock held or released twice (``RuntimeError: release unlocked lock``), a thread
that never starts, or a process that hangs at exit. In the middle of a save it can also leave a lock
file descriptor nobody records, or a temp file nobody removes.

:func:`deferred` marks such a section. On the main thread, while it runs, SIGINT is recorded instead
of raised (a temporary handler, installed only when the current one is a Python-level handler such as
Python's ``default_int_handler``, and always restored); when the section ends the saved handler is
called with the recorded signal, so the ``KeyboardInterrupt`` is raised right after the section, and
the program stops as promptly as the section is short. Sections nest; in other threads they do nothing
(signal handlers run only on the main thread). A second Ctrl-C during the same section is delivered at
once: the way out of a section stuck on a hung file system.

The other :data:`SIGNALS` a program handles in Python (SIGTERM, SIGHUP, SIGUSR1, SIGUSR2: what job
schedulers send before stopping a job) wait the same way, for the end of the outermost section: a handler
that raises (``sys.exit``) would leave the same half-done state, and one that saves a checkpoint (Lightning
requeues on SIGUSR1) would re-enter the save it interrupted. Signals left to the system (SIG_DFL) are not
touched: a plain SIGTERM still ends the process at once.

Long parts (copying a snapshot, writing data) stay interruptible: they run outside sections, or call
:meth:`Deferred.poll` at points where stopping is safe. :func:`result` and :func:`wait_for` wait for
another thread that way: Ctrl-C stops the wait within :data:`SLICE` seconds, never inside
``Condition.wait``.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Callable, TypeVar

if TYPE_CHECKING:  # (concurrent.futures imports logging: not paid by a cold `torchckpt inspect`)
    from concurrent.futures import Future

__all__ = ["deferred", "Deferred", "result", "wait_for", "interruption_in", "SLICE", "SIGNALS"]

SLICE = 0.05  # seconds a deferred wait blocks before it looks for a recorded Ctrl-C

T = TypeVar("T")
_Handler = Callable[[int, "FrameType | None"], Any]

# The signals a section holds back when the program handles them in Python: Ctrl-C, and what job schedulers
# send before they stop a job (SLURM: SIGTERM, SIGUSR1 with --signal; Lightning's requeue handler saves a
# checkpoint on SIGUSR1: run inside a save's bookkeeping it would re-enter the save, whose lock is taken).
SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")
                if hasattr(signal, name))

# Main thread only (the only thread that runs Python signal handlers or may call signal.signal).
_depth = 0  # sections entered and not left
_saved: dict[int, _Handler] = {}  # the handlers the outermost section replaced, by signal
_box: list[tuple[int, FrameType | None]] = []  # signals recorded during the outermost section (a new list each time)


def _record(signum: int, frame: FrameType | None) -> None:
    """The handler while a section runs: remember the signal; deliver a second one of a kind at once."""
    _box.append((signum, frame))
    handler = _saved.get(signum)
    if signum == signal.SIGINT and _depth and handler is not None and sum(n == signum for n, _ in _box) > 1:
        _box[:] = [item for item in _box if item[0] != signum]  # (not while the last section restores)
        handler(signum, frame)


def _deliver(saved: dict[int, _Handler], box: list[tuple[int, FrameType | None]]) -> None:
    """Call the saved handler of every recorded signal, in order; each runs even if an earlier one raised
    (a SIGTERM handler that only sets a flag must still run after a KeyboardInterrupt)."""
    items, box[:] = list(box), []
    for i, (signum, frame) in enumerate(items):
        try:
            saved[signum](signum, frame)
        except BaseException:
            _deliver(saved, items[i + 1:])
            raise


class Deferred:
    """A section during which the :data:`SIGNALS` the program handles wait (see the module); use through
    :func:`deferred`."""

    __slots__ = ("active", "_outer")

    def __init__(self) -> None:
        self.active = False  # signals are being recorded for this section (main thread, Python-level handlers)
        self._outer = False  # this section installed the recording handler (it is not nested in another)

    def __enter__(self) -> "Deferred":
        global _depth, _saved, _box
        if threading.current_thread() is not threading.main_thread():
            return self
        if _depth:  # nested: the outermost section's handlers record for both
            _depth += 1
            self.active = True
            return self
        saved: dict[int, _Handler] = {}
        for signum in SIGNALS:  # SIG_DFL, SIG_IGN, a C-level handler: nothing to defer for that signal
            current = signal.getsignal(signum)
            if callable(current) and current is not _record:
                saved[signum] = current
        if not saved:
            return self
        _saved, _box = saved, []
        installed = []
        try:
            for signum in saved:
                signal.signal(signum, _record)  # from here this signal is recorded, not handled
                installed.append(signum)
        except ValueError:  # not the main interpreter
            for signum in installed:
                signal.signal(signum, saved[signum])
            return self
        _depth = 1
        self.active = self._outer = True
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        global _depth
        if not self.active:
            return
        self.active = False
        if not self._outer:
            _depth -= 1
            return
        _depth = 0
        saved, box = _saved, _box
        for signum, handler in saved.items():
            signal.signal(signum, handler)  # from here a signal goes to its own handler directly
        _deliver(saved, box)  # KeyboardInterrupt (default SIGINT handler), as if it arrived now

    def poll(self) -> None:
        """Deliver a Ctrl-C recorded so far now (raises KeyboardInterrupt with the default handler).

        Call it where stopping is safe: no lock held that a ``with`` block does not release, nothing
        half recorded. In a nested section it does nothing: the enclosing section is not to be stopped.
        Other signals wait for the section's end: their handlers may do anything (save a checkpoint)."""
        if self._outer and self.active and any(n == signal.SIGINT for n, _ in _box):
            first = next(item for item in _box if item[0] == signal.SIGINT)
            _box.remove(first)
            _deliver(_saved, [first])


def deferred() -> Deferred:
    """A ``with`` block during which Ctrl-C is recorded and raised when it ends (see the module)."""
    return Deferred()


def result(future: "Future[T]") -> T:
    """``future.result()``, waiting in deferred slices: Ctrl-C stops the wait within :data:`SLICE` seconds
    (the future keeps running), never inside CPython's ``Condition.wait``."""
    with deferred() as section:
        while section.active:
            section.poll()
            try:  # exception(), not result(): a TimeoutError the future raised is not a slice that ran out
                future.exception(SLICE)
                break
            except TimeoutError:
                continue
        return future.result()  # (in the section too: Condition.__enter__/__exit__ are Python code)


def wait_for(cond: threading.Condition, predicate: Callable[[], bool]) -> None:
    """``with cond: cond.wait_for(predicate)``, interruptible by Ctrl-C the way :func:`result` is."""
    with deferred() as section, cond:
        while not predicate():
            section.poll()  # raising here is safe: the ``with`` releases ``cond``
            cond.wait(SLICE if section.active else None)


def interruption_in(exc: BaseException) -> BaseException | None:
    """The KeyboardInterrupt or SystemExit behind ``exc``: itself, or one in its cause/context chain.

    A Ctrl-C inside a callback of C++ code (the file ``write`` that ``torch.save``'s zip writer calls)
    comes out of it as another error (``RuntimeError: ... unexpected pos``) with the interrupt as context.
    """
    current: BaseException | None = exc
    for _ in range(16):
        if current is None:
            return None
        if isinstance(current, (KeyboardInterrupt, SystemExit)):
            return current
        current = current.__cause__ or current.__context__
    return None
