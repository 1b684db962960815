"""numpy's global RNG is captured only when the program imported numpy.random; resume restores what the file holds.

Each case runs in a fresh interpreter: whether ``numpy.random`` is imported is process-wide state.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

_PRELUDE = """
import json, random, sys
import torch
import torchckpt
net = torch.nn.Linear(4, 4)
def draws(with_numpy):
    out = {"python": [random.random() for _ in range(3)], "gauss": random.gauss(0, 1),
           "torch": torch.rand(4).tolist()}
    if with_numpy:
        import numpy as np
        out["numpy"] = np.random.rand(3).tolist() + [float(np.random.standard_normal())]
    return out
"""


def _run(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_save_and_resume_without_numpy_random_leave_it_unimported_and_round_trip(tmp_path):
    path = str(tmp_path / "c.pt")
    out = _run(f"""
        random.seed(1); torch.manual_seed(2); random.random(); torch.rand(2)
        torchckpt.save({path!r}, model=net, step=1)
        after_save = "numpy.random" in sys.modules
        expected = draws(False)
        draws(False)  # move on
        state = torchckpt.resume({path!r}, model=net)
        print(json.dumps({{"after_save": after_save, "after_resume": "numpy.random" in sys.modules,
                          "keys": sorted(state.rng), "expected": expected, "got": draws(False)}}))
    """)
    assert out["after_save"] is False and out["after_resume"] is False
    assert "numpy" not in out["keys"] and {"python", "torch"} <= set(out["keys"])
    assert out["got"] == out["expected"]  # floats through JSON repr: bit-for-bit


def test_numpy_random_in_use_round_trips_exactly(tmp_path):
    path = str(tmp_path / "c.pt")
    out = _run(f"""
        import numpy as np
        np.random.seed(5); np.random.rand(7); np.random.standard_normal(3)  # a cached gaussian may be pending
        random.seed(1); torch.manual_seed(2)
        torchckpt.save({path!r}, model=net, step=1)
        expected = draws(True)
        draws(True)
        state = torchckpt.resume({path!r}, model=net)
        print(json.dumps({{"keys": sorted(state.rng), "expected": expected, "got": draws(True)}}))
    """)
    assert "numpy" in out["keys"]
    assert out["got"] == out["expected"]


def test_a_checkpoint_holding_numpy_state_restores_it_in_a_process_that_never_imported_it(tmp_path):
    path = str(tmp_path / "c.pt")
    saved = _run(f"""
        import numpy as np
        np.random.seed(11); np.random.rand(2)
        torchckpt.save({path!r}, model=net, step=1)
        print(json.dumps(draws(True)))
    """)
    resumed = _run(f"""
        before = "numpy.random" in sys.modules
        torchckpt.resume({path!r}, model=net)
        print(json.dumps({{"before": before, "draws": draws(True)}}))
    """)
    assert resumed["before"] is False
    assert resumed["draws"] == saved
