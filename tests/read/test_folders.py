"""Hugging Face model folders and accelerate save_state folders, written by the real libraries
(transformers >= 5 writes safetensors only: the pytorch_model.bin layouts are written as transformers
4 wrote them, a torch.save of the state dict, sharded with the same index format)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import torchckpt
from torchckpt.errors import NotACheckpointError, UnsafeCheckpointError, UnsupportedFormatError

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers")  # the helper scripts


# --------------------------------------------------------------------------- Hugging Face
@pytest.fixture(scope="module")
def bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers, config, transformers.BertModel(config)


def _fresh(bert):
    transformers, config, _ = bert
    torch.manual_seed(1)
    return transformers.BertModel(config)


def _assert_same(model: torch.nn.Module, expected: dict) -> None:
    got = model.state_dict()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_sharded_safetensors_folder_loads_into_the_model_with_its_config(bert, tmp_path):
    _, config, model = bert
    folder = str(tmp_path / "bert")
    model.save_pretrained(folder, max_shard_size="10KB")
    assert "model.safetensors.index.json" in os.listdir(folder)  # really sharded

    target = _fresh(bert)
    report = torchckpt.load_into(target, folder)
    assert report.ok and report.applied
    _assert_same(target, model.state_dict())
    assert "BertModel" in report.format
    assert any(n.startswith("config.json: architectures=['BertModel'], model_type='bert'") for n in report.notes)

    state, info = torchckpt.load(folder, return_info=True)
    with open(os.path.join(folder, "config.json")) as fh:
        assert info.details["config"] == json.load(fh)
    assert info.kind == "huggingface" and info.details["weights_file"] == "model.safetensors.index.json"
    with open(os.path.join(folder, "model.safetensors.index.json")) as fh:
        assert list(state) == list(json.load(fh)["weight_map"])  # every tensor of every shard, merged
    for k, v in state.items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_single_safetensors_folder_is_preferred_over_pytorch_model_bin(bert, tmp_path):
    _, config, model = bert
    folder = str(tmp_path / "bert")
    model.save_pretrained(folder)
    torch.save({k: torch.zeros_like(v) for k, v in model.state_dict().items()}, os.path.join(folder, "pytorch_model.bin"))
    target = _fresh(bert)
    report = torchckpt.load_into(target, folder)
    _assert_same(target, load_file(os.path.join(folder, "model.safetensors")))
    assert any("also holds pytorch_model.bin (not read)" in n for n in report.notes)


def test_pytorch_model_bin_folders_single_and_sharded(bert, tmp_path):
    _, config, model = bert
    sd = model.state_dict()
    single = tmp_path / "single"
    config.save_pretrained(single)
    torch.save(sd, single / "pytorch_model.bin")
    target = _fresh(bert)
    assert torchckpt.load_into(target, str(single)).ok
    _assert_same(target, sd)

    sharded = tmp_path / "sharded"
    config.save_pretrained(sharded)
    keys = list(sd)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, part in shards.items():
        torch.save({k: sd[k] for k in part}, sharded / name)
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
             "weight_map": {k: name for name, part in shards.items() for k in part}}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    target = _fresh(bert)
    report = torchckpt.load_into(target, str(sharded))
    assert report.ok and "pytorch_model.bin.index.json" in report.format
    _assert_same(target, sd)


def test_folders_that_are_not_pytorch_checkpoints(tmp_path):
    tf_only = tmp_path / "tf"
    tf_only.mkdir()
    (tf_only / "config.json").write_text('{"model_type": "bert"}')
    (tf_only / "tf_model.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    with pytest.raises(UnsupportedFormatError, match="TensorFlow"):
        torchckpt.load(str(tf_only))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotACheckpointError, match="directory"):
        torchckpt.load(str(empty))
    bad_config = tmp_path / "bad"
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{not json")
    torch.save({"w": torch.ones(2)}, bad_config / "pytorch_model.bin")
    with pytest.raises(torchckpt.CorruptCheckpointError, match="config.json is not valid JSON"):
        torchckpt.load(str(bad_config))


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned",))


def test_malicious_file_in_a_model_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    torch.save({"w": torch.ones(2), "x": _Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="system") as exc:
        torchckpt.load(str(tmp_path))
    assert "pytorch_model.bin" in str(exc.value)


# --------------------------------------------------------------------------- accelerate
@pytest.fixture(scope="module")
def accelerate_folders(tmp_path_factory):
    pytest.importorskip("accelerate")
    out = tmp_path_factory.mktemp("accelerate")
    subprocess.run([sys.executable, os.path.join(HERE, "accelerate_app.py"), str(out)], check=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join([HERE] + sys.path)},
                   stdout=subprocess.DEVNULL)
    with open(out / "next.json") as fh:
        return str(out), json.load(fh)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["safe", "bin"])
def test_accelerate_folder_resumes_model_optimizer_scheduler_and_rng(accelerate_folders, layout):
    import accelerate_app

    root, drawn_after_save = accelerate_folders
    folder = os.path.join(root, layout)
    names = os.listdir(folder)
    assert {"optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= set(names)
    assert ("model.safetensors" if layout == "safe" else "pytorch_model.bin") in names

    torch.manual_seed(7)  # a different initialisation and RNG position: everything must come from the folder
    random.seed(7)
    np.random.seed(7)
    net = accelerate_app.make_net()
    opt, sched = accelerate_app.make_training(net)
    state = torchckpt.resume(folder, model=net, optimizer=opt, scheduler=sched)

    # the RNG streams continue exactly where the saved run stood
    assert random.random() == drawn_after_save["python"]
    assert float(np.random.rand()) == drawn_after_save["numpy"]
    assert torch.rand(3).tolist() == drawn_after_save["torch"]
    # independent readers for the expected values
    weights = load_file(os.path.join(folder, "model.safetensors")) if layout == "safe" else \
        torch.load(os.path.join(folder, "pytorch_model.bin"), weights_only=True)
    _assert_same(net, weights)
    saved_opt = torch.load(os.path.join(folder, "optimizer.bin"), weights_only=True)
    got = opt.state_dict()
    assert got["param_groups"] == saved_opt["param_groups"]
    for i, s in saved_opt["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(got["state"][i][k]), torch.as_tensor(v)), (i, k)
    assert sched.state_dict() == torch.load(os.path.join(folder, "scheduler.bin"), weights_only=True)
    assert state.report.ok and state.rng is not None

    obj, info = torchckpt.load(folder, return_info=True)
    assert info.kind == "accelerate" and set(obj) >= {"model", "optimizer", "scheduler", "rng", "random_states"}
    fresh = accelerate_app.make_net()
    assert torchckpt.load_into(fresh, folder).ok  # the weights are found among the folder's states
    _assert_same(fresh, weights)


@pytest.mark.slow
def test_malicious_random_states_are_refused(accelerate_folders, tmp_path):
    import shutil

    import accelerate_app

    folder = tmp_path / "acc"
    shutil.copytree(os.path.join(accelerate_folders[0], "safe"), folder)
    torch.save({"random_state": _Evil()}, folder / "random_states_0.pkl")
    net = accelerate_app.make_net()
    with pytest.raises(UnsafeCheckpointError, match="system") as exc:
        torchckpt.resume(str(folder), model=net)
    assert "random_states_0.pkl" in str(exc.value)


def test_tied_weights_of_a_sharded_gpt2_folder_into_a_meta_model(tmp_path):
    """The from_pretrained path without from_pretrained: a model built on ``meta`` from config.json,
    filled from a sharded folder whose index omits the tied ``lm_head.weight``; the tie survives."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    source = transformers.GPT2LMHeadModel(config).eval()
    folder = str(tmp_path / "gpt2")
    source.save_pretrained(folder, max_shard_size="20KB")
    with open(os.path.join(folder, "model.safetensors.index.json")) as fh:
        weight_map = json.load(fh)["weight_map"]
    assert "lm_head.weight" not in weight_map and len(set(weight_map.values())) > 1  # tied, sharded

    with torch.device("meta"):
        target = transformers.GPT2LMHeadModel(transformers.GPT2Config.from_pretrained(folder))
    report = torchckpt.load_into(target, folder)
    assert report.ok and report.missing_keys == [] and report.unexpected_keys == []
    assert "lm_head.weight" in str(report) and "tied" in str(report)
    assert target.lm_head.weight is target.transformer.wte.weight  # still one parameter
    assert not [n for n, t in [*target.named_parameters(), *target.named_buffers()] if t.is_meta]
    _assert_same(target, source.state_dict())
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(target.eval()(ids).logits, source(ids).logits)


@pytest.mark.slow
def test_reading_folders_never_imports_the_libraries_that_wrote_them(bert, accelerate_folders, tmp_path):
    """transformers, accelerate and lightning stay optional: loading and resuming their folders needs none."""
    _, _, model = bert
    hf = str(tmp_path / "bert")
    model.save_pretrained(hf, max_shard_size="10KB")
    code = (
        "import sys, torch, torchckpt\n"
        f"weights = torchckpt.load({hf!r})\n"
        f"assert len(weights) == {len(model.state_dict())}, len(weights)\n"
        "net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))\n"
        "opt = torch.optim.AdamW(net.parameters(), lr=0.01)\n"
        f"state = torchckpt.resume({os.path.join(accelerate_folders[0], 'safe')!r}, model=net, optimizer=opt)\n"
        "assert state.report.ok\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('transformers', 'accelerate', 'lightning', 'pytorch_lightning', 'huggingface_hub'))\n"
        "print('heavy:', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "heavy: []" in done.stdout, done.stdout
