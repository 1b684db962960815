"""Issue 24: results never mislead (diff, report, errors, types, first-contact frictions).

Each test names the numbered item of the issue it guards; each failed on the code before the fix.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import torchckpt


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "torchckpt", *map(str, args)], capture_output=True, text=True,
                          **kw)


def _strict(text):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


# -- item 1: diff compares values by default, never claims what it did not check ----------------------
@pytest.mark.slow
def test_item1_diff_compares_values_by_default(tmp_path):
    sd = {"w": torch.ones(4, 4), "b": torch.zeros(4)}
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(sd, a)
    torch.save({"w": torch.ones(4, 4) * 2, "b": torch.zeros(4)}, b)
    report = torchckpt.diff(a, b)
    assert report.equal is False and [d.key for d in report.changed] == ["w"]
    res = run_cli("diff", a, b, "--json")
    doc = _strict(res.stdout)
    assert res.returncode == 1 and doc["equal"] is False and "tensor values" in doc["compared"]
    # structure only: never "equal", says what it compared, exit 0 (nothing compared differs)
    structure = torchckpt.diff(a, b, values=False)
    assert structure.equal is None and structure.structure_equal
    res = run_cli("diff", a, b, "--structure-only", "--json")
    doc = _strict(res.stdout)
    assert res.returncode == 0 and doc["equal"] is None and doc["structure_equal"] is True
    assert "tensor values" not in doc["compared"]
    assert "NOT compared" in run_cli("diff", a, b, "--structure-only").stdout


@pytest.mark.slow
def test_item1_plain_values_are_compared(tmp_path):
    w = torch.randn(3, 3)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"model": {"w": w}, "epoch": 3, "lr": 0.1, "config": {"depth": 4, "name": "x", "opt": {"m": 0.9}}},
               a)
    torch.save({"model": {"w": w.clone()}, "epoch": 4, "lr": 0.1, "config": {"depth": 4, "name": "y",
                                                                              "opt": {"m": 0.99}}, "seed": 1}, b)
    for values in (True, False):
        report = torchckpt.diff(a, b, values=values)
        assert report.equal is False and not report.changed
        assert {k: (x, y) for k, x, y in report.plain_changed} == {
            "epoch": (3, 4), "config.name": ("x", "y"), "config.opt.m": (0.9, 0.99)}
        assert report.plain_only_b == ["seed"]
        assert "value  epoch: 3 -> 4" in str(report)
    res = run_cli("diff", a, b, "--json")
    doc = _strict(res.stdout)
    assert res.returncode == 1
    assert {"key": "epoch", "a": 3, "b": 4} in doc["plain_values"]["changed"]  # epoch keeps its type
    assert run_cli("diff", a, b, "--structure-only").returncode == 1
    same = tmp_path / "c.pt"
    torch.save({"model": {"w": w.clone()}, "epoch": 3, "lr": 0.1, "config": {"depth": 4, "name": "x",
                                                                              "opt": {"m": 0.9}}}, same)
    assert torchckpt.diff(a, same).equal is True
    assert run_cli("diff", a, same).returncode == 0


# -- item 3: --json is strict JSON, epoch keeps its type ----------------------------------------------
@pytest.mark.slow
def test_item3_json_is_strict_and_epoch_is_a_number(tmp_path):
    pytest.importorskip("jinja2")
    pytest.importorskip("matplotlib")
    w = torch.randn(8, 8)
    bad = w.clone()
    bad[0, 0] = float("nan")
    bad[1, 1] = float("inf")
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"state_dict": {"w": w, "v": torch.ones(3)}, "epoch": 12, "lr": float("inf")}, a)
    torch.save({"state_dict": {"w": bad, "v": torch.ones(3)}, "epoch": 12, "lr": float("nan")}, b)
    res = run_cli("diff", a, b, "--json")
    doc = _strict(res.stdout)
    assert res.returncode == 1
    w_diff = next(d for d in doc["changed"] if d["key"] == "w")
    assert w_diff["max_abs"] in ("nan", "inf") and float(w_diff["max_abs"]) != 0
    assert {"key": "lr", "a": "inf", "b": "nan"} in doc["plain_values"]["changed"]
    res = run_cli("report", b, "-o", tmp_path / "r.html", "--diff", a, "--json")
    doc = _strict(res.stdout)
    assert res.returncode == 0, res.stderr
    assert doc["training"]["epoch"] == 12 and doc["training"]["lr"] == "nan"
    w_stats = next(t for t in doc["tensors"] if t["key"].endswith("w"))
    assert w_stats["nan"] == 1 and w_stats["inf"] == 1


# -- items 4 and 5: wrong-model errors lead with counts and give one hint that works; the report unpacks --
def _hint_kwargs(hint):
    """The keyword arguments a hint tells the user to pass (``strict=False, on_mismatch="skip"``)."""
    import re
    return {k: (v == "True") if v in ("True", "False") else v.strip('"')
            for k, v in re.findall(r'(strict|on_mismatch)=("?\w+"?)', hint)}


def test_item4_wrong_model_leads_with_counts_and_one_working_hint(tmp_path):
    sd = torch.nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                              dim_feedforward=16).state_dict()
    sd["0.weight"] = torch.zeros(5, 5)  # one name in common, with another shape
    path = tmp_path / "t.pt"
    torch.save(sd, path)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    with pytest.raises(torchckpt.StateDictMismatchError) as info:
        torchckpt.load_into(mlp, path)
    message = str(info.value)
    first = message.splitlines()[0]
    assert "3 missing" in first and f"{len(sd) - 1} unexpected" in first and "1 with another shape" in first
    kwargs = _hint_kwargs(info.value.hint)
    assert kwargs == {"strict": False, "on_mismatch": "skip"}
    report = torchckpt.load_into(mlp, path, **kwargs)  # following the hint succeeds in one step
    assert report.applied and report.skipped == ["0.weight"]


def test_item4_resized_layer_in_one_step(tmp_path):
    def net(classes):
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                   torch.nn.Linear(4, classes))
    path = tmp_path / "c.pt"
    torch.save(net(1000).state_dict(), path)
    for extra in ({}, {"strict": True}):
        with pytest.raises(torchckpt.StateDictMismatchError) as info:
            torchckpt.load_into(net(10), path, **extra)
        assert "2 with another shape" in str(info.value).splitlines()[0]
        report = torchckpt.load_into(net(10), path, **extra, **_hint_kwargs(info.value.hint))
        assert report.applied and sorted(report.skipped) == ["3.bias", "3.weight"]
    # a model with an extra layer and a resized head: still one step
    model = torch.nn.Sequential(*net(10), torch.nn.Linear(10, 2))
    with pytest.raises(torchckpt.StateDictMismatchError) as info:
        torchckpt.load_into(model, path)
    assert "2 missing" in str(info.value).splitlines()[0]
    assert torchckpt.load_into(model, path, **_hint_kwargs(info.value.hint)).applied


def test_item5_load_into_unpacks_like_load_state_dict(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    path = tmp_path / "m.pt"
    torch.save({"0.weight": torch.ones(3, 3), "0.bias": torch.ones(3), "9.weight": torch.ones(1)}, path)
    missing, unexpected = torchckpt.load_into(model, path, strict=False)
    expected = model.load_state_dict(torch.load(path), strict=False)
    assert (missing, unexpected) == (expected.missing_keys, expected.unexpected_keys)
    report = torchckpt.load_into(model, path, strict=False)
    assert report[0] == missing and report[1] == unexpected and report.loaded == ["0.weight", "0.bias"]


# -- item 9: save creates missing parent directories (local and through fsspec) -----------------------
def test_item9_save_creates_parent_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = torch.nn.Linear(2, 2)
    torchckpt.save("checkpoint/deeper/x.pt", model=model, step=3)  # the tutorials' relative path
    assert torchckpt.resume("checkpoint/deeper/x.pt", model=torch.nn.Linear(2, 2)).step == 3
    pytest.importorskip("fsspec")
    url = f"local://{tmp_path}/remote/run/y.pt"  # a URL whose file system has real directories
    torchckpt.save(url, model=model, step=4)
    assert (tmp_path / "remote" / "run" / "y.pt").is_file()
    assert torchckpt.resume(url, model=torch.nn.Linear(2, 2)).step == 4


# -- item 10: load / load_into accept a Checkpointer run directory, as resume does ---------------------
def test_item10_load_and_load_into_read_a_run_directory(tmp_path):
    run = tmp_path / "runs" / "exp1"
    model = torch.nn.Linear(3, 2)
    with torchckpt.Checkpointer(str(run), keep_last=5) as ckpt:
        for step in (1, 2, 3):
            with torch.no_grad():
                model.weight.fill_(step)
            ckpt.save(step, model=model, epoch=step)
    (run / "ckpt-0000000004.pt").write_bytes(b"PK\x03\x04 half-written, no sidecar")  # not committed
    obj, info = torchckpt.load(run, return_info=True)
    assert obj["epoch"] == 3 and torch.equal(obj["model"]["weight"], torch.full((2, 3), 3.0))
    assert any("ckpt-0000000003.pt" in n and "run directory" in n for n in info.notes)
    target = torch.nn.Linear(3, 2)
    report = torchckpt.load_into(target, str(run))
    assert torch.equal(target.weight, torch.full((2, 3), 3.0))
    assert any("ckpt-0000000003.pt" in n for n in report.notes)
    assert torchckpt.resume(str(run), model=torch.nn.Linear(3, 2)).step == 3  # the same checkpoint
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(torchckpt.NotACheckpointError):  # a plain folder still says what to do
        torchckpt.load(empty)


# -- item 11: a truncated zip's error gives the actual and the expected size ----------------------------
@pytest.mark.parametrize("cut", ["half", "directory", "end"])
def test_item11_truncated_zip_gives_both_sizes(tmp_path, cut):
    full = tmp_path / "full.pt"
    torch.save({"w": torch.randn(300, 100), "v": torch.randn(5000)}, full)
    data = full.read_bytes()
    keep = {"half": len(data) // 2, "directory": len(data) - 300, "end": len(data) - 1}[cut]
    short = tmp_path / "short.pt"
    short.write_bytes(data[:keep])
    with pytest.raises(torchckpt.TruncatedCheckpointError) as info:
        torchckpt.load(short)
    err = info.value
    assert err.actual_size == keep and f"{keep:,} bytes" in str(err)
    if cut == "half":  # cut inside tensor data: a lower bound from the sizes data.pkl declares
        assert keep < err.expected_size <= len(data) and f"at least {err.expected_size:,}" in str(err)
    else:  # every member complete: exact for torch.save's layout
        assert err.expected_size == len(data) and f"{len(data):,} bytes expected" in str(err)


# -- item 12: Ctrl-C exits 130 with one line, and 130 is documented ------------------------------------
@pytest.mark.slow
def test_item12_ctrl_c_exits_130_with_one_line():
    import signal
    import socket
    import time

    pytest.importorskip("aiohttp")
    with socket.socket() as server:  # answers nothing: the command waits until it is interrupted
        server.bind(("127.0.0.1", 0))
        server.listen(5)
        server.settimeout(120)
        proc = subprocess.Popen([sys.executable, "-m", "torchckpt", "inspect",
                                 f"http://127.0.0.1:{server.getsockname()[1]}/x.pt"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            conn, _ = server.accept()
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
            conn.close()
        finally:
            proc.kill()
    assert proc.returncode == 130
    assert [line for line in err.splitlines() if line.strip()] == ["error: interrupted (Ctrl-C)"]
    assert "130 interrupted" in run_cli("--help").stdout
    from torchckpt.cli import codes
    assert "130 interrupted" in codes.__doc__


# -- item 2: report --diff lists layers that became NaN/Inf first; zero-initialised tensors do not dominate --
@pytest.mark.slow
def test_item2_report_diff_nan_first_and_zero_init_does_not_dominate(tmp_path):
    pytest.importorskip("jinja2")
    pytest.importorskip("matplotlib")
    g = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(64, 64, generator=g) * 0.05 for i in range(4)}
    base.update({f"layer{i}.bias": torch.zeros(64) for i in range(4)})  # zero-initialised biases
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["layer1.weight"] += 0.02 * torch.randn(64, 64, generator=g)  # the real change: ~40% of the layer
    for i in range(4):
        tuned[f"layer{i}.bias"] += 1e-4 * torch.randn(64, generator=g)  # biases barely moved off zero
    tuned["layer3.weight"][0, 0] = float("nan")  # training blew up here
    pb, pt = tmp_path / "base.pt", tmp_path / "tuned.pt"
    torch.save(base, pb)
    torch.save(tuned, pt)
    r = torchckpt.report(pt, diff=pb, output=tmp_path / "r.html")
    assert r.changes[0].key == "layer3.weight" and r.changes[0].nonfinite == "here"
    ranked = [c for c in r.changes if not c.nonfinite]
    assert ranked[0].key == "layer1.weight" and ranked[0].change == pytest.approx(0.4, rel=0.1)
    assert all(c.change < 0.01 for c in ranked if c.key.endswith("bias"))
    text = str(r)
    assert "NaN/Inf" in text and text.index("layer3.weight") < text.index("layer1.weight")
    page = (tmp_path / "r.html").read_text()
    table = page[page.index('id="most-changed"'):]
    assert table.index("layer3.weight") < table.index("layer1.weight") and "became NaN/Inf" in table
    res = run_cli("report", pt, "--diff", pb, "-o", tmp_path / "r2.html", "--json")
    doc = _strict(res.stdout)
    assert doc["diff"]["changes"][0]["key"] == "layer3.weight" and doc["diff"]["changes"][0]["change"] == "nan"


# -- item 6: print(resume(...)) is short and its report names the file's real format -------------------
def test_item6_resume_prints_short_and_names_the_format(tmp_path):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters())
    path = tmp_path / "x.pt"
    torchckpt.save(path, model=model, optimizer=opt, epoch=1, step=3)
    state = torchckpt.resume(path, model=model, optimizer=opt)
    text = repr(state)
    assert len(text) < 600 and "rng=<python, numpy, torch" in text and str(path) in text
    assert "in-memory" not in str(state.report) and "PyTorch zip format" in state.report.format
    assert state.rng and len(state.rng["python"][1]) > 600  # the states themselves are all there
    legacy = tmp_path / "legacy.pth"
    torch.save({"epoch": 2, "state_dict": model.state_dict()}, legacy, _use_new_zipfile_serialization=False)
    assert "legacy" in torchckpt.resume(legacy, model=model).report.format.lower()


# -- item 8: a new BatchNorm's counter is missing, not "absent from pre-0.4.1 files" --------------------
def test_item8_new_batchnorm_is_missing_not_pre_041(tmp_path):
    old = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    path = tmp_path / "old.pt"
    torch.save(old.state_dict(), path)
    grown = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 4, 1),
                                torch.nn.BatchNorm2d(4))
    report = torchckpt.load_into(grown, path, strict=False)
    assert "3.num_batches_tracked" in report.missing and not report.ignored
    assert "pre-0.4.1" not in str(report)
    # a file of the pre-0.4.1 era (no counters at all, running statistics present): ignored, and said why
    sd = {k: v for k, v in old.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, path)
    report = torchckpt.load_into(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)), path)
    assert report.ok and report.ignored == ["1.num_batches_tracked"] and "pre-0.4.1" in str(report)


# -- item 15: --dtype aliases; an unknown output extension needs --format; scan of a directory --------
@pytest.mark.slow
def test_item15_convert_dtype_aliases_and_unknown_extension(tmp_path):
    src = tmp_path / "x.pt"
    torch.save({"w": torch.randn(3, 3)}, src)
    for alias, want in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("BF16", torch.bfloat16),
                        ("half", torch.float16), ("fp32", torch.float32)):
        report = torchckpt.convert(src, tmp_path / f"{alias}.safetensors", dtype=alias)
        assert report.verified
        assert torchckpt.load(tmp_path / f"{alias}.safetensors")["w"].dtype == want
    res = run_cli("convert", src, tmp_path / "cli.pt", "--dtype", "bf16")
    assert res.returncode == 0, res.stderr
    assert torch.load(tmp_path / "cli.pt")["w"].dtype == torch.bfloat16
    res = run_cli("convert", src, tmp_path / "out.txt")
    assert res.returncode == 2 and "--format" in res.stderr and not (tmp_path / "out.txt").exists()
    with pytest.raises(ValueError, match="output format"):
        torchckpt.convert(src, tmp_path / "out.txt")
    res = run_cli("convert", src, tmp_path / "out.txt", "--format", "safetensors")
    assert res.returncode == 0, res.stderr
    assert torchckpt.load(tmp_path / "out.txt")["w"].dtype == torch.float32


@pytest.mark.slow
def test_item15_scan_directory_hint_and_folder_files_listed(tmp_path):
    import json as json_module

    from safetensors.torch import save_file

    plain, hf = tmp_path / "plain", tmp_path / "hf"
    plain.mkdir()
    hf.mkdir()
    torch.save({"w": torch.ones(2)}, plain / "a.pt")
    save_file({"w": torch.ones(2)}, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json_module.dumps({"model_type": "bert"}))
    res = run_cli("scan", plain)
    assert res.returncode == 2 and "-r" in res.stderr and "unreadable" not in res.stdout + res.stderr
    report = torchckpt.scan(tmp_path, recursive=True)
    statuses = {f.path: f.status for f in report.files}
    assert statuses[str(hf)] == "clean" and statuses[str(hf / "model.safetensors")] == "clean"
    assert statuses[str(plain / "a.pt")] == "clean"


# -- item 13: the report page groups unused keys, separates thousands, and summarises the model -----------
def test_item13_report_page_groups_numbers_and_model_summary(tmp_path):
    pytest.importorskip("jinja2")
    import html as html_module
    model = torch.nn.Sequential()
    model.add_module("encoder", torch.nn.Linear(100, 100))
    model.add_module("head", torch.nn.Linear(100, 10))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 100)).sum().backward()
    opt.step()
    extra = {f"module.extra.{i}.w": torch.ones(3) for i in range(12)}
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": torch.nn.DataParallel(model).state_dict() | extra, "optimizer": opt.state_dict(),
                "epoch": 3}, path)
    target = torch.nn.Sequential()
    target.add_module("encoder", torch.nn.Linear(100, 100))
    target.add_module("head", torch.nn.Linear(100, 10))
    r = torchckpt.report(path, against=target, output=tmp_path / "r.html")
    modules, other = r.model_summary()
    assert [(m, n) for m, n, _ in modules] == [("encoder", 10_100), ("head", 1_010), ("extra", 36)]
    assert [m for m, _, _ in other] == ["optimizer"] and other[0][1] == 2 * 11_110 + 4
    page = html_module.unescape((tmp_path / "r.html").read_text())
    summary = page[page.index('id="model-summary"'):]
    assert "10,100" in summary and "11,146" in summary  # thousands separators, and the total
    unused = page[page.index('id="unused"'):]
    unused = unused[:unused.index("</ul>")]
    assert "module.extra.* (12)" in unused and "extra.0.w" not in unused
    assert "model: 11,146 values in 3 top-level modules" in str(r)


# -- item 7: allow=["mypkg.*"] gives a model that runs: its torch.nn children are real values -----------
USER_PACKAGE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.head = nn.Linear(4, 3)
        self.note = {"classes": ("a", "b", "c"), "scale": 0.5}

    def forward(self, x):
        return self.head(self.features(x)) * self.note["scale"]


def hook(module, args, output):
    return output


class Huge:
    def __reduce__(self):
        return (nn.Linear, (1 << 40, 1 << 40))
'''


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg_i24"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(USER_PACKAGE)
    (tmp_path / "evilpkg_i24.py").write_text("def hook(module, args, output):\n    return output\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    return importlib.import_module("mypkg_i24.models")


def test_item7_allowed_model_runs_with_real_nn_children(tmp_path, user_package):
    torch.manual_seed(0)
    net = user_package.Net().eval()
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    model = torchckpt.load(path, allow=["mypkg_i24.*"])
    assert type(model) is user_package.Net
    assert type(model.features[0]) is torch.nn.Conv2d and type(model.features[1]) is torch.nn.BatchNorm2d
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model.eval()(x), net(x))
    assert isinstance(model.head.weight, torch.nn.Parameter) and model.head.weight.requires_grad
    assert model.note == {"classes": ("a", "b", "c"), "scale": 0.5}
    # without allow=, everything stays an inert stub, as before
    stub = torchckpt.load(path)
    assert isinstance(stub, torchckpt.Stub) and isinstance(stub.features, torchckpt.Stub)


def _save_tampered(net, path, **entries):
    net.__dict__.update(entries)  # what a hostile file's state dict can say
    torch.save(net, path)


@pytest.mark.parametrize("attack", ["forward_hook_real_function", "forward_hook_stub", "forward_attribute",
                                    "dunder_class", "state_dict_attribute", "callable_value",
                                    "parameter_not_tensor"])
def test_item7_hostile_module_state_is_refused(tmp_path, user_package, attack):
    import functools

    net = user_package.Net()
    path = tmp_path / "evil.pt"
    if attack == "forward_hook_real_function":  # a function the caller's own allow= makes real
        net.register_forward_hook(user_package.hook)
        torch.save(net, path)
    elif attack == "forward_hook_stub":  # a function outside allow=: an inert stub, refused all the same
        import evilpkg_i24
        net.head.register_forward_hook(evilpkg_i24.hook)
        torch.save(net.head, path)
    elif attack == "forward_attribute":
        _save_tampered(net, path, forward=user_package.hook)
    elif attack == "dunder_class":
        _save_tampered(net, path, __class__="x")
    elif attack == "state_dict_attribute":
        _save_tampered(net.features[0], path, state_dict=3)
    elif attack == "callable_value":
        _save_tampered(net, path, helper=functools.partial(user_package.hook, None))
    else:
        net.head.__dict__["_parameters"]["weight"] = "not a tensor"
        torch.save(net, path)
    if attack == "callable_value":  # functools.partial stays an inert stub: kept, but it cannot run anything
        model = torchckpt.load(path, allow=["mypkg_i24.*"])
        assert isinstance(model.helper, torchckpt.Stub)
        with pytest.raises(TypeError, match="inert"):
            model.helper(None, None)
        return
    with pytest.raises((torchckpt.UnsafeCheckpointError, torchckpt.CorruptCheckpointError)):
        torchckpt.load(path, allow=["mypkg_i24.*"])


def test_item7_nn_classes_are_never_called(tmp_path, user_package):
    """REDUCE on a torch.nn class would run its __init__ with the file's arguments (a 4 TiB Linear)."""
    path = tmp_path / "huge.pt"
    torch.save({"layer": user_package.Huge()}, path)
    with pytest.raises(torchckpt.CheckpointError):
        torchckpt.load(path, allow=["mypkg_i24.*"])
