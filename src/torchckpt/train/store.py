"""The protocol between a :class:`~torchckpt.train.checkpointer.Checkpointer` and where its checkpoints
live: :class:`Store`. One implementation per file: :mod:`.local_store` (a local directory),
:mod:`.fsspec_store` (a URL prefix on any fsspec filesystem) and :mod:`.dcp_store` (sharded
``ckpt-<step>.dcp`` directories written through torch.distributed.checkpoint). A new store
implements :class:`Store` (and :class:`FileStore` if it writes single-file checkpoints) in one file;
the Checkpointer speaks to nothing else.

Every store keeps the same promise. A checkpoint ``ckpt-<step>.pt`` exists once its sidecar
``ckpt-<step>.pt.meta.json`` (the commit record, written last, :mod:`.sidecar`) exists and matches
its data. Everything else is crash safety:

* **one writer**: a writer holds the store's lock for as long as it writes (a local directory: an
  exclusive ``flock`` on ``.torchckpt.lock`` holding its pid); a second writer gets
  :class:`~torchckpt.errors.CheckpointWriteError` naming the holder. Readers take no lock.
* **intent markers**: before a checkpoint's files are created (save) or removed (retention), an
  empty marker ``.ckpt-<step>.pt.uncommitted`` is written; it is removed when the step is done.
  A kill at any moment leaves either a committed checkpoint or a marker that names the leftovers,
  so ``reclaim`` (run under the lock) removes exactly the files this protocol wrote and never a
  file it did not (a ``ckpt-7.pt`` copied in by hand has no marker and is left alone).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping, Protocol

from . import sidecar
from .training import FORMAT, TrainingState

__all__ = ["Store", "FileStore", "Staging", "WriterLock", "Entry", "NAME", "LOCK_NAME", "MARKER_SUFFIX", "file_name",
           "marker_path", "commit_problem", "step_of"]

NAME = re.compile(r"^ckpt-(\d+)\.pt$")
LOCK_NAME = ".torchckpt.lock"
MARKER_SUFFIX = ".uncommitted"
_MARKER = re.compile(r"^\.(ckpt-\d+\.pt)" + re.escape(MARKER_SUFFIX) + "$")


def file_name(step: int) -> str:
    """The name of step ``step``'s checkpoint file in any store."""
    return f"ckpt-{step:010d}.pt"


def marker_path(path: str) -> str:
    """The intent marker of the checkpoint at ``path`` (a local path or a URL)."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}{MARKER_SUFFIX}")


def step_of(name: str) -> tuple[int, str] | None:
    """``(step, checkpoint file name)`` for a checkpoint's data file, sidecar or marker name, else None."""
    base = sidecar.base_name(name)
    marker = _MARKER.match(name)
    m = NAME.match(base) or (NAME.match(marker.group(1)) if marker else None)
    return (int(m.group(1)), m.group(0)) if m else None


# --------------------------------------------------------------------------- what a store lists
@dataclass(frozen=True)
class Entry:
    """One step found in a store. ``problem`` is None for a committed checkpoint."""

    step: int
    path: str
    meta: Mapping[str, Any] | None
    problem: str | None
    unfinished: bool = False  # an intent marker is present: a save or delete did not finish (yet)
    store: "Store | None" = field(default=None, compare=False, repr=False)  # the store that listed it


def commit_problem(name: str, meta: Mapping[str, Any] | None, names: Collection[str],
                   size_of: Callable[[], int]) -> str | None:
    """What is wrong with checkpoint ``name`` (None: committed), given its sidecar ``meta``, the names
    present beside it and ``size_of()`` its data file's size (may raise OSError). Local and remote
    stores judge a commit by this one rule."""
    if meta is None:
        return "it has no sidecar (its save or upload never finished, or the sidecar was removed)" \
            if name in names else "its files are gone"
    if meta.get("format") != FORMAT or meta.get("file") != name:
        return "its sidecar was not written by torchckpt for this file"
    if name not in names:
        return "its data file is missing"
    try:
        size = size_of()
    except OSError as exc:
        return f"its data file cannot be read ({exc.strerror})"
    if size != meta.get("size"):
        return f"its data file is {size} bytes but {meta.get('size')} were written (truncated?)"
    return None


# --------------------------------------------------------------------------- the protocol
class WriterLock(Protocol):
    """The one-writer lock of a store."""

    @property
    def held(self) -> bool: ...

    def acquire(self) -> None:
        """Take the lock or raise CheckpointWriteError naming who holds it."""

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; False otherwise (never raises for a held lock)."""

    def release(self) -> None: ...


class Store(Protocol):
    """Where a Checkpointer's checkpoints live: listing, locking, deleting, reclaiming, resuming."""

    directory: str

    def lock(self) -> WriterLock:
        """A new (not yet taken) writer lock on this store."""

    def entries(self) -> list[Entry]:
        """Every step this store holds, committed or not, oldest first (each Entry's ``store`` is self)."""

    def delete(self, path: str) -> None:
        """Remove a committed checkpoint so that a crash at any moment leaves it committed or reclaimable."""

    def reclaim(self) -> list[str]:
        """Remove the files of saves and deletes that killed writers left unfinished (call under the lock);
        returns their names."""

    def remove_temp_files(self) -> list[str]:
        """Remove the temp files of dead writers (call under the lock); returns their names."""

    def resume(self, entry: Entry, **objects: Any) -> TrainingState:
        """Verify the committed ``entry`` and restore ``objects`` from it (``resume_file``'s arguments)."""


class Staging(Protocol):
    """One save of a single-file checkpoint in two phases (:meth:`FileStore.stage`): :meth:`write` puts its
    files where nobody sees them yet (temp names, a staging folder), :meth:`publish` commits them. A sync save
    runs both on its caller's thread; an async save's write-through publishes in the writer's thread (see
    :mod:`.checkpointer`). Made before anything is written: its owner can always :meth:`abort` it."""

    def write(self, payload: dict[str, Any], weights_format: str) -> None:
        """Write ``payload``'s files, not yet visible; if anything fails (Ctrl-C included), nothing of it stays."""

    def publish(self) -> None:
        """Commit it: its files durable (or uploaded) under their final names, the sidecar last; if anything
        fails, no file of it stays under its final name."""

    def abort(self) -> None:
        """Remove every file of it (nothing once published)."""


class FileStore(Store, Protocol):
    """A store of single-file checkpoints (``ckpt-<step>.pt`` and their sidecars)."""

    def path_for(self, step: int) -> str:
        """Where step ``step``'s checkpoint goes."""

    def begin(self, path: str) -> None:
        """Write the intent marker of ``path`` before any of its files changes (raises OSError)."""

    def stage(self, path: str) -> Staging:
        """A new save of ``path`` (nothing written yet; call after :meth:`begin`)."""

    def end(self, path: str) -> None:
        """The step begun on ``path`` is complete (committed or every file removed): drop its marker."""

