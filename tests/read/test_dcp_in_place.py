"""DCP items are read in place: each item is a window of its data file (``Source.window``), parsed there and
read with ``pread`` straight into its tensor, never first copied whole into a bytes object. So a large item
costs its size once, not twice (per worker); a range that lies about an item is a typed error naming the
data file and the item, and no read leaves the item's range."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

import torchckpt
from torchckpt.errors import CheckpointError, LimitExceededError, TruncatedCheckpointError, UnsupportedFormatError
from torchckpt.read.opener import open_checkpoint
from torchckpt.storage.source import Source

MIB = 2**20
BIG = 64 * MIB


def _save(path, state, threads: int = 2) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path), thread_count=threads))


def _rewrite_metadata(path, change) -> None:
    """Edit the real .metadata this test wrote, the way a damaged or hostile file would differ."""
    meta_file = path / ".metadata"
    meta = pickle.loads(meta_file.read_bytes())
    change(meta)
    meta_file.write_bytes(pickle.dumps(meta))


def _record(meta, fqn: str):
    return next(info for index, info in meta.storage_data.items() if index.fqn == fqn)


# A fresh process loads the folder twice with 2 workers and reports the peak RSS of the second load above
# the process before it (the first imports every lazily imported module and makes every cache).
PEAK_PRELUDE = textwrap.dedent("""
    import json, sys, torch, torchckpt
    import torchckpt.read.opener, torchckpt.read.formats.dcp, torchckpt.read.formats.torch_zip  # imports are not the load
    def status(field):
        with open('/proc/self/status') as fh:
            return next(int(l.split()[1]) for l in fh if l.startswith(field)) * 1024
    torchckpt.load(sys.argv[1], workers=2, mmap=False)
    try:
        with open('/proc/self/clear_refs', 'w') as fh:
            fh.write('5')  # peak RSS := current RSS
    except OSError:
        pass
    base = status('VmRSS')
    sd = torchckpt.load(sys.argv[1], workers=2, mmap=False)
""")
CHILD = PEAK_PRELUDE + textwrap.dedent("""
    print(json.dumps({"peak_extra": status('VmHWM') - base, "sum": float(sd["big"].double().sum()),
                      "small": sd["small"].tolist()}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self for peak RSS")
def test_a_big_item_costs_its_size_once_with_two_workers(tmp_path):
    """A 64 MiB tensor item read by a pool of 2: the peak is about the tensor, not the tensor plus a bytes copy
    of its item (the old reader: ~2x)."""
    big = torch.arange(BIG // 4, dtype=torch.float32)
    _save(tmp_path / "ckpt", {"big": big, "small": torch.arange(5), "note": "x" * 100})
    assert len([n for n in os.listdir(tmp_path / "ckpt") if n.endswith(".distcp")]) == 2
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "ckpt")], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["sum"] == float(big.double().sum()) and out["small"] == list(range(5))
    assert out["peak_extra"] <= BIG + 8 * MIB, f"{out['peak_extra'] / BIG:.2f}x the item"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_range_cut_short_is_a_typed_error_naming_file_and_item(tmp_path, workers):
    """.metadata gives an item a length that ends inside its archive: the item is read as those bytes only (a
    zip without its end, not the bytes after it), and the error names the data file and the item."""
    path = tmp_path / "ckpt"
    _save(path, {"w": torch.ones(1000), "v": torch.zeros(1000), "note": "x" * 100})
    _rewrite_metadata(path, lambda meta: setattr(_record(meta, "w"), "length", _record(meta, "w").length - 100))
    rel = _record(pickle.loads((path / ".metadata").read_bytes()), "w").relative_path
    with pytest.raises(TruncatedCheckpointError) as info:
        torchckpt.load(path, workers=workers)
    assert f"{rel}[w]" in str(info.value)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_range_past_the_end_of_its_data_file_is_refused_before_reading(tmp_path, workers):
    path = tmp_path / "ckpt"
    _save(path, {"w": torch.ones(1000), "v": torch.zeros(1000)})
    _rewrite_metadata(path, lambda meta: setattr(_record(meta, "w"), "length", 1 << 40))
    with pytest.raises(CheckpointError, match=r"outside .*distcp") as info:
        torchckpt.load(path, workers=workers)
    assert "'w'" in str(info.value)


@pytest.mark.parametrize("length", [50, 100_000, 200_000], ids=["read-whole", "in-place", "in-place-long"])
def test_a_window_reads_only_its_range(tmp_path, length):
    """``Source.window``: reads are clipped to the range, reading into a tensor past it is a typed error, and a
    window that does not fit its file is refused before anything is read (a small range is read whole at
    once, a large one in place: the same answers)."""
    data = bytes(range(256)) * 1024
    (tmp_path / "f.bin").write_bytes(data)
    start, end = 100, 100 + length
    with Source(str(tmp_path / "f.bin")) as src:
        with src.window(start, length, name="f.bin[item]") as item:
            assert item.size == length and item.name == "f.bin[item]"
            assert item.read_at(0, length + 1000) == data[start:end] and item.head(4096) == data[start:min(end, start + 4096)]
            assert item.read_at(length - 10, 20) == data[end - 10:end] and item.read_at(length, 5) == b""
            assert item.buffer() == data[start:end]
            fh = item.open()
            fh.seek(-10, os.SEEK_END)
            assert fh.read() == data[end - 10:end]
            out = torch.zeros(8, dtype=torch.uint8)
            item.read_into(out.untyped_storage(), length - 8, 8)
            assert bytes(out.tolist()) == data[end - 8:end]
            with pytest.raises(TruncatedCheckpointError):
                item.read_into(out.untyped_storage(), length - 7, 8)  # one byte past the item, not the next byte
        for offset, length in ((len(data) - 10, 11), (-1, 10), (0, len(data) + 1)):
            with pytest.raises(TruncatedCheckpointError):
                src.window(offset, length)


def _chunked(path, first, second, offsets) -> torch.Tensor:
    """A DCP directory whose tensor ``w`` is stored in two chunks, as ranks of a sharded save write it: two
    tensors saved by DCP (``a``, ``b``), then .metadata made to name them as the chunks of ``w`` at
    ``offsets``. Returns the whole ``w`` the chunks make."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata

    _save(path, {"a": first, "b": second, "note": "x" * 100})
    whole = torch.cat([first, second], dim=1 if offsets[1] != 0 else 0).contiguous()

    def change(meta):
        props = meta.state_dict_metadata.pop("a").properties
        del meta.state_dict_metadata["b"]
        meta.state_dict_metadata["w"] = TensorStorageMetadata(properties=props, size=whole.shape, chunks=[
            ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=first.shape),
            ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=second.shape)])
        for name, at in (("a", [0, 0]), ("b", offsets)):
            info = meta.storage_data.pop(next(i for i in meta.storage_data if i.fqn == name))
            meta.storage_data[MetadataIndex("w", torch.Size(at))] = info
        for name in ("a", "b"):
            meta.planner_data.pop(name, None)
        meta.planner_data["w"] = ("w",)

    _rewrite_metadata(path, change)
    return whole


@pytest.mark.parametrize("layout", ["rows", "columns", "transposed"])
@pytest.mark.parametrize("workers", [1, 2])
def test_chunks_fill_their_whole_tensor(tmp_path, layout, workers):
    """A tensor in two chunks comes back whole: row chunks are read straight into their places; column chunks
    (not one run of the whole tensor) are copied there; a row chunk stored transposed (DCP saves the view as it
    is) is read into its place and then put in order. The values are the saved ones every time."""
    g = torch.Generator().manual_seed(0)
    first = torch.randn(3, 5, generator=g)
    second = {"rows": lambda: torch.randn(3, 5, generator=g), "columns": lambda: torch.randn(3, 4, generator=g),
              "transposed": lambda: torch.randn(5, 3, generator=g).t()}[layout]()
    offsets = [0, 5] if layout == "columns" else [3, 0]
    whole = _chunked(tmp_path / "ckpt", first, second, offsets)
    got = torchckpt.load(tmp_path / "ckpt", workers=workers)
    assert got["note"] == "x" * 100 and torch.equal(got["w"], whole)
    with open_checkpoint(tmp_path / "ckpt", "build", lazy=True, workers=workers) as ckpt:  # load_into's way
        lazy = ckpt.tree["w"]
        assert torch.equal(lazy.materialize(), whole)
        (r, c), (h, w) = ((1, 4), (2, 3)) if layout == "columns" else ((2, 1), (2, 3))  # parts of both chunks
        assert torch.equal(lazy.read_region((r, c), (h, w)), whole[r:r + h, c:c + w])


CHUNKED_CHILD = PEAK_PRELUDE + textwrap.dedent("""
    print(json.dumps({"peak_extra": status('VmHWM') - base, "sum": float(sd["w"].double().sum())}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self for peak RSS")
def test_chunks_are_read_into_their_whole_tensor_without_a_copy(tmp_path):
    """Two 32 MiB row chunks of a 64 MiB tensor, read by 2 workers: the peak is about the whole tensor (each
    chunk read straight into its place), not the tensor plus the chunks in flight (the old reader: ~1.5-2x)."""
    rows = BIG // 4 // 2 // 1024
    first, second = torch.ones(rows, 1024), torch.full((rows, 1024), 2.0)
    _chunked(tmp_path / "ckpt", first, second, [rows, 0])
    proc = subprocess.run([sys.executable, "-c", CHUNKED_CHILD, str(tmp_path / "ckpt")], capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["sum"] == float(first.sum() + second.sum())
    assert out["peak_extra"] <= BIG + 8 * MIB, f"{out['peak_extra'] / BIG:.2f}x the tensor"


def test_chunks_read_in_place_are_charged_to_the_one_budget(tmp_path):
    """The smallest step budget that loads a chunked tensor is the same for 1 and 2 workers, and the error
    just below it names the same data file and item: reading a chunk into its place shares the read's meter."""
    from test_parallel_shards import least

    _chunked(tmp_path / "ckpt", torch.ones(3, 5), torch.zeros(3, 5), [3, 0])
    need = {workers: least(tmp_path / "ckpt", workers) for workers in (1, 2)}
    assert need[1] == need[2], need
    errors = []
    for workers in (1, 2):
        with pytest.raises(CheckpointError) as info:
            torchckpt.load(tmp_path / "ckpt", workers=workers,
                           policy=torchckpt.Policy(budget=torchckpt.Budget(steps=need[1] - 1, amplification=0)))
        errors.append(str(info.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_zero_size_chunk_beside_the_whole_tensor_does_not_replace_it(tmp_path, workers):
    """One chunk is the whole tensor and another is empty (a rank that holds no rows of it): the value is the
    whole chunk. The empty chunk's tensor, read after it, once became the value (shape [0, 5], no error)."""
    whole = _chunked(tmp_path / "ckpt", torch.randn(6, 5), torch.empty(0, 5), [6, 0])
    got = torchckpt.load(tmp_path / "ckpt", workers=workers)
    assert got["w"].shape == (6, 5) and torch.equal(got["w"], whole)


def test_thousands_of_row_chunks_are_checked_in_linear_time(tmp_path):
    """4096 row chunks of one tensor (4096 ranks of an FSDP save): checking that they do not overlap compared
    every pair (16 s per tensor; a folder of hundreds of such tensors took hours). Each chunk is the one item a
    real DCP save wrote (a [1, 2] tensor), so the tensor is that row 4096 times."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata

    rows, row = 4096, torch.randn(1, 2)  # 4096 x 8 bytes: within the 64 KiB a tensor may exceed its distinct items by
    path = tmp_path / "ckpt"
    _save(path, {"a": row})

    def change(meta):
        md = meta.state_dict_metadata.pop("a")
        info = meta.storage_data.pop(next(iter(meta.storage_data)))
        meta.state_dict_metadata["w"] = TensorStorageMetadata(properties=md.properties, size=torch.Size([rows, 2]),
            chunks=[ChunkStorageMetadata(offsets=torch.Size([i, 0]), sizes=torch.Size([1, 2])) for i in range(rows)])
        meta.storage_data.update({MetadataIndex("w", torch.Size([i, 0])): info for i in range(rows)})
        meta.planner_data.clear()

    _rewrite_metadata(path, change)
    start = time.perf_counter()
    info = torchckpt.inspect(path)  # the structure (and the chunk check) only: no item is read
    assert time.perf_counter() - start < 2  # ~0.03 s; the pairwise check alone took 16 s
    assert [list(t.shape) for t in info.tensors] == [[rows, 2]]
    assert torch.equal(torchckpt.load(path)["w"], row.expand(rows, 2))

    def overlap(meta):  # the last chunk moved onto the first: the element count still adds up
        meta.state_dict_metadata["w"].chunks[-1] = ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([1, 2]))

    _rewrite_metadata(path, overlap)
    with pytest.raises(CheckpointError, match="overlap"):
        torchckpt.load(path)


@pytest.mark.parametrize("stored", ["int32", "swapped", "dict"])
def test_scan_refuses_the_chunk_load_refuses(tmp_path, stored):
    """A chunk whose item holds another dtype (of the same size: it would fit its place byte for byte), another
    shape, or no tensor: load refuses it, naming the data file and the chunk, and so does scan (it reported the
    folder clean: scan read the item but never checked it)."""
    from torchckpt.tools.scanning import scan

    path = tmp_path / "ckpt"
    second = torch.randn(3, 5)
    _chunked(path, torch.randn(3, 5), second, [3, 0])
    value = {"int32": second.view(torch.int32), "swapped": torch.randn(5, 3), "dict": {"w": second}}[stored]
    item = io.BytesIO()
    torch.save(value, item)

    def change(meta):  # the chunk's item replaced by one holding `value`, appended to its data file
        info = next(info for index, info in meta.storage_data.items() if index.fqn == "w" and index.offset[0] == 3)
        with open(path / info.relative_path, "ab") as fh:
            info.offset, info.length = fh.tell(), len(item.getvalue())
            fh.write(item.getvalue())

    _rewrite_metadata(path, change)
    with pytest.raises(CheckpointError, match=r"chunk of 'w' at \[3, 0\] in '.*distcp' holds") as loaded:
        torchckpt.load(path)
    (report,) = scan([str(path)]).files
    assert report.status == "unreadable" and report.error in str(loaded.value)


@pytest.mark.parametrize("shared_by, columns", [("chunks", 65536), ("tensors", 65536), ("tensors", 4096)])
def test_one_item_named_many_times_cannot_declare_a_tensor_larger_than_the_folder(tmp_path, shared_by, columns):
    """64 chunks (or 64 tensors) naming the same 256 KiB item: a 256 KiB folder declared 16 MiB of tensors, and load
    allocated and filled them all (1 MiB x 24000 chunks: 24 GiB from a 1 MiB folder). A byte range backs one place,
    and a tensor of 16 KiB whose item another tensor holds is refused too (64 KiB allowed per .metadata entry)."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata

    count, row = 64, torch.randn(1, columns)
    path = tmp_path / "ckpt"
    _save(path, {"a": row})

    def change(meta):
        md = meta.state_dict_metadata.pop("a")
        info = meta.storage_data.pop(next(iter(meta.storage_data)))
        meta.planner_data.clear()
        if shared_by == "chunks":
            meta.state_dict_metadata["w"] = TensorStorageMetadata(properties=md.properties, size=torch.Size([count, columns]),
                chunks=[ChunkStorageMetadata(offsets=torch.Size([i, 0]), sizes=torch.Size([1, columns])) for i in range(count)])
            meta.storage_data.update({MetadataIndex("w", torch.Size([i, 0])): info for i in range(count)})
        else:
            meta.state_dict_metadata.update({f"w{i}": md for i in range(count)})
            meta.storage_data.update({MetadataIndex(f"w{i}", torch.Size([0, 0])): info for i in range(count)})

    _rewrite_metadata(path, change)
    with pytest.raises(LimitExceededError, match="declares"):
        torchckpt.load(path)


def test_a_key_with_a_newline_and_esc_is_shown_escaped_in_an_items_error(tmp_path):
    """The item's name in an error (data file[key]) is one line: a key holding a newline and ESC (a forged
    log line, a terminal command) is shown escaped, whatever prints the error."""
    key = "w\nOK: all tensors verified\x1b[2J"
    path = tmp_path / "ckpt"
    _save(path, {key: torch.ones(4)}, threads=1)
    meta = pickle.loads((path / ".metadata").read_bytes())
    info = _record(meta, key)
    with open(path / info.relative_path, "r+b") as fh:  # the item's zip no longer starts where it is said to
        fh.seek(info.offset)
        fh.write(b"JUNK")
    with pytest.raises(CheckpointError) as caught:
        torchckpt.load(path)
    shown = str(caught.value)
    assert "\x1b" not in shown and "\nOK: all tensors verified" not in shown, shown
    assert "\\x0aOK: all tensors verified" in shown or "\\nOK: all tensors verified" in shown, shown


@pytest.mark.parametrize("workers", [1, 2])
def test_an_item_whose_range_holds_no_torch_save_stream_is_named_as_a_dcp_entry(tmp_path, workers):
    """.metadata pointing 40 bytes into an item (damaged, or from another save): the error names the entry, its
    byte range and data file, and says what to do inside a folder (not "expected a PyTorch file")."""
    path = tmp_path / "ckpt"
    _save(path, {"w": torch.ones(4), "v": torch.zeros(3)}, threads=1)

    def shift(meta):
        _record(meta, "w").offset += 40

    _rewrite_metadata(path, shift)
    with pytest.raises(UnsupportedFormatError) as caught:
        torchckpt.load(path, workers=workers)
    shown = str(caught.value)
    assert "DCP entry 'w': bytes 40..+" in shown and "do not hold a torch.save stream" in shown, shown
    assert "Expected a PyTorch" not in shown and ".metadata does not match its data files" in shown, shown
