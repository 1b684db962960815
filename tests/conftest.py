from __future__ import annotations

import os
import sys
from collections import OrderedDict

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

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
