"""Ctrl-C (a real SIGINT) at every few lines of save()/wait()/close() bookkeeping, CPython's threading code
included, in a child process under a hard timeout (tests/helpers/ctrl_c_stress.py, which runs longer by hand).

Before the bookkeeping deferred Ctrl-C (storage/interrupts.py), these points left CPython's locks unowned
(``RuntimeError: release unlocked lock`` out of save()), the directory lock taken but unrecorded, and now and
then a process that hung inside the test or at exit.
"""

from __future__ import annotations

import pytest

import ctrl_c_stress


@pytest.mark.slow
@pytest.mark.parametrize("kind, every", [("file", 3), ("sync", 3), ("async", 3), ("wait", 2), ("close", 2)])
def test_ctrl_c_at_every_few_lines_of_the_bookkeeping_loses_and_leaks_nothing(tmp_path, kind, every):
    code, out = ctrl_c_stress.run_child("trace", str(tmp_path), kinds=kind, every=every, timeout=50)
    assert code == 0, out[-8000:]
    assert "ok: " in out
