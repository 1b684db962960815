"""Every code block of README.md runs as written: python blocks against files this test writes, bash
blocks through the command line (install and test commands aside). A line ``expr  # [literal]`` must
evaluate to that literal."""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from t7_writer import Obj, write_t7
from torch import nn

from torchckpt.cli.main import main
from torchckpt.demo.samples import saved_on_device, write_py2_legacy

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers")  # the helper scripts
README = os.path.join(HERE, os.pardir, os.pardir, "README.md")
BLOCK = re.compile(r"```(python|bash)\n(.*?)```", re.S)
SKIP = ("pip ", "python3 -m pip", "python3 -m pytest", "python -m pytest")
# Statements not run here, and where they are tested instead:
NOT_HERE = {"trainer.fit(": "tests/train/test_lightning.py (a real Lightning run, killed and resumed)",
            # remote storage: tests/*/test_remote_*.py, against a real moto S3 server and http.server
            'opts = {"endpoint_url"': "tests/read/test_remote_read.py", 'torchckpt.inspect("s3://': "tests/read/test_remote_read.py",
            'with torchckpt.Checkpointer("s3://': "tests/train/test_remote_train.py (incl. kill -9 mid-upload)",
            'torchckpt.load("https://': "tests/storage/test_remote_cache.py", 'path = torchckpt.download("hf://':
            "tests/storage/test_remote_errors.py (the missing [hf] extra; hf:// itself needs the network)",
            "model = fully_shard(": "tests/train/test_distributed.py (FSDP2 on real gloo ranks)"}
NOT_HERE_BASH = {"torchrun ": "tests/train/test_distributed_example.py (the example under torchrun, 2 ranks)"}

MODELS = textwrap.dedent('''
    from collections import OrderedDict
    import torch
    from torch import nn

    def build_model(classes=10):
        torch.manual_seed(classes)
        return nn.Sequential(OrderedDict([
            ("backbone", nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                       nn.AdaptiveAvgPool2d(1), nn.Flatten())),
            ("head", nn.Linear(4, classes))]))

    class Net(nn.Module):
        def __init__(self, classes=10):
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                          nn.Flatten())
            self.head = nn.Linear(4, classes)

        def forward(self, x):
            return self.head(self.backbone(x))
''')


def blocks(kind: str) -> list[str]:
    with open(README, encoding="utf-8") as fh:
        return [code for k, code in BLOCK.findall(fh.read()) if k == kind]


def build_model(classes: int = 10) -> nn.Module:
    namespace: dict = {}
    exec(MODELS, namespace)
    return namespace["build_model"](classes)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every file the README names, written once."""
    tmp_path = tmp_path_factory.mktemp("readme")
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        _write_files(tmp_path)
    finally:
        os.chdir(old)
    return tmp_path


@pytest.fixture
def workdir(files, monkeypatch):
    """The README's files in the current directory, and ``mypkg`` importable."""
    monkeypatch.chdir(files)
    monkeypatch.syspath_prepend(str(files))
    return files


def _write_files(tmp_path):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "models.py").write_text(MODELS)
    model = build_model()
    sd = model.state_dict()
    sys.path.insert(0, str(tmp_path))
    try:  # a whole model of the user's own class: torchckpt.load(..., allow=["mypkg.*"])
        import mypkg.models

        torch.save(mypkg.models.Net().eval(), "mypkg_model.pt")
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("mypkg.models", "mypkg"):
            sys.modules.pop(name, None)
    torch.save({"epoch": 90, "arch": "net", "state_dict": nn.DataParallel(model).state_dict(), "best_acc1": 0.76},
               "model_best.pth.tar", _use_new_zipfile_serialization=False)
    torch.save({"epoch": 3, "state_dict": nn.DataParallel(model).state_dict()}, "checkpoint.pth")
    torch.save(build_model(1000).state_dict(), "classifier_1000.pt")
    keys = list(sd)
    save_file({k: sd[k].contiguous() for k in keys[:4]}, "model-00001-of-00002.safetensors")
    save_file({k: sd[k].contiguous() for k in keys[4:]}, "model-00002-of-00002.safetensors")
    weight_map = {k: "model-0000%d-of-00002.safetensors" % (1 if i < 4 else 2) for i, k in enumerate(keys)}
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"metadata": {}, "weight_map": %s}' % str(weight_map).replace("'", '"'))
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"model": sd, "step": 1000}, checkpoint_id=str(tmp_path / "checkpoints" / "step_1000"))
    write_py2_legacy({"state_dict": sd, "best": np.float64(0.9)}, "old_py2_model.pth", location="cuda:0")
    write_py2_legacy({"epoch": 7, "state_dict": sd}, "old_py2.pth.tar")
    torch.save(build_model(), "whole_model.pt")  # its class (mypkg-less __main__-like) stays a stub
    (tmp_path / "whole_model.pkl").write_bytes((tmp_path / "whole_model.pt").read_bytes())
    with saved_on_device("cuda:3"):
        torch.save(sd, "gpu.ckpt")
    write_t7(Obj("nn.Sequential", {"modules": [Obj("nn.Linear", {"weight": torch.randn(2, 4),
                                                                 "bias": torch.randn(2)})]}), "lua_model.t7")
    torch.save(sd, "model.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, "pretrained.safetensors")
    torch.save(sd, "base.pt")
    torch.save(sd, "base.pth")
    tuned = build_model()
    with torch.no_grad():
        tuned.head.weight.add_(0.5)
    torch.save(tuned.state_dict(), "finetuned.pt")
    os.mkdir("downloads")
    torch.save(sd, "downloads/a.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, "downloads/b.safetensors")


def namespace() -> dict:
    """The names the snippets take as given: a model, its parts, a training loop's objects."""
    model = build_model()
    full = build_model()
    torch.save(OrderedDict((k.replace("backbone.", "encoder."), v) for k, v in full.state_dict().items()),
               "renamed.pt")
    torch.manual_seed(0)
    dataset = torch.utils.data.TensorDataset(torch.randn(256, 3, 8, 8), torch.randint(0, 10, (256,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return {
        "torch": torch, "torchckpt": __import__("torchckpt"), "model": model, "ckpt": "classifier_1000.pt", "old_ckpt": "renamed.pt",
        "backbone": build_model().backbone, "full_network_ckpt": "checkpoint.pth",
        "meta_model": None, "dataset": dataset, "DataLoader": torch.utils.data.DataLoader, "opt": opt,
        "sched": torch.optim.lr_scheduler.StepLR(opt, 10), "scaler": torch.amp.GradScaler("cpu", enabled=False),
        "step": 100, "epoch": 1, "loss": 0.5,
    }


def run_python(code: str, ns: dict) -> None:
    """Run a block statement by statement; ``expr  # <literal>`` compares the value with the literal
    (``{'a': ..., ...}``: a dict holding at least the key ``a``)."""
    tree = ast.parse(code)
    lines = code.splitlines()
    for node in tree.body:
        src = ast.get_source_segment(code, node)
        if src.startswith(tuple(NOT_HERE)):
            continue
        comment = lines[node.end_lineno - 1].partition("#")[2].strip()
        if isinstance(node, ast.Expr) and comment[:1] in ("[", "{", "(", "'", '"'):
            value = eval(compile(ast.Expression(node.value), "README.md", "eval"), ns)
            if comment.startswith("{") and comment.endswith(", ...}"):
                expected = ast.literal_eval(comment[:-len(", ...}")] + "}")
                assert isinstance(value, dict) and set(value) >= set(expected), f"{src}: {value!r} != {comment}"
                assert all(v is Ellipsis or value[k] == v for k, v in expected.items()), f"{src}: {value!r}"
            else:
                assert value == ast.literal_eval(comment), f"{src}: {value!r} != {comment}"
        else:
            exec(compile(ast.Module([node], []), "README.md", "exec"), ns)


def _hugging_face(ns: dict, files) -> None:
    """``bert-base-uncased/`` as ``save_pretrained`` writes it (a small BertModel), and a fresh model for it."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    if not (files / "bert-base-uncased").exists():
        torch.manual_seed(0)
        transformers.BertModel(config).save_pretrained(str(files / "bert-base-uncased"))
    ns["model"] = transformers.BertModel(config)


def _accelerate(ns: dict, files) -> None:
    """``output/checkpoint_3/`` written by a real accelerate run (tests/accelerate_app.py), and its objects."""
    pytest.importorskip("accelerate")
    import accelerate_app

    if not (files / "output" / "checkpoint_3").exists():
        subprocess.run([sys.executable, os.path.join(HERE, "accelerate_app.py"), str(files / "acc")], check=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join([HERE] + sys.path)},
                       stdout=subprocess.DEVNULL)
        shutil.copytree(files / "acc" / "safe", files / "output" / "checkpoint_3")
    ns["model"] = accelerate_app.make_net()
    ns["opt"], ns["sched"] = accelerate_app.make_training(ns["model"])


ADAPT_MODELS = textwrap.dedent('''
    import torch
    from torch import nn

    class ViT(nn.Module):
        def __init__(self, grid):
            super().__init__()
            self.patch_embed = nn.Conv2d(3, 8, 16, 16)
            self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, 8))

    class Attn(nn.Module):
        def __init__(self, fused):
            super().__init__()
            if fused:
                self.qkv = nn.Linear(8, 24)
            else:
                self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    class Block(nn.Module):
        def __init__(self, fused):
            super().__init__()
            self.attn = Attn(fused)

        def forward(self, x):
            a = self.attn
            return a.qkv(x) if hasattr(a, "qkv") else torch.cat([a.q_proj(x), a.k_proj(x), a.v_proj(x)], -1)

    class MoE(nn.Module):
        def __init__(self, stacked):
            super().__init__()
            self.moe = nn.Module()
            if stacked:
                self.moe.w1 = nn.Parameter(torch.randn(4, 6, 8))
            else:
                self.moe.experts = nn.ModuleList(nn.Module() for _ in range(4))
                for e in self.moe.experts:
                    e.w1 = nn.Parameter(torch.randn(6, 8))
''')


def _adaptations(ns: dict) -> None:
    """The models and files of the "adapt the weights" recipes (written in the current directory)."""
    models: dict = {}
    exec(ADAPT_MODELS, models)
    torch.manual_seed(0)
    torch.save(models["ViT"](14).state_dict(), "vit_224.pt")
    ns["vit_384"] = models["ViT"](24)
    gray = build_model()
    gray.backbone[0] = nn.Conv2d(1, 4, 3)
    ns["gray_model"] = gray
    split, fused = models["Block"](False), models["Block"](True)
    torch.save(split.state_dict(), "split_qkv.pt")
    torch.save(fused.state_dict(), "fused_qkv.pt")
    ns["fused_model"], ns["split_model"] = fused, models["Block"](False)
    opt = torch.optim.Adam(split.parameters())
    sum(p.sum() for p in split.parameters()).backward()
    opt.step()
    import torchckpt

    torchckpt.save("run.pt", model=split, optimizer=opt)
    ns["fused_opt"] = torch.optim.Adam(fused.parameters())
    torch.save(models["MoE"](False).state_dict(), "experts.pt")
    ns["moe_model"] = models["MoE"](True)
    ns["probe"] = torch.randn(2, 8)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_python_block(workdir, index):
    ns = namespace()
    if "bert-base-uncased/" in blocks("python")[index]:
        _hugging_face(ns, workdir)
    if "output/checkpoint_3/" in blocks("python")[index]:
        _accelerate(ns, workdir)
    if any(name in blocks("python")[index] for name in ("vit_224.pt", "fused_opt", "split_qkv.pt")):
        _adaptations(ns)
    if "lightning" in blocks("python")[index]:
        ns["lightning"] = pytest.importorskip("lightning")
        ns["ModelCheckpoint"] = ns["lightning"].pytorch.callbacks.ModelCheckpoint
    run_python(blocks("python")[index], ns)


def test_readme_bash_blocks(workdir, capsys):
    ran = 0
    for block in blocks("bash"):
        for line in block.splitlines():
            for command in line.partition("  #")[0].split("&&"):
                command = command.strip()
                if not command or command.startswith(SKIP + tuple(NOT_HERE_BASH)) or command == "torchckpt tour":
                    continue  # installing and testing are CI's job; the tour and torchrun have their own tests
                args = shlex.split(command)
                assert args[0] == "torchckpt", command
                code = main(args[1:])  # in-process: the console script's own entry point
                out = capsys.readouterr()
                allowed = {0, 1} if args[1] == "diff" else {0}
                assert code in allowed, f"{command}\n{out.out}\n{out.err}"
                ran += 1
    assert ran >= 8
