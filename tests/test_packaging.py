"""The package as users install it: a wheel with its license, type marker and metadata."""

from __future__ import annotations

import email
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setuptools_is_recent() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("wheel")
    isolation = [] if not _setuptools_is_recent() else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(out), ROOT],
                   check=True, cwd=str(out), timeout=300)
    (name,) = [n for n in os.listdir(out) if n.endswith(".whl")]
    return str(out / name)


def test_wheel_carries_license_type_marker_and_metadata(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(zf.read(meta_name))
        (license_name,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        license_text = zf.read(license_name).decode()
    assert "torchckpt/py.typed" in names
    assert "BSD 3-Clause License" in license_text and "the torchckpt authors" in license_text
    assert meta["Name"] == "torchckpt"
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert meta["License-File"] == "LICENSE"
    assert meta["Description-Content-Type"] == "text/markdown"
    assert "Typing :: Typed" in meta.get_all("Classifier")
    with open(os.path.join(ROOT, "src", "torchckpt", "_version.py"), encoding="utf-8") as fh:
        declared = next(line for line in fh if line.startswith("__version__"))
    assert f'"{meta["Version"]}"' in declared  # one version source: the wheel's comes from _version.py
    extras = meta.get_all("Provides-Extra")
    assert "lightning" in extras and "test" in extras
    # optional integrations never become hard dependencies
    hard = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    assert not [r for r in hard if r.split(">")[0].split("=")[0].strip() in ("lightning", "transformers", "accelerate")]
