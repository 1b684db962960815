"""The cost of the safe unpickler's checks: ``torchckpt.load`` of a 600-tensor checkpoint against
``torch.load(weights_only=True, mmap=True)`` of the same file, in the same process and run.

    PYTHONPATH=src python bench/bench_vm.py [--tensors 600] [--repeats 41]

Run it once on the tree before a VM change and once after: the ratio (ours / torch.load) must not grow
by more than 1.1x. Also times a structure-only read (``inspect``'s path) and a scan of the same file.
Both loaders are warmed up first, so the medians measure parsing and tensor construction, not imports.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()

    import torch

    import torchckpt

    sd = {f"layers.{i // 6}.block.{i % 6}.weight": torch.randn(32, 32) for i in range(args.tensors)}
    path = os.path.join(tempfile.mkdtemp(prefix="torchckpt-bench-vm-", dir=args.dir), "model.pt")
    torch.save(sd, path)

    def median(fn) -> float:
        fn()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    base = median(lambda: torch.load(path, weights_only=True, mmap=True))
    ours = median(lambda: torchckpt.load(path))
    structure = median(lambda: torchckpt.read_checkpoint(path, meta=True))
    scan = median(lambda: torchckpt.scan(path))
    print(f"{args.tensors} tensors, {os.path.getsize(path) / 2**20:.1f} MiB, medians of {args.repeats} warm runs "
          f"({torchckpt.__file__})")
    print(f"  torch.load(weights_only=True, mmap=True)  {base * 1e3:8.2f} ms   [baseline]")
    print(f"  torchckpt.load                            {ours * 1e3:8.2f} ms   ratio {ours / base:.2f}")
    print(f"  torchckpt structure-only read             {structure * 1e3:8.2f} ms   ratio {structure / base:.2f}")
    print(f"  torchckpt.scan                            {scan * 1e3:8.2f} ms   ratio {scan / base:.2f}")


if __name__ == "__main__":
    main()
