"""Torch functions stored in whole models (activations as attributes) load as inert references: the weights
load, scan finds nothing dangerous, nothing is called; any other use of builtins.getattr stays unsafe."""

from __future__ import annotations

import collections
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchckpt
from torchckpt.errors import UnsafeCheckpointError


class ActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.act = torch.sigmoid                   # getattr(torch._C._VariableFunctionsClass, "sigmoid")
        self.act2 = F.relu                         # torch.nn.functional.relu
        self.act3 = torch._C._nn.gelu              # torch._C._nn.gelu
        self.acts = [torch.tanh, F.silu]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = ActNet()
    path = tmp_path / "act.pt"
    torch.save(model, path)
    return model, path


def test_function_attributes_load_as_references(saved):
    model, path = saved
    loaded = torchckpt.load(path)
    refs = {"act": "torch.sigmoid", "act2": "torch.nn.functional.relu", "act3": "torch._C._nn.gelu"}
    for attr, name in refs.items():
        ref = getattr(loaded, attr)
        assert ref.qualified_name == name and not isinstance(ref, nn.Module)
        with pytest.raises(TypeError, match="inert reference"):
            ref(torch.zeros(1))
    assert [r.qualified_name for r in loaded.acts] == ["torch.tanh", "torch.nn.functional.silu"]
    state = torchckpt.state_dict_of(loaded)
    assert list(state) == ["fc.weight", "fc.bias"]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_scan_finds_nothing_dangerous(saved):
    _, path = saved
    report = torchckpt.scan(path)
    assert report.status == "clean", report.render()
    assert not [g for g in report.files[0].globals if g.verdict.value == "dangerous"]


def test_load_into_from_a_model_with_function_attributes(saved):
    model, path = saved
    torch.manual_seed(1)
    fresh = ActNet()
    torchckpt.load_into(fresh, path)
    x = torch.randn(4, 3)
    assert torch.equal(fresh(x), model(x))


def test_trust_gives_the_real_functions(saved):
    _, path = saved
    loaded = torchckpt.load(path, trust=True)
    assert loaded.act is torch.sigmoid and loaded.act2 is F.relu


# --------------------------------------------------------------------------- attacks
class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


GETATTR_ATTACKS = {
    "private_name": (torch._C._VariableFunctionsClass, "_cast_Byte"),
    "class_name": (torch._C._VariableFunctionsClass, "Tensor"),
    "dunder": (torch._C._VariableFunctionsClass, "__class__"),
    "other_class": (collections.OrderedDict, "fromkeys"),
    "string_receiver": ("os", "system"),
    "with_default": (torch._C._VariableFunctionsClass, "sigmoid", None),
    "not_a_name": (torch._C._VariableFunctionsClass, 7),
}


@pytest.mark.parametrize("name", sorted(GETATTR_ATTACKS))
def test_other_getattr_uses_stay_unsafe(tmp_path, name):
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(pickle.dumps({"x": _Reduce(getattr, GETATTR_ATTACKS[name])}, protocol=2))
    with pytest.raises(UnsafeCheckpointError) as info:
        torchckpt.load(path)
    assert info.value.global_name == "builtins.getattr"
    report = torchckpt.scan(path)
    assert report.status == "findings"
    assert [g.fullname for g in report.files[0].globals if g.verdict.value == "dangerous"] == ["builtins.getattr"]


def test_a_pickle_calling_a_referenced_function_only_records_it(tmp_path):
    path = tmp_path / "call.pkl"
    path.write_bytes(pickle.dumps({"y": _Reduce(torch.nn.functional.relu, ("not a tensor",))}, protocol=2))
    got = torchckpt.load(path)["y"]
    assert type(got).__name__ == "relu" and got.stub_args == ("not a tensor",)  # a stub record, nothing ran


def test_convert_keeps_the_weights_and_names_the_functions(saved, tmp_path):
    model, path = saved
    report = torchckpt.convert(path, tmp_path / "out.pt")
    assert report.verified
    out = torch.load(tmp_path / "out.pt")  # plain torch, weights_only
    assert all(torch.equal(out[k], v) for k, v in model.state_dict().items())
