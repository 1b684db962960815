"""Peak memory of load_into: the model once, never a second copy (issue 14).

Each case runs in a fresh process that resets its peak RSS (``/proc/self/clear_refs``) once the model
exists (and the reader modules are imported), loads, reads every value in 512 KiB pieces (so mapped
pages count), and reports the peak above that point. Bounds: on ``meta``, the model once plus at most
two 4 MiB tensors in flight (~1.04x measured); into an allocated model, at most two tensors (~0.05x
measured). A second copy of the 96 MiB model would exceed either by far.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self for peak RSS")

MIB = 2**20
N, ROWS, COLS = 24, 1024, 1024  # 24 tensors of 4 MiB: 96 MiB, large enough that a second copy shows


def _write(folder: str) -> dict[str, str]:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {f"layers.{i}.weight": torch.randn(ROWS, COLS, generator=g) for i in range(N)}
    paths = {"zip": os.path.join(folder, "m.pt"), "legacy": os.path.join(folder, "m.pth"),
             "safetensors": os.path.join(folder, "m.safetensors")}
    torch.save(sd, paths["zip"])
    torch.save(sd, paths["legacy"], _use_new_zipfile_serialization=False)
    save_file(sd, paths["safetensors"])
    return paths


CHILD = textwrap.dedent("""
    import json, sys, torch, torchckpt
    path, device = sys.argv[1], sys.argv[2]
    def status(field):
        with open('/proc/self/status') as fh:
            return next(int(l.split()[1]) for l in fh if l.startswith(field)) * 1024
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear({cols}, {rows}, bias=False) for _ in range({n}))
    with torch.device(device):
        model = Net()
    expected = torch.load(path, mmap=True, weights_only=True) if path.endswith('.pt') else None
    del expected
    import torchckpt.fit.load_into, torchckpt.read.opener, torchckpt.read.formats.torch_zip  # imports are not the load
    import torchckpt.read.formats.torch_legacy, torchckpt.read.formats.simple, torchckpt.read.unpickle.machine
    try:
        with open('/proc/self/clear_refs', 'w') as fh:
            fh.write('5')  # peak RSS := current RSS
    except OSError:
        pass
    base = status('VmRSS')
    report = torchckpt.load_into(model, path)
    total = sum(float(c.double().sum()) for p in model.parameters()
                for c in p.detach().reshape(-1).split(1 << 16))  # every page read, 512 KiB temporaries
    print(json.dumps({{"peak_extra": status('VmHWM') - base, "total": total,
                      "device": str(next(model.parameters()).device)}}))
""").format(n=N, rows=ROWS, cols=COLS)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _write(str(tmp_path_factory.mktemp("mem")))


def _peak(path: str, device: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, path, device], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _expected_total(path: str) -> float:
    sd = torch.load(path, weights_only=True)
    return sum(float(t.double().sum()) for t in sd.values())


MODEL = N * ROWS * COLS * 4
TENSOR = ROWS * COLS * 4  # one tensor in flight (read, placed, released) is the price of streaming


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
def test_meta_model_holds_one_copy(files, fmt):
    """A model built on meta ends up with the weights once: no copy next to the mapped file."""
    out = _peak(files[fmt], "meta")
    assert out["device"] == "cpu"
    assert out["total"] == pytest.approx(_expected_total(files["zip"]), rel=1e-9)
    assert out["peak_extra"] <= MODEL + 2 * TENSOR + 4 * MIB, f"{out['peak_extra'] / MODEL:.3f}x the model"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
def test_cpu_model_loads_without_a_second_copy(files, fmt):
    """Into an allocated model, a load costs a small fraction of the model, whatever the format."""
    out = _peak(files[fmt], "cpu")
    assert out["total"] == pytest.approx(_expected_total(files["zip"]), rel=1e-9)
    # 2 tensors in flight + 6 MiB of allocator slack: glibc may keep a freed 4 MiB read buffer (the legacy
    # reader's temporary) beside the next one; measured 12.1 MiB once in 8 runs against the old 12 MiB bound
    assert out["peak_extra"] <= 2 * TENSOR + 6 * MIB, f"{out['peak_extra'] / MODEL:.3f}x the model"
