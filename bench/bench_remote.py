"""Benchmark: remote storage on a local S3 server (moto on 127.0.0.1), against the local disk and
against plain fsspec/s3fs + torch.load in the same run.

    python bench/bench_remote.py [--size-mib 256] [--repeats 3]

Cases, each in a fresh process (median seconds, CPU seconds, peak RSS over the process baseline):
  load_into
  - torchckpt.load_into(model, local model.pt)                        [local baseline]
  - s3fs file object -> torch.load(weights_only=True) -> load_state_dict [remote baseline]
  - s3fs whole read -> torch.load(BytesIO) -> load_state_dict
  - torchckpt.load_into(model, "s3://bench/model.pt")                  (ranged reads, straight into the model)
  - safetensors: s3fs whole read -> safetensors.torch.load -> load_state_dict  [baseline]
  - torchckpt.load_into(model, "s3://bench/model.safetensors")
  save
  - torch.save(state_dict, s3fs file opened "wb")                      [baseline]
  - torchckpt.save("s3://bench/run/ckpt.pt")  (staged, uploaded whole, sidecar last, size checked)
  cache
  - torchckpt.download(url, sha256=...) miss (download + hash) and hit (re-hash, no transfer)
and the bytes that `torchckpt.inspect` moves for the remote zip and safetensors files, counted by a
TCP proxy in front of the server (HTTP headers included), against the object size.
Needs the test extras (moto[server], s3fs). Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
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
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's request log
    patient = {"config_kwargs": {"connect_timeout": 10, "read_timeout": 300, "retries": {"max_attempts": 1}}}
    with moto_server() as endpoint, CountingProxy(int(endpoint.rsplit(":", 1)[1])) as proxy:
        opts = s3_options(endpoint, **patient)  # a loaded machine must not turn into timeouts and retries
        fs = fsspec.filesystem("s3", **opts)
        fs.mkdir("bench")
        fs.put_file(path, "bench/model.pt")
        fs.put_file(st_path, "bench/model.safetensors")
        print(f"checkpoint: {size / 2**20:.0f} MiB; medians of {args.repeats} fresh processes; S3 = moto on {endpoint}")

        setup = f"""
from common import model_like
import fsspec, io
opts = {opts!r}
sd_shapes = torch.load({path!r}, map_location="meta", weights_only=True, mmap=True)
model = model_like(sd_shapes)
del sd_shapes
base = reset_peak()
t0 = time.perf_counter()
"""
        done = "result = time.perf_counter() - t0\n"

        def case(body: str) -> dict:
            return measure(setup + body.strip() + "\n" + done, args.repeats)

        r = {
            "local": case(f"torchckpt.load_into(model, {path!r})"),
            "s3fs_file": case("""
with fsspec.open("s3://bench/model.pt", "rb", **opts) as f:
    model.load_state_dict(torch.load(f, weights_only=True))"""),
            "s3fs_whole": case("""
with fsspec.open("s3://bench/model.pt", "rb", **opts) as f:
    model.load_state_dict(torch.load(io.BytesIO(f.read()), weights_only=True))"""),
            "ours_zip": case('torchckpt.load_into(model, "s3://bench/model.pt", storage_options=opts)'),
            "s3fs_st": case("""
from safetensors.torch import load as st_load
with fsspec.open("s3://bench/model.safetensors", "rb", **opts) as f:
    model.load_state_dict(st_load(f.read()))"""),
            "ours_st": case('torchckpt.load_into(model, "s3://bench/model.safetensors", storage_options=opts)'),
            "save_s3fs": case("""
with fsspec.open("s3://bench/plain/ckpt.pt", "wb", **opts) as f:
    torch.save(model.state_dict(), f)"""),
            "save_ours": case('torchckpt.save("s3://bench/run/ckpt.pt", model=model, step=1, storage_options=opts)'),
        }
        print_table("load_into from a local S3 server (moto), against plain s3fs + torch.load", [
            ("load_into(model, local model.pt)            [local baseline]", r["local"], None),
            ("s3fs file -> torch.load -> load_state_dict  [s3 baseline]", r["s3fs_file"], None),
            ("s3fs read() -> torch.load(BytesIO) -> load_state_dict", r["s3fs_whole"], r["s3fs_file"]),
            ("load_into(model, s3://bench/model.pt)", r["ours_zip"], r["s3fs_file"]),
            ("  ... against the local disk", r["ours_zip"], r["local"]),
            ("s3fs read() -> safetensors load -> load_state_dict [baseline]", r["s3fs_st"], None),
            ("load_into(model, s3://bench/model.safetensors)", r["ours_st"], r["s3fs_st"]),
        ], size_mib=size / 2**20)
        print_table("save to the S3 server", [
            ("torch.save(sd, s3fs file 'wb')               [baseline]", r["save_s3fs"], None),
            ("torchckpt.save(s3://..., model=...)  (+ sidecar, checks)", r["save_ours"], r["save_s3fs"]),
        ], size_mib=size / 2**20)

        cache = os.path.join(folder, "cache")
        fetch = f"""
os.environ["TORCHCKPT_CACHE"] = {cache!r}
base = reset_peak()
t0 = time.perf_counter()
torchckpt.download("s3://bench/model.pt", sha256={digest!r}, storage_options={opts!r})
result = time.perf_counter() - t0
"""
        plain = f"""
import fsspec
base = reset_peak()
t0 = time.perf_counter()
fsspec.filesystem("s3", **{opts!r}).get_file("bench/model.pt", {os.path.join(folder, 'plain.pt')!r})
result = time.perf_counter() - t0
"""
        cold = []
        for _ in range(args.repeats):  # a miss each time: the cache is emptied before each run
            shutil.rmtree(cache, ignore_errors=True)
            cold.append(measure(fetch, 1))
        miss = {"seconds": sorted(c["seconds"] for c in cold)[len(cold) // 2],
                "peak_mib": max(c["peak_mib"] for c in cold), "cpu": sorted(c["cpu"] for c in cold)[len(cold) // 2]}
        hit = measure(fetch, args.repeats)  # the cache is warm now: re-hash only
        print_table("download cache (sha256 checked)", [
            ("s3fs get_file (no hash)                      [baseline]", measure(plain, args.repeats), None),
            ("torchckpt.download miss (download + sha256)", miss, None),
            ("torchckpt.download hit (sha256 re-checked, no transfer)", hit, miss),
        ], size_mib=size / 2**20)

        proxied = s3_options(proxy.endpoint, **patient)
        print("\nbytes moved by inspect (counted by a TCP proxy, headers included)")
        for key in ("model.pt", "model.safetensors"):
            proxy.reset()
            report = torchckpt.inspect(f"s3://bench/{key}", storage_options=proxied)
            moved = proxy.up + proxy.down
            total = fs.info("bench/" + key)["size"]
            print(f"  inspect s3://bench/{key}: {len(report.tensors)} tensors, moved {moved / 1024:.1f} KiB "
                  f"of a {total / 2**20:.0f} MiB object ({moved / total * 100:.3f}%)")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
