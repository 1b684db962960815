"""The package as users install it: a wheel with its license, type marker and metadata."""

from __future__ import annotations

import email
import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _setuptools_is_recent() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``python -m build``: the sdist first, then the wheel built from that sdist (so a file the
    sdist forgets breaks the wheel too)."""
    out = tmp_path_factory.mktemp("dist")
    isolation = ["--no-isolation"] if _setuptools_is_recent() else []
    subprocess.run([sys.executable, "-m", "build", *isolation, "--outdir", str(out), ROOT],
                   check=True, cwd=str(out), timeout=300, capture_output=True)
    found = {kind: [n for n in os.listdir(out) if n.endswith(ext)] for kind, ext in
             (("wheel", ".whl"), ("sdist", ".tar.gz"))}
    assert all(len(v) == 1 for v in found.values()), found
    return {kind: str(out / names[0]) for kind, names in found.items()}


@pytest.fixture(scope="module")
def wheel(dists: dict[str, str]) -> str:
    return dists["wheel"]


@pytest.mark.slow
def test_twine_check_passes_for_wheel_and_sdist(dists: dict[str, str]) -> None:
    done = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", dists["wheel"], dists["sdist"]],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASSED") == 2, done.stdout


@pytest.mark.slow
def test_sdist_carries_license_changelog_tests_and_type_marker(dists: dict[str, str]) -> None:
    with tarfile.open(dists["sdist"]) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for needed in ("LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "src/torchckpt/py.typed",
                   "src/torchckpt/_version.py", "src/torchckpt/integrations/lightning.py"):
        assert needed in names, needed


@pytest.mark.slow
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
