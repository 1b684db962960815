"""Training checkpoints on remote storage (any fsspec URL): the protocol of :mod:`.store`, on a store
that has no rename, no fsync and no locks.

* **Publish whole.** A checkpoint's data files are written to a local staging folder by the same
  writer as local checkpoints (:func:`~torchckpt.train.training.write_data`), then uploaded with
  :func:`torchckpt.storage.files.write_whole`: on object stores an object is visible only once its
  upload completed (an interrupted multipart upload is aborted, never completed), and the size the
  store reports is checked against the bytes sent.
* **Commit record last.** The sidecar is uploaded after the data; listing (one LIST, sizes included)
  trusts only data whose sidecar exists and matches its size. A writer killed at any moment leaves
  the previous checkpoint as the latest.
* **Intent markers** (``.ckpt-<step>.pt.uncommitted``, empty objects) name the files of a save or
  delete in progress, so the next writer (at its first save) removes the leftovers of a killed one,
  and only those. Listing and resuming never remove anything.
* **No writer lock**: object stores have no ``flock``. Two writers on one prefix are not detected.

Resume downloads the checkpoint (and its weights file) once into a temporary folder, verifies it
there against its sidecar, restores from it and removes the download.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any, Iterator

from ..errors import CorruptCheckpointError
from ..storage import files
from ..storage.remote import StorageOptions, join
from . import store
from .restore import resume_file
from . import sidecar
from .training import TrainingState, data_files, verify, write_data

__all__ = ["RemoteStore", "resume_url"]

STAGING = "torchckpt-upload-"  # + pid: a local folder a writer stages one checkpoint in before uploading it


class _NoLock:
    """Object stores have no advisory locks. ``acquire`` (a save) always succeeds; ``try_acquire`` (a
    Checkpointer being opened, perhaps only to list or resume) never does, so that a reader never
    removes the leftovers of what may be another process's save in progress."""

    held = False

    def acquire(self) -> None:
        self.held = True

    def try_acquire(self) -> bool:
        return False

    def release(self) -> None:
        self.held = False


class RemoteStore:
    """The steps of :mod:`.store` (``entries``, ``begin``, ``end``, ``delete``, ``reclaim``) for a
    directory that is a URL prefix, plus the write, the temp-file cleanup and the resume of one entry."""

    NAME = store.NAME

    def __init__(self, storage_options: StorageOptions | None = None) -> None:
        self.options = dict(storage_options or {})

    def DirectoryLock(self, directory: str) -> _NoLock:  # noqa: N802 - the same spelling as store.DirectoryLock
        return _NoLock()

    def path_for(self, directory: str, step: int) -> str:
        return join(directory, os.path.basename(store.path_for("", step)))

    # ------------------------------------------------------------------ listing
    def entries(self, directory: str) -> list[store.Entry]:
        """Every step with a data file, sidecar or marker under the prefix, oldest first (one LIST)."""
        sizes = files.list_sizes(directory, self.options)
        steps: dict[int, str] = {}
        for name in sizes:
            base = sidecar.base_name(name)
            if base.startswith(".") and base.endswith(store.MARKER_SUFFIX):
                base = base[1: -len(store.MARKER_SUFFIX)]
            m = store.NAME.match(base)
            if m:
                steps[int(m.group(1))] = base
        out = []
        for step in sorted(steps):
            name = steps[step]
            path = join(directory, name)
            unfinished = os.path.basename(store.marker_path(name)) in sizes
            meta, problem = None, None
            if os.path.basename(sidecar.path_of(name)) in sizes:
                try:
                    meta = sidecar.read(path, strict=True, storage_options=self.options)
                except CorruptCheckpointError as exc:
                    problem = exc.reason
            if problem is None:
                problem = store.commit_problem(name, meta, sizes, lambda: sizes[name])
            out.append(store.Entry(step, path, meta, problem, unfinished))
        return out

    # ------------------------------------------------------------------ writing steps
    def begin(self, path: str) -> None:
        with files.write_whole(store.marker_path(path), self.options):
            pass

    def end(self, path: str) -> None:
        files.remove(store.marker_path(path), self.options)

    def discard(self, path: str) -> None:
        for victim in data_files(path):  # the sidecar first: without it the data is no checkpoint
            files.remove(victim, self.options)

    def delete(self, path: str) -> None:
        self.begin(path)
        self.discard(path)
        self.end(path)

    def reclaim(self, directory: str) -> list[str]:
        """Remove the files of saves and deletes that a killed writer left unfinished."""
        removed: list[str] = []
        for entry in self.entries(directory):
            if not entry.unfinished:
                continue
            if entry.problem is not None:
                self.discard(entry.path)
                removed.append(os.path.basename(entry.path))
            self.end(entry.path)
        return removed

    def write_payload(self, path: str, payload: dict[str, Any], weights_format: str = "pt") -> dict[str, Any]:
        """Write the checkpoint's files to a staging folder, upload each whole, then the sidecar."""
        _clean_stale_staging()
        staging = tempfile.mkdtemp(prefix=f"{STAGING}{os.getpid()}-")
        try:
            local = os.path.join(staging, os.path.basename(path.rstrip("/")))
            meta = write_data(local, payload, weights_format)
            try:
                files.remove(sidecar.path_of(path), self.options)  # a re-save of a step: the old record goes first
                for name in meta.get("files") or [os.path.basename(local)]:
                    with open(os.path.join(staging, name), "rb") as src, \
                            files.write_whole(join(path.rsplit("/", 1)[0], name), self.options) as dst:
                        shutil.copyfileobj(src, dst, 8 << 20)
                sidecar.write(path, meta, self.options)  # the commit record, last
            except BaseException:
                with contextlib.suppress(Exception):
                    self.discard(path)  # data without its sidecar must not stay under the final name
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return meta

    # ------------------------------------------------------------------ resuming
    @contextlib.contextmanager
    def downloaded(self, path: str) -> Iterator[str]:
        """The checkpoint at ``path`` (and its weights file and sidecar) in a temporary local folder."""
        with files.local_copy(path, self.options, companions=(".safetensors", sidecar.SUFFIX)) as local:
            yield local

    def resume_entry(self, entry: store.Entry, **kwargs: Any) -> TrainingState:
        with self.downloaded(entry.path) as local:
            verify(local, entry.meta)
            state = resume_file(local, verified=True, **kwargs)
        _renamed(state, local, entry.path)
        return state


def _clean_stale_staging() -> None:
    """Remove the staging folders of writers on this machine that were killed mid-upload."""
    root = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(root):
            pid = name[len(STAGING):].split("-", 1)[0] if name.startswith(STAGING) else ""
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _renamed(state: TrainingState, local: str, url: str) -> None:
    """Report the URL, not the temporary download, as where the state came from."""
    state.path = url
    if state.report is not None and getattr(state.report, "source", None) == local:
        state.report.source = url


def resume_url(url: str, storage_options: StorageOptions | None = None, **kwargs: Any) -> TrainingState:
    """Resume from one checkpoint file at ``url`` (downloaded once, verified, restored, removed)."""
    remote = RemoteStore(storage_options)
    with remote.downloaded(url) as local:
        state = resume_file(local, **kwargs)
    _renamed(state, local, url)
    return state
