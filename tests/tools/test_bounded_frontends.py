"""Bounded end to end (issue 26): one regression test per class of attack on the layers above the VM.

Files come from the attacker's kit (tests/helpers/hostile.py). Each test asserts real behaviour: a front end
finishes, and either works or raises a CheckpointError that names the limit and how to raise it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import hostile
import torchckpt
from torchckpt import Budget, CheckpointError, LimitExceededError, Policy
from torchckpt.fit.tree import expanded_size, walk
from torchckpt.read.unpickle.budget import TreeMeter
from torchckpt.text import key_text, summary
from torchckpt.tools.diffing import _compare
from torchckpt.tools.report.tensor_stats import tensor_stats

HERE = os.path.join(os.path.dirname(__file__), os.pardir, "helpers")  # where hostile.py lives
SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "src"))


def _run_front_ends(files: list[str], tmp_path, timeout: float = 240.0) -> dict[str, dict[str, str]]:
    """Every front end on every file, in a child process with a wall-clock limit (a hang fails the test)."""
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {HERE!r})
        import hostile
        print(json.dumps({{f: hostile.check(f, {str(tmp_path)!r}) for f in {files!r}}}))
    """)
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_bounded(results: dict[str, dict[str, str]]) -> None:
    for path, per_front in results.items():
        for front, outcome in per_front.items():
            assert not outcome.startswith("RAW"), f"{os.path.basename(path)} {front}: {outcome}"


@pytest.mark.slow
def test_dag_tuple_2_48_leaves_is_not_expanded(tmp_path):
    """A 300-byte pickle of a tuple DAG with 2^48 leaves, in raw pickle, zip and legacy containers:
    every front end (load, load_into, inspect, inspect --json, scan, diff, diff --values, convert to
    .pt/.safetensors/DCP, report, report --diff, resume) finishes, with a value or a CheckpointError."""
    files = [hostile.CATALOGUE[n](str(tmp_path / n)) for n in ("dag_tuple.pkl", "dag_tuple.pt", "dag_tuple_legacy.pt")]
    assert os.path.getsize(files[0]) < 400
    out = tmp_path / "out"
    out.mkdir()
    results = _run_front_ends(files, out)
    _assert_bounded(results)
    for per_front in results.values():
        assert per_front["inspect"] == "ok" and per_front["load"] == "ok" and per_front["diff_values"] == "ok"
        assert per_front["convert_safetensors"].startswith("LimitExceededError")  # JSON cannot share: refused


def test_dag_tuple_is_summarised_within_its_limit():
    report = torchckpt.inspect(pickle_bytes := __import__("pickle").dumps({"dag": hostile.dag_tuple(48)}, protocol=2))
    assert len(pickle_bytes) < 400
    (value,) = [v for p, _, v in report.values if p == "dag"]
    assert len(value) <= 120 and value.endswith("...")


def test_module_dag_state_dict_charges_every_name_and_names_the_policy(tmp_path):
    """Module stubs sharing their submodules (2^48 names): state_dict_of raises before expanding,
    naming the limit and the Policy that would allow it; a raised budget is honoured."""
    path = hostile.module_dag(str(tmp_path / "m.pt"))
    with pytest.raises(LimitExceededError) as info:
        torchckpt.inspect(path)
    text = str(info.value)
    assert "visits limit" in text and "Policy(budget=Budget(visits=" in text and str(path) in text
    small = hostile.module_dag(str(tmp_path / "small.pt"), depth=6)
    assert len(torchckpt.inspect(small).tensors) == 2 ** 6  # tied weights under every name, as nn.Module does
    with pytest.raises(LimitExceededError):
        torchckpt.inspect(small, policy=Policy(budget=Budget(visits=10)))


def test_expanded_size_counts_each_shared_value_once():
    assert expanded_size(hostile.dag_tuple(48), lambda v: v if isinstance(v, tuple) else ()) == 2 ** 49 - 1


def test_walk_lists_a_shared_container_once():
    inner = {f"k{i}": i for i in range(2000)}
    tree = {f"r{i}": inner for i in range(2000)}
    meter = TreeMeter()
    nodes = sum(1 for _ in walk(tree, meter=meter))
    assert nodes == 1 + 2000 + 2000 and meter.used < 10_000


def test_deep_long_names_paths_are_charged(tmp_path):
    """200 levels of one 64 KiB key: paths would total ~1.3 GB of text; the walk raises instead."""
    path = hostile.deep_long_names(str(tmp_path / "deep.pt"))
    with pytest.raises(LimitExceededError) as info:
        torchckpt.diff(path, path)
    assert "visits" in str(info.value)


def test_key_with_150000_dots_stays_linear(tmp_path):
    path = hostile.dotted_key(str(tmp_path / "dots.pt"))
    report = torchckpt.report(path)
    assert report is not None
    assert len(torchckpt.inspect(path).tensors) == 2


def test_huge_integer_key_and_value_are_described_not_converted():
    assert "digits" in key_text(10 ** 5000)
    assert len(summary([10 ** 5000] * 3, 100)) <= 100


def test_odd_optimizer_summary_says_what_is_unusual(tmp_path):
    report = torchckpt.inspect(hostile.odd_optimizer(str(tmp_path / "o.pt")))
    (summary_text,) = [v for p, t, v in report.values if t == "optimizer state"]
    assert "unusual" in summary_text and "params is a int" in summary_text
    assert "\x1b" not in summary_text


def test_config_json_5000_digit_integer_is_a_typed_error(tmp_path):
    folder = hostile.escape_folder(str(tmp_path / "f"))
    with pytest.raises(CheckpointError) as info:
        torchckpt.load(folder)
    assert "5000 digits" in str(info.value)


DTYPES = hostile.all_dtypes()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_in_stats_diff_convert_inspect(dtype, tmp_path):
    path = hostile.dtypes_file(str(tmp_path / "d.pt"), [dtype])
    report = torchckpt.inspect(path)
    assert len(report.tensors) == 1
    diff = torchckpt.diff(path, path, values=True)
    assert not diff.changed
    stats = torchckpt.report(path)
    assert stats is not None
    for dst in ("c.pt", "c.safetensors"):
        try:
            torchckpt.convert(path, str(tmp_path / dst))
        except CheckpointError as exc:  # a dtype safetensors cannot store is refused by name
            assert dst.endswith("safetensors") and str(dtype).replace("torch.", "") in str(exc)


def test_quantized_tensor_statistics_are_of_the_values_it_stands_for():
    q = torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)
    stats = tensor_stats("q", q)
    assert stats.numel == 4 and stats.mean is not None and abs(stats.mean - 1.0) < 1e-6


def test_expanded_tensor_is_processed_per_stored_value():
    e = torch.arange(3.0).reshape(3, 1).expand(3, 1 << 30)  # 3 stored values, 3 Gi elements (12 GB dense)
    stats = tensor_stats("e", e, bins=3)
    assert stats.numel == 3 << 30 and stats.finite == 3 << 30 and stats.mean == 1.0
    assert stats.histogram is not None and stats.histogram[1] == [1 << 30] * 3
    d = _compare(e, torch.arange(3.0).reshape(3, 1).expand(3, 1 << 30), "e")
    assert d.max_abs == 0.0
    d = _compare(e, torch.arange(1.0, 4.0).reshape(3, 1).expand(3, 1 << 30), "e")
    assert d.max_abs == 1.0


@pytest.mark.slow
def test_expanded_tensor_diff_values_stays_one_chunk(tmp_path):
    """diff --values of a zero-stride view (1 Gi elements of one stored float) in a child process whose
    peak RSS must stay far below the 4 GB a dense copy would take."""
    path = hostile.expanded(str(tmp_path / "e.pt"), numel=1 << 30)
    other = tmp_path / "dense_partner.pt"
    torch.save({"e": torch.ones(1).expand(1 << 30), "w": torch.ones(2)}, other)
    script = textwrap.dedent(f"""
        import resource, torchckpt
        d = torchckpt.diff({path!r}, {str(other)!r}, values=True)
        r = torchckpt.report({path!r})
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, [c.key for c in d.changed])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": SRC})
    assert done.returncode == 0, done.stderr[-2000:]
    rss_kib, changed = done.stdout.split(" ", 1)
    assert int(rss_kib) < 1_500_000, rss_kib
    assert "'w'" in changed and "'e'" not in changed


@pytest.mark.slow
def test_hostile_catalogue_fast_slice(tmp_path):
    """The CI slice of the attacker's kit: every front end on the catalogue's small files."""
    names = ["module_dag.pt", "escape_keys.pt", "escape.safetensors", "odd_optimizer.pt", "shared_big_dict.pt",
             "dtypes.pt"]
    files = [hostile.CATALOGUE[n](str(tmp_path / n)) for n in names]
    out = tmp_path / "out"
    out.mkdir()
    _assert_bounded(_run_front_ends(files, out, timeout=600))
    for f in files:
        assert hostile.scan_agrees_with_load(f), f


def test_torchscript_code_members_inflate_under_one_budget(tmp_path):
    """20 deflated code/ members of 15 MiB each (a few KiB compressed): 300 MiB together, past the
    file's inflation budget (256 MiB floor). Each member alone is within it; one meter sees them all."""
    import io
    import zipfile

    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), buf)
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        prefix = src.namelist()[0].split("/")[0]
        for info in src.infolist():
            dst.writestr(info, src.read(info), info.compress_type)
        for i in range(20):
            dst.writestr(f"{prefix}/code/__torch__/pad{i}.py", b"\n" * (15 << 20), zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 1 << 20
    with pytest.raises(LimitExceededError) as info:
        torchckpt.load(path)
    assert "inflat" in str(info.value)


@pytest.mark.parametrize("shape", [[2 ** 64, 0], [2 ** 63, 0], [2 ** 40, 2 ** 40, 0], [2 ** 62, 2, 0]], ids=str)
def test_safetensors_shape_beyond_int64_is_refused_by_load_scan_and_inspect_alike(shape, tmp_path):
    header = json.dumps({"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    path = tmp_path / "huge.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    for front in (torchckpt.load, torchckpt.inspect):
        with pytest.raises(CheckpointError, match="64 bits"):
            front(path)
    assert torchckpt.scan(path).status != "clean"
    assert hostile.scan_agrees_with_load(str(path))


def test_legacy_tar_reader_reads_exactly_the_pickles_torch_reads_in_its_order(tmp_path):
    """scan == load starts at the bytes: the tar reader runs the same pickle streams as torch's own
    legacy loader, member by member, at the same offsets, in the same order (recorded from torch
    through a pickle_module that notes each stream; the file is one this test wrote)."""
    import pickle
    import types

    from tar_writer import write_torch_tar

    from torchckpt.read import open_checkpoint

    t = torch.arange(6.0).view(2, 3)
    path = tmp_path / "ancient.pth"
    write_torch_tar({"w": t, "b": t[1], "epoch": 3}, path)
    torch_order: list[tuple[str, int]] = []

    def where(f) -> tuple[str, int]:  # storages/tensors are extracted files; "pickle" is read through
        name = os.path.basename(str(getattr(f, "name", "")))  # tarfile.extractfile (named like the archive)
        return (name if name in ("storages", "tensors") else "pickle"), f.tell()

    class Unpickler(pickle.Unpickler):
        def __init__(self, f, *args, **kwargs):
            torch_order.append(where(f))
            super().__init__(f, *args, **kwargs)

    def load(f, *args, **kwargs):
        torch_order.append(where(f))
        return pickle.load(f, *args, **kwargs)

    recorder = types.ModuleType("recording_pickle")
    recorder.__dict__.update(vars(pickle))
    recorder.Unpickler, recorder.load = Unpickler, load
    torch.load(path, weights_only=False, pickle_module=recorder)  # our own file: nothing untrusted runs
    with open_checkpoint(path) as ckpt:
        ours = [(s.member, s.offset) for s in ckpt.trace.streams]
    assert ours == torch_order


def test_sharded_index_with_thousands_of_spellings_of_one_shard_reads_it_once(tmp_path):
    from safetensors.torch import save_file

    save_file({f"t{i}": torch.full((2,), float(i)) for i in range(2000)}, str(tmp_path / "model.safetensors"))
    weight_map = {f"t{i}": "./" * i + "model.safetensors" for i in range(2000)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out, info = torchckpt.load(tmp_path / "model.safetensors.index.json", return_info=True)
    assert len(out) == 2000 and float(out["t1999"][0]) == 1999.0
    assert "(1 shards)" in info.description


def test_nested_fraction_arithmetic_is_charged():
    """Fraction(Fraction(big, 3), Fraction(1, big)): each part is within the digits limit, the product is
    twice as long; nested, the digits would double per level. The result is checked like a literal."""
    import pickle

    from pickle_asm import PROTO2, STOP, call, glob, i

    big = pickle.dumps(10 ** 4000 + 7, protocol=2)[2:-1]  # a LONG opcode of 4001 digits
    inner = call(glob("fractions", "Fraction"), big, i(3))
    other = call(glob("fractions", "Fraction"), i(1), big)
    data = PROTO2 + call(glob("fractions", "Fraction"), inner, other) + STOP
    assert torchckpt.load(PROTO2 + inner + STOP).denominator == 3  # one level is fine
    with pytest.raises(LimitExceededError, match="digits"):
        torchckpt.load(data)


def test_fuzz_seed_1173_histogram_of_one_complex_value():
    """Found by the fuzz (tests/helpers/hostile.py fuzz): a 1-element complex tensor (an expanded view collapses to
    one) made the histogram's half chunk hold half a complex value: a raw RuntimeError in report."""
    stats = tensor_stats("c", torch.ones(1, dtype=torch.complex64).expand(5), bins=4)
    assert stats.histogram is not None and sum(stats.histogram[1]) == 10  # real and imaginary parts


def test_fuzz_seed_1261_convert_verifies_complex32(tmp_path):
    """Found by the fuzz: verifying a converted complex32 tensor fell back to torch.equal, which has no
    complex32 kernel (raw NotImplementedError)."""
    src = tmp_path / "c32.pt"
    torch.save({"c": torch.ones(2, dtype=torch.complex32)[::2]}, src, _use_new_zipfile_serialization=False)
    torchckpt.convert(src, str(tmp_path / "out.pt"))
