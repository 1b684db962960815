"""DeepSpeed ZeRO folders, written by DeepSpeed itself (tests/deepspeed_app.py, 2 ranks on gloo), checked
against DeepSpeed's own zero_to_fp32 (the oracle; the library never imports DeepSpeed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import torchckpt
from torchckpt.errors import CheckpointError, CorruptCheckpointError, NotACheckpointError, UnsupportedFormatError, \
    WeightsNotFoundError

import deepspeed_app as app

pytestmark = pytest.mark.slow
CONFIGS = ["0-fp32", "1-fp32", "2-fp32", "2-bf16", "2-fp16", "3-fp32", "3-bf16"]
ZERO = [c for c in CONFIGS if not c.startswith("0")]
CONTINUED = 2


@pytest.fixture(scope="session")
def ds_runs(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Every config trained 3 steps and saved (and saved again CONTINUED steps later, '<config>-after')."""
    pytest.importorskip("deepspeed")
    out = str(tmp_path_factory.mktemp("deepspeed"))
    from dist_launch import free_port

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers", "deepspeed_app.py"), out,
           *CONFIGS, "--continue", str(CONTINUED)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def oracle(folder: str) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(folder)


def assert_bitwise(ours: dict, ref: dict) -> None:
    assert list(ours) == list(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, k
        assert torch.equal(ours[k].view(torch.uint8) if ours[k].dim() else ours[k], ref[k].view(torch.uint8)
                           if ref[k].dim() else ref[k]), k


@pytest.mark.parametrize("config", ZERO)
def test_load_is_zero_to_fp32_bit_for_bit(ds_runs: str, config: str) -> None:
    folder = os.path.join(ds_runs, config)
    ours, info = torchckpt.load(folder, return_info=True)
    assert_bitwise(ours, oracle(folder))
    assert ours["head.weight"] is ours["emb.weight"]  # tied names are one tensor, as in zero_to_fp32
    assert info.format == "deepspeed" and info.details["stage"] == int(config[0])
    assert info.details["world_size"] == 2 and info.details["step"] == 3
    assert not any(t.requires_grad for t in ours.values())
    # the step folder itself reads the same
    assert_bitwise(torchckpt.load(os.path.join(folder, "global_step3")), ours)


@pytest.mark.parametrize("config", ["2-fp32", "3-bf16"])
def test_rank_files_are_read_side_by_side(ds_runs: str, config: str, tmp_path) -> None:
    """The rank files are the parts of one read (``workers=``): every pool size gives the same tensors and
    the same trace, and a damaged rank file is a typed error naming that file whatever the pool size."""
    from torchckpt.read.opener import open_checkpoint

    folder = os.path.join(ds_runs, config)
    one = torchckpt.load(folder, workers=1)
    for workers in (2, 4, None):
        assert_bitwise(torchckpt.load(folder, workers=workers), one)
    traces = []
    for workers in (1, 4):
        with open_checkpoint(folder, "build", workers=workers) as ckpt:
            traces.append([(s.source, s.member, s.offset, s.complete) for s in ckpt.trace.streams])
    assert traces[0] == traces[1] and len({s[0] for s in traces[0]}) == (4 if config.startswith("3") else 3)
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    victim = damaged / "global_step3" / next(n for n in sorted(os.listdir(damaged / "global_step3"))
                                             if n.startswith(("zero_pp_rank_1", "bf16_zero_pp_rank_1")) and "optim" in n)
    victim.write_bytes(victim.read_bytes()[:4000])
    for workers in (1, 4):
        with pytest.raises(CheckpointError) as info:
            torchckpt.load(str(damaged), workers=workers)
        assert victim.name in str(info.value), str(info.value)


def test_stage0_is_the_module(ds_runs: str) -> None:
    folder = os.path.join(ds_runs, "0-fp32")
    ours = torchckpt.load(folder)
    saved = torch.load(os.path.join(folder, "global_step3", "mp_rank_00_model_states.pt"), weights_only=False)
    assert sorted(ours) == sorted(saved["module"])
    for k, v in saved["module"].items():
        assert torch.equal(ours[k], v.float() if k == "scale" else v), k


def test_inspect_scan_and_front_ends(ds_runs: str, tmp_path) -> None:
    folder = os.path.join(ds_runs, "3-bf16")
    report = torchckpt.inspect(folder)
    text = str(report)
    for want in ("ZeRO stage 3", "deepspeed.world_size: 2", "deepspeed.step: 3", "deepspeed.dtype: bfloat16",
                 "deepspeed.runtime.zero.config.ZeroStageEnum"):
        assert want in text
    assert report.format == "deepspeed"
    scan = torchckpt.scan(folder)
    assert "clean (deepspeed, 4 pickle streams" in str(scan)
    ref = oracle(folder)
    with torch.device("meta"):
        model = app.TiedNet()
    torchckpt.load_into(model, folder, assign=True)
    for k, v in model.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, ref[k].to(v.dtype)), k
    for dst, to in (("w.pt", None), ("w.safetensors", None), ("dcp", "dcp")):
        torchckpt.convert(folder, str(tmp_path / dst), to=to)
        back = torchckpt.load(str(tmp_path / dst))
        back = back.get("state_dict", back) if isinstance(back, dict) else back
        for k in ref:
            assert torch.equal(back[k], ref[k]), (dst, k)


def test_resume_plain_model_and_optimizer(ds_runs: str) -> None:
    """Weights and Adam moments restored exactly (moments against zero_to_fp32's own gathering applied to the
    moments), then a plain loop on the same batches follows DeepSpeed's continued run."""
    from deepspeed.utils import zero_to_fp32 as z

    for config in ("2-fp32", "3-fp32"):
        folder = os.path.join(ds_runs, config)
        model = app.make_model()
        opt = app.make_optimizer(model)
        state = torchckpt.resume(folder, model=model, optimizer=opt)
        assert state.step == 3
        step_dir = os.path.join(folder, "global_step3")
        ref = oracle(folder)
        for k, v in model.state_dict().items():
            assert torch.equal(v, ref[k].to(v.dtype)), (config, k)
        # the oracle's consolidation run over the exp_avg partitions instead of the fp32 weights
        files = z.get_optim_files(step_dir)
        raw = [torch.load(f, weights_only=False)["optimizer_state_dict"] for f in files]
        models = z.parse_model_states(z.get_model_state_files(step_dir))
        for slot in ("exp_avg", "exp_avg_sq"):
            if config.startswith("3"):
                groups = [[s[g][slot] for g in sorted(s)] for s in (b["optimizer_state_dict"]["state"] for b in raw)]
                moments = z.to_torch_tensor(z._get_fp32_state_dict_from_zero3_checkpoint(2, groups, models, True))
            else:
                groups = [[b["base_optimizer_state"]["state"][g][slot][:len(p)]
                           for g, p in enumerate(b["single_partition_of_fp32_groups"])] for b in raw]
                moments = z._get_fp32_state_dict_from_zero2_checkpoint(2, groups, models, True)
            for name, p in model.named_parameters():
                if p.requires_grad:
                    assert torch.equal(opt.state[p][slot], moments[name]), (config, slot, name)
        assert all(float(opt.state[p]["step"]) == 3 for p in model.parameters() if p.requires_grad)
        saved = torch.load(os.path.join(folder, "batches.pt"))
        for k in range(CONTINUED):
            opt.zero_grad()
            for x in saved["batches"][k]:
                app.loss_of(model(x), x).backward()
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(1 / saved["world"])  # DeepSpeed averages the ranks' gradients (exact: a power of 2)
            opt.step()
        after = oracle(folder + "-after")
        for k, v in model.state_dict().items():
            # Equal up to 1 ulp: DeepSpeed's Adam runs over one flat tensor per group, ours per parameter, and
            # torch's vectorised kernels round an element at a tail differently from one in the body.
            torch.testing.assert_close(v, after[k].to(v.dtype), rtol=2e-7, atol=2e-9, msg=f"{config} {k}")


def test_rank_files_say_where_the_weights_are(ds_runs: str) -> None:
    folder = os.path.join(ds_runs, "3-fp32")
    step = os.path.join(folder, "global_step3")
    obj, info = torchckpt.load(os.path.join(step, "zero_pp_rank_0_mp_rank_00_optim_states.pt"), return_info=True)
    assert "optimizer_state_dict" in obj and any(folder in n for n in info.notes)
    with pytest.raises(WeightsNotFoundError, match="Pass the folder") as err:
        torchckpt.load_into(app.make_model(), os.path.join(step, "zero_pp_rank_1_mp_rank_00_model_states.pt"))
    assert folder in str(err.value)


def test_broken_folders_are_diagnosed(ds_runs: str, tmp_path) -> None:
    lfs = tmp_path / "lfs"
    shutil.copytree(os.path.join(ds_runs, "2-fp32"), lfs)
    for f in (lfs / "global_step3").iterdir():
        f.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 4242\n")
    with pytest.raises(NotACheckpointError, match="3 of the 3 DeepSpeed files are git-lfs pointers"):
        torchckpt.load(str(lfs))
    partial = tmp_path / "partial"
    shutil.copytree(os.path.join(ds_runs, "3-fp32"), partial)
    for f in (partial / "global_step3").glob("*optim_states.pt"):
        f.unlink()
    with pytest.raises(CorruptCheckpointError, match="without its optimizer partitions"):
        torchckpt.load(str(partial))
    one_rank = tmp_path / "one_rank"
    shutil.copytree(os.path.join(ds_runs, "2-fp32"), one_rank)
    (one_rank / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CorruptCheckpointError, match="written by 2 ranks but 1"):
        torchckpt.load(str(one_rank))
    (one_rank / "latest").write_text("../../etc")
    with pytest.raises(CheckpointError, match="outside|inside"):  # 'latest' may not lead out of the folder
        torchckpt.load(str(one_rank))
    no_optim = tmp_path / "no_optim"  # ZeRO-2 without its optimizer files: the bf16 module, said so
    shutil.copytree(os.path.join(ds_runs, "2-bf16"), no_optim)
    for f in (no_optim / "global_step3").glob("*optim_states.pt"):
        f.unlink()
    weights, info = torchckpt.load(str(no_optim), return_info=True)
    assert weights["body.weight"].dtype == torch.bfloat16
    assert any("ZeRO stage 2 but no *_optim_states.pt" in n for n in info.notes)
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    (other / "notes.txt").write_text("hello")
    with pytest.raises(UnsupportedFormatError, match="checkpoint folder torchckpt knows: 1 files and 1 folders"):
        torchckpt.load(str(other))


def _resume_and_continue(rank: int, world: int, folder: str) -> dict:
    model = app.make_model()
    opt = app.make_optimizer(model)
    torchckpt.resume(folder, model=model, optimizer=opt)
    ddp = torch.nn.parallel.DistributedDataParallel(model)  # averages the ranks' gradients, as DeepSpeed does
    saved = torch.load(os.path.join(folder, "batches.pt"))
    for k in range(CONTINUED):
        opt.zero_grad()
        x = saved["batches"][k][rank]
        app.loss_of(ddp(x), x).backward()
        opt.step()
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}  # numpy: tensors would go by shared memory


def test_resume_on_two_processes(ds_runs: str) -> None:
    """Two plain DDP processes resume the 2-rank ZeRO-3 run and follow DeepSpeed's continued run."""
    from dist_launch import launch

    folder = os.path.join(ds_runs, "3-fp32")
    results = launch(_resume_and_continue, 2, folder, timeout=120)
    after = oracle(folder + "-after")
    for k, v in results[0].items():
        v = torch.from_numpy(v)
        assert torch.equal(v, torch.from_numpy(results[1][k])), k
        torch.testing.assert_close(v, after[k].to(v.dtype), rtol=2e-7, atol=2e-9, msg=k)


@pytest.mark.parametrize("config", ["2-fp32", "3-fp32"])
def test_universal_checkpoint_folder(ds_runs: str, config: str, tmp_path) -> None:
    """DeepSpeed's ds_to_universal output reads as the same fp32 state dict as the ZeRO folder it came from."""
    universal = str(tmp_path / "global_step3_universal")
    done = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           os.path.join(ds_runs, config, "global_step3"), "--output_folder", universal,
                           "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"],
                          env=dict(os.environ, DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ours, info = torchckpt.load(universal, return_info=True)
    ref = oracle(os.path.join(ds_runs, config))
    assert info.format == "deepspeed-universal" and sorted(ours) == sorted(ref)
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
    for workers in (1, 4):  # the model states and zero/<name>/fp32.pt files are the parts of one read
        again = torchckpt.load(universal, workers=workers)
        assert list(again) == list(ours) and all(torch.equal(again[k], ours[k]) for k in ours)
    assert ours["head.weight"] is ours["emb.weight"]
    assert "deepspeed-universal" in str(torchckpt.scan(universal))


def test_convert_to_sharded_safetensors(ds_runs: str, tmp_path) -> None:
    """A DeepSpeed ZeRO-3 folder to Hugging Face's sharded layout: every shard loads with safetensors' own
    loader, the weight_map covers every stored name, and the folder reads back as zero_to_fp32's result."""
    import json

    from safetensors.torch import load_file

    folder = os.path.join(ds_runs, "3-fp32")
    ref = oracle(folder)
    out = tmp_path / "hf"
    sizes = sorted(t.numel() * t.element_size() for t in ref.values())
    report = torchckpt.convert(folder, str(out), max_shard_size=sizes[-1] + 1)
    assert report.verified and report.to == "sharded-safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2
    seen = {}
    for f in files:
        seen.update(load_file(str(out / f)))
    assert set(seen) == set(index["weight_map"])
    # the tied head is stored once, as transformers stores it, and torchckpt restores the name
    assert index["metadata"]["torchckpt.aliases"] == {"head.weight": "emb.weight"}
    back = torchckpt.load(str(out))
    assert set(back) == set(ref)
    for k in ref:
        assert torch.equal(back[k], ref[k]), k
