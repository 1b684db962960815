"""Benchmark: remote storage on a local S3 server (moto on 127.0.0.1) against the local disk.

    python bench/bench_remote.py [--size-mib 256] [--repeats 3]

Cases, each in a fresh process (medians, peak RSS over the process baseline):
  - torchckpt.load_into(model, local file)                      [baseline]
  - torchckpt.load_into(model, "s3://bench/model.pt")           (ranged reads through the S3 API)
  - torchckpt.load_into(model, "s3://bench/model.safetensors")
and the bytes that `torchckpt.inspect` moves for the remote zip and safetensors files, measured by a
counting TCP proxy in front of the server (HTTP headers included), against the object size.
Needs the test extras (moto[server], s3fs). Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import os
import sys
import tempfile

from common import HERE, bench_args, measure, print_table, transformer_state_dict

sys.path.insert(0, os.path.join(HERE, os.pardir, "tests"))


def main() -> None:
    args = bench_args(__doc__, size_mib=256)
    import fsspec
    import torch
    from safetensors.torch import save_file

    import torchckpt
    from remote_servers import CountingProxy, moto_server, s3_options

    folder = tempfile.mkdtemp(prefix="torchckpt-bench-", dir=args.dir)
    sd = transformer_state_dict(args.size_mib)
    path = os.path.join(folder, "model.pt")
    st_path = os.path.join(folder, "model.safetensors")
    torch.save(sd, path)
    save_file(sd, st_path)
    del sd
    size = os.path.getsize(path)
    with moto_server() as endpoint, CountingProxy(int(endpoint.rsplit(":", 1)[1])) as proxy:
        opts = s3_options(endpoint)
        fs = fsspec.filesystem("s3", **opts)
        fs.mkdir("bench")
        fs.put_file(path, "bench/model.pt")
        fs.put_file(st_path, "bench/model.safetensors")
        print(f"checkpoint: {size / 2**20:.0f} MiB; medians of {args.repeats} fresh processes; S3 = moto on {endpoint}")

        def case(target: str, options: dict | None) -> str:
            return f"""
from common import model_like
sd_shapes = torch.load({path!r}, map_location="meta", weights_only=True, mmap=True)
base = current_mib()
model = model_like(sd_shapes)
del sd_shapes
t0 = time.perf_counter()
torchckpt.load_into(model, {target!r}, storage_options={options!r})
result = time.perf_counter() - t0
"""

        r = args.repeats
        local = measure(case(path, None), r)
        s3_zip = measure(case("s3://bench/model.pt", opts), r)
        s3_st = measure(case("s3://bench/model.safetensors", opts), r)
        print_table("load_into: local disk vs a local S3 server", [
            ("load_into(model, local model.pt)                [baseline]", local, None),
            ("load_into(model, s3://bench/model.pt)", s3_zip, local),
            ("load_into(model, s3://bench/model.safetensors)", s3_st, local),
        ])
        proxied = s3_options(proxy.endpoint)
        print("\nbytes moved by inspect (counted by a TCP proxy, headers included)")
        for key in ("model.pt", "model.safetensors"):
            proxy.reset()
            report = torchckpt.inspect(f"s3://bench/{key}", storage_options=proxied)
            moved = proxy.up + proxy.down
            print(f"  inspect s3://bench/{key}: {len(report.tensors)} tensors, moved {moved / 1024:.1f} KiB "
                  f"of a {fs.info('bench/' + key)['size'] / 2**20:.0f} MiB object "
                  f"({moved / fs.info('bench/' + key)['size'] * 100:.3f}%)")
    for f in (path, st_path):
        os.remove(f)
    os.rmdir(folder)


if __name__ == "__main__":
    main()
