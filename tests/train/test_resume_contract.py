"""resume() on hand-written and hostile training files: what it keeps, what it names, what it refuses."""

from __future__ import annotations

import os
import random
import struct
import zipfile

import numpy as np
import pytest
import torch

import torchckpt
from torchckpt import CorruptCheckpointError, ResumeError, UnsafeCheckpointError
from torchckpt.train.training import capture, write_payload


def _trained_sgd(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    return opt


def test_tutorial_dict_keeps_unknown_keys_and_names_the_file(tmp_path, net):
    # the PyTorch ImageNet example's checkpoint
    opt = _trained_sgd(net)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 7, "arch": "resnet18", "state_dict": net.state_dict(), "best_prec1": torch.tensor(71.5),
                "optimizer": opt.state_dict()}, path)
    from conftest import small_net

    fresh = small_net()
    state = torchckpt.resume(path, model=fresh, optimizer=torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9))
    assert state.epoch == 7
    assert set(state.extra) == {"arch", "best_prec1"}
    assert state.extra["arch"] == "resnet18" and float(state.extra["best_prec1"]) == 71.5
    assert state.report.source == str(path) and str(path) in str(state.report)
    assert "<in-memory" not in str(state.report)


def test_weights_that_do_not_fit_name_the_file(tmp_path, net):
    torch.save({"epoch": 1, "state_dict": net.state_dict()}, tmp_path / "c.pth")
    other = torch.nn.Linear(3, 3)
    with pytest.raises(torchckpt.CheckpointError) as info:
        torchckpt.resume(tmp_path / "c.pth", model=other)
    assert info.value.path == str(tmp_path / "c.pth")


def test_sgd_state_into_adam_names_both_types(tmp_path, net):
    torchckpt.save(tmp_path / "c.pt", model=net, optimizer=_trained_sgd(net))
    with pytest.raises(ResumeError) as info:
        torchckpt.resume(tmp_path / "c.pt", model=net, optimizer=torch.optim.Adam(net.parameters()))
    text = str(info.value)
    assert "SGD" in text and "Adam" in text and "momentum" in text, text
    assert "'step'" not in text


def test_same_optimizer_type_still_resumes(tmp_path, net):
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    torchckpt.save(tmp_path / "c.pt", model=net, optimizer=opt)
    opt2 = torch.optim.AdamW(net.parameters())
    torchckpt.resume(tmp_path / "c.pt", model=net, optimizer=opt2)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def _payload_file(path, net, **changes):
    payload = capture(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), step=3)
    payload.update(changes)
    write_payload(str(path), payload)
    return path


@pytest.mark.parametrize("rng", [
    "not a dict",
    {"python": "garbage"},
    {"python": (3, (1, 2, 3), None)},
    {"numpy": {"bit_generator": "MT19937", "keys": [1, 2], "pos": 0, "has_gauss": 0, "cached_gaussian": 0.0}},
    {"torch": torch.zeros(3, dtype=torch.uint8)},
])
def test_malformed_rng_state_is_a_resume_error_and_changes_nothing(tmp_path, net, rng):
    path = _payload_file(tmp_path / "c.pt", net, rng=rng)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    with pytest.raises(ResumeError) as info:
        torchckpt.resume(path, model=net)
    assert "RNG state" in str(info.value) and str(path) in str(info.value)
    assert random.getstate() == before[0] and np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])


@pytest.mark.parametrize("optimizer", [
    "garbage", {"param_groups": [1, 2]}, {"param_groups": [{"lr": 0.1}]}, {"state": [], "param_groups": []},
    {"state": {}, "param_groups": [{"params": [0, 1, 2, 3, 4, 5], "lr": "fast"}]},
])
def test_malformed_optimizer_state_is_a_resume_error(tmp_path, net, optimizer):
    path = _payload_file(tmp_path / "c.pt", net, optimizer=optimizer)
    with pytest.raises(ResumeError) as info:
        torchckpt.resume(path, model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    assert str(path) in str(info.value)


def _adam_state(net):
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    return opt.state_dict()


def _edit(state, how):
    first = next(iter(state["state"]))
    if how == "exp_avg shape":
        state["state"][first]["exp_avg"] = torch.zeros(7)
    elif how == "exp_avg not a tensor":
        state["state"][first]["exp_avg"] = "x"
    elif how == "exp_avg integer":
        state["state"][first]["exp_avg"] = state["state"][first]["exp_avg"].long()
    elif how == "unknown parameter":
        state["state"][99] = state["state"][first]
    elif how == "entry not a dict":
        state["state"][first] = [1, 2]
    elif how == "duplicate ids":
        state["param_groups"][0]["params"][1] = state["param_groups"][0]["params"][0]
    return state


# each of these loads into torch's optimizer without complaint and fails (or misleads) at step()
@pytest.mark.parametrize("how,why", [("exp_avg shape", r"has shape \[7\]"), ("exp_avg not a tensor", "is a str"),
                                     ("exp_avg integer", "torch.int64 tensor"),
                                     ("unknown parameter", "names parameter 99"),
                                     ("entry not a dict", "is a list, not a dict"),
                                     ("duplicate ids", "distinct")])
def test_optimizer_state_that_would_fail_at_step_is_refused_at_resume(tmp_path, net, how, why):
    path = _payload_file(tmp_path / "c.pt", net, optimizer=_edit(_adam_state(net), how))
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    with pytest.raises(ResumeError, match=why) as info:
        torchckpt.resume(path, model=net, optimizer=opt)
    assert str(path) in str(info.value)
    assert opt.state_dict()["state"] == {}  # nothing was restored


def test_optimizer_state_keyed_by_names_still_resumes(tmp_path, net):
    state = _adam_state(net)
    names = [n for n, _ in net.named_parameters()]
    state["state"] = {names[i]: v for i, v in state["state"].items()}
    state["param_groups"][0]["params"] = names
    path = _payload_file(tmp_path / "c.pt", net, optimizer=state)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    torchckpt.resume(path, model=net, optimizer=opt)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()


@pytest.mark.parametrize("change,why", [({"last_epoch": "three"}, "last_epoch is 'three'"),
                                        ({"base_lrs": [0.1, 0.1]}, "base_lrs"),
                                        ({"optimizer": "x"}, "never saves"),
                                        ({"gamma": [0.5]}, "gamma")])
def test_scheduler_state_of_the_wrong_kind_is_refused(tmp_path, net, change, why):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    path = _payload_file(tmp_path / "c.pt", net, scheduler={**sched.state_dict(), **change})
    fresh = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(net.parameters(), lr=0.1), 2)
    with pytest.raises(ResumeError, match=why) as info:
        torchckpt.resume(path, model=net, scheduler=fresh)
    assert str(path) in str(info.value)
    fresh.step()  # the scheduler was left as it was


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_model_file_outside_the_checkpoint_directory_is_refused(tmp_path, net, where):
    secret_dir = tmp_path / "elsewhere"
    secret_dir.mkdir()
    secret = secret_dir / "secret.safetensors"
    from safetensors.torch import save_file

    save_file({"SECRET_KEY_NAME": torch.zeros(1)}, str(secret))
    run = tmp_path / "run"
    run.mkdir()
    if where == "absolute":
        name = str(secret)
    elif where == "dotdot":
        name = "../elsewhere/secret.safetensors"
    else:
        os.symlink(secret, run / "link.safetensors")
        name = "link.safetensors"
    path = _payload_file(run / "c.pt", net, model=None, model_file=name)
    with pytest.raises(UnsafeCheckpointError) as info:
        torchckpt.resume(path, model=net)
    assert "outside" in str(info.value) and "SECRET_KEY_NAME" not in str(info.value)


def test_model_file_beside_the_checkpoint_still_loads(tmp_path, net):
    torchckpt.save(tmp_path / "c.pt", model=net, weights_format="safetensors")
    from conftest import small_net

    fresh = small_net()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    torchckpt.resume(tmp_path / "c.pt", model=fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))


def _central_entries(data: bytes):
    end = data.rindex(b"PK\x05\x06")
    count, size, offset = struct.unpack("<HII", data[end + 10:end + 20])
    pos = offset
    for _ in range(count):
        n, m, k = struct.unpack("<HHH", data[pos + 28:pos + 34])
        yield pos, n
        pos += 46 + n + m + k


@pytest.mark.parametrize("field", ["version", "flags-encrypted", "method", "utf8-name"])
def test_zip_header_fields_in_the_digest_check_are_corrupt_errors(tmp_path, net, field):
    path = tmp_path / "c.pt"
    torchckpt.save(path, model=net)
    data = bytearray(path.read_bytes())
    pos, n = list(_central_entries(bytes(data)))[-1]
    if field == "version":
        data[pos + 6:pos + 8] = struct.pack("<H", 99)
    elif field == "flags-encrypted":
        data[pos + 8] |= 0x01
    elif field == "method":
        data[pos + 10:pos + 12] = struct.pack("<H", 99)
    else:
        data[pos + 9] |= 0x08  # bit 11: the name is UTF-8
        data[pos + 46] = 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError) as info:
        torchckpt.resume(path, model=net)
    assert str(path) in str(info.value)


def test_resume_checks_every_crc_once(tmp_path, net, monkeypatch):
    ckpt = torchckpt.Checkpointer(tmp_path)
    ckpt.save(1, model=net)
    calls = []
    real = zipfile.ZipFile.testzip

    def counting(self):
        calls.append(self.filename)
        return real(self)

    monkeypatch.setattr(zipfile.ZipFile, "testzip", counting)
    torchckpt.resume(tmp_path, model=net)
    assert len(calls) == 1
