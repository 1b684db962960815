"""The package as a type checker sees it: ``mypy --strict`` is clean on the sources, the public
names are the real typed objects (not ``Any`` behind the lazy loader), and what users write with
them is checked. Also the bugs that making the sources strict-clean turned up."""

from __future__ import annotations

import ast
import io
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

import torchckpt
from torchckpt.errors import UnsupportedFormatError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SRC = os.path.join(ROOT, "src")

pytest.importorskip("mypy")


def _mypy(*args: str, cache: str) -> subprocess.CompletedProcess[str]:
    # the configuration in pyproject.toml (strict = true) applies; --strict says so once more
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", cache, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "MYPYPATH": SRC})


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("mypy_cache"))


@pytest.mark.slow
def test_mypy_strict_is_clean_on_the_sources(mypy_cache: str) -> None:
    done = _mypy(cache=mypy_cache)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "Success: no issues found" in done.stdout


@pytest.mark.slow
def test_public_names_are_typed_for_users(mypy_cache: str, tmp_path) -> None:
    user = tmp_path / "user_code.py"
    user.write_text(textwrap.dedent('''
        import torchckpt
        from torch import nn

        model = nn.Linear(2, 2)
        report = torchckpt.load_into(model, "ckpt.pt", strict=False)
        reveal_type(report)
        reveal_type(report.missing_keys)
        reveal_type(torchckpt.load)
        reveal_type(torchckpt.Checkpointer)
        reveal_type(torchckpt.__version__)
        wrong: int = torchckpt.scan("x.pt")
        torchckpt.load_into(model, "ckpt.pt", strikt=True)
    '''))
    done = _mypy(str(user), cache=mypy_cache)
    revealed = [line.split("Revealed type is ", 1)[1].replace("builtins.", "")
                for line in done.stdout.splitlines() if "Revealed type is" in line]
    assert len(revealed) == 5, done.stdout
    report_type, missing_type, load_type, checkpointer_type, version_type = revealed
    assert report_type == '"torchckpt.fit.report.LoadReport"'
    assert missing_type == '"list[str]"'
    assert load_type.startswith('"Overload(def (source: str | os.PathLike[str] | bytes') and "map_location:" in load_type
    assert checkpointer_type.startswith('"def (directory: str, *, keep_last: int | None')
    assert checkpointer_type.endswith('-> torchckpt.train.checkpointer.Checkpointer"')
    assert version_type == '"str"'
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 2 and done.returncode == 1, done.stdout
    assert 'expression has type "ScanReport", variable has type "int"' in errors[0]
    assert 'Unexpected keyword argument "strikt" for "load_into"' in errors[1]


def test_names_for_type_checkers_are_the_names_loaded_at_run_time() -> None:
    """The TYPE_CHECKING imports in __init__ and the lazy table must name the same objects."""
    with open(os.path.join(SRC, "torchckpt", "__init__.py"), encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    checked: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom)
                for alias in imp.names:
                    checked[alias.asname or alias.name] = f"{(imp.module or '').lstrip('.')}:{alias.name}"
    lazy = {name: f"{module}:{attr}" for name, (module, attr) in torchckpt._LAZY.items()}
    lazy.update({name: f":{name}" for name in torchckpt._SUBMODULES})  # `from . import transforms`
    assert checked == lazy
    for name in torchckpt.__all__:
        assert getattr(torchckpt, name) is not None


def test_an_encrypted_zip_member_is_unsupported_not_a_type_error(tmp_path) -> None:
    """mypy found ``UnsupportedFormatError(..., member=...)`` called with an argument it did not take:
    an encrypted member gave "malformed pickle ... TypeError" instead of the intended error. (The
    error now takes ``member``; torch_zip.py was reworked meanwhile and no longer passes it.)"""
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buf)
    data = bytearray(buf.getvalue())
    pos = 0
    while (pos := data.find(b"PK\x01\x02", pos)) >= 0:  # central directory entries
        name_len, = struct.unpack_from("<H", data, pos + 28)
        if data[pos + 46:pos + 46 + name_len].endswith(b"/data/0"):
            data[pos + 8] |= 1  # general purpose flag bit 0: encrypted (central and local header)
            local, = struct.unpack_from("<I", data, pos + 42)
            data[local + 6] |= 1
        pos += 4
    path = tmp_path / "encrypted.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedFormatError) as caught:
        torchckpt.load(str(path))
    assert "member archive/data/0 is marked encrypted" in str(caught.value) and "TypeError" not in str(caught.value)


def test_private_stdlib_modules_are_refused_even_with_trust() -> None:
    """mypy found ``_STDLIB`` bound twice in policy.py (stdlib module names, then the allowlist dict):
    the private-stdlib rule compared a module name against (module, name) pairs and never fired, so
    ``trust=True`` imported e.g. ``_queue.SimpleQueue`` for real. Outside the short list of data-only
    private modules, a private stdlib module is refused like the blocklist."""
    pickled = b"\x80\x02c_queue\nSimpleQueue\n)R."  # _queue.SimpleQueue()
    for trust in (False, True):
        with pytest.raises(torchckpt.UnsafeCheckpointError) as caught:
            torchckpt.load(pickled, trust=trust)
        assert "_queue.SimpleQueue" in str(caught.value)
    assert isinstance(torchckpt.load(b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00hiX\x06\x00\x00\x00latin1\x86R.",
                                     trust=False), bytes)  # a data-only private module stays allowed


@pytest.mark.slow
def test_literal_and_overload_types_reach_users(mypy_cache: str, tmp_path) -> None:
    """Issue 24 item 14: return_info picks the return type, on_mismatch/dtype/to are Literals, model and
    source are real types."""
    user = tmp_path / "user_literals.py"
    user.write_text(textwrap.dedent('''
        import torchckpt
        from torch import nn

        obj, info = torchckpt.load("ckpt.pt", return_info=True)
        reveal_type(info)
        reveal_type(torchckpt.load("ckpt.pt"))
        missing, unexpected = torchckpt.load_into(nn.Linear(2, 2), "ckpt.pt")
        reveal_type(missing)
        torchckpt.load_into(nn.Linear(2, 2), "ckpt.pt", on_mismatch="skipp")
        torchckpt.load_into(nn.Linear(2, 2), "ckpt.pt", dtype="float16")
        torchckpt.load_into(42, "ckpt.pt")
        torchckpt.convert("a.pt", "b.safetensors", dtype="bf16", to="safetensors")
        torchckpt.convert("a.pt", "b.x", to="onnx")
    '''))
    done = _mypy(str(user), cache=mypy_cache)
    revealed = [line.split("Revealed type is ", 1)[1] for line in done.stdout.splitlines() if "Revealed type is" in line]
    assert [r.replace("builtins.", "") for r in revealed] == [
        '"torchckpt.read.formats.base.Checkpoint"', '"Any"', '"list[str]"'], \
        done.stdout
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 4, done.stdout
    assert '"on_mismatch"' in errors[0] and '"dtype"' in errors[1] and 'expected Module' in errors[2] \
        and '"to"' in errors[3]
