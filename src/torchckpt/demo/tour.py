"""``torchckpt tour``: generate a checkpoint for every real-world scenario, then load and inspect it.

Each scenario writes a file the way real code does (or did, for old eras), tries what a user would
try first (``torch.load``), then shows what torchckpt found and fixed. Used as the project's main job.

Imports of torch (and safetensors.torch, which imports it) stay inside the scenario functions: importing
this module, as the ``tour`` command does, costs no torch import.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import sys
import tempfile
import textwrap
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import CheckpointError
from ..fit.load_into import load_into
from ..fit.select import find_state_dicts
from ..read.load import load
from ..tools.convert import convert
from ..tools.inspection import inspect as inspect_file
from ..tools.scanning import scan
from ..train import sidecar
from ..train.resume import resume
from ..train.save import save
from .samples import saved_on_device, write_py2_legacy

__all__ = ["Scenario", "Outcome", "TourReport", "run_tour", "SCENARIOS"]


@dataclass
class Scenario:
    name: str
    filename: str
    make: Callable[[str], None]
    expect_error: str | None = None  # CheckpointError subclass name torchckpt must raise
    check: Callable[[Any, str], list[str]] | None = None  # extra actions -> result lines


@dataclass
class Outcome:
    scenario: str
    file: str
    format: str
    torch_load: str
    torchckpt: str
    details: list[str] = field(default_factory=list)
    ok: bool = True


def _net() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(OrderedDict([
        ("conv1", torch.nn.Conv2d(3, 8, 3)), ("bn1", torch.nn.BatchNorm2d(8)), ("relu", torch.nn.ReLU()),
        ("pool", torch.nn.AdaptiveAvgPool2d(1)), ("flat", torch.nn.Flatten()), ("fc", torch.nn.Linear(8, 10))]))


def _save(obj_factory: Callable[[], Any], **kwargs: Any) -> Callable[[str], None]:
    def make(path: str) -> None:
        import torch

        torch.save(obj_factory(), path, **kwargs)
    return make


def _training_dict() -> Any:
    import torch

    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    return {"epoch": 12, "arch": "smallnet", "model_state_dict": net.state_dict(),
            "optimizer_state_dict": opt.state_dict(), "loss": 0.4321, "best_acc": np.float64(0.9137),
            "args": argparse.Namespace(lr=0.1, batch_size=64, data="/data/imagenet")}


def _make_py2(path: str) -> None:
    net = _net()
    write_py2_legacy({"epoch": 90, "arch": "resnet18", "state_dict": net.state_dict(),
                      "best_prec1": np.float64(69.758), "optimizer": {"lr": 0.001}}, path, location="cuda:0")


def _make_whole_model(path: str) -> None:
    import torch

    code = textwrap.dedent("""
        import torch
        class TinyNet(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
                self.head = torch.nn.Linear(4, 2)
    """)
    with tempfile.TemporaryDirectory() as tmp:
        pkg = os.path.join(tmp, "tour_models")
        os.makedirs(pkg)
        with open(os.path.join(pkg, "__init__.py"), "w") as fh:
            fh.write(code)
        sys.path.insert(0, tmp)
        try:
            import tour_models  # type: ignore[import-not-found]

            torch.save(tour_models.TinyNet(), path)
        finally:
            sys.path.remove(tmp)
            sys.modules.pop("tour_models", None)


def _make_cuda3(path: str) -> None:
    import torch

    with saved_on_device("cuda:3"):
        torch.save(_net().state_dict(), path)


def _make_safetensors(path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in _net().state_dict().items()}, path, metadata={"format": "pt"})


def _make_torchscript(path: str) -> None:
    import torch

    torch.jit.trace(_net().eval(), torch.randn(1, 3, 8, 8)).save(path)


def _make_detectron_pkl(path: str) -> None:
    blobs = {"conv1_w": np.ones((8, 3, 3, 3), np.float32), "fc_b": np.zeros(10, np.float32)}
    with open(path, "wb") as fh:
        pickle.dump({"blobs": blobs, "model_iter": 90000}, fh, protocol=2)


def _text_file(content: bytes) -> Callable[[str], None]:
    def make(path: str) -> None:
        with open(path, "wb") as fh:
            fh.write(content)
    return make


def _make_truncated(path: str) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(_net().state_dict(), buf)
    with open(path, "wb") as fh:
        fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])


def _make_malicious(path: str) -> None:
    canary = path + ".canary"

    class Payload:
        def __reduce__(self) -> Any:
            return os.system, (f"touch {canary}",)

    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {}, "x": Payload()}, fh, protocol=2)


def _net_classes(classes: int) -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(OrderedDict([
        ("conv1", torch.nn.Conv2d(3, 8, 3)), ("pool", torch.nn.AdaptiveAvgPool2d(1)), ("flat", torch.nn.Flatten()),
        ("fc", torch.nn.Linear(8, classes))]))


def _check_load_into(**kwargs: Any) -> Callable[[Any, str], list[str]]:
    def check(obj: Any, path: str) -> list[str]:
        model = _net_classes(10) if kwargs.pop("classes10", False) else _net()
        report = load_into(model, path, **kwargs)
        return ["load_into: " + line.strip() for line in str(report).splitlines()]
    return check


def _make_dp(path: str) -> None:
    import torch

    torch.save({"epoch": 5, "state_dict": torch.nn.DataParallel(_net()).state_dict()}, path)


def _make_imagenet(path: str) -> None:
    import torch

    torch.save(_net_classes(1000).state_dict(), path)


def _make_training(path: str) -> None:
    import torch

    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    save(path, model=torch.nn.DataParallel(net), optimizer=opt, epoch=3, step=300, metrics={"val_loss": 0.42})


def _check_resume(obj: Any, path: str) -> list[str]:
    import torch

    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    state = resume(path, model=net, optimizer=opt)
    return [f"resume: epoch {state.epoch}, step {state.step}, metrics {state.metrics}; model, optimizer and "
            f"{len(state.rng or {})} RNG states restored (sha-checked: {os.path.exists(sidecar.path_of(path))})"]


def _check_convert(obj: Any, path: str) -> list[str]:
    report = convert(path, path + ".safetensors", weights_only=True)
    return ["convert: " + line.strip() for line in str(report).splitlines()[:2]]


_LFS = (b"version https://git-lfs.github.com/spec/v1\n"
        b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 102502400\n")
_HTML = b"<!DOCTYPE html><html><head><title>Sign in - Google Accounts</title></head><body></body></html>"

SCENARIOS = [
    Scenario("state_dict, zip format", "resnet_state.pt", _save(lambda: _net().state_dict())),
    Scenario("training dict with Namespace + numpy scalar", "checkpoint.pth.tar", _save(_training_dict)),
    Scenario("legacy stream format (torch 0.4-1.5)", "legacy.pth",
             _save(lambda: _net().state_dict(), _use_new_zipfile_serialization=False)),
    Scenario("Python 2 era file, saved on cuda:0", "py2_model_best.pth.tar", _make_py2, check=_check_convert),
    Scenario("DataParallel checkpoint into a single-GPU model", "dp_best.pth", _make_dp,
             check=_check_load_into()),
    Scenario("classifier resized 1000 -> 10 classes", "imagenet.pth", _make_imagenet,
             check=_check_load_into(classes10=True, strict=False, on_mismatch="skip")),
    Scenario("training checkpoint: atomic save, then resume", "train.ckpt", _make_training, check=_check_resume),
    Scenario("whole model, its class's module deleted", "whole_model.pkl", _make_whole_model),
    Scenario("saved on cuda:3, loaded on a CPU machine", "gpu3.ckpt", _make_cuda3),
    Scenario("safetensors", "model.safetensors", _make_safetensors),
    Scenario("TorchScript archive", "traced.t7", _make_torchscript),
    Scenario("Detectron-style numpy pickle", "R-50.pkl", _make_detectron_pkl),
    Scenario("git-lfs pointer instead of the model", "pytorch_model.bin", _text_file(_LFS), "NotACheckpointError"),
    Scenario("HTML page saved by a failed download", "weights.pth", _text_file(_HTML), "NotACheckpointError"),
    Scenario("truncated download", "partial.pt", _make_truncated, "TruncatedCheckpointError"),
    Scenario("malicious pickle (os.system)", "evil.bin", _make_malicious, "UnsafeCheckpointError"),
]


def _torch_load_result(path: str) -> str:
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(path, weights_only=True, map_location=None)
        return "ok"
    except Exception as exc:  # noqa: BLE001 - shown to the user as the baseline
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {first[:70]}"


def run_scenario(sc: Scenario, folder: str) -> Outcome:
    path = os.path.join(folder, sc.filename)
    sc.make(path)
    baseline = _torch_load_result(path)
    outcome = Outcome(sc.name, sc.filename, "", baseline, "")
    scanned = scan(path).files[0]
    scan_line = f"scan: {scanned.status}" + (f" ({scanned.findings[0].message})" if scanned.findings else "")
    try:
        obj, info = load(path, return_info=True)
    except CheckpointError as exc:
        outcome.format = "-"
        outcome.torchckpt = f"{type(exc).__name__}"
        outcome.details.append(str(exc).replace(path, sc.filename))
        outcome.ok = type(exc).__name__ == sc.expect_error
        outcome.details.append(scan_line)
        if sc.expect_error == "UnsafeCheckpointError":
            outcome.ok = outcome.ok and scanned.status == "findings"
            ran = os.path.exists(path + ".canary")
            outcome.details.append("payload did not run" if not ran else "PAYLOAD RAN")
            outcome.ok = outcome.ok and not ran
        return outcome
    if sc.expect_error:
        outcome.ok = False
        outcome.torchckpt = f"loaded, but {sc.expect_error} was expected"
        return outcome
    report = inspect_file(path)
    outcome.format = info.description
    candidates = find_state_dicts(obj)
    weights = ", ".join(f"{c.path or '<root>'} ({len(c.state_dict)} tensors)" for c in candidates) or "none"
    outcome.torchckpt = f"ok: {len(report.tensors)} tensors, {report.total_parameters:,} params"
    outcome.details.extend(e for e in info.evidence[1:])
    outcome.details.append(f"weights at: {weights}")
    outcome.details.extend(f"fixed: {n}" for n in info.notes)
    if report.stubbed_classes:
        outcome.details.append(f"stubbed (not imported): {', '.join(report.stubbed_classes[:3])}")
    outcome.details.append(scan_line)
    outcome.ok = scanned.status == "clean"
    if sc.check is not None:
        outcome.details.extend(line.replace(folder + os.sep, "") for line in sc.check(obj, path))
    return outcome


@dataclass
class TourReport:
    """What the tour did: one :class:`Outcome` per scenario. ``render()`` is what ``torchckpt tour`` prints."""

    outcomes: list[Outcome]

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)

    def to_dict(self) -> list[dict[str, Any]]:
        return [dict(o.__dict__) for o in self.outcomes]

    def render(self) -> str:
        lines = []
        for i, o in enumerate(self.outcomes, 1):
            lines.append(f"{i:2d}. {o.scenario}  ({o.file})  {'ok ' if o.ok else 'FAIL'}")
            if o.format and o.format != "-":
                lines.append(f"    format      {o.format}")
            lines.append(f"    torch.load  {o.torch_load}")
            lines.append(f"    torchckpt   {o.torchckpt}")
            lines += [f"      {sub}" for line in o.details for sub in line.splitlines()]
        failed = [o.scenario for o in self.outcomes if not o.ok]
        lines.append(f"\n{len(self.outcomes) - len(failed)} of {len(self.outcomes)} scenarios behaved as expected"
                     + (f"; failed: {', '.join(failed)}" if failed else "."))
        return "\n".join(lines)

    __str__ = render


def run_tour(folder: str, scenarios: list[Scenario] | None = None) -> TourReport:
    """Run every scenario (or those given) with its files written into ``folder``."""
    return TourReport([run_scenario(sc, folder) for sc in (scenarios or SCENARIOS)])
