from __future__ import annotations

import importlib
import os
import shutil
import sys
from collections import OrderedDict

import pytest
import torch

# Imported by name through sys.path: the helpers (tests/helpers/*.py), this module (from conftest import ...)
# and the few test modules whose fixtures or payloads other layers' tests reuse (test_malicious, test_distributed ...)
TESTS = os.path.dirname(os.path.abspath(__file__))
for _folder in ("package", "tools", "train", "fit", "storage", "read", "helpers", ""):
    sys.path.insert(0, os.path.join(TESTS, _folder))

SHARED_T7 = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "shared", "fixtures", "t7")
LOCAL_T7 = os.path.join(os.path.dirname(__file__), "data", "t7")


def small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(OrderedDict([
        ("conv1", torch.nn.Conv2d(3, 8, 3)), ("bn1", torch.nn.BatchNorm2d(8)), ("relu", torch.nn.ReLU()),
        ("pool", torch.nn.AdaptiveAvgPool2d(1)), ("flat", torch.nn.Flatten()), ("fc", torch.nn.Linear(8, 10))]))


@pytest.fixture
def net() -> torch.nn.Module:
    return small_net()


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a.keys()) == list(b.keys())
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


class ForgettablePackage:
    """Package ``name`` written under ``root`` from ``source`` and imported (``module``), until :meth:`forget`
    deletes its files and drops it from ``sys.modules``: a whole-model pickle whose code is gone."""

    def __init__(self, root, monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> None:
        self.name, self.path = name, root / name
        self.path.mkdir()
        (self.path / "__init__.py").write_text(source)
        monkeypatch.syspath_prepend(str(root))
        self.module = importlib.import_module(name)

    def forget(self) -> None:
        shutil.rmtree(self.path)
        sys.modules.pop(self.name, None)
        importlib.invalidate_caches()
