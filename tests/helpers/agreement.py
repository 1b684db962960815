"""Scan/load agreement on generated and mutated inputs, for every reader (test helper and fuzz driver).

``check(case, workdir)`` writes one input (a file, or a directory for DCP), runs ``load``, ``inspect``
and ``scan`` on it and raises AssertionError if they disagree or anything but a value or a
``CheckpointError`` comes out, or an input takes longer than ``TIME_BOUND``:

* load refuses as unsafe            => scan reports a dangerous global or an unsafe path;
* load fails for any other reason   => scan records the error (the file is unreadable to it);
* load succeeds                     => scan records no error and no dangerous global in what load read.

Long run (nice'd, bounded memory; prints counts and every failure)::

    nice -n 10 python tests/agreement.py 50000 [seed] [--front-ends]
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
import struct
import sys
import tarfile
import time
import warnings
import zipfile
from dataclasses import dataclass
from typing import Callable

TIME_BOUND = 5.0


@dataclass
class Case:
    kind: str
    files: dict[str, bytes]  # one entry: a file; several: a directory (DCP)

    @property
    def is_dir(self) -> bool:
        return len(self.files) > 1


def seeds() -> dict[str, Case]:
    """One small valid input per reader (plus a few variants), made by the real writers."""
    import numpy as np
    import torch
    from safetensors.torch import save as st_save

    from torchckpt.demo.samples import write_py2_legacy

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    from pickle_asm import torch_zip
    from t7_writer import Obj, Writer
    from tar_writer import write_torch_tar

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    obj = {"epoch": 1, "state_dict": net.state_dict(), "np": np.float32(1.5), "arr": np.arange(3)}
    out: dict[str, Case] = {}

    def saved(fn) -> bytes:
        buf = io.BytesIO()
        fn(buf)
        return buf.getvalue()

    out["zip"] = Case("zip", {"f": saved(lambda b: torch.save(obj, b))})
    out["legacy"] = Case("legacy", {"f": saved(lambda b: torch.save(obj, b, _use_new_zipfile_serialization=False))})
    out["py2"] = Case("py2", {"f": saved(lambda b: write_py2_legacy({"state_dict": net.state_dict(),
                                                                     "x": np.float64(2.0)}, b))})
    out["whole"] = Case("whole", {"f": saved(lambda b: torch.save(net, b))})
    out["safetensors"] = Case("safetensors", {"f": st_save({k: v.contiguous() for k, v in net.state_dict().items()},
                                                           metadata={"format": "pt"})})
    out["pickle"] = Case("pickle", {"f": pickle.dumps({"blobs": {"w": np.ones((2, 2), np.float32)}, "it": 3},
                                                      protocol=2)})
    out["npz"] = Case("npz", {"f": saved(lambda b: np.savez(b, a=np.arange(6.0).reshape(2, 3), b=np.ones(2, np.int8)))})
    out["npy"] = Case("npy", {"f": saved(lambda b: np.save(b, np.arange(5, dtype=np.int32)))})
    tar = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"agreement-seed-{os.getpid()}.tar")
    write_torch_tar({"w": torch.ones(2), "b": torch.arange(3.0)}, tar)
    with open(tar, "rb") as fh:
        out["tar"] = Case("tar", {"f": fh.read()})
    os.remove(tar)
    w = Writer()
    w.write(Obj("nn.Sequential", {"modules": [Obj("nn.Linear", {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}),
                                              Obj("nn.BatchNormalization", {"running_mean": torch.zeros(2),
                                                                            "running_std": torch.ones(2),
                                                                            "eps": 1e-5})]}))
    out["t7"] = Case("t7", {"f": bytes(w.out)})
    for name in ("floattensor.t7", "recursive_class.t7", "tds_hash.t7"):
        with open(os.path.join(here, os.pardir, "data", "t7", name), "rb") as fh:
            out[f"t7-{name[:-3]}"] = Case("t7", {"f": fh.read()})
    out["dcp"] = _dcp_seed(net)
    out.update(_issue28_seeds(net, saved))
    out["training"] = _training_seed(net)
    from pickle_asm import PROTO2, STOP, call, glob, legacy, s, wrap_in_dict

    evil = wrap_in_dict(call(glob("os", "system"), s("true")))  # never run: refused or recorded
    out["evil-zip"] = Case("zip", {"f": torch_zip(evil)})
    out["evil-legacy"] = Case("legacy", {"f": legacy(evil)})
    out["evil-pickle"] = Case("pickle", {"f": PROTO2 + call(glob("builtins", "getattr"), call(
        glob("collections", "OrderedDict")), s("x")) + STOP})
    out["polyglot"] = Case("zip", {"f": torch_zip(pickle.dumps({"a": [1, 2]}, protocol=2),
                                                  {"data/extra.pkl": pickle.dumps({"hidden": 1}, protocol=2)})})
    return out


def _issue28_seeds(net, saved) -> dict[str, Case]:
    """Quantized tensors and packed params, a numpy object array, a torch function reference in a whole model,
    and a TorchScript archive of torch < 1.2 (model.json + tensors/ + attributes.pkl)."""
    import json
    import zipfile

    import numpy as np
    import torch
    import torch.jit._pickle

    torch.manual_seed(0)
    weight = torch.quantize_per_channel(torch.randn(4, 3), torch.rand(4, dtype=torch.double) + 0.1,
                                        torch.zeros(4, dtype=torch.long), 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(weight, torch.randn(4))
    qsd = {"w": torch.quantize_per_tensor(torch.randn(5), 0.1, 2, torch.quint8), "fc._packed_params": packed}
    objects = np.empty(2, dtype=object)
    objects[0], objects[1] = np.ones((2, 2), np.float32), np.arange(3)
    with_fn = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with_fn.act = torch.sigmoid

    class TensorRef:
        def __reduce__(self):
            return torch.jit._pickle.build_tensor_from_id, (1,)

    t0, t1 = torch.arange(6.0), torch.ones(2)
    defs = [{"dims": [str(d) for d in t.shape], "offset": "0", "strides": [str(x) for x in t.stride()],
             "dataType": "FLOAT", "data": {"key": f"tensors/{i}"}, "device": "cpu"} for i, t in enumerate((t0, t1))]
    model = {"protoVersion": "3", "tensors": defs, "mainModule": {
        "name": "m", "parameters": [{"isBuffer": False, "tensorId": "0", "name": "w"}],
        "attributes": [{"type": "Tensor", "name": "a", "id": "0"}]}}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("m/model.json", json.dumps(model))
        zf.writestr("m/attributes.pkl", pickle.dumps((TensorRef(),), protocol=2))
        for i, t in enumerate((t0, t1)):
            zf.writestr(f"m/tensors/{i}", t.numpy().tobytes())
    return {"quantized": Case("zip", {"f": saved(lambda b: torch.save(qsd, b))}),
            "object-array": Case("pickle", {"f": pickle.dumps({"weights": objects}, protocol=4)}),
            "function-ref": Case("zip", {"f": saved(lambda b: torch.save(with_fn, b))}),
            "torchscript-v1": Case("zip", {"f": buf.getvalue()})}


def _training_seed(net) -> Case:
    """A torchckpt training checkpoint (model, optimizer, RNG states), the file resume reads."""
    import tempfile

    import torch

    import torchckpt

    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.ones(2, 3)).sum().backward()
    opt.step()
    with tempfile.TemporaryDirectory() as d:
        torchckpt.save(os.path.join(d, "ckpt.pt"), model=net, optimizer=opt, epoch=2, step=7)
        with open(os.path.join(d, "ckpt.pt"), "rb") as fh:
            return Case("zip", {"f": fh.read()})


def _dcp_seed(net) -> Case:
    import tempfile

    import torch
    import torch.distributed.checkpoint as dcp

    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": net.state_dict(), "step": 3, "note": "x"}, checkpoint_id=d)
        files = {}
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as fh:
                files[name] = fh.read()
    return Case("dcp", files)


_INTS = [b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80", b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x01\x00\x00\x00"]
_OPCODES = b"()}]cRbsueatq\x94\x85\x86\x87\x81\x92\x93QP.NKJM"


def mutate(case: Case, rng: random.Random) -> Case:
    """Mutate one file of the case: either its raw bytes (flips, cuts, big ints, opcodes, splices: the
    container's own checks, CRCs included, see most of these), or, one time in two, the inside of the
    container with its framing repaired (a zip/npz member re-packed with a valid CRC, a tar member
    re-packed, a safetensors header edited as JSON), so that the readers behind the framing get bad input
    too."""
    files = dict(case.files)
    name = rng.choice(sorted(files))
    data = files[name]
    inner = None
    if rng.random() < 0.5:
        if data[:4] == b"PK\x03\x04":
            inner = _mutate_zip_member(data, rng)
        elif len(data) > 262 and data[257:262] == b"ustar":
            inner = _mutate_tar_member(data, rng)
        elif case.kind == "safetensors":
            inner = _mutate_safetensors_header(data, rng)
    files[name] = inner if inner is not None else mutate_bytes(data, rng)
    return Case(case.kind, files)


def mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    """1-4 byte-level mutations (mostly one, and cuts rarely: inputs that stay nearly valid go deepest)."""
    data = bytearray(raw)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 4))):
        if not data:
            break
        i = rng.randrange(len(data))
        op = rng.choices(range(8), (3, 3, 1, 2, 1, 2, 2, 2))[0]
        if op == 0:
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[i] = rng.randrange(256)
        elif op == 2:
            del data[i:]
        elif op == 3:
            data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 4:
            del data[i:i + rng.randint(1, 16)]
        elif op == 5:
            data[i:i + 4] = rng.choice(_INTS)
        elif op == 6:
            data[i] = rng.choice(_OPCODES)
        else:
            j = rng.randrange(len(data))
            n = rng.randint(1, 32)
            data[i:i + n] = data[j:j + n]
    return bytes(data)


def _mutate_zip_member(data: bytes, rng: random.Random) -> bytes | None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = [(info, zf.read(info)) for info in zf.infolist()]
    except Exception:  # noqa: BLE001 - already broken: fall back to byte mutations
        return None
    # pickles and headers are where the parsing is: pick them more often than tensor data
    weights = [8 if i.filename.endswith((".pkl", ".npy", "version", "byteorder")) else 1 for i, _ in members]
    k = rng.choices(range(len(members)), weights)[0]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for n, (info, body) in enumerate(members):
            zf.writestr(info, mutate_bytes(body, rng) if n == k else body)
    return out.getvalue()


def _mutate_tar_member(data: bytes, rng: random.Random) -> bytes | None:
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            members = [(m, tf.extractfile(m).read() if m.isfile() else b"") for m in tf.getmembers()]
    except Exception:  # noqa: BLE001
        return None
    k = rng.randrange(len(members))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tf:
        for n, (m, body) in enumerate(members):
            body = mutate_bytes(body, rng) if n == k else body
            m.size = len(body)
            tf.addfile(m, io.BytesIO(body))
    return out.getvalue()


_JSON_VALUES = [-1, 0, 1, 2**31, 2**63, 2**64 + 5, -(2**63), 1e308, None, True, "", "F32", "BOOL", "x" * 40, [],
                [1, 2], [0, 2**62], {}, {"a": 1}]


def _mutate_safetensors_header(data: bytes, rng: random.Random) -> bytes | None:
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
    except Exception:  # noqa: BLE001
        return None

    def value():  # a fresh copy: a shared list edited in two places would make the header circular
        return json.loads(json.dumps(rng.choice(_JSON_VALUES)))

    def edit(node, depth=0):
        if isinstance(node, dict) and node:
            key = rng.choice(sorted(node))
            if depth and rng.random() < 0.4:
                node[key] = value()
            elif rng.random() < 0.1:
                node[key + "_"] = node.pop(key)
            else:
                node[key] = edit(node[key], depth + 1)
            return node
        if isinstance(node, list) and node:
            i = rng.randrange(len(node))
            node[i] = value() if rng.random() < 0.7 else edit(node[i], depth + 1)
            return node
        return value()

    for _ in range(rng.randint(1, 3)):
        header = edit(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def _write(case: Case, workdir: str) -> str:
    if not case.is_dir:
        path = os.path.join(workdir, "input.bin")
        with open(path, "wb") as fh:
            fh.write(case.files["f"])
        return path
    path = os.path.join(workdir, "input.dir")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    for name, data in case.files.items():
        with open(os.path.join(path, name), "wb") as fh:
            fh.write(data)
    return path


def _outcome(fn) -> tuple[str, BaseException | None]:
    import torchckpt

    start = time.perf_counter()
    try:
        fn()
        result: tuple[str, BaseException | None] = ("ok", None)
    except torchckpt.UnsafeCheckpointError as exc:
        result = ("unsafe", exc)
    except torchckpt.CheckpointError as exc:
        result = ("error", exc)
    elapsed = time.perf_counter() - start
    assert elapsed < TIME_BOUND, f"took {elapsed:.1f}s"
    return result


def check(case: Case, workdir: str, *, front_ends: bool = False) -> str:
    """Run load (of the path, and of the bytes), inspect and scan on ``case``; assert they agree.
    With ``front_ends``, also ``load_into`` (strict=False), ``resume``, ``diff`` (values) and ``convert``: each must end
    in a value or a CheckpointError within the bound. Returns load's outcome."""
    import torchckpt

    path = _write(case, workdir)
    load, load_exc = _outcome(lambda: torchckpt.load(path))
    if not case.is_dir:
        from_bytes, bytes_exc = _outcome(lambda: torchckpt.load(case.files["f"]))
        assert from_bytes == load, f"load(path): {load} ({load_exc!r}); load(bytes): {from_bytes} ({bytes_exc!r})"
    _outcome(lambda: torchckpt.inspect(path))
    start = time.perf_counter()
    report = torchckpt.scan(path)
    assert time.perf_counter() - start < TIME_BOUND
    f = report.files[0]
    dangerous = [x for x in f.findings if x.kind in ("dangerous-global", "unsafe")]
    loaded_danger = [g for s in f.streams if s["loaded"] for g in s["globals"] if g.verdict.value == "dangerous"]
    if load == "unsafe":
        assert dangerous, f"load refused ({load_exc}) but scan found nothing dangerous: {f.to_dict()}"
    elif load == "error":
        assert f.error is not None or dangerous, f"load failed ({load_exc!r}) but scan read it: {f.to_dict()}"
    else:
        assert f.error is None, f"load read it but scan could not: {f.error}"
        assert not loaded_danger and not any(x.kind == "unsafe" for x in f.findings), \
            f"load read it but scan calls it dangerous: {f.to_dict()}"
    if front_ends:
        _front_ends(path, workdir)
    return load


def _front_ends(path: str, workdir: str) -> None:
    import torch

    import torchckpt

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    _outcome(lambda: torchckpt.load_into(model, path, strict=False))
    _outcome(lambda: torchckpt.resume(path, model=model, optimizer=torch.optim.Adam(model.parameters())))
    _outcome(lambda: torchckpt.diff(path, path, values=True))
    out = os.path.join(workdir, "converted.pt")
    _outcome(lambda: torchckpt.convert(path, out))
    if os.path.exists(out):
        os.remove(out)


def run_fuzz(total: int, make_case: Callable[[int], Case], check_case: Callable[[Case, str], str], *,
             failures_dir: str, blob_name: Callable[[int, Case], str]) -> tuple[dict[str, dict[str, int]], int]:
    """Check ``total`` cases (``make_case(n)``) in a temporary folder; returns the outcomes counted per kind
    and the number of failures. A check that raises is a failure: the case's files are kept in
    $FUZZ_FAILURES (default ``failures_dir``) under ``blob_name(n, case)``, and a line says what escaped."""
    import tempfile

    counts: dict[str, dict[str, int]] = {}
    failures = 0
    start = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        for n in range(total):
            case = make_case(n)
            try:
                outcome = check_case(case, workdir)
            except Exception as exc:  # noqa: BLE001 - every escape is a finding of the fuzz run
                failures += 1
                outcome = "FAIL"
                blob = os.environ.get("FUZZ_FAILURES", failures_dir)
                os.makedirs(blob, exist_ok=True)
                with open(os.path.join(blob, blob_name(n, case)), "wb") as fh:
                    pickle.dump(case.files, fh)
                print(f"[{n}] {case.kind}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            per_kind = counts.setdefault(case.kind, {})
            per_kind[outcome] = per_kind.get(outcome, 0) + 1
            if (n + 1) % 1000 == 0:
                print(f"{n + 1} inputs, {failures} failures, {time.time() - start:.0f}s", flush=True)
    print(f"done: {total} inputs, {failures} failures, {time.time() - start:.0f}s")
    return counts, failures


def main(total: int, seed: int, front_ends: bool) -> int:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
    corpus = seeds()
    kinds = sorted(corpus)
    rng = random.Random(seed)
    counts, failures = run_fuzz(total, lambda n: mutate(corpus[kinds[n % len(kinds)]], rng),
                                lambda case, workdir: check(case, workdir, front_ends=front_ends),
                                failures_dir="/tmp/torchckpt-fuzz-failures",
                                blob_name=lambda n, case: f"{case.kind}-{n}.pickle")
    for kind in kinds:
        print(f"  {kind}: {counts.get(kind, {})}")
    return 1 if failures else 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    sys.exit(main(int(args[0]) if args else 1000, int(args[1]) if len(args) > 1 else 0, "--front-ends" in sys.argv))
