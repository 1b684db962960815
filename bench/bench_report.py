"""The HTML report against reading the file once.

Goal (issue "look before you load"): a report in under 2x the time of reading the file once
(`torch.load`, what a user would run to look at the tensors), with peak memory under 1.2x the
largest tensor plus the page. Each case runs in a fresh process; medians of --repeats runs.

    python bench/bench_report.py --size-mib 1024
"""

from __future__ import annotations

import os
import tempfile

from common import bench_args, measure, print_table, transformer_state_dict


def main() -> None:
    args = bench_args(__doc__)
    import torch

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "ckpt.pt")
        sd = transformer_state_dict(args.size_mib)
        largest = max(t.numel() * t.element_size() for t in sd.values()) / 2**20
        torch.save(sd, path)
        del sd
        with open(path, "rb+") as fh:  # written back before timing: pages under writeback stall mapped reads
            os.fsync(fh.fileno())
        out = os.path.join(tmp, "report.html")
        # The modules each case needs are imported before its clock and its memory baseline start (an
        # import is a constant, not work on the file); the report itself imports nothing else.
        prelude = "import jinja2\nfrom torchckpt.tools.report import html_report, page\nbase = reset_peak()\n"
        read_once = measure(prelude + f"""
t = time.perf_counter()
sd = torch.load({path!r}, weights_only=True)
result = time.perf_counter() - t
""", args.repeats)
        read_stats = measure(prelude + f"""
t = time.perf_counter()
sd = torch.load({path!r}, weights_only=True)
for v in sd.values():
    v.double().mean(); v.double().std(); v.min(); v.max(); (v == 0).sum(); torch.isnan(v).sum()
result = time.perf_counter() - t
""", args.repeats)
        ours = measure(prelude + f"""
t = time.perf_counter()
torchckpt.report({path!r}, output={out!r})
result = time.perf_counter() - t
""", args.repeats)
        page = f"page {os.path.getsize(out) / 2**20:.1f} MiB" if os.path.exists(out) else "no page written"
        print_table(f"report of a {args.size_mib} MiB checkpoint (largest tensor {largest:.0f} MiB; {page})", [
            ("torch.load(weights_only=True) (reading the file once)", read_once, None),
            ("torch.load + the same statistics by hand", read_stats, read_once),
            ("torchckpt.report(path, output=...)", ours, read_once),
        ])
        if "peak_mib" in ours:
            print(f"report peak RSS over base: {ours['peak_mib']:.0f} MiB = "
                  f"{ours['peak_mib'] / largest:.2f}x the largest tensor")
        else:
            print(f"the report failed: {ours.get('error')}")


if __name__ == "__main__":
    main()
