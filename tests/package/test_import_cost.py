"""Cold start: ``import torchckpt`` and ``torchckpt inspect|scan`` of a small file import only what they need.

Each check runs a fresh interpreter and reads its ``sys.modules`` at exit: a module imported at the top of
any module on the path (a reader, a subcommand, the output sink) shows up here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")

# Runs the CLI in-process, then prints which of the heavy modules it imported.
CLI = """
import atexit, json, sys
HEAVY = ("torch", "numpy", "rich", "fsspec", "safetensors", "torch.distributed")
atexit.register(lambda: sys.__stderr__.write("MODULES " + json.dumps(sorted(h for h in HEAVY if h in sys.modules)) + "\\n"))
from torchckpt.cli.main import run
sys.argv = ["torchckpt", *sys.argv[1:]]
run()
"""


def modules_after(code: str, *args: str) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("MODULES "))
    return json.loads(line[len("MODULES "):]), res


@pytest.mark.slow
def test_import_torchckpt_leaves_torch_and_numpy_out():
    code = ("import atexit, json, sys\nimport torchckpt\n"
            "atexit.register(lambda: sys.__stderr__.write('MODULES ' + json.dumps(sorted(m for m in "
            "('torch', 'numpy', 'click', 'rich') if m in sys.modules)) + '\\n'))\n"
            "assert torchckpt.CheckpointError and torchckpt.__version__\n")
    heavy, res = modules_after(code)
    assert res.returncode == 0, res.stderr
    assert heavy == [], heavy


@pytest.mark.slow
def test_public_names_still_resolve_lazily():
    code = ("import atexit, json, sys\nimport torchckpt\n"
            "atexit.register(lambda: sys.__stderr__.write('MODULES ' + json.dumps(sorted(m for m in "
            "('torch', 'numpy') if m in sys.modules)) + '\\n'))\n"
            "missing = [n for n in torchckpt.__all__ if getattr(torchckpt, n, None) is None]\n"
            "assert not missing, missing\n"
            "assert set(torchckpt.__all__) <= set(dir(torchckpt))\n")
    heavy, res = modules_after(code)
    assert res.returncode == 0, res.stderr


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small")
    sd = {"fc.weight": torch.randn(4, 3), "fc.bias": torch.zeros(4), "step": 7}
    files = {"zip": folder / "small.pt", "safetensors": folder / "small.safetensors",
             "legacy": folder / "legacy.pt"}
    torch.save(sd, files["zip"])
    save_file({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, files["safetensors"])
    torch.save(sd, files["legacy"], _use_new_zipfile_serialization=False)
    return files


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["zip", "safetensors", "legacy"])
@pytest.mark.parametrize("command", [["inspect"], ["inspect", "--json"], ["scan"], ["scan", "--json"]])
def test_inspect_and_scan_of_a_small_file_import_no_torch(small_files, kind, command):
    heavy, res = modules_after(CLI, *command, str(small_files[kind]))
    assert res.returncode == 0, res.stderr
    assert "fc.weight" in res.stdout or "clean" in res.stdout, res.stdout  # it did the work
    # rich only draws on a terminal; in a pipe the text is written as it is.
    assert heavy == [], (command, kind, heavy)


@pytest.mark.slow
def test_piped_output_is_the_rendered_text(small_files):
    """Without rich in a pipe, the text is still exactly the record's rendering (no wrapping, no markup)."""
    import torchckpt

    _, res = modules_after(CLI, "inspect", str(small_files["zip"]))
    assert res.stdout == torchckpt.inspect(small_files["zip"]).render(60) + "\n"


# The reader modules of torchckpt.read.formats, and which of them a load of each small file may import.
READERS = ("torch_zip", "torch_legacy", "simple", "safetensors", "sharded", "dcp", "parallel", "deepspeed", "zero",
           "ds_universal", "folders", "lua_t7", "torchscript_v1")
NEEDED = {"zip": {"torch_zip"}, "legacy": {"torch_zip", "torch_legacy"}, "safetensors": {"torch_zip", "simple"}}
LOAD = """
import json, sys
import torch
import torchckpt
obj = torchckpt.load(sys.argv[1])
assert {"fc.bias", "fc.weight"} <= set(obj), obj
sys.__stderr__.write("MODULES " + json.dumps(sorted(m for m in sys.modules
                                                   if m.startswith(("torchckpt.", "safetensors", "decimal", "fractions"))))
                     + "\\n")
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors"])
def test_loading_a_small_file_imports_only_its_own_reader(small_files, kind):
    """A plain torch zip load does not pay for the DeepSpeed, DCP, Lua, TorchScript or safetensors readers, the
    shard pool, the matcher or the Checkpointer (each is imported when its kind of file or folder is read)."""
    import importlib.util

    assert all(importlib.util.find_spec(f"torchckpt.read.formats.{r}") for r in READERS)  # the names are real
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", LOAD, str(small_files[kind])], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("MODULES "))
    imported = set(json.loads(line[len("MODULES "):]))
    readers = {m.rsplit(".", 1)[1] for m in imported if m.startswith("torchckpt.read.formats.")} & set(READERS)
    assert readers == NEEDED[kind], (kind, sorted(readers))
    assert "safetensors" not in imported  # the library: our reader parses the header itself
    assert not {m for m in imported if m.startswith(("torchckpt.fit.", "torchckpt.tools.", "torchckpt.cli."))}
    assert "torchckpt.train.checkpointer" not in imported
    assert not imported & {"decimal", "fractions"}  # ~3 ms of import: only a pickle that names one pays


EXACT = """
import json, sys
import torchckpt
values = [torchckpt.load(bytes.fromhex(h)) for h in sys.argv[1:]]
sys.__stderr__.write("MODULES " + json.dumps(sorted(m for m in ("decimal", "fractions") if m in sys.modules)) + "\\n")
print(json.dumps([[type(v).__name__, str(v)] for v in values]))
"""


@pytest.mark.slow
def test_decimal_and_fraction_are_imported_when_a_pickle_names_them():
    """They load as before in a process that has not imported them: int(Decimal), float(Fraction) and
    copyreg._reconstructor(Decimal, Decimal, text) first, before any Decimal or Fraction was built."""
    import decimal
    import fractions
    import pickle

    programs = [b"\x80\x02cbuiltins\nint\ncdecimal\nDecimal\nX\x03\x00\x00\x0042.\x85R\x85R.",
                b"\x80\x02cbuiltins\nfloat\ncfractions\nFraction\nK\x01K\x04\x86R\x85R.",
                b"\x80\x02ccopyreg\n_reconstructor\ncdecimal\nDecimal\ncdecimal\nDecimal\nX\x03\x00\x00\x001.5\x87R.",
                pickle.dumps({"lr": decimal.Decimal("-7.5e3"), "f": fractions.Fraction(3, 7)}, protocol=0)]
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", EXACT, *(p.hex() for p in programs)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == [["int", "42"], ["float", "0.25"], ["Decimal", "1.5"],
                                      ["dict", "{'lr': Decimal('-7.5E+3'), 'f': Fraction(3, 7)}"]]
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("MODULES "))
    assert json.loads(line[len("MODULES "):]) == ["decimal", "fractions"]
