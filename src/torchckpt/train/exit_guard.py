"""Background saves are never lost silently when the program ends.

Every background write torchckpt starts (``Checkpointer(async_save=True)``, whatever its directory or
URL, and the Lightning ``TorchckptIO(async_save=True)``) is registered here until its outcome reaches
the caller (``wait()``, ``close()``, the next ``save()``, ``teardown()``). When the interpreter exits
with writes nobody waited for (the script just ends, ``sys.exit``, an uncaught exception):

1. torchckpt waits for them, at most ``TORCHCKPT_EXIT_TIMEOUT`` seconds in all (default 600), before
   Python joins its worker threads;
2. a write that failed gets its typed error printed to stderr; a write still running after the bound
   is reported as not committed (the previous checkpoint stays the latest);
3. the exit status becomes :data:`EXIT_CODE` (1), so a job scheduler sees the failure: torchckpt's
   ``atexit`` handler (registered with the first background save, so handlers registered later run
   before it) shuts ``logging`` down, flushes stdout and stderr and calls ``os._exit(1)``. A write
   still hanging ends the process the same way at step 2, at once; Ctrl-C during the wait ends it
   with status 130, the writes not committed (said on stderr).

A write that succeeded changes nothing: its checkpoint is committed before the process ends.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import os
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

from ..storage import interrupts

__all__ = ["track", "settled", "EXIT_CODE"]

EXIT_CODE = 1
INTERRUPTED_CODE = 130  # Ctrl-C while waiting at exit (the shell's 128 + SIGINT)
_TIMEOUT_ENV = "TORCHCKPT_EXIT_TIMEOUT"

_lock = threading.Lock()
_pending: dict[int, tuple["Future[Any]", str, Callable[[BaseException], BaseException]]] = {}
_installed = False
_failed = False


def track(future: "Future[Any]", what: str, typed: Callable[[BaseException], BaseException]) -> None:
    """Watch ``future`` (a background write described by ``what``) until :func:`settled`; ``typed`` turns
    its exception into the typed error the caller would have received."""
    _install()
    with _lock:
        _pending[id(future)] = (future, what, typed)


def settled(future: "Future[Any] | None") -> None:
    """``future``'s outcome reached the caller (or it was replaced by a write that waits for it)."""
    if future is not None:
        with _lock:
            _pending.pop(id(future), None)


def _install() -> None:
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    atexit.register(_exit_status)
    # Runs before the interpreter joins non-daemon threads (concurrent.futures registers its own join the
    # same way, earlier, and these run in reverse order), so a hung write cannot hold the exit forever.
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is None:
            raise RuntimeError("no threading._register_atexit")
        register(_drain)
    except RuntimeError:  # interpreter already shutting down, or an older Python: drain at atexit time
        atexit.register(_drain)


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker, a multiprocessing.Process) has none of its parent's writer threads: the
    writes tracked here are the parent's, never complete in the child, and are not the child's to wait for or report
    (its exit ran Python's thread shutdown, so it waited TORCHCKPT_EXIT_TIMEOUT s for them, then exited with 1)."""
    global _lock, _failed
    _lock = threading.Lock()  # (another thread may have held it at the fork)
    _pending.clear()
    _failed = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _timeout() -> float:
    try:
        return max(0.0, float(os.environ.get(_TIMEOUT_ENV, "600")))
    except ValueError:
        return 600.0


def _drain() -> None:
    global _failed
    with _lock:
        items = list(_pending.values())
        _pending.clear()
    if not items:
        return
    limit = _timeout()
    deadline = time.monotonic() + limit
    hung = False
    for future, what, typed in items:
        try:
            if not _wait(future, deadline):
                raise concurrent.futures.TimeoutError
            future.result(timeout=0)
        except KeyboardInterrupt:  # Ctrl-C while the program waits at exit: stop waiting, say what is lost
            print(f"torchckpt: interrupted while waiting at exit for {what}; it is not committed and the "
                  "previous checkpoint stays the latest (a later Checkpointer on the directory removes what it "
                  "left).", file=sys.stderr)
            _flush()
            os._exit(INTERRUPTED_CODE)
        except concurrent.futures.TimeoutError:
            hung = True
            print(f"torchckpt: {what} was still being written {limit:g} s after the program ended "
                  f"({_TIMEOUT_ENV}); it is not committed and the previous checkpoint stays the latest. "
                  "Call wait() or close() (or use the Checkpointer in a `with` block) before exiting.",
                  file=sys.stderr)
        except BaseException as exc:  # noqa: BLE001 - every failure is reported, none is swallowed
            err = typed(exc)
            _failed = True
            print(f"torchckpt: {what} failed in the background, and the program ended without wait() or "
                  f"close():\n{type(err).__name__}: {err}", file=sys.stderr)
    if hung:
        _flush()
        os._exit(EXIT_CODE)


def _wait(future: "Future[Any]", deadline: float) -> bool:
    """Until ``future`` is done (True) or ``deadline`` passes (False). On the main thread the wait runs in
    deferred slices: Ctrl-C stops it between two, never inside CPython's ``Condition.wait`` (which could
    leave the future's lock held, and the interpreter's own join of the writer thread would hang)."""
    with interrupts.deferred() as section:
        while True:
            section.poll()
            left = deadline - time.monotonic()
            if left <= 0:
                return future.done()
            try:
                future.exception(min(interrupts.SLICE, left) if section.active else left)
                return True
            except concurrent.futures.TimeoutError:
                continue


def _exit_status() -> None:
    if _failed:
        _flush()
        os._exit(EXIT_CODE)


def _flush() -> None:
    logging = sys.modules.get("logging")
    if logging is not None:
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
