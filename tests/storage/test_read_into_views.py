"""``Source.read_into_views``: one run of a file read with ``preadv`` into many destinations (the ZeRO
consolidation reads each rank's fp32 slices straight into the parameters this way)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from torchckpt.errors import TruncatedCheckpointError
from torchckpt.storage.source import IOV_MAX, Source


def test_more_views_than_one_call_takes(tmp_path) -> None:
    rng = random.Random(5)
    sizes = [rng.choice([0, 1, 3, 4, 4096, 10_000]) for _ in range(2 * IOV_MAX + 77)]
    data = os.urandom(sum(sizes) + 999)
    (tmp_path / "f").write_bytes(data)
    views = [np.full(n, 7, dtype=np.uint8) for n in sizes]
    floats = np.zeros(6, dtype=np.float32)  # any writable contiguous buffer: a numpy slice of a float tensor
    with Source(str(tmp_path / "f")) as src:
        src.read_into_views(999 - 24, [floats] + views)
    assert floats.tobytes() == data[999 - 24:999]
    assert b"".join(v.tobytes() for v in views) == data[999:]


def test_out_of_range_and_a_file_that_shrank(tmp_path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(50_000))
    views = [np.zeros(20_000, dtype=np.uint8) for _ in range(2)]
    with Source(str(path)) as src:
        with pytest.raises(TruncatedCheckpointError, match="outside"):
            src.read_into_views(20_000, views)
        os.truncate(path, 30_000)  # inside the second view: the first is read, the second in part, then EOF
        with pytest.raises(TruncatedCheckpointError, match="file ended at byte 30000"):
            src.read_into_views(0, views)
