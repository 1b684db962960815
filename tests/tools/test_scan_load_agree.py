"""Property: for generated and mutated inputs of every reader, scan's verdict and load's outcome agree
(unsafe <=> flagged; unloadable <=> unreadable to scan) and nothing but a value or a CheckpointError
comes out of load (path and bytes), inspect and scan within a time bound; a few inputs per reader also go
through load_into, resume, diff and convert. CI runs a small smoke (AGREE_EXAMPLES per reader); the long run is
``python tests/agreement.py 50000 --front-ends`` (see that module)."""

from __future__ import annotations

import os
import random
import resource

import pytest
from agreement import check, mutate, seeds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("AGREE_EXAMPLES", "30"))
SEEDS = seeds()
MEMORY_BOUND = 2 << 30  # growth of peak RSS over the whole run of one reader


@pytest.mark.parametrize("kind", sorted(SEEDS))
def test_scan_and_load_agree(kind, tmp_path):
    # the seed itself: loads and scans clean (the evil ones: refused, flagged), through every front end
    assert check(SEEDS[kind], str(tmp_path), front_ends=True) == ("unsafe" if kind.startswith("evil") else "ok")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(st.integers(0, 2**32 - 1))
    def run(seed: int) -> None:
        check(mutate(SEEDS[kind], random.Random(seed)), str(tmp_path), front_ends=seed % 8 == 0)

    run()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before < MEMORY_BOUND
