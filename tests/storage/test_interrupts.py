"""storage/interrupts.py: a real SIGINT (os.kill) inside a deferred section is raised when the section ends."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from torchckpt.storage import interrupts


def ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)  # the handler runs here at the latest (a sleep returns early to run signal handlers)


def spin() -> None:
    for _ in range(10_000):  # many points where a KeyboardInterrupt is normally raised
        pass


def test_sigint_in_a_section_is_raised_when_it_ends_and_the_handler_is_restored():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred() as section:
            assert section.active
            ctrl_c()
            spin()
            done.append("end of section")
    assert done == ["end of section"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ctrl_c_raises_at_once()


def ctrl_c_raises_at_once() -> None:
    with pytest.raises(KeyboardInterrupt):
        ctrl_c()
        spin()


def test_a_section_without_sigint_changes_nothing():
    with interrupts.deferred():
        spin()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nested_sections_raise_at_the_end_of_the_outermost_and_poll_only_there():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred() as outer:
            with interrupts.deferred() as inner:
                ctrl_c()
                inner.poll()  # the outer section is not to be stopped
                done.append("inner")
            done.append("outer")
            outer.poll()
            done.append("after poll")
    assert done == ["inner", "outer"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_error_in_the_section_is_kept_as_the_context_and_the_handler_restored():
    with pytest.raises(KeyboardInterrupt) as info:
        with interrupts.deferred():
            ctrl_c()
            raise ValueError("the section's own error")
    assert isinstance(info.value.__context__, ValueError)
    with pytest.raises(ValueError):
        with interrupts.deferred():
            raise ValueError("no Ctrl-C: the error as it is")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_python_handler_of_the_program_is_called_after_the_section():
    calls = []

    def handler(signum, frame):
        calls.append((signum, threading.current_thread() is threading.main_thread()))

    previous = signal.signal(signal.SIGINT, handler)
    try:
        with interrupts.deferred():
            ctrl_c()
            assert calls == []
        assert calls == [(signal.SIGINT, True)]
        assert signal.getsignal(signal.SIGINT) is handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts.deferred() as section:
            assert not section.active
            ctrl_c()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_second_ctrl_c_in_the_same_section_is_raised_at_once():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            ctrl_c()
            done.append("first deferred")
            ctrl_c()
            done.append("second deferred too")
    assert done == ["first deferred"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sections_in_other_threads_change_nothing():
    seen = []

    def work():
        with interrupts.deferred() as section:
            seen.append((section.active, signal.getsignal(signal.SIGINT)))
            section.poll()

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == [(False, signal.default_int_handler)]


def test_result_stops_waiting_at_ctrl_c_and_the_future_goes_on():
    future: Future[str] = Future()
    timer = threading.Timer(0.1, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        interrupts.result(future)
    assert time.monotonic() - start < 0.1 + interrupts.SLICE + 1.0
    assert not future.done()
    future.set_result("written")
    assert interrupts.result(future) == "written"
    timer.join()


def test_result_reports_a_timeout_error_of_the_future_itself():
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(time.sleep, 0.2)
        assert interrupts.result(future) is None
        failing = pool.submit(lambda: (_ for _ in ()).throw(TimeoutError("the store timed out")))
        with pytest.raises(TimeoutError, match="the store timed out"):
            interrupts.result(failing)  # not taken for a slice that ran out (that would wait forever)


def test_wait_for_stops_at_ctrl_c_with_the_condition_released():
    cond = threading.Condition()
    timer = threading.Timer(0.1, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        interrupts.wait_for(cond, lambda: False)
    timer.join()
    assert cond.acquire(timeout=1)  # released, not left owned
    cond.release()
    flag = []
    threading.Timer(0.05, lambda: (flag.append(1), cond.acquire(), cond.notify_all(), cond.release())).start()
    interrupts.wait_for(cond, lambda: bool(flag))


def test_a_sigterm_handler_runs_after_the_section_once_even_if_ctrl_c_came_first():
    """A job scheduler's SIGTERM (a Python handler: it may save or exit) waits for the section like Ctrl-C;
    with both recorded, both are delivered in order at its end, the handler even though Ctrl-C raised."""
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts.deferred() as section:
                ctrl_c()
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)
                assert calls == []  # held back with the Ctrl-C
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert calls == [signal.SIGTERM]


def test_a_handler_that_saves_is_not_run_inside_the_section_it_interrupted():
    """Lightning's SLURM requeue handler saves a checkpoint on SIGUSR1: run inside a save's bookkeeping it would
    re-enter that save. It runs once the section ends, and the restored handler is the program's."""
    inside = []
    depth = []

    def handler(signum, frame):
        depth.append(interrupts._depth)  # 0: no section is running when it runs
        inside.append(signum)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        with interrupts.deferred() as section:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.01)
            spin()
            section.poll()  # Ctrl-C only: the SIGUSR1 handler waits for the end
            assert inside == []
        assert inside == [signal.SIGUSR1] and depth == [0]
        assert signal.getsignal(signal.SIGUSR1) is handler
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_signals_left_to_the_system_are_not_touched():
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with interrupts.deferred():
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a plain SIGTERM still ends the process
