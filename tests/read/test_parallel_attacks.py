"""Hostile multi-part folders read with one thread and with a pool: the same typed error, naming the same
file and item, with the same numbers, and no thread left behind."""

from __future__ import annotations

import os
import threading

import pytest

import torchckpt
from torchckpt.errors import CheckpointError, LimitExceededError

from test_parallel_folders import save_dcp
from test_parallel_shards import least


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "ckpt"
    save_dcp(path)
    return path


def _error(path, workers, **kwargs) -> str:
    before = threading.active_count()
    with pytest.raises(CheckpointError) as info:
        torchckpt.load(path, workers=workers, **kwargs)
    assert threading.active_count() == before  # the pool's threads are gone
    return str(info.value)


def test_a_budget_overrun_across_data_files_is_the_error_a_sequential_read_raises(folder):
    """Each data file fits the budget alone; together they do not. With 4 workers the error once named the
    directory and the input of whole files ("for its 13263 bytes") instead of the item where a sequential
    read stops ("__0_1.distcp[model.layer9.w] ... for its 12953 bytes")."""
    steps = least(folder, 1) - 1
    policy = torchckpt.Policy(budget=torchckpt.Budget(steps=steps, amplification=0))
    errors = {workers: _error(folder, workers, policy=policy) for workers in (1, 4)}
    assert errors[1] == errors[4]
    assert ".distcp[" in errors[1]  # names the data file and the item


def test_a_data_file_alone_over_the_budget_fails_where_a_sequential_read_fails(folder):
    steps = least(folder, 1) // 3  # less than the first files together need
    policy = torchckpt.Policy(budget=torchckpt.Budget(steps=steps, amplification=0))
    errors = {workers: _error(folder, workers, policy=policy) for workers in (1, 2, 4)}
    assert errors[1] == errors[2] == errors[4]
    with pytest.raises(LimitExceededError):
        torchckpt.load(folder, workers=4, policy=policy)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_data_file_that_is_not_a_regular_file_is_named_and_never_opened(folder, kind):
    target = folder / "__0_2.distcp"
    os.remove(target)
    os.mkfifo(target) if kind == "fifo" else os.mkdir(target)  # opening a FIFO would block forever
    errors = {workers: _error(folder, workers) for workers in (1, 4)}
    assert errors[1] == errors[4]
    assert "'__0_2.distcp'" in errors[1] and "not a regular file" in errors[1]

