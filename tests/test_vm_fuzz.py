"""A small sample of the generated VM programs (tests/vm_programs.py; the long run is
``python tests/vm_programs.py 50000``): random opcode programs over every allowlisted global with hostile
arguments, in a bare pickle, a torch zip or a legacy stream. For each, load (path and bytes), inspect and
scan agree and end in a value or a CheckpointError within the time bound."""

from __future__ import annotations

import os
import random

from agreement import check
from vm_programs import _globals, program

PROGRAMS = int(os.environ.get("VM_PROGRAMS", "200"))
NAMES = _globals()


def test_generated_programs_end_in_a_value_or_a_checkpoint_error(tmp_path):
    import torch  # noqa: F401 - imported before the clock runs

    outcomes: dict[str, int] = {}
    for seed in range(PROGRAMS):
        outcome = check(program(random.Random(seed), NAMES), str(tmp_path))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert set(outcomes) <= {"ok", "error", "unsafe"}
    if PROGRAMS >= 100:  # the sample reaches all three outcomes (the generator is not degenerate)
        assert len(outcomes) == 3, outcomes
