"""Shared helpers for the benchmarks: a realistic ~N MiB state dict, child-process timing with peak RSS,
and a results table. Every measurement runs in a fresh Python process so peak RSS is its own."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap
from typing import Any
from collections import OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))


def bench_args(doc: str | None, size_mib: int = 1024, extra=None):
    """The arguments every benchmark takes: --size-mib, --repeats, --dir."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=size_mib, help="checkpoint size")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per case (the median is shown)")
    ap.add_argument("--dir", default=None, help="where to write the temporary files")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each measured process (0: default)")
    if extra is not None:
        extra(ap)  # a benchmark's own arguments
    args = ap.parse_args()
    if args.threads:
        os.environ["TORCHCKPT_BENCH_THREADS"] = str(args.threads)  # read by every child's prelude
    return args


def transformer_state_dict(size_mib: int, dtype: str = "float32", device: str = "cpu"):
    """A GPT-like state dict of about ``size_mib`` MiB: embeddings + layers of 4 square matrices.

    ``device="meta"`` gives the shapes only (instant): enough for :func:`model_like`.
    """
    import torch

    dt = getattr(torch, dtype)
    d, vocab = (1024, 8192) if size_mib >= 64 else (256, 1024)  # small sizes: layers of 1 MiB, not 16
    per_layer = 4 * d * d + 4 * d * 4 + 4 * d
    layer_bytes = per_layer * dt.itemsize
    n_layers = max(1, (size_mib * 2**20 - vocab * d * dt.itemsize) // layer_bytes)
    g = torch.Generator().manual_seed(0) if device != "meta" else None
    # meta: torch.empty, not randn (a meta randn runs torch._refs, which imports torch._dynamo and with it
    # numpy.random: seconds of imports the measured process of a real program would not have)
    def randn(*shape: int) -> Any:
        return torch.randn(*shape, generator=g) if g is not None else torch.empty(*shape)

    sd = OrderedDict()
    with torch.device(device):
        sd["embed.weight"] = randn(vocab, d).to(dt)
        for i in range(int(n_layers)):
            for name in ("q", "k", "v", "o"):
                sd[f"layers.{i}.attn.{name}.weight"] = randn(d, d).to(dt)
                sd[f"layers.{i}.attn.{name}.bias"] = torch.zeros(d, dtype=dt)
            sd[f"layers.{i}.ln.weight"] = torch.ones(d, dtype=dt)
            sd[f"layers.{i}.ln.bias"] = torch.zeros(d, dtype=dt)
            sd[f"layers.{i}.ln.running"] = torch.zeros(d, dtype=dt)
            sd[f"layers.{i}.ln.extra"] = torch.zeros(d, dtype=dt)
    return sd


CHILD_PRELUDE = textwrap.dedent("""
    import json, os, resource, sys, time, gc
    import torch, numpy, torchckpt
    sys.path.insert(0, {here!r})
    if os.environ.get("TORCHCKPT_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["TORCHCKPT_BENCH_THREADS"]))
    gc.collect()
    def rss_mib():  # VmHWM: peak RSS since the last reset_peak()
        with open('/proc/self/status') as fh:
            return next(int(l.split()[1]) for l in fh if l.startswith('VmHWM')) / 1024
    def current_mib():
        with open('/proc/self/statm') as fh:
            return int(fh.read().split()[1]) * 4096 / 2**20
    def cpu_s():  # user + system CPU seconds of this process (all threads): robust on a loaded machine
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    def sys_s():  # the kernel's share: page faults on fresh memory, copies into the page cache
        return resource.getrusage(resource.RUSAGE_SELF).ru_stime
    def reset_peak():
        # Peak := current RSS (Linux clear_refs 5), so whatever the setup built and freed (a state dict to
        # make the model from, the model's own construction) does not count; returns the current RSS.
        gc.collect()
        try:
            with open('/proc/self/clear_refs', 'w') as fh:
                fh.write('5')
        except OSError:
            pass
        return current_mib()
    base = reset_peak()
""")


def _child_script(code: str) -> str:
    # CPU seconds are taken over the same span as ``result``: the snippet's own start and end lines.
    code = textwrap.dedent(code).replace("t0 = time.perf_counter()\n", "t0 = time.perf_counter(); cpu0 = cpu_s(); sys0 = sys_s()\n")
    code = code.replace("result = time.perf_counter() - t0\n", "result = time.perf_counter() - t0; cpu = cpu_s() - cpu0; sys_cpu = sys_s() - sys0\n")
    return CHILD_PRELUDE.format(here=HERE) + code + textwrap.dedent("""
        print(json.dumps({"seconds": result, "peak_mib": rss_mib() - base, "cpu": globals().get("cpu"),
                          "sys": globals().get("sys_cpu")}))
    """)


def _run_child(script: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(outs: list[dict]) -> dict:
    errors = [o for o in outs if "error" in o]
    if errors:
        return errors[0]
    res = {"seconds": statistics.median(o["seconds"] for o in outs), "peak_mib": max(o["peak_mib"] for o in outs),
           "runs": len(outs)}
    if all(o.get("cpu") is not None for o in outs):
        res["cpu"] = statistics.median(o["cpu"] for o in outs)
    if all(o.get("sys") is not None for o in outs):
        res["sys"] = statistics.median(o["sys"] for o in outs)
    return res


def measure(code: str, repeats: int = 3) -> dict:
    """Run ``code`` (which sets ``result`` seconds) in fresh processes; median seconds, max peak RSS over base.

    ``code`` calls ``base = reset_peak()`` once its setup is done: peak RSS is measured from there.
    """
    script = _child_script(code)
    outs = []
    for _ in range(repeats):
        outs.append(_run_child(script))
        if "error" in outs[-1]:
            break
    res = _summary(outs)
    print(f"  ... case done: {res}", file=sys.stderr, flush=True)  # progress (the table comes at the end)
    return res


def measure_alternated(codes: dict[str, str], repeats: int = 5) -> dict[str, dict]:
    """Like :func:`measure` for several cases whose runs alternate (a, b, c, a, b, c, ...): a change in
    machine load or disk speed during the run hits every case alike. Returns the summary per case."""
    scripts = {name: _child_script(code) for name, code in codes.items()}
    outs: dict[str, list[dict]] = {name: [] for name in codes}
    for i in range(repeats):
        for name, script in scripts.items():
            if not any("error" in o for o in outs[name]):
                outs[name].append(_run_child(script))
        print(f"  ... round {i + 1}/{repeats}: " + ", ".join(
            f"{n} {o[-1].get('seconds', float('nan')):.3f}s" for n, o in outs.items()), file=sys.stderr, flush=True)
    return {name: _summary(o) for name, o in outs.items()}


def print_table(title: str, rows: list[tuple[str, dict, dict | None]], size_mib: float | None = None) -> None:
    """rows: (label, result, baseline result or None). With ``size_mib`` the peak is also shown as a multiple."""
    print(f"\n{title}")
    print(f"{'case':60s} {'median s':>9s} {'ratio':>7s} {'cpu s':>7s} {'cpu x':>6s} {'sys s':>6s} {'peak MiB':>9s} "
          f"{'x size':>7s}")
    for label, res, base in rows:
        if "error" in res:
            print(f"{label:60s} {'error: ' + res['error'][:60]}")
            continue
        ratio = f"{res['seconds'] / base['seconds']:.2f}x" if base and "seconds" in base else "-"
        cpu = f"{res['cpu']:.3f}" if "cpu" in res else "-"
        cpu_ratio = f"{res['cpu'] / base['cpu']:.2f}x" if base and base.get("cpu") and "cpu" in res else "-"
        times = f"{res['peak_mib'] / size_mib:.2f}x" if size_mib and res["peak_mib"] == res["peak_mib"] else ""
        kernel = f"{res['sys']:.3f}" if "sys" in res else "-"
        print(f"{label:60s} {res['seconds']:9.3f} {ratio:>7s} {cpu:>7s} {cpu_ratio:>6s} {kernel:>6s} "
              f"{res['peak_mib']:9.0f} {times:>7s}")


def model_like(state_dict):
    """An nn.Module whose state_dict() has exactly the keys and shapes of ``state_dict`` (zero-filled)."""
    import torch

    root = torch.nn.Module()
    for key, value in state_dict.items():
        *path, name = key.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, torch.nn.Module())
            module = module._modules[part]
        module.register_parameter(name, torch.nn.Parameter(torch.zeros(value.shape, dtype=value.dtype)))
    return root
