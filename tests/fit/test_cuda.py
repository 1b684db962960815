"""CUDA paths: loading onto a GPU, device maps, load_into a CUDA model, and bit-exact resume with CUDA state.

These run only where a CUDA device exists (CI has none; the developers run them on a lent GPU
machine). Each compares against what torch itself gives on the same device.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import torchckpt
from torchckpt.demo.samples import saved_on_device, write_py2_legacy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), k


@pytest.mark.parametrize("layout", ["zip", "legacy", "py2"])
def test_load_to_cuda(tmp_path, layout):
    sd = _model().state_dict()
    path = tmp_path / f"m.{layout}"
    if layout == "py2":
        with open(path, "wb") as fh:
            write_py2_legacy(sd, fh)
    else:
        torch.save(sd, path, _use_new_zipfile_serialization=layout == "zip")
    got = torchckpt.load(path, map_location="cuda")
    assert all(t.device.type == "cuda" for t in got.values())
    _same(got, sd)


def test_saved_on_cuda3_maps_to_the_gpu_we_have(tmp_path):
    sd = _model().state_dict()
    path = tmp_path / "gpu3.pt"
    with saved_on_device("cuda:3"):
        torch.save(sd, path)
    on_cpu, info = torchckpt.load(path, return_info=True)
    assert all(t.device.type == "cpu" for t in on_cpu.values())
    mapped = torchckpt.load(path, map_location={"cuda:3": "cuda:0"})
    assert all(t.device == torch.device("cuda:0") for t in mapped.values())
    _same(mapped, sd)
    if torch.cuda.device_count() < 4:  # the saved device is absent: restored devices fall back to the CPU
        restored, info = torchckpt.load(path, map_location=None, return_info=True)
        assert all(t.device.type == "cpu" for t in restored.values())
        assert any("cuda:3" in n for n in info.notes)


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
def test_load_into_cuda_model(tmp_path, fmt):
    src = _model()
    sd = src.state_dict()
    path = tmp_path / f"m.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path,
                   _use_new_zipfile_serialization=fmt == "zip")
    target = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)).cuda()
    report = torchckpt.load_into(target, path)
    assert report.ok
    assert all(p.device.type == "cuda" for p in target.state_dict().values())
    _same(target.state_dict(), sd)


def test_load_into_half_cuda_model_casts_and_reports(tmp_path):
    sd = _model().state_dict()
    path = tmp_path / "m.pt"
    torch.save(sd, path)
    target = _model().cuda().half()
    report = torchckpt.load_into(target, path)
    assert report.cast and all(t.dtype == torch.float16 for k, t in target.state_dict().items()
                               if not k.endswith("num_batches_tracked"))
    for k, v in sd.items():
        assert torch.equal(target.state_dict()[k].cpu(), v.to(target.state_dict()[k].dtype)), k


def test_resume_cuda_training_is_bit_exact(tmp_path):
    def run(steps: int, model: nn.Module, opt: torch.optim.Optimizer) -> list[float]:
        losses = []
        for _ in range(steps):
            x = torch.randn(8, 16, device="cuda")
            loss = model(x).pow(2).mean() + torch.rand((), device="cuda") * 0  # draws from the CUDA RNG
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
        return losses

    torch.manual_seed(1)
    torch.cuda.manual_seed_all(1)
    model = _model().cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    run(3, model, opt)
    path = tmp_path / "ckpt.pt"
    torchckpt.save(str(path), model=model, optimizer=opt, step=3)
    expected = run(4, model, opt)

    fresh = _model().cuda()
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    state = torchckpt.resume(str(path), model=fresh, optimizer=fresh_opt)
    assert state.step == 3
    assert all(v.device.type == "cuda" for s in fresh_opt.state.values() for v in s.values() if torch.is_tensor(v)
               and v.dim() > 0)
    assert run(4, fresh, fresh_opt) == expected


def test_async_checkpointer_from_cuda(tmp_path):
    model = _model().cuda()
    ckpt = torchckpt.Checkpointer(str(tmp_path / "run"), keep_last=2, async_save=True)
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ckpt.save(step, model=model)
        expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    ckpt.wait()
    fresh = _model().cuda()
    state = ckpt.resume(model=fresh)
    assert state.step == 2
    _same(fresh.state_dict(), expected)


def test_report_and_diff_of_a_cuda_checkpoint(tmp_path):
    sd = {k: v.cuda() for k, v in _model().state_dict().items()}
    buf = io.BytesIO()
    torch.save(sd, buf)
    a = tmp_path / "a.pt"
    a.write_bytes(buf.getvalue())
    b = tmp_path / "b.pt"
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}, b)
    d = torchckpt.diff(a, b, values=True)
    assert not d.equal and len(d.changed) == sum(1 for v in sd.values() if v.is_floating_point())
    info = torchckpt.inspect(a)
    assert any("cuda" in e for e in info.evidence)
