"""Lightning through TorchckptIO: a real Trainer.fit, killed with SIGKILL and resumed; resuming a
Lightning run from a torchckpt training checkpoint; unsafe and damaged files refused."""

from __future__ import annotations

import copy
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

lightning = pytest.importorskip("lightning")

import lightning_app  # noqa: E402  (tests/ is on sys.path, see conftest.py)

import torchckpt  # noqa: E402
from torchckpt.errors import CorruptCheckpointError, ResumeError, UnsafeCheckpointError  # noqa: E402
from torchckpt.train.training import verify  # noqa: E402

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers")  # the helper scripts


class Capture(lightning.Callback):
    """What the resumed run holds when training (re)starts, before any new step."""

    def on_train_start(self, trainer: lightning.Trainer, module: lightning.LightningModule) -> None:
        self.global_step = trainer.global_step
        self.epoch = trainer.current_epoch
        self.weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())
        self.scheduler = copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.state_dict())


def _assert_optimizer_equal(got: dict, saved: dict) -> None:
    assert got["param_groups"] == saved["param_groups"]
    assert sorted(got["state"]) == sorted(saved["state"])
    for i, state in saved["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(got["state"][i][name]), torch.as_tensor(value)), (i, name)


def _steps(root: str) -> list[int]:
    return sorted(int(p.rsplit("step=", 1)[1][:-5]) for p in glob.glob(os.path.join(root, "*.ckpt")))


@pytest.mark.slow
def test_fit_killed_and_resumed_restores_exactly_what_was_saved(tmp_path):
    root = str(tmp_path / "ckpts")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE] + sys.path)}
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "lightning_app.py"), root], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:  # the run prints every step; kill it once two checkpoints were committed
            committed = [p for p in glob.glob(os.path.join(root, "*.ckpt")) if os.path.exists(p + ".meta.json")]
            if line.startswith("step") and len(committed) >= 2 and int(line.split()[1]) >= 10:
                break
            assert time.monotonic() < deadline, "the Lightning run did not checkpoint in time"
        else:
            pytest.fail(f"the Lightning run ended on its own (exit {proc.wait()})")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # Retention was Lightning's (save_top_k=2): every file under a final name is complete and verified.
    steps = _steps(root)
    assert 2 <= len(steps) <= 3 and all(s % 3 == 0 for s in steps), steps
    for path in glob.glob(os.path.join(root, "*.ckpt")):
        verify(path)  # raises if the sidecar is missing or does not match
    assert not [n for n in os.listdir(root) if n.endswith(".meta.json") and not os.path.exists(
        os.path.join(root, n[:-len(".meta.json")]))], "a removed checkpoint left its sidecar behind"

    latest = os.path.join(root, f"epoch=1-step={steps[-1]}.ckpt")
    if not os.path.exists(latest):
        latest = glob.glob(os.path.join(root, f"*step={steps[-1]}.ckpt"))[0]
    saved = torch.load(latest, map_location="cpu", weights_only=False)  # an independent reader
    capture = Capture()
    torch.manual_seed(123)  # a different initialisation: everything must come from the checkpoint
    module = lightning_app.LitNet()
    trainer = lightning_app.trainer(root + "-resumed", steps[-1] + 2, async_save=False, callbacks=[capture])
    trainer.fit(module, lightning_app.loader(), ckpt_path=latest)

    assert capture.global_step == saved["global_step"] == steps[-1]
    assert capture.weights.keys() == saved["state_dict"].keys()
    for k, v in saved["state_dict"].items():
        assert torch.equal(capture.weights[k], v), k
    _assert_optimizer_equal(capture.optimizer, saved["optimizer_states"][0])
    assert capture.scheduler == saved["lr_schedulers"][0]
    assert trainer.global_step == steps[-1] + 2  # and training went on from there


def _plain_torch_run(path: str) -> None:
    torch.manual_seed(0)
    net = lightning_app.make_net()
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    for x, y in list(lightning_app.loader())[:5]:
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        sched.step()
    torchckpt.save(path, model=net, optimizer=opt, scheduler=sched, epoch=0, step=5)


def test_lightning_resumes_from_a_torchckpt_training_checkpoint(tmp_path):
    path = str(tmp_path / "plain.pt")
    _plain_torch_run(path)
    saved = torch.load(path, map_location="cpu", weights_only=False)

    # Without the plugin Lightning cannot read it (the failure users hit today).
    with pytest.raises(KeyError, match="pytorch-lightning_version"):
        lightning_app.trainer(str(tmp_path / "a"), 6, async_save=False, plugin=False).fit(
            lightning_app.LitNet(), lightning_app.loader(), ckpt_path=path)
    # The LightningModule holds the network as `net`: prefix= puts its keys where Lightning expects them.
    capture = Capture()
    trainer = lightning_app.trainer(str(tmp_path / "b"), 7, async_save=False, callbacks=[capture], prefix="net.")
    trainer.fit(lightning_app.LitNet(), lightning_app.loader(), ckpt_path=path)

    assert capture.global_step == 5
    assert capture.weights.keys() == {f"net.{k}" for k in saved["model"]}
    for k, v in saved["model"].items():
        assert torch.equal(capture.weights[f"net.{k}"], v), k
    _assert_optimizer_equal(capture.optimizer, saved["optimizer"])
    assert capture.scheduler == saved["scheduler"]
    assert trainer.global_step == 7


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned",))


def test_unsafe_damaged_and_foreign_files_are_refused(tmp_path):
    from torchckpt.integrations.lightning import TorchckptIO

    io = TorchckptIO()
    evil = str(tmp_path / "evil.ckpt")
    torch.save({"pytorch-lightning_version": "2.0.0", "state_dict": {}, "hyper_parameters": _Evil()}, evil)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        lightning_app.trainer(str(tmp_path / "a"), 2, async_save=False).fit(
            lightning_app.LitNet(), lightning_app.loader(), ckpt_path=evil)

    good = str(tmp_path / "good.ckpt")
    io.save_checkpoint({"pytorch-lightning_version": "2.0.0", "state_dict": {"w": torch.ones(3)}}, good)
    assert torch.equal(io.load_checkpoint(good)["state_dict"]["w"], torch.ones(3))
    with open(good, "r+b") as fh:  # flip one byte of tensor data: the CRC check catches it
        data = fh.read()
        at = data.index(torch.ones(3).numpy().tobytes())
        fh.seek(at)
        fh.write(b"\xff")
    with pytest.raises(CorruptCheckpointError):
        io.load_checkpoint(good)

    weights = str(tmp_path / "weights.pt")
    torch.save({"w": torch.ones(3)}, weights)
    with pytest.raises(ResumeError, match="neither a Lightning checkpoint"):
        io.load_checkpoint(weights)
    io.remove_checkpoint(good)
    assert not os.path.exists(good) and not os.path.exists(good + ".meta.json")


# --------------------------------------------------------------- async_save: the first save writes through
def _checkpoint(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> dict:
    return {"pytorch-lightning_version": lightning.__version__, "epoch": 0, "global_step": step,
            "state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()], "loops": {"note": "x"}}


def _assert_same(got, expected, where="") -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == expected.dtype and torch.equal(got, expected), where
    elif isinstance(expected, dict):
        assert list(got) == list(expected), where
        for k in expected:
            _assert_same(got[k], expected[k], f"{where}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            _assert_same(g, e, f"{where}[{i}]")
    else:
        assert got == expected, where


def _trained(width: int = 256, layers: int = 4) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    return model, opt


def test_the_first_async_save_writes_what_a_sync_save_writes(tmp_path):
    from torchckpt.integrations.lightning import TorchckptIO

    model, opt = _trained()
    sync, io = TorchckptIO(), TorchckptIO(async_save=True)
    sync.save_checkpoint(_checkpoint(model, opt, 3), tmp_path / "sync.ckpt")
    try:
        io.save_checkpoint(_checkpoint(model, opt, 3), tmp_path / "async.ckpt")
        assert io._warming is not None  # written through: its buffers are warmed for the next save
        assert io._buffers and all(b.nbytes() for b in io._buffers.values())
    finally:
        io.teardown()
    assert io._warming is None and sorted(os.listdir(tmp_path)) == [
        "async.ckpt", "async.ckpt.meta.json", "sync.ckpt", "sync.ckpt.meta.json"]  # no temp file left
    for name in ("sync.ckpt", "async.ckpt"):
        verify(str(tmp_path / name))  # size, digest and every CRC against its sidecar
    _assert_same(io.load_checkpoint(tmp_path / "async.ckpt"), sync.load_checkpoint(tmp_path / "sync.ckpt"))


def test_a_change_right_after_an_async_save_returns_never_reaches_the_file(tmp_path):
    """The first save is written before save_checkpoint returns; the next ones copy into its (warmed) buffers."""
    from torchckpt.integrations.lightning import TorchckptIO

    model, opt = _trained(512, 8)  # 8 MiB: buffers large enough to be warmed
    io = TorchckptIO(async_save=True)
    try:
        for step in (1, 2, 3):
            expected = copy.deepcopy(_checkpoint(model, opt, step))
            io.save_checkpoint(_checkpoint(model, opt, step), tmp_path / f"{step}.ckpt")
            warm = io._warming
            with torch.no_grad():  # the next training step, while the writer may still be writing
                for p in model.parameters():
                    p.mul_(-3).add_(1)
                    opt.state[p]["exp_avg"].add_(7)
            assert (warm is not None) == (step == 1)  # only the first save writes through
            io._wait()
            _assert_same(io.load_checkpoint(tmp_path / f"{step}.ckpt"), expected, str(step))
            if step == 1:
                assert warm.done.wait(60)  # warmed before the second save
    finally:
        io.teardown()


def test_a_failure_of_the_durable_part_is_raised_by_the_next_save_and_leaves_nothing(tmp_path):
    """The first async save's file is written in save_checkpoint; its rename, in the background, fails (a
    directory holds the name): the next save raises it, typed, as for any failed background write."""
    from torchckpt.errors import CheckpointWriteError
    from torchckpt.integrations.lightning import TorchckptIO

    (tmp_path / "a.ckpt").mkdir()
    (tmp_path / "a.ckpt" / "keep").write_text("not ours")
    model, opt = _trained()
    io = TorchckptIO(async_save=True)
    try:
        io.save_checkpoint(_checkpoint(model, opt, 1), tmp_path / "a.ckpt")  # returns: the write succeeded
        with pytest.raises(CheckpointWriteError, match="a.ckpt"):
            io.save_checkpoint(_checkpoint(model, opt, 2), tmp_path / "b.ckpt")
        assert sorted(os.listdir(tmp_path)) == ["a.ckpt"]  # no temp file or sidecar; b.ckpt was not started
        io.save_checkpoint(_checkpoint(model, opt, 2), tmp_path / "b.ckpt")  # the next save works
    finally:
        io.teardown()
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt", "b.ckpt", "b.ckpt.meta.json"]
    verify(str(tmp_path / "b.ckpt"))
    io.save_checkpoint(_checkpoint(model, opt, 3), tmp_path / "a.ckpt")  # teardown reports it too
    with pytest.raises(CheckpointWriteError, match="a.ckpt"):
        io.teardown()


def test_ctrl_c_inside_the_first_async_save_leaves_nothing(tmp_path):
    """A real SIGINT inside torch.save's writes on the training thread: nothing published, no temp file."""
    from test_ctrl_c_bookkeeping import interrupt_at_call
    from torchckpt.integrations.lightning import TorchckptIO

    model, opt = _trained()
    io = TorchckptIO(async_save=True)
    try:
        sys.settrace(interrupt_at_call("_Counted.write", os.path.join("storage", "atomic.py"), call=3))
        try:
            with pytest.raises(KeyboardInterrupt):
                io.save_checkpoint(_checkpoint(model, opt, 1), tmp_path / "a.ckpt")
        finally:
            sys.settrace(None)
        assert os.listdir(tmp_path) == [] and io._pending is None
        io.save_checkpoint(_checkpoint(model, opt, 2), tmp_path / "b.ckpt")
    finally:
        io.teardown()
    assert sorted(os.listdir(tmp_path)) == ["b.ckpt", "b.ckpt.meta.json"]
