"""load_into: every scenario of the issue on generated checkpoints; outputs equal where weights loaded."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import torchckpt
from torchckpt import AmbiguousCheckpointError, StateDictMismatchError


class Net(nn.Module):
    def __init__(self, conv2_out=16, classes=1000, conv3=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, conv2_out, 3, padding=1)
        self.conv3 = nn.Conv2d(conv2_out, conv2_out, 1) if conv3 else None
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(conv2_out, classes)

    def features(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return x

    def forward(self, x):
        x = torch.relu(self.conv2(self.features(x)))
        if self.conv3 is not None:
            x = self.conv3(x)
        return self.fc(self.pool(x).flatten(1))


def make(seed=0, **kw):
    torch.manual_seed(seed)
    model = Net(**kw).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.5, 2)
        model.bn1.num_batches_tracked.fill_(11)
    return model


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def same_outputs(a, b):
    a, b = getattr(a, "module", a), getattr(b, "module", b)
    with torch.no_grad():
        return torch.equal(a.eval()(X), b.eval()(X))


@pytest.mark.parametrize("saved_wrapped", [False, True], ids=["saved-single", "saved-dp"])
@pytest.mark.parametrize("load_wrapped", [False, True], ids=["into-single", "into-dp"])
def test_four_single_multi_gpu_combinations(tmp_path, saved_wrapped, load_wrapped):
    src = make(0)
    saved = nn.DataParallel(src) if saved_wrapped else src
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": saved.state_dict()}, path)
    target = make(1)
    target = nn.DataParallel(target) if load_wrapped else target
    report = torchckpt.load_into(target, path)
    assert report.ok and len(report.loaded) == report.model_keys
    assert same_outputs(src, target)
    if saved_wrapped != load_wrapped:
        assert report.renamed and "module." in str(report)


def test_layer_added_strict_and_not_strict(tmp_path):
    src = make(0)
    path = tmp_path / "old.pt"
    torch.save(src.state_dict(), path)
    bigger = make(1, conv3=True)
    before = {k: v.clone() for k, v in bigger.state_dict().items()}
    with pytest.raises(StateDictMismatchError) as info:
        torchckpt.load_into(bigger, path)
    assert "conv3.*" in str(info.value) or "conv3.weight" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in bigger.state_dict().items()), "strict must not half-load"
    report = torchckpt.load_into(bigger, path, strict=False)
    assert sorted(report.missing) == ["conv3.bias", "conv3.weight"] and not report.unexpected
    assert torch.equal(bigger.conv1.weight, src.conv1.weight) and torch.equal(bigger.conv3.weight, before["conv3.weight"])


def test_layer_removed_reports_unexpected(tmp_path):
    src = make(0, conv3=True)
    smaller = make(1)
    report = torchckpt.load_into(smaller, src.state_dict(), strict=False)
    assert sorted(report.unexpected) == ["conv3.bias", "conv3.weight"]
    assert torch.equal(smaller.fc.weight, src.fc.weight)


def test_conv_resized_3_to_32_channels(tmp_path):
    src = make(0, conv2_out=3, classes=10)
    target = make(1, conv2_out=32, classes=10)
    path = tmp_path / "c.pt"
    torch.save(src.state_dict(), path)
    with pytest.raises(StateDictMismatchError) as info:
        torchckpt.load_into(target, path)
    message = str(info.value)
    assert "conv2.weight" in message and "[3, 8, 3, 3]" in message and "[32, 8, 3, 3]" in message
    assert "fc.weight" in message and 'on_mismatch="skip"' in message
    init = target.conv2.weight.detach().clone()
    report = torchckpt.load_into(target, path, on_mismatch="skip", strict=False)
    assert {m.key for m in report.mismatched} == {"conv2.weight", "conv2.bias", "fc.weight"}
    assert torch.equal(target.conv2.weight, init) and torch.equal(target.conv1.weight, src.conv1.weight)
    report = torchckpt.load_into(target, path, on_mismatch="copy_overlap", strict=False)
    assert torch.equal(target.conv2.weight[:3], src.conv2.weight)
    assert torch.equal(target.conv2.weight[3:], init[3:])


def test_classifier_1000_to_10(tmp_path):
    src = make(0, classes=1000)
    target = make(1, classes=10)
    path = tmp_path / "imagenet.pth"
    torch.save({"model": src.state_dict()}, path)
    with pytest.raises(StateDictMismatchError):
        torchckpt.load_into(target, path)
    report = torchckpt.load_into(target, path, on_mismatch="skip", strict=False)
    assert [m.key for m in report.mismatched] == ["fc.weight", "fc.bias"]
    assert torch.equal(target.conv2.weight, src.conv2.weight)
    with torch.no_grad():
        assert torch.equal(target.features(X), src.features(X))
    grown = make(1, classes=1200)
    torchckpt.load_into(grown, path, on_mismatch="copy_overlap", strict=False)
    assert torch.equal(grown.fc.weight[:1000], src.fc.weight)  # old classes kept


def test_compiled_model_state_dict(tmp_path):
    src = make(0)
    compiled_sd = torch.compile(src).state_dict()
    assert next(iter(compiled_sd)).startswith("_orig_mod.")
    target = make(1)
    report = torchckpt.load_into(target, compiled_sd)
    assert report.ok and same_outputs(src, target) and "torch.compile" in str(report)
    into_compiled = torch.compile(make(2))
    assert torchckpt.load_into(into_compiled, src.state_dict()).ok
    assert torch.equal(into_compiled._orig_mod.fc.weight, src.fc.weight)
    ddp_compiled = {"module._orig_mod." + k: v for k, v in src.state_dict().items()}
    assert torchckpt.load_into(make(3), ddp_compiled).ok


def test_lightning_style_checkpoint(tmp_path):
    src = make(0)
    ckpt = {"epoch": 9, "global_step": 900, "pytorch-lightning_version": "2.1.0",
            "state_dict": {f"model.{k}": v for k, v in src.state_dict().items()},
            "optimizer_states": [{"state": {}, "param_groups": []}], "hyper_parameters": {"lr": 0.1}}
    path = tmp_path / "epoch=9.ckpt"
    torch.save(ckpt, path)
    target = make(1)
    report = torchckpt.load_into(target, path)
    assert report.ok and same_outputs(src, target) and report.weights_path == "state_dict"


def test_ambiguous_checkpoint_raises_and_key_chooses(tmp_path):
    a, b = make(0), make(5)
    path = tmp_path / "ema.pth"
    torch.save({"state_dict": a.state_dict(), "state_dict_ema": b.state_dict()}, path)
    with pytest.raises(AmbiguousCheckpointError) as info:
        torchckpt.load_into(make(1), path)
    assert set(info.value.candidates) == {"state_dict", "state_dict_ema"} and "key=" in str(info.value)
    target = make(1)
    torchckpt.load_into(target, path, key="state_dict_ema")
    assert same_outputs(b, target)


def test_best_fitting_candidate_is_chosen_and_said(tmp_path):
    src = make(0)
    other = {"w": torch.ones(3)}
    target = make(1)
    report = torchckpt.load_into(target, {"aux": other, "net": src.state_dict()})
    assert report.weights_path == "net" and any("also found" in n for n in report.notes)


@pytest.mark.parametrize("ckpt_dtype", [torch.float16, torch.bfloat16])
def test_half_checkpoint_into_float_model_and_reverse(ckpt_dtype):
    src = make(0)
    half = {k: (v.to(ckpt_dtype) if v.is_floating_point() else v) for k, v in src.state_dict().items()}
    target = make(1)
    report = torchckpt.load_into(target, half)
    assert report.cast and all(b == "float32" for _, _, b in report.cast)
    assert torch.equal(target.conv1.weight, half["conv1.weight"].float())
    low = make(2).to(ckpt_dtype)
    report = torchckpt.load_into(low, src.state_dict())
    assert torch.equal(low.fc.weight, src.fc.weight.to(ckpt_dtype))
    with pytest.raises(StateDictMismatchError):
        torchckpt.load_into(make(3), half, dtype="error")


def test_meta_device_model_is_materialised(tmp_path):
    src = make(0)
    path = tmp_path / "m.pt"
    torch.save(src.state_dict(), path)
    with torch.device("meta"):
        target = Net()
    report = torchckpt.load_into(target, path)
    assert report.ok
    assert all(p.device.type == "cpu" for p in target.parameters())
    assert all(b.device.type == "cpu" for b in target.buffers())
    assert same_outputs(src, target)
    assert isinstance(target.conv1.weight, nn.Parameter) and target.conv1.weight.requires_grad


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weights_saved_once(tmp_path):
    torch.manual_seed(0)
    src = TiedLM()
    sd = {k: v for k, v in src.state_dict().items() if k != "head.weight"}  # HF-style: tied key dropped
    torch.manual_seed(1)
    target = TiedLM()
    report = torchckpt.load_into(target, sd)
    assert report.ok and report.tied == {"head.weight": "embed.weight"}
    assert target.head.weight is target.embed.weight and torch.equal(target.head.weight, src.embed.weight)
    with torch.device("meta"):
        meta = TiedLM()
    torchckpt.load_into(meta, sd)
    assert meta.head.weight is meta.embed.weight, "assign must keep ties"


def test_pre_041_checkpoint_without_num_batches_tracked():
    src = make(0)
    old = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    target = make(1)
    report = torchckpt.load_into(target, old)
    assert report.ok and report.ignored == ["bn1.num_batches_tracked"]
    assert torch.equal(target.bn1.running_var, src.bn1.running_var)


class Legacy(nn.Module):
    """A custom module whose _load_from_state_dict renames an old key (must keep working)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3))
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("tmp", torch.zeros(1), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = prefix + "w_old"
        if old in state_dict:
            state_dict[prefix + "weight"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def test_custom_load_hooks_and_non_persistent_buffers():
    model = nn.Sequential(Legacy())
    seen = []
    model.register_load_state_dict_post_hook(lambda module, keys: seen.append(keys))
    report = torchckpt.load_into(model, {"0.weight": torch.arange(3.0), "0.scale": torch.full((1,), 2.0)})
    assert report.ok and torch.equal(model[0].weight, torch.arange(3.0)) and seen
    assert "0.tmp" not in report.missing


def test_python2_checkpoint(tmp_path):
    from torchckpt.demo.samples import write_py2_legacy

    src = make(0)
    path = tmp_path / "py2.pth.tar"
    write_py2_legacy({"epoch": 90, "arch": "net", "state_dict": src.state_dict(),
                      "best_prec1": np.float64(0.7)}, path, location="cuda:0")
    target = make(1)
    assert torchckpt.load_into(target, path).ok and same_outputs(src, target)


def test_whole_model_pickle_source(tmp_path):
    src = make(0)
    path = tmp_path / "whole.pt"
    torch.save(nn.DataParallel(src), path)
    target = make(1)
    assert torchckpt.load_into(target, path).ok and same_outputs(src, target)


def test_dry_run_does_not_touch_the_model():
    src, target = make(0), make(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = torchckpt.load_into(target, src.state_dict(), dry_run=True)
    assert report.ok and report.dry_run and not report.applied and "would load" in str(report)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


class WithBackbone(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 2)


def test_prefix_full_network_into_submodule_and_reverse():
    full = WithBackbone(0)
    part = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    report = torchckpt.load_into(part, full.state_dict(), prefix="backbone.", strict=False)
    assert torch.equal(part[0].weight, full.backbone[0].weight) and not report.missing
    other = WithBackbone(3)
    report = torchckpt.load_into(other, part.state_dict(), prefix="backbone", strict=False)
    assert torch.equal(other.backbone[0].weight, full.backbone[0].weight)
    assert sorted(report.missing) == ["head.bias", "head.weight"]


def test_rename_rules_are_reported():
    src = make(0)
    old = {k.replace("conv", "convolution_"): v for k, v in src.state_dict().items()}
    target = make(1)
    report = torchckpt.load_into(target, old, rename={r"^convolution_(\d)": r"conv\1"})
    assert report.ok and same_outputs(src, target)
    assert all("rule" in rule for _, rule in report.renamed.values())


def test_report_groups_by_prefix():
    big = nn.Sequential(OrderedDict((f"block{i}", nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
                                    for i in range(75)))
    sd = {k: v for k, v in big.state_dict().items() if not k.startswith("block7")}
    fresh = nn.Sequential(OrderedDict((f"block{i}", nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
                                      for i in range(75)))
    report = torchckpt.load_into(fresh, sd, strict=False)
    text = str(report)
    assert len(report.missing) == 24 and "block7.* (4)" in text and "block70.* (4)" in text
    assert len(text.splitlines()) < 10
    assert report.to_dict()["missing"] == report.missing


def test_numpy_weights_into_model():
    lin = nn.Linear(3, 2)
    report = torchckpt.load_into(lin, {"weight": np.ones((2, 3), np.float64), "bias": np.zeros(2, np.float32)})
    assert report.ok and torch.equal(lin.weight, torch.ones(2, 3))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layer = nn.Linear(4, 4)


class Classifier(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.bert = Encoder()
        self.classifier = nn.Linear(4, classes)


def test_whole_network_into_its_part_and_back_without_prefix():
    torch.manual_seed(0)
    full = Classifier()
    encoder = Encoder()
    report = torchckpt.load_into(encoder, full.state_dict(), strict=False)
    assert torch.equal(encoder.layer.weight, full.bert.layer.weight) and not report.missing
    assert report.unexpected == ["classifier.weight", "classifier.bias"] and "'bert.'" in str(report)
    torch.manual_seed(1)
    other = Classifier(classes=7)
    report = torchckpt.load_into(other, encoder.state_dict(), strict=False)
    assert torch.equal(other.bert.embed.weight, full.bert.embed.weight)
    assert sorted(report.missing) == ["classifier.bias", "classifier.weight"]
    with pytest.raises(StateDictMismatchError):  # strict still says that the classifier is missing
        torchckpt.load_into(Classifier(), encoder.state_dict())
