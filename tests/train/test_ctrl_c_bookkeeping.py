"""Ctrl-C (a real SIGINT) at points spread over save()/wait()/close() and their bookkeeping, CPython's threading
code included, in a child process under a hard timeout (tests/helpers/ctrl_c_stress.py, run longer by hand).

Before the bookkeeping deferred Ctrl-C (storage/interrupts.py), these points left CPython's locks unowned
(``RuntimeError: release unlocked lock`` out of save()), the directory lock taken but unrecorded, and now and
then a process that hung inside the test or at exit.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import ctrl_c_stress
import torchckpt


def _run(mode, tmp_path, points):
    directory = tmp_path
    if os.path.isdir("/dev/shm"):  # RAM: the ~300 saves are quick (the trace points are lines, not times)
        directory = Path(tempfile.mkdtemp(prefix="ctrl-c-", dir="/dev/shm"))
    try:
        code, out = ctrl_c_stress.run_child(mode, str(directory), points=points, timeout=120)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert code == 0, out[-8000:]
    assert "ok: " in out, out[-8000:]


@pytest.mark.slow
def test_ctrl_c_at_points_spread_over_the_bookkeeping_loses_and_leaks_nothing(tmp_path):
    """50 points (of 200-1500) in each of torchckpt.save, Checkpointer.save (sync, async), wait() and close():
    on main they left temp files, RuntimeError('release unlocked lock'), and a process hung in Event.set()."""
    _run("trace", tmp_path, 50)


@pytest.mark.slow
def test_ctrl_c_at_random_times_loses_and_leaks_nothing(tmp_path):
    """25 saves, waits and closes interrupted at random times (a SIGALRM handler sends SIGINT): found torch's zip
    writer aborting the process when freed after its file was closed."""
    _run("timer", tmp_path, 25)


def interrupt_at_call(qualified_name, filename_end, call):
    """A trace that sends a real SIGINT as the main thread enters its ``call``-th call of ``qualified_name`` (a
    function of the file whose path ends with ``filename_end``)."""
    calls = []

    def trace(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_qualname == qualified_name and code.co_filename.endswith(filename_end):
            calls.append(1)
            if len(calls) == call:
                sys.settrace(None)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0)  # (the KeyboardInterrupt is raised here, into the traced call)
        return None

    return trace


def test_ctrl_c_inside_a_write_of_torch_save_is_a_keyboard_interrupt_and_keeps_the_old_file(tmp_path):
    """torch.save's zip writer calls the file's write(); a Ctrl-C there came out of torchckpt.save as
    ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos`` (the interrupt only its context)."""
    path = str(tmp_path / "m.pt")
    torchckpt.save(path, model=torch.nn.Linear(4, 4), step=1)
    # the 2nd to 5th write and most later ones gave the RuntimeError
    sys.settrace(interrupt_at_call("_Counted.write", os.path.join("storage", "atomic.py"), call=2))
    try:
        with pytest.raises(KeyboardInterrupt):
            torchckpt.save(path, model=torch.nn.Linear(4, 4), step=2)
    finally:
        sys.settrace(None)
    assert torchckpt.resume(path, model=torch.nn.Linear(4, 4)).step == 1
    assert sorted(os.listdir(tmp_path)) == ["m.pt", "m.pt.meta.json"]
    torchckpt.save(path, model=torch.nn.Linear(4, 4), step=3)
    assert torchckpt.resume(path, model=torch.nn.Linear(4, 4)).step == 3
