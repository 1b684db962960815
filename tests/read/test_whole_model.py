"""Whole-model pickles load without their class, and state_dict_of rebuilds model.state_dict() exactly."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from conftest import ForgettablePackage, assert_same_state

import torchckpt

MODEL_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1)
            self.bn = nn.BatchNorm2d(c)
            self.register_buffer("scale", torch.full((c,), 0.5))
            self.register_buffer("cache", torch.zeros(2), persistent=False)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 1)))
            self.blocks = nn.ModuleList([Block(4), Block(4)])
            self.heads = nn.ModuleDict({"cls": nn.Linear(4, 3), "box": nn.Linear(4, 4)})
            self.embed = nn.Embedding(3, 4)
            self.tied = nn.Linear(4, 3, bias=False)
            self.tied.weight = self.embed.weight          # shared parameter
            self.register_parameter("optional", None)      # None parameters are skipped
            self.register_buffer("step", torch.tensor(7))
''')


@pytest.fixture
def vanished_module(tmp_path, monkeypatch):
    """Create package 'models_gone', yield a factory and the package (to forget), then drop it from sys.modules."""
    package = ForgettablePackage(tmp_path, monkeypatch, "models_gone", MODEL_SOURCE)
    torch.manual_seed(0)
    yield package.module.Net, package
    sys.modules.pop("models_gone", None)


def _save_and_forget(obj, path, package: ForgettablePackage) -> None:
    torch.save(obj, path)
    package.forget()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_state_dict_of_equals_original(tmp_path, vanished_module, zip_format):
    make, pkg = vanished_module
    model = make()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "whole.pth"
    torch.save(model, path, _use_new_zipfile_serialization=zip_format)
    pkg.forget()
    with pytest.raises(Exception, match="models_gone"):
        torch.load(path, weights_only=False)  # what users see today
    obj = torchckpt.load(path)
    assert torchckpt.Stub and isinstance(obj, torchckpt.Stub)
    sd = torchckpt.state_dict_of(obj)
    assert_same_state(expected, sd)
    assert "blocks.0.cache" not in sd and "optional" not in sd
    assert sd["tied.weight"].untyped_storage().data_ptr() == sd["embed.weight"].untyped_storage().data_ptr()
    assert obj.heads.cls.weight.shape == (3, 4)  # attribute access through the stub tree


def test_dataparallel_wrapped_model(tmp_path, vanished_module):
    make, pkg = vanished_module
    wrapped = torch.nn.DataParallel(make())
    expected = wrapped.state_dict()
    assert next(iter(expected)).startswith("module.")
    path = tmp_path / "dp.pt"
    _save_and_forget(wrapped, path, pkg)
    assert_same_state(expected, torchckpt.state_dict_of(torchckpt.load(path)))


def test_model_inside_training_dict(tmp_path, vanished_module):
    make, pkg = vanished_module
    model = make()
    expected = model.state_dict()
    path = tmp_path / "ckpt.pt"
    _save_and_forget({"epoch": 3, "model": model, "optimizer": torch.optim.Adam(model.parameters()).state_dict()},
                     path, pkg)
    found = torchckpt.find_state_dicts(torchckpt.load(path))
    assert [c.path for c in found] == ["model"]
    assert_same_state(expected, found[0].state_dict)


def test_trust_uses_real_class_when_available(tmp_path, vanished_module):
    make, _ = vanished_module
    model = make()
    path = tmp_path / "m.pt"
    torch.save(model, path)
    obj = torchckpt.load(path, trust=True)
    assert type(obj).__name__ == "Net" and isinstance(obj, torch.nn.Module)
    assert_same_state(model.state_dict(), obj.state_dict())
    partial = torchckpt.load(path, allow=["torch.nn.modules.*"])
    assert isinstance(partial, torchckpt.Stub) and isinstance(partial.heads, torch.nn.ModuleDict)


def test_benign_framework_objects_load_as_stubs(tmp_path):
    import enum
    import functools
    import types

    mod = types.ModuleType("fw_fake")
    sys.modules["fw_fake"] = mod

    class Color(enum.Enum):
        RED = 1

    class AttributeDict(dict):
        pass

    class DictConfig:
        def __init__(self):
            self._content = {"lr": 0.1}

    for cls in (Color, AttributeDict, DictConfig):
        cls.__module__ = "fw_fake"
        cls.__qualname__ = cls.__name__
        setattr(mod, cls.__name__, cls)
    hp = AttributeDict(lr=0.01, opt=functools.partial(torch.optim.Adam, lr=1e-3))
    obj = {"hyper_parameters": hp, "color": Color.RED, "cfg": DictConfig(), "state_dict": {"w": torch.ones(2)}}
    path = tmp_path / "lightning.ckpt"
    torch.save(obj, path)
    del sys.modules["fw_fake"]
    out = torchckpt.load(path)
    assert out["hyper_parameters"]["lr"] == 0.01
    assert out["color"].stub_args == (1,)
    assert out["cfg"]._content == {"lr": 0.1}
    assert torch.equal(out["state_dict"]["w"], torch.ones(2))
    plain = torchckpt.stub_to_plain(out["color"])
    assert plain == {"__class__": "fw_fake.Color", "args": (1,)}


def test_torch_03_style_parameters(tmp_path, vanished_module, monkeypatch):
    """torch <= 0.3 pickled Parameters as REDUCE(Parameter, (data,)) + BUILD((requires_grad, volatile, hooks))."""
    from collections import OrderedDict

    make, pkg = vanished_module
    model = make()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(torch.nn.Parameter, "__reduce_ex__", lambda self, proto: (
        torch.nn.parameter.Parameter, (self.data,), (self.requires_grad, False, OrderedDict())))
    path = tmp_path / "old_whole.pth"
    _save_and_forget(model, path, pkg)
    monkeypatch.undo()
    obj = torchckpt.load(path)
    sd = torchckpt.state_dict_of(obj)
    assert_same_state(expected, sd)
    assert obj.stem._modules["0"]._parameters["weight"].requires_grad
    assert {t.key for t in torchckpt.inspect(path).tensors} == set(expected)
