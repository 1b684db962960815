"""The attacker's kit for the layers above the pickle VM: hostile checkpoints in every container.

Each generator writes one file (or folder) and returns its path. The shapes are the classes of
issue 26: DAG-shaped trees (a 400-byte pickle with 2^48 paths), deep trees of long names, wide
trees, strings carrying terminal control sequences (OSC 0 window title, OSC 52 clipboard write, CSI
clear screen, bidi overrides), odd-typed values in the places summaries look at, and every dtype.
Nothing here unpickles. ``python3 tests/helpers/hostile.py DIR`` writes the whole catalogue to DIR.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
import types
from collections import OrderedDict
from typing import Any, Callable

import torch

# What must never reach a terminal raw: window title, clipboard write, clear screen, bidi override.
OSC_TITLE = "\x1b]0;PWNED-TITLE\x07"
OSC_CLIPBOARD = "\x1b]52;c;ZWNobyBwd25lZA==\x07"
CSI_CLEAR = "\x1b[2J\x1b[H"
BIDI = "\u202egnp.exe\u202c"
C1_CSI = "\x9b31m"
ESCAPES = (OSC_TITLE, OSC_CLIPBOARD, CSI_CLEAR, BIDI, C1_CSI)
EVIL = "k" + "".join(ESCAPES)  # one string carrying all of them
# the raw bytes a terminal would act on (UTF-8, as printed)
RAW_MARKERS = (b"\x1b]0;", b"\x1b]52;", b"\x1b[2J", "\u202e".encode(), "\x9b".encode())


def dag_tuple(depth: int = 48) -> Any:
    """A tuple DAG: ``depth`` levels, each tuple holding the one below twice: 2^depth leaves."""
    t: Any = "leaf"
    for _ in range(depth):
        t = (t, t)
    return t


def dag_dict(depth: int = 48, leaf: Any = None) -> Any:
    """Dicts ``{"l": x, "r": x}`` nested ``depth`` levels over ``leaf`` (a tensor by default)."""
    x: Any = {"w": torch.zeros(2) if leaf is None else leaf}
    for _ in range(depth):
        x = {"l": x, "r": x}
    return x


def write_raw_pickle(path: str, obj: Any) -> str:
    with open(path, "wb") as fh:
        fh.write(pickle.dumps(obj, protocol=2))
    return path


def write_zip(path: str, obj: Any) -> str:
    torch.save(obj, path)
    return path


def write_legacy(path: str, obj: Any) -> str:
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


class _FakeModules:
    """Classes under a module name that does not exist when the file is read (a whole-model pickle
    whose code is gone): torchckpt reads them as stubs."""

    def __init__(self, module: str = "hostile_pkg.models") -> None:
        self.module = module
        self.mod = types.ModuleType(module)

    def cls(self, name: str) -> type:
        c = type(name, (), {"__module__": self.module})
        setattr(self.mod, name, c)
        return c

    def dumps(self, obj: Any, path: str, legacy: bool = False) -> str:
        parts = self.module.split(".")
        added = []
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                sys.modules[name] = self.mod if i == len(parts) else types.ModuleType(name)
                added.append(name)
        try:
            torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        finally:
            for name in added:
                del sys.modules[name]
        return path


def module_dag(path: str, depth: int = 48, legacy: bool = False) -> str:
    """A whole-model pickle whose module ``m_i`` has two submodules, both ``m_{i-1}``: 2^depth names."""
    fake = _FakeModules()
    Net = fake.cls("Net")

    def module(params: dict[str, Any], children: dict[str, Any]) -> Any:
        m = Net()
        m.__dict__.update({"training": True, "_parameters": OrderedDict(params), "_buffers": OrderedDict(),
                           "_non_persistent_buffers_set": set(), "_modules": OrderedDict(children)})
        return m

    m = module({"weight": torch.nn.Parameter(torch.zeros(2))}, {})
    for _ in range(depth):
        m = module({}, {"a": m, "b": m})
    return fake.dumps(m, path, legacy)


def escape_class_model(path: str) -> str:
    """A whole-model pickle whose class name and module carry control sequences (as pickle bytes)."""
    fake = _FakeModules("hostile_pkg.m" + "\x1b]0;PWNED-TITLE\x07")
    Net = fake.cls("Net\x1b[2J")
    m = Net()
    m.__dict__.update({"training": True, "_parameters": OrderedDict(weight=torch.nn.Parameter(torch.ones(2))),
                       "_buffers": OrderedDict(), "_modules": OrderedDict(), "note": EVIL})
    return fake.dumps(m, path)


def escape_keys(path: str, legacy: bool = False) -> str:
    """A state dict whose keys and plain values carry every escape."""
    sd = OrderedDict((f"layer{i}.{esc}weight", torch.ones(2)) for i, esc in enumerate(ESCAPES))
    obj = {"state_dict": sd, "meta": {EVIL: EVIL, "note": EVIL}, "epoch": 3}
    return write_legacy(path, obj) if legacy else write_zip(path, obj)


def escape_safetensors(path: str) -> str:
    """A safetensors file whose tensor names and metadata carry every escape."""
    header: dict[str, Any] = {"__metadata__": {EVIL: EVIL, "format": "pt"}}
    data = b""
    for i, esc in enumerate(ESCAPES):
        header[f"t{i}{esc}"] = {"dtype": "F32", "shape": [2], "data_offsets": [len(data), len(data) + 8]}
        data += struct.pack("<2f", 1.0, 2.0)
    raw = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw + data)
    return path


def escape_folder(path: str, big_int: bool = True) -> str:
    """A Hugging Face folder: config.json values, and a sharded index whose shard name carries escapes
    (and, with ``big_int``, a 5000-digit integer in config.json)."""
    os.makedirs(path, exist_ok=True)
    shard = "model-00001" + "\x1b]0;T\x07" + ".safetensors"
    escape_safetensors(os.path.join(path, shard))
    names = [f"t{i}{esc}" for i, esc in enumerate(ESCAPES)]
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"note": EVIL}, "weight_map": {n: shard for n in names}}, fh)
    with open(os.path.join(path, "config.json"), "w") as fh:
        fh.write('{"model_type": ' + json.dumps(EVIL) + ', "architectures": [' + json.dumps(EVIL) + '], '
                 '"big": ' + ("9" * 5000 if big_int else "9") + '}')
    return path


def odd_optimizer(path: str) -> str:
    """An optimizer state whose param group ``params`` is an int and whose slot names mix str and int."""
    obj = {"model": {"w": torch.zeros(2)},
           "optimizer": {"state": {0: {"step": 1, 3: torch.zeros(2), "exp_avg": torch.zeros(2)},
                                   1: {EVIL: 1}},
                         "param_groups": [{"params": 7, "lr": 10 ** 300}, {"params": [0, 1], "lr": 0.1},
                                          "not a group"]}}
    return write_zip(path, obj)


def deep_long_names(path: str, depth: int = 200, name_len: int = 1 << 16) -> str:
    """Nested dicts ``depth`` deep whose every key is the same ``name_len``-character string: the
    dotted paths total depth^2/2 x name_len characters if rebuilt per level."""
    name = "n" * name_len
    x: Any = {"w": torch.zeros(1)}
    for _ in range(depth):
        x = {name: x}
    return write_zip(path, x)


def dotted_key(path: str, dots: int = 150_000) -> str:
    return write_zip(path, {"." * dots: torch.zeros(1), "a" + ".b" * dots: torch.zeros(1)})


def wide(path: str, n: int = 100_000) -> str:
    """One storage, ``n`` views of it (convert must stay linear)."""
    base = torch.arange(64, dtype=torch.float32)
    return write_zip(path, {f"v{i}": base[i % 32: i % 32 + 8] for i in range(n)})


def shared_big_dict(path: str, n: int = 3000) -> str:
    """A dict of ``n`` keys whose every value is that same ``n``-key dict's sibling: n^2 children if
    each occurrence were listed again."""
    inner = {f"k{i}": i for i in range(n)}
    return write_zip(path, {"state_dict": {"w": torch.zeros(1)}, "many": {f"r{i}": inner for i in range(n)}})


def expanded(path: str, numel: int = 1 << 28) -> str:
    """A zero-stride view: 4 bytes of storage, ``numel`` elements."""
    return write_zip(path, {"e": torch.ones(1).expand(numel), "w": torch.zeros(2)})


def dtypes_file(path: str, dtypes: list[torch.dtype], legacy: bool = False) -> str:
    sd = {}
    for dt in dtypes:
        sd[str(dt).replace("torch.", "")] = torch.arange(6).to(dt) if not dt.is_complex else \
            torch.arange(6, dtype=torch.float64).to(dt) * (1 + 1j)
    return write_legacy(path, sd) if legacy else write_zip(path, sd)


def all_dtypes() -> list[torch.dtype]:
    names = ["bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64", "float16",
             "bfloat16", "float32", "float64", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2",
             "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "complex32"]
    return [getattr(torch, n) for n in names if hasattr(torch, n)]


CATALOGUE: dict[str, Callable[[str], str]] = {
    "dag_tuple.pkl": lambda p: write_raw_pickle(p, {"w": 1, "dag": dag_tuple()}),
    "dag_tuple.pt": lambda p: write_zip(p, {"model": {"w": torch.zeros(3)}, "dag": dag_tuple()}),
    "dag_tuple_legacy.pt": lambda p: write_legacy(p, {"model": {"w": torch.zeros(3)}, "dag": dag_tuple()}),
    "dag_dict.pt": lambda p: write_zip(p, dag_dict()),
    "module_dag.pt": module_dag,
    "module_dag_legacy.pt": lambda p: module_dag(p, legacy=True),
    "escape_keys.pt": escape_keys,
    "escape_keys_legacy.pt": lambda p: escape_keys(p, legacy=True),
    "escape_class.pt": escape_class_model,
    "escape.safetensors": escape_safetensors,
    "escape_folder": escape_folder,
    "escape_folder_text": lambda p: escape_folder(p, big_int=False),
    "odd_optimizer.pt": odd_optimizer,
    "deep_long_names.pt": deep_long_names,
    "dotted_key.pt": dotted_key,
    "shared_big_dict.pt": shared_big_dict,
    "expanded.pt": expanded,
    "dtypes.pt": lambda p: dtypes_file(p, all_dtypes()),
}


def write_all(directory: str) -> dict[str, str]:
    os.makedirs(directory, exist_ok=True)
    return {name: make(os.path.join(directory, name)) for name, make in CATALOGUE.items()}




# -- every front end ---------------------------------------------------------------------------------

def _model() -> Any:
    return torch.nn.Linear(2, 2)


def front_ends(out_dir: str) -> dict[str, Callable[[str], Any]]:
    """Every library front end, as ``name -> fn(path)``; outputs go under ``out_dir``."""
    import torchckpt

    def out(name: str) -> str:
        return os.path.join(out_dir, name)

    def inspect_json(p: str) -> Any:
        r = torchckpt.inspect(p)
        return json.dumps(r.to_dict()), str(r)

    def resume(p: str) -> Any:
        return torchckpt.resume(p, model=_model(), strict=False)

    return {
        "load": lambda p: torchckpt.load(p),
        "load_into": lambda p: torchckpt.load_into(_model(), p, strict=False),
        "inspect": lambda p: str(torchckpt.inspect(p)),
        "inspect_json": inspect_json,
        "scan": lambda p: str(torchckpt.scan(p)),
        "diff": lambda p: str(torchckpt.diff(p, p)),
        "diff_values": lambda p: str(torchckpt.diff(p, p, values=True)),
        "convert_pt": lambda p: str(torchckpt.convert(p, out("c.pt"))),
        "convert_safetensors": lambda p: str(torchckpt.convert(p, out("c.safetensors"))),
        "convert_dcp": lambda p: str(torchckpt.convert(p, out(f"dcp{len(os.listdir(out_dir))}"), to="dcp")),
        "report": lambda p: str(torchckpt.report(p, output=out("r.html"))),
        "report_diff": lambda p: str(torchckpt.report(p, diff=p, output=out("rd.html"))),
        "resume": resume,
    }


def check(path: str, out_dir: str, names: list[str] | None = None) -> dict[str, str]:
    """Run every front end on ``path``: ``name -> "ok" | "CheckpointError: ..." | "RAW <type>: ..."``."""
    import torchckpt

    results = {}
    for name, fn in front_ends(out_dir).items():
        if names and name not in names:
            continue
        try:
            fn(path)
            results[name] = "ok"
        except torchckpt.CheckpointError as exc:
            results[name] = f"{type(exc).__name__}: {str(exc)[:160]!r}"
        except Exception as exc:  # noqa: BLE001 - what the harness is looking for
            results[name] = f"RAW {type(exc).__name__}: {str(exc)[:160]!r}"
    return results


def scan_agrees_with_load(path: str) -> bool:
    """``scan`` calls the file clean exactly when ``load`` reads it."""
    import torchckpt

    try:
        torchckpt.load(path)
        loads = True
    except torchckpt.CheckpointError:
        loads = False
    return (torchckpt.scan(path).status == "clean") == loads


# -- random hostile checkpoints (the property test) ----------------------------------------------------

def random_tree(rng: Any, budget: int = 60) -> Any:
    """A random tree of dicts, lists and tuples that shares containers (DAG), nests deep, carries escape
    strings, odd keys (ints, tuples, huge ints), odd optimizer groups and tensors of every dtype and
    stride (views, zero strides)."""
    made: list[Any] = []
    dtypes = all_dtypes()

    def leaf() -> Any:
        kind = rng.randrange(9)
        if kind == 0:
            dt = rng.choice(dtypes)
            base = torch.arange(rng.randrange(1, 12)).to(dt) if not dt.is_complex else \
                torch.arange(rng.randrange(1, 12), dtype=torch.float64).to(dt)
            if rng.random() < 0.3:
                return base[:1].expand(rng.choice([3, 1 << 20]))  # zero stride
            return base[::2] if rng.random() < 0.3 else base
        if kind == 1:
            return rng.choice(ESCAPES) + "x" * rng.randrange(3)
        if kind == 2:
            return rng.choice([0, -1, 2 ** 63, 10 ** 300, float("nan"), float("inf"), True, None, 1.5])
        if kind == 3:
            return b"\x1b]0;T\x07" * rng.randrange(1, 4)
        if kind == 4 and made:
            return rng.choice(made)  # sharing: a DAG
        if kind == 5:
            return {"state": {0: {"exp_avg": torch.zeros(2), rng.choice([1, "s", EVIL]): 1}},
                    "param_groups": [{"params": rng.choice([3, [0], "x", None]), "lr": rng.choice([0.1, 10 ** 400])}]}
        if kind == 6:
            return dag_tuple(rng.randrange(1, 50))
        return "k" * rng.randrange(0, 2000)

    def node(depth: int) -> Any:
        nonlocal budget
        budget -= 1
        if budget <= 0 or depth > rng.randrange(2, 40) or rng.random() < 0.35:
            return leaf()
        kind = rng.randrange(3)
        n = rng.randrange(0, 6)
        if kind == 0:
            keys = [rng.choice([f"k{i}", f"{EVIL}{i}", "." * rng.randrange(1, 300), i, (i, "t"), 10 ** 50 + i])
                    for i in range(n)]
            out: Any = {k: node(depth + 1) for k in keys}
        elif kind == 1:
            out = [node(depth + 1) for _ in range(n)]
        else:
            out = tuple(node(depth + 1) for _ in range(n))
        made.append(out)
        return out

    return {"model": {"w": torch.ones(2)}, "x": node(0)}


def random_checkpoint(seed: int, directory: str) -> str:
    """One random hostile checkpoint (zip, legacy or raw pickle) under ``directory``."""
    import random

    rng = random.Random(seed)
    tree = random_tree(rng)
    container = rng.choice(["zip", "legacy", "pickle"])
    path = os.path.join(directory, f"fuzz{seed}.{ {'zip': 'pt', 'legacy': 'pth', 'pickle': 'pkl'}[container]}")
    if container == "pickle":
        tree = {k: v for k, v in tree.items()}
        try:
            with open(path, "wb") as fh:
                fh.write(pickle.dumps(tree, protocol=2))
        except (RecursionError, TypeError, pickle.PicklingError):  # tensors pickle through torch only
            return write_zip(path[:-4] + ".pt", tree)
        return path
    return write_legacy(path, tree) if container == "legacy" else write_zip(path, tree)


def fuzz(seeds: range, directory: str, names: list[str] | None = None) -> dict[str, int]:
    """Run every front end on one random checkpoint per seed; print each raw failure and slow run."""
    import time

    counts = {"inputs": 0, "runs": 0, "raw": 0, "checkpoint_errors": 0, "slow": 0}
    for seed in seeds:
        try:
            path = random_checkpoint(seed, directory)
        except Exception:  # noqa: BLE001 - a tree torch cannot save is not an input
            continue
        counts["inputs"] += 1
        for front, outcome in check(path, directory, names).items():
            counts["runs"] += 1
            if outcome.startswith("RAW"):
                counts["raw"] += 1
                print(f"seed {seed} {front}: {outcome}", flush=True)
            elif outcome != "ok":
                counts["checkpoint_errors"] += 1
        start = time.monotonic()
        agree = scan_agrees_with_load(path)
        if not agree:
            counts["raw"] += 1
            print(f"seed {seed}: scan and load disagree", flush=True)
        if time.monotonic() - start > 10:
            counts["slow"] += 1
        for f in os.listdir(directory):
            full = os.path.join(directory, f)
            if os.path.isfile(full):
                os.unlink(full)
            else:
                import shutil
                shutil.rmtree(full, ignore_errors=True)
    return counts


if __name__ == "__main__":  # python3 tests/helpers/hostile.py DIR [check] | python3 tests/helpers/hostile.py fuzz FIRST COUNT
    import tempfile

    if sys.argv[1] == "fuzz":
        first, count = int(sys.argv[2]), int(sys.argv[3])
        with tempfile.TemporaryDirectory() as tmp:
            print(fuzz(range(first, first + count), tmp), flush=True)
        sys.exit(0)

    for name, where in write_all(sys.argv[1]).items():
        print(name, where, flush=True)
        if sys.argv[2:] == ["check"]:
            with tempfile.TemporaryDirectory() as tmp:
                for front, result in check(where, tmp).items():
                    print(f"  {front}: {result}", flush=True)
