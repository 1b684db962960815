"""timm's own functions as references for torchckpt.transforms, without importing torchvision.

timm is installed with ``pip install --no-deps --target .testdeps timm==1.0.31`` (``.ci/run`` does it):
its top-level ``timm/__init__`` and ``timm/layers/__init__`` import torchvision, whose registry build
breaks ``import lightning`` beside the CPU torch. The modules we need (``timm.layers.pos_embed``,
``timm.layers.pos_embed_rel``, ``timm.models._manipulate``) import only torch and sibling modules, so
the packages are registered empty (their real directories as ``__path__``, their ``__init__`` not run)
and those modules are imported from timm's own files.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from typing import Any

import pytest

TIMM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, ".testdeps")


def timm_module(name: str) -> Any:
    """``timm.<name>`` imported from the timm in ``.testdeps`` (skips, saying why, when it is missing)."""
    root = os.path.join(TIMM_DIR, "timm")
    if not os.path.isdir(root):
        pytest.skip("timm reference not installed: run `pip install --no-deps --target .testdeps timm==1.0.31` "
                    "(.ci/run does)")
    for package in ("timm", "timm.layers", "timm.models"):
        if package not in sys.modules:
            module = types.ModuleType(package)
            module.__path__ = [os.path.join(root, *package.split(".")[1:])]
            sys.modules[package] = module
    if "timm.layers.config" not in sys.modules:
        config = importlib.import_module("timm.layers.config")
        sys.modules["timm.layers"].use_reentrant_ckpt = config.use_reentrant_ckpt  # what _manipulate imports
    module = importlib.import_module(f"timm.{name}")
    return module
