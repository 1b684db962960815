"""Removing and replacing large checkpoint files: the name goes at once, the content is freed off the caller's
thread, before the next write, and never kept alive by a forked child. Real files, real fork, real FIFO."""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

import torchckpt
from torchckpt.storage import reclaim
from torchckpt.storage.atomic import AtomicFiles

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")


def _held_deleted(name: str) -> list[str]:
    """Descriptors of this process that point at a removed file called ``name``."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.endswith(" (deleted)") and os.path.basename(target[: -len(" (deleted)")]) == name:
            out.append(target)
    return out


def _large_file(path, size: int = reclaim.LARGE + 4096) -> None:
    with open(path, "wb") as fh:
        fh.write(b"\x01" * size)


@contextlib.contextmanager
def _removed_with_closer_paused(path):
    """A large file at ``path``, removed while the closing thread cannot run (this test holds its lock)."""
    _large_file(path)
    with reclaim._closer._cond:
        reclaim.remove_file(str(path))
        assert not path.exists()
        assert _held_deleted(path.name), "the content should be held for the background thread"
        yield


def test_remove_file_removes_the_name_at_once_and_frees_the_content_in_the_background(tmp_path):
    big = tmp_path / "ckpt-0000000001.pt"
    with _removed_with_closer_paused(big):
        pass
    reclaim.drain()
    assert _held_deleted(big.name) == []


def test_the_next_write_starts_only_after_the_removed_content_is_freed(tmp_path):
    big = tmp_path / "old.pt"
    with _removed_with_closer_paused(big):
        # a writer drains first: inside the write the old content is already freed (a full disk has its space back)
        with AtomicFiles(str(tmp_path)) as group:
            with group.write(str(tmp_path / "new.pt")) as fh:
                assert _held_deleted(big.name) == []
                fh.write(b"x")
            group.publish()
    assert (tmp_path / "new.pt").read_bytes() == b"x"


def test_replacing_a_large_file_frees_the_old_content_and_keeps_the_new(tmp_path):
    target = tmp_path / "last.pt"
    _large_file(target)
    with reclaim._closer._cond:
        with AtomicFiles(str(tmp_path)) as group:
            with group.write(str(target)) as fh:
                fh.write(b"new content")
            group.publish()
        assert target.read_bytes() == b"new content"
        assert _held_deleted(target.name), "the replaced content should be freed by the background thread"
    reclaim.drain()
    assert _held_deleted(target.name) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_keep_a_removed_checkpoint_alive(tmp_path):
    big = tmp_path / "ckpt-0000000002.pt"
    with _removed_with_closer_paused(big):
        pid = os.fork()
        if pid == 0:  # the child (a DataLoader worker, say) must not hold the content for its lifetime
            os._exit(0 if _held_deleted(big.name) == [] else 1)
        _, status = os.waitpid(pid, 0)
    reclaim.drain()
    assert os.waitstatus_to_exitcode(status) == 0
    assert _held_deleted(big.name) == []


def test_small_files_symlinks_and_fifos_are_removed_plainly_and_never_block(tmp_path):
    small = tmp_path / "small.pt"
    small.write_bytes(b"abc")
    target = tmp_path / "target.pt"
    _large_file(target)
    link = tmp_path / "link.pt"
    link.symlink_to(target)
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)  # opening a FIFO for reading would block forever without O_NONBLOCK
    shared = tmp_path / "shared.pt"
    os.link(target, shared)  # a second name: removing one frees nothing, nothing to hold
    with reclaim._closer._cond:
        for victim in (small, link, fifo, shared):
            reclaim.remove_file(str(victim))
            assert not os.path.lexists(victim)
        assert _held_deleted("small.pt") == [] and _held_deleted("target.pt") == [] and _held_deleted("shared.pt") == []
    assert target.stat().st_size == reclaim.LARGE + 4096  # removing a link never touches its target
    with pytest.raises(FileNotFoundError):
        reclaim.remove_file(str(tmp_path / "missing.pt"))


def test_checkpointer_retention_leaves_no_removed_checkpoint_held(tmp_path):
    model = torch.nn.Linear(4200, 1024)  # 16.4 MiB of weights: above the threshold
    run = tmp_path / "run"
    ck = torchckpt.Checkpointer(str(run), keep_last=1)
    for step in (1, 2, 3):
        ck.save(step, model=model)
    reclaim.drain()
    assert sorted(n for n in os.listdir(run) if n.startswith("ckpt-")) == ["ckpt-0000000003.pt", "ckpt-0000000003.pt.meta.json"]
    assert _held_deleted("ckpt-0000000001.pt") == [] and _held_deleted("ckpt-0000000002.pt") == []
    fresh = torch.nn.Linear(4200, 1024)
    assert torchckpt.Checkpointer(str(run)).resume(model=fresh).step == 3
    assert torch.equal(fresh.weight, model.weight)
