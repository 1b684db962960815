"""``resume``: restore a training run from any checkpoint: a file, a Checkpointer directory (the newest
complete checkpoint), a sharded DCP or DeepSpeed folder, an accelerate folder, or a URL."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping

from ..read import deepspeed_kind, is_accelerate_folder
from ..storage import files
from ..storage.remote import StorageOptions, is_url
from . import distributed
from .checkpointer import Checkpointer, adapting_options
from .fsspec_store import resume_url
from .restore import resume_file
from .training import TrainingState
from .zero import resume_deepspeed

if TYPE_CHECKING:  # names for type checkers only: fit/ is imported when a resume runs
    from ..fit.align import RenameSpec
    from ..transforms import TransformSpec

__all__ = ["resume"]


def resume(path_or_dir: str, *, model: Any, optimizer: Any = None, scheduler: Any = None, scaler: Any = None,
           stateful: Mapping[str, Any] | None = None, map_location: Any = None, restore_rng: bool = True,
           strict: bool = True, storage_options: StorageOptions | None = None, rename: RenameSpec = None,
           prefix: str | None = None, transforms: TransformSpec = None) -> TrainingState:
    """Restore a training run from a checkpoint file, or from the newest complete one in a directory.

    Restores the model (through ``load_into``, so DataParallel-saved weights resume into a plain
    model and the reverse), optimizer (its state moved to the parameters' devices), scheduler,
    scaler, ``stateful`` objects and, unless ``restore_rng=False``, every RNG. Refuses clearly when
    the optimizer's parameter groups or type do not fit. A file that does not match its sidecar is
    refused; in a directory, the newest complete checkpoint is used (see :meth:`Checkpointer.resume`).
    Top-level keys of a hand-written training dict that resume does not restore (``best_prec1``,
    ``arch`` ...) are kept in ``state.extra``. An accelerate ``save_state`` folder is restored as one
    checkpoint (model, optimizer, scheduler, scaler and the RNG states of process 0). A DeepSpeed ZeRO
    folder (run or step folder) resumes into a plain model and optimizer: the fp32 weights and the Adam
    moments are gathered from every rank's partition.
    Files and directories may be URLs (``storage_options`` for their filesystem): a remote checkpoint
    is downloaded once into a temporary folder, verified, restored, and the download removed.

    When the model's architecture changed since saving, ``rename``, ``prefix`` and ``transforms`` are
    :func:`torchckpt.load_into`'s (pass ``strict=False`` for new or dropped layers), and the optimizer
    state follows the same plan (:func:`torchckpt.remap_optimizer_state`): carried through renames,
    prefixes and fuse/split, afresh for new or resized parameters; ``state.notes`` says which.
    """
    path = os.fspath(path_or_dir)
    kwargs = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, stateful=stateful,
                  map_location=map_location, restore_rng=restore_rng, strict=strict,
                  **adapting_options(rename, prefix, transforms, path))
    if is_url(path):
        if files.isdir(path, storage_options):
            return Checkpointer(path, storage_options=storage_options).resume(**kwargs)
        return resume_url(path, storage_options, **kwargs)
    if os.path.isdir(path) and distributed.is_dcp(path):  # one sharded checkpoint, not a directory of them
        state: TrainingState = distributed.resume_one(path, **kwargs)
        return state
    if os.path.isdir(path) and deepspeed_kind(path):  # a DeepSpeed run or step folder: gathered into plain PyTorch
        return resume_deepspeed(path, **kwargs)
    if os.path.isdir(path) and not is_accelerate_folder(path):  # accelerate folders load as one payload
        return Checkpointer(path).resume(**kwargs)
    return resume_file(path, **kwargs)
