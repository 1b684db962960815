"""Reads into fresh memory that is prefaulted piece by piece (``Source.read_into(prefault=True)``, issue 27).

The meta-model load reads each tensor with ``pread`` into new memory and maps that memory first with
``madvise(MADV_POPULATE_WRITE)`` in 8 MiB pieces. These tests check that the bytes are exact across piece
boundaries and unaligned ranges, that a kernel refusing the advice leaves the read exact, and that a
model on ``meta`` gets exact values from every format when its tensors span several pieces.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import torchckpt
from torchckpt.storage import prefault as prefault_module
from torchckpt.storage.prefault import PREFAULT_PIECE
from torchckpt.storage.source import Source

SIZE = 2 * PREFAULT_PIECE + 12_345  # three pieces, the last one short


@pytest.fixture()
def data_file(tmp_path):
    data = os.urandom(SIZE)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    return str(path), data


@pytest.mark.parametrize("offset,nbytes", [(0, SIZE), (7, SIZE - 20), (4096, PREFAULT_PIECE), (3, 2 * PREFAULT_PIECE + 1)])
def test_prefaulted_read_is_exact(data_file, offset, nbytes):
    path, data = data_file
    with Source(path) as src:
        storage = src.read_into_storage(offset, nbytes, prefault=True)
        plain = src.read_into_storage(offset, nbytes)
    got = bytes(torch.empty(0, dtype=torch.uint8).set_(storage).numpy())
    assert got == data[offset:offset + nbytes]
    assert bytes(torch.empty(0, dtype=torch.uint8).set_(plain).numpy()) == got


def test_prefaulted_read_into_an_unaligned_destination(data_file):
    """The destination need not start on a page: only whole pages inside it are populated."""
    path, data = data_file
    buf = bytearray(SIZE + 100)
    target = torch.frombuffer(memoryview(buf)[37:], dtype=torch.uint8).untyped_storage()  # starts at byte 37
    assert target.data_ptr() % 4096 != 0
    with Source(path) as src:
        src.read_into(target, 5, SIZE - 5, prefault=True)
    assert bytes(buf[37:37 + SIZE - 5]) == data[5:]
    assert not any(buf[:37]) and not any(buf[37 + SIZE - 5:])  # nothing written outside the range


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise advice values are Linux's")
def test_a_kernel_that_refuses_the_advice_still_reads_exactly(data_file, monkeypatch):
    path, data = data_file
    monkeypatch.setattr(prefault_module, "_madvise", None)
    monkeypatch.setattr(prefault_module, "_MADV_POPULATE_WRITE", 0x7FFF)  # no such advice: EINVAL, as on Linux < 5.14
    with Source(path) as src:
        storage = src.read_into_storage(0, SIZE, prefault=True)
    assert prefault_module._madvise is False  # asked once, never again
    assert bytes(torch.empty(0, dtype=torch.uint8).set_(storage).numpy()) == data


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
def test_meta_model_gets_exact_values_across_pieces(tmp_path, fmt):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {"big.weight": torch.randn(3 * PREFAULT_PIECE // 4 // 1000 + 1, 1000, generator=g),  # > 3 pieces
          "small.weight": torch.randn(3, 5, generator=g)}
    path = str(tmp_path / {"zip": "m.pt", "legacy": "m.pth", "safetensors": "m.safetensors"}[fmt])
    if fmt == "safetensors":
        save_file(sd, path)
    else:
        torch.save(sd, path, _use_new_zipfile_serialization=fmt == "zip")
    with torch.device("meta"):
        model = torch.nn.ModuleDict({"big": torch.nn.Linear(1000, sd["big.weight"].shape[0], bias=False),
                                     "small": torch.nn.Linear(5, 3, bias=False)})
    report = torchckpt.load_into(model, path)
    assert report.ok and sorted(report.loaded) == ["big.weight", "small.weight"]
    for name, tensor in sd.items():
        param = model.get_parameter(name)
        assert param.device.type == "cpu" and torch.equal(param, tensor)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_POPULATE_WRITE) is Linux's")
def test_a_range_the_kernel_refuses_does_not_turn_prefaulting_off_for_good():
    """Any failure of one madvise (ENOMEM for memory the process does not map, or under memory pressure; EINTR)
    set prefaulting off for the rest of the process (every later load and every async save's warming); only an
    unknown advice (EINVAL, Linux < 5.14) means the kernel cannot do it."""
    import ctypes
    import mmap as _mmap

    from torchckpt.storage.prefault import prefault_pages

    size = 16 << 20
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

    def fresh_pages() -> int:  # anonymous memory nothing has touched (a heap chunk may be resident already)
        at = libc.mmap(None, size, _mmap.PROT_READ | _mmap.PROT_WRITE, _mmap.MAP_PRIVATE | _mmap.MAP_ANONYMOUS, -1, 0)
        assert at not in (None, ctypes.c_void_p(-1).value)
        return at

    def resident() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _mmap.PAGESIZE

    probe = fresh_pages()
    try:
        if not prefault_pages(probe, size):
            pytest.skip("no MADV_POPULATE_WRITE on this kernel")
    finally:
        libc.munmap(probe, size)
    gone = fresh_pages()
    assert libc.munmap(gone, size) == 0  # a range nobody maps
    assert prefault_pages(gone, size) is False  # refused: ENOMEM
    fresh = fresh_pages()
    try:
        before = resident()
        assert prefault_pages(fresh, size) is True  # still asked
        assert resident() - before > size // 2  # and mapped
    finally:
        libc.munmap(fresh, size)
