"""The HTML report: its numbers equal torch's, the plan and diff sections say what torch says, the page
is self-contained, streams with bounded memory, and renders in a real headless browser."""

from __future__ import annotations

import html
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import torchckpt
from torchckpt.tools.report import CheckpointReport
from torchckpt.tools.report.page import plan_statuses

pytest.importorskip("matplotlib")
pytest.importorskip("jinja2")


class Net(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, classes)


def _net(classes: int = 10) -> Net:
    torch.manual_seed(0)
    return Net(classes)


def _stats_by_key(report: CheckpointReport) -> dict:
    return {s.key: s for s in report.stats}


def _expect_stats(s, t: torch.Tensor) -> None:
    x = t.detach().to(torch.float64).reshape(-1)
    finite = x[torch.isfinite(x)]
    assert s.numel == t.numel() and s.shape == tuple(t.shape)
    assert s.nan == int(torch.isnan(x).sum()) and s.inf == int(torch.isinf(x).sum())
    assert s.zeros == int((x == 0).sum())
    if finite.numel():
        # float32 chunks give float32-rounded chunk moments (accumulated in float64 by torch)
        assert s.mean == pytest.approx(float(finite.mean()), rel=1e-6, abs=1e-9)
        assert s.min == float(finite.min()) and s.max == float(finite.max())
        assert s.norm == pytest.approx(float(torch.linalg.vector_norm(finite)), rel=1e-6, abs=1e-9)
        if finite.numel() > 1:
            assert s.std == pytest.approx(float(finite.std()), rel=1e-6, abs=1e-9)


def test_training_checkpoint_numbers_equal_torch(tmp_path):
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sd = model.state_dict()
    sd["head.bias"][2] = float("nan")
    sd["head.bias"][3] = float("inf")
    sd["features.0.weight"].mul_(1e4)  # one layer far above the others
    sd["head.weight"].zero_()  # a dead layer
    path = tmp_path / "train.pth"
    torch.save({"epoch": 12, "best_acc1": 0.764, "arch": "net", "state_dict": sd, "optimizer": opt.state_dict()},
               path)
    out = tmp_path / "report.html"
    r = torchckpt.report(path, output=out)
    stats = _stats_by_key(r)
    assert set(stats) == {f"state_dict.{k}" for k in sd}
    for k, t in sd.items():
        _expect_stats(stats[f"state_dict.{k}"], t)
    kinds = {(w.kind, w.key) for w in r.warnings}
    assert ("nan/inf", "state_dict.head.bias") in kinds
    assert ("all zero", "state_dict.head.weight") in kinds
    assert ("exploding", "state_dict.features.0.weight") in kinds
    assert not any(k == "all zero" and key.endswith(("bias", "running_mean")) for k, key in kinds)
    assert dict(r.training)["epoch"] == 12 and dict(r.training)["best_acc1"] == 0.764
    page = out.read_text()
    assert r.safety == "clean" and 'id="safety">clean<' in page
    for k, t in sd.items():  # every tensor's row shows torch's numbers
        row = re.search(rf'<tr data-key="state_dict.{re.escape(k)}">(.*?)</tr>', page, re.S).group(1)
        cells = [html.unescape(re.sub("<[^>]+>", "", c)).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        x = t.to(torch.float64)
        finite = x[torch.isfinite(x)]
        assert cells[2] == str(t.dtype).replace("torch.", "")
        assert float(cells[4]) == pytest.approx(float(finite.mean()), rel=1e-3, abs=1e-6)
        assert float(cells[7]) == pytest.approx(float(finite.max()), rel=1e-3, abs=1e-6)
        assert int(cells[9]) == int(torch.isnan(x).sum())
    assert "1 param group(s)" in page  # the optimizer summary


def test_whole_model_pickle_reads_through_stubs(tmp_path):
    model = _net()
    path = tmp_path / "whole.pt"
    torch.save(model, path)  # the class lives in this test module: the report never imports it
    r = torchckpt.report(path, output=tmp_path / "whole.html")
    expected = model.state_dict()
    stats = _stats_by_key(r)
    assert set(stats) == set(expected)
    for k, t in expected.items():
        _expect_stats(stats[k], t)
    page = (tmp_path / "whole.html").read_text()
    assert "test_report.Net" in page  # listed among the classes read as stubs
    assert r.by_dtype["float32"][1] == sum(t.numel() * 4 for t in expected.values() if t.dtype == torch.float32)


def test_load_plan_section(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": _net(10).state_dict()}, path)
    target = nn.Module()
    target.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    target.head = nn.Linear(8, 4)  # resized
    target.extra = nn.Linear(2, 2)  # missing from the checkpoint
    before = {k: v.clone() for k, v in target.state_dict().items()}
    r = torchckpt.report(path, against=target, output=tmp_path / "plan.html")
    statuses, unused = plan_statuses(r.plan)
    assert statuses["head.weight"] == statuses["head.bias"] == "resized"
    assert statuses["extra.weight"] == statuses["extra.bias"] == "missing"
    assert statuses["features.0.weight"] == "matched"
    assert unused == []
    page = (tmp_path / "plan.html").read_text()
    assert "resized: 2" in page and "missing: 2" in page
    matched = sum(1 for k in target.state_dict() if not k.startswith(("head.", "extra.")))
    assert f"matched: {matched}" in page
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # a dry run: nothing applied


def test_diff_section_relative_change(tmp_path):
    a = _net().state_dict()
    b = {k: v.clone() for k, v in a.items()}
    b["head.weight"] += 0.5
    b["features.0.bias"] *= 1.01
    pa, pb = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(a, pa)
    torch.save({"module." + k: v for k, v in b.items()}, pb)  # DataParallel names: aligned
    r = torchckpt.report(pa, diff=pb, output=tmp_path / "diff.html")
    change = {c.key: c for c in r.changes}
    assert set(change) == set(a)
    # relative to the base (b), never to less than a typical base layer of that size (issue 24 item 2)
    rms = [float(torch.linalg.vector_norm(v.double())) / math.sqrt(v.numel()) for v in b.values()
           if v.is_floating_point() and v.numel() > 1 and v.abs().sum() > 0]
    typical = statistics.median(rms)
    for k in a:
        d = float(torch.linalg.vector_norm(a[k].double() - b[k].double()))
        scale = max(float(torch.linalg.vector_norm(b[k].double())), math.sqrt(a[k].numel()) * typical)
        assert change[k].change == pytest.approx(d / scale, rel=1e-9, abs=1e-15), k
    ranked = sorted((c for c in r.changes if c.change), key=lambda c: -c.change)
    assert ranked[0].key == "head.weight"
    page = (tmp_path / "diff.html").read_text()
    table = page[page.index('id="most-changed"'):]
    assert table.index("head.weight") < table.index("features.0.bias")


def test_page_is_self_contained_and_escaped(tmp_path):
    evil = '<script>alert(1)</script>'
    path = tmp_path / "evil.pt"
    torch.save({evil: torch.ones(3), "note": evil}, path)
    out = tmp_path / "evil.html"
    torchckpt.report(path, output=out)
    page = out.read_text()
    assert "<script" not in page  # keys and values from the file are escaped; the page has no script
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:|//)', page)
    assert "Content-Security-Policy" in page


@pytest.mark.slow
def test_streaming_memory_stays_near_the_largest_tensor(tmp_path):
    """The issue's bound: peak memory under 1.2x the largest tensor plus the page (imports excluded)."""
    mib = 1 << 20
    path = tmp_path / "big.pt"
    torch.save({f"layer{i}.weight": torch.randn(32 * mib // 4) for i in range(4)}, path)  # 128 MiB, 32 MiB each
    page = tmp_path / "big.html"
    script = textwrap.dedent(f"""
        import torch, jinja2, torchckpt
        from torchckpt.tools.report import html_report, page
        def peak():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
        base = peak()
        torchckpt.report({str(path)!r}, output={str(page)!r})
        print(peak() - base)
    """)
    grew = int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
    # holding the whole file would cost 128 MiB, one tensor 32 MiB
    assert grew < 1.2 * 32 * mib + page.stat().st_size, f"peak grew by {grew / mib:.1f} MiB"


@pytest.mark.slow
def test_cli_writes_the_page_and_exit_codes(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(_net().state_dict(), path)
    out = tmp_path / "m.html"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [os.environ.get("PYTHONPATH", "")] if p))
    proc = subprocess.run([sys.executable, "-m", "torchckpt", "report", str(path), "-o", str(out)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and "written to" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "torchckpt", "report", str(tmp_path / "nope.pt"), "-o", str(out)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 3 and "nope.pt" in proc.stderr
    for module, extra_args in (("jinja2", []), ("matplotlib", ["--diff", str(path)])):
        blocker = tmp_path / f"block-{module}"
        (blocker / module).mkdir(parents=True)
        (blocker / module / "__init__.py").write_text(f"raise ImportError('No module named {module}')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(blocker)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        out.unlink(missing_ok=True)
        proc = subprocess.run([sys.executable, "-m", "torchckpt", "report", str(path), "-o", str(out), *extra_args],
                              capture_output=True, text=True, env=env)
        assert proc.returncode == 2 and 'pip install "torchckpt[report]"' in proc.stderr and module in proc.stderr
        assert not out.exists()
    # without a diff the page needs no matplotlib (its histograms and treemap are drawn as SVG here)
    proc = subprocess.run([sys.executable, "-m", "torchckpt", "report", str(path), "-o", str(out)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and out.exists(), proc.stderr


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no chromium installed (apt-get install chromium)")
def test_page_renders_in_headless_chromium(tmp_path):
    model = _net()
    path = tmp_path / "m.pt"
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, path)
    out = tmp_path / "m.html"
    torchckpt.report(path, against=_net(4), diff=path, output=out)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", out.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'id="safety">clean<' in dom.stdout  # the browser parsed the page and built its DOM
    assert dom.stdout.count("<tr data-key=") == len(model.state_dict())
    assert dom.stdout.count("<rect") > len(model.state_dict())  # the treemaps
    shot = tmp_path / "shot.png"
    proc = subprocess.run([_chromium(), *flags, "--window-size=1200,1600", f"--screenshot={shot}", out.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.stat().st_size > 20_000  # a real picture, not a blank page


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64,
                                   torch.uint8, torch.bool])
def test_chunked_statistics_merge_exactly(dtype):
    from torchckpt.tools.report.tensor_stats import tensor_stats

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1000, generator=g) * 3 + 5)
    if dtype.is_floating_point:
        x = x.to(dtype)
        x[[3, 500]] = float("nan")
        x[77] = float("inf")
        x[10:20] = 0
    else:
        x = x.abs().to(dtype)
    t = x.reshape(10, 100).t()  # non-contiguous: the walk must follow the logical order
    for chunk in (7, 64, 1 << 20):  # uneven chunks exercise the parallel merge
        _expect_stats(tensor_stats("x", t, chunk=chunk), t)
    s = tensor_stats("x", t, bins=10, chunk=13)
    finite = t.to(torch.float64)[torch.isfinite(t.to(torch.float64))]
    assert sum(s.histogram[1]) == finite.numel()
    lo, hi = float(finite.min()), float(finite.max())
    if lo == hi:  # one value: the histogram spans value ± 0.5
        lo, hi = lo - 0.5, hi + 0.5
    assert s.histogram[0][0] == lo and s.histogram[0][-1] == pytest.approx(hi)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int32])
def test_histogram_counts_equal_numpy(dtype):
    """Every bin's count equals numpy.histogram over the finite values with the same range, whatever the chunking."""
    import numpy as np

    from torchckpt.tools.report.tensor_stats import tensor_stats

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(5000, generator=g) * 7).to(dtype)
    if dtype.is_floating_point:
        x[[1, 2]] = float("nan")
        x[3] = float("-inf")
    values = x.to(torch.float64).numpy()
    values = values[np.isfinite(values)]
    want, edges = np.histogram(values, bins=17, range=(values.min(), values.max()))
    for chunk in (5000, 333):
        s = tensor_stats("x", x, bins=17, chunk=chunk)
        assert s.histogram[1] == want.tolist()
        assert s.histogram[0] == pytest.approx(edges.tolist())


def test_page_histograms_show_the_counts(tmp_path):
    """Each of the largest float layers gets an SVG histogram whose bars carry torch's counts per bin."""
    g = torch.Generator().manual_seed(4)
    sd = {f"l{i}.weight": torch.randn(100 * (i + 1), generator=g) for i in range(10)}
    sd["l9.weight"][:7] = float("nan")
    sd["ids"] = torch.arange(5000)  # large but not floating: no histogram
    path = tmp_path / "h.pt"
    torch.save(sd, path)
    page = torchckpt.report(path, output=tmp_path / "h.html", bins=12, histograms=4).render()
    charts = re.findall(r'<svg[^>]*class="histogram".*?</svg>', page, flags=re.S)
    assert len(charts) == 4
    keys = [re.search(r"<title>([^<]*)</title>", chart).group(1) for chart in charts]
    assert sorted(keys) == ["l6.weight", "l7.weight", "l8.weight", "l9.weight"]  # the 4 largest float layers
    for chart, key in zip(charts, keys):
        x = sd[key][torch.isfinite(sd[key])]
        want = torch.histc(x.double(), bins=12, min=float(x.min()), max=float(x.max()))
        counts = [int(n.replace(",", "")) for n in re.findall(r"\): ([\d,]+)</title>|\]: ([\d,]+)</title>", chart)
                  for n in n if n]
        assert counts == [int(c) for c in want.tolist()]
