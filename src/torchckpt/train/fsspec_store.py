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
from ..storage.atomic import process_alive
from ..storage.remote import StorageOptions, join
from . import store
from .restore import resume_file
from . import sidecar
from .training import TrainingState, data_files, verify, write_data

__all__ = ["FsspecStore", "upload", "StagedUpload", "downloaded", "resume_url"]

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


class FsspecStore:
    """Single-file checkpoints under a URL prefix on any fsspec filesystem
    (:class:`~torchckpt.train.store.FileStore`): uploads published whole, the sidecar last."""

    def __init__(self, directory: str, storage_options: StorageOptions | None = None) -> None:
        self.directory = directory
        self.options = dict(storage_options or {})

    def lock(self) -> _NoLock:
        return _NoLock()

    def path_for(self, step: int) -> str:
        return join(self.directory, store.file_name(step))

    # ------------------------------------------------------------------ listing
    def entries(self) -> list[store.Entry]:
        """Every step with a data file, sidecar or marker under the prefix, oldest first (one LIST)."""
        sizes = files.list_sizes(self.directory, self.options)
        steps = dict(found for found in map(store.step_of, sizes) if found is not None)
        out = []
        for step in sorted(steps):
            name = steps[step]
            path = join(self.directory, name)
            unfinished = os.path.basename(store.marker_path(name)) in sizes
            meta, problem = None, None
            if os.path.basename(sidecar.path_of(name)) in sizes:
                try:
                    meta = sidecar.read(path, strict=True, storage_options=self.options)
                except CorruptCheckpointError as exc:
                    problem = exc.reason
            if problem is None:
                problem = store.commit_problem(name, meta, sizes, lambda: sizes[name])
            out.append(store.Entry(step, path, meta, problem, unfinished, store=self))
        return out

    # ------------------------------------------------------------------ writing steps
    def begin(self, path: str) -> None:
        with files.write_whole(store.marker_path(path), self.options):
            pass

    def end(self, path: str) -> None:
        files.remove(store.marker_path(path), self.options)

    def discard(self, path: str) -> None:
        _discard(path, self.options)

    def delete(self, path: str) -> None:
        self.begin(path)
        self.discard(path)
        self.end(path)

    def reclaim(self) -> list[str]:
        """Remove the files of saves and deletes that a killed writer left unfinished."""
        removed: list[str] = []
        for entry in self.entries():
            if not entry.unfinished:
                continue
            if entry.problem is not None:
                self.discard(entry.path)
                removed.append(os.path.basename(entry.path))
            self.end(entry.path)
        return removed

    def remove_temp_files(self) -> list[str]:
        """Nothing to remove: on object stores an interrupted upload leaves no object (configure the bucket
        to abort incomplete multipart uploads); staging folders of dead local writers go at each upload."""
        return []

    def stage(self, path: str) -> "StagedUpload":
        return StagedUpload(path, self.options)

    # ------------------------------------------------------------------ resuming
    def resume(self, entry: store.Entry, **objects: Any) -> TrainingState:
        """Download the checkpoint once, verify it against its sidecar there, restore, remove the download."""
        with downloaded(entry.path, self.options) as local:
            verify(local, entry.meta)
            state = resume_file(local, verified=True, **objects)
        _renamed(state, local, entry.path)
        return state


def upload(path: str, payload: dict[str, Any], weights_format: str = "pt",
           storage_options: StorageOptions | None = None) -> dict[str, Any]:
    """Write one checkpoint's files to a local staging folder, upload each whole, then the sidecar; returns
    the sidecar. If anything fails, none of its files stays under its final name."""
    staged = StagedUpload(path, storage_options)
    try:
        staged.write(payload, weights_format)
        staged.publish()
    finally:
        staged.abort()
    return staged.meta


class StagedUpload:
    """One upload of the checkpoint at ``path`` in two phases (:class:`~torchckpt.train.store.Staging`): its files
    written to a local staging folder (:meth:`write`), then uploaded (:meth:`publish`)."""

    def __init__(self, path: str, storage_options: StorageOptions | None = None) -> None:
        self.path, self.options = path, dict(storage_options or {})
        self.meta: dict[str, Any] = {}
        self.staging: str | None = None

    def write(self, payload: dict[str, Any], weights_format: str = "pt") -> None:
        """Write the checkpoint's files into a new local staging folder (the writer of local checkpoints)."""
        _clean_stale_staging()
        self.staging = tempfile.mkdtemp(prefix=f"{STAGING}{os.getpid()}-")
        try:
            self.meta = write_data(os.path.join(self.staging, os.path.basename(self.path.rstrip("/"))), payload,
                                   weights_format)
        except BaseException:
            self.abort()
            raise

    def publish(self) -> None:
        """Upload each file whole, then the sidecar (the commit record); on failure none of them stays under its
        final name. The staging folder is removed either way."""
        path, options = self.path, self.options
        assert self.staging is not None, "write() first"
        try:
            files.remove(sidecar.path_of(path), options)  # a re-save of a step: the old record goes first
            for name in self.meta.get("files") or [os.path.basename(path.rstrip("/"))]:
                with open(os.path.join(self.staging, name), "rb") as src, \
                        files.write_whole(join(path.rsplit("/", 1)[0], name), options) as dst:
                    shutil.copyfileobj(src, dst, 8 << 20)
            sidecar.write(path, self.meta, options)  # the commit record, last
        except BaseException:
            with contextlib.suppress(Exception):
                _discard(path, options)  # data without its sidecar must not stay under the final name
            raise
        finally:
            self.abort()

    def abort(self) -> None:
        """Remove the staging folder (nothing is uploaded before publish, and publish removes what it uploaded
        when it fails)."""
        staging, self.staging = self.staging, None
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _discard(path: str, options: StorageOptions) -> None:
    for victim in data_files(path):  # the sidecar first: without it the data is no checkpoint
        files.remove(victim, options)


@contextlib.contextmanager
def downloaded(path: str, storage_options: StorageOptions | None = None) -> Iterator[str]:
    """The checkpoint at ``path`` (and its weights file and sidecar) in a temporary local folder."""
    with files.local_copy(path, storage_options, companions=(".safetensors", sidecar.SUFFIX)) as local:
        yield local


def _clean_stale_staging() -> None:
    """Remove the staging folders of writers on this machine that were killed mid-upload."""
    root = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(root):
            pid = name[len(STAGING):].split("-", 1)[0] if name.startswith(STAGING) else ""
            if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _renamed(state: TrainingState, local: str, url: str) -> None:
    """Report the URL, not the temporary download, as where the state came from."""
    state.path = url
    if state.report is not None and getattr(state.report, "source", None) == local:
        state.report.source = url


def resume_url(url: str, storage_options: StorageOptions | None = None, **kwargs: Any) -> TrainingState:
    """Resume from one checkpoint file at ``url`` (downloaded once, verified, restored, removed)."""
    with downloaded(url, storage_options) as local:
        state = resume_file(local, **kwargs)
    _renamed(state, local, url)
    return state
