"""``torchckpt.load``: read any checkpoint, safely."""

from __future__ import annotations

import os
from typing import Any, Iterable, Literal, Mapping, overload

from ..storage.cache import download
from ..storage.source import SourceLike
from .devices import MapLocation
from .formats import Checkpoint, ReadOptions, optimizer_state, read
from .opener import open_checkpoint
from .trust import Policy, resolve_policy
from .unpickle.mode import Mode

__all__ = ["load", "read_checkpoint", "read_zero_optimizer"]


def read_checkpoint(source: SourceLike, *, map_location: MapLocation = "cpu", mmap: bool = False,
                    trust: bool = False, allow: Iterable[str] | str | None = None, meta: bool = False,
                    policy: Policy | None = None,
                    storage_options: Mapping[str, Any] | None = None, workers: int | None = None) -> Checkpoint:
    """Read ``source`` and return the tree together with its format, evidence and notes.

    The tensors are in the process's own memory unless ``mmap=True`` (see :func:`load`)."""
    mode = Mode.STRUCTURE if meta else Mode.BUILD
    with open_checkpoint(source, mode, resolve_policy(policy, trust, allow),
                         map_location=map_location, mmap=mmap, storage_options=storage_options,
                         workers=workers) as ckpt:
        ckpt.reader = None  # closed on return: nothing lazy is left in a build or structure tree
        return ckpt


@overload
def load(source: SourceLike, *, map_location: MapLocation = "cpu", mmap: bool = False, trust: bool = False,
         allow: Iterable[str] | str | None = None, return_info: Literal[False] = False, policy: Policy | None = None,
         storage_options: Mapping[str, Any] | None = None, sha256: str | None = None,
         check_hash: bool = False) -> Any: ...


@overload
def load(source: SourceLike, *, map_location: MapLocation = "cpu", mmap: bool = False, trust: bool = False,
         allow: Iterable[str] | str | None = None, return_info: Literal[True], policy: Policy | None = None,
         storage_options: Mapping[str, Any] | None = None, sha256: str | None = None,
         check_hash: bool = False) -> tuple[Any, Checkpoint]: ...


def load(source: SourceLike, *, map_location: MapLocation = "cpu", mmap: bool = False, trust: bool = False,
         allow: Iterable[str] | str | None = None, return_info: bool = False, policy: Policy | None = None,
         storage_options: Mapping[str, Any] | None = None, sha256: str | None = None,
         check_hash: bool = False, workers: int | None = None) -> Any:
    """Load a checkpoint of any format and era without running code from it.

    Args:
        source: a path (any extension, or none), an open binary file, bytes, or a URL that
            fsspec can open (``s3://``, ``gs://``, ``hf://``, ``https://`` ...; ``pip install
            'torchckpt[s3]'`` and so on). Remote files are read by byte ranges.
        map_location: where tensors go; every form ``torch.load`` accepts. The default ``"cpu"``
            loads checkpoints saved on ``cuda:N`` on a machine without a GPU. ``None`` restores the
            saved devices, falling back to the CPU for devices this machine lacks.
        mmap: ``False`` (the default, like ``torch.load``): tensor data is read into the process's own
            memory (``pread`` straight into each tensor's storage, one copy), so the returned tensors
            never depend on the file again: ``torch.save(ck, same_path)`` is safe. ``True``: tensors
            of zip and safetensors files at local paths are copy-on-write views of a private mapping
            of the file (no read until touched, pages shared with the page cache). A mapping does not
            survive the file being truncated or rewritten in place: while such tensors are alive, a
            ``torch.save`` to the same path kills the process (SIGBUS) and leaves a 0-byte file;
            replace the file atomically (``torchckpt.save`` does) or copy the tensors first.
        trust: import the real classes the file names (whole-model pickles) instead of inert stubs.
            **Dangerous**: importing and restoring classes runs their code. Blocklisted callables
            (``os.system`` & co.) are refused even then.
        allow: dotted names or ``"package.*"`` prefixes to import for real, everything else stays a stub.
        policy: a :class:`~torchckpt.Policy` value instead of the ``trust``/``allow`` shorthands, including
            its :class:`~torchckpt.Budget` of work: ``policy=Policy(budget=Budget(depth=1000))``.
        storage_options: options for the URL's fsspec filesystem (``endpoint_url``, ``key``,
            ``secret``, ``token`` ...), also used for the shards or DCP files beside it.
        sha256, check_hash: download ``source`` into the cache (``$TORCHCKPT_CACHE``) and check its
            sha256 (the hex digest or a prefix of at least 8 digits; ``check_hash=True`` takes the
            prefix from a torch.hub style name ``model-<hex>.pt``) before reading it; a cached copy
            is re-hashed and reused when it still matches. See :func:`torchckpt.download`.
        workers: threads that read the parts of a checkpoint side by side (the shards of an index file
            or folder, the data files of a DCP directory, the rank files of a DeepSpeed folder); the
            default is one per core, at most 8; ``workers=1`` reads them one after another. The work
            budget bounds all parts together; an error names the part's file.
        return_info: return ``(obj, info)`` where ``info`` is a :class:`~torchckpt.read.formats.Checkpoint`
            with the detected format, its evidence and every automatic fix applied.

    Returns:
        The checkpoint object: dicts, tensors, numpy arrays, plain values, and stubs for classes that
        were not imported (see :func:`torchckpt.state_dict_of` for whole-model pickles).

    Raises:
        CheckpointError: subclasses name the file, the problem and the next step:
        ``UnsafeCheckpointError`` (code execution attempt), ``TruncatedCheckpointError``,
        ``NotACheckpointError`` (git-lfs pointer, HTML page), ``UnsupportedFormatError``,
        ``CorruptCheckpointError``, ``CheckpointNotFoundError``, ``IntegrityError`` (sha256),
        ``RemoteStorageError`` subclasses for URLs.
    """
    if sha256 is not None or check_hash:
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError("sha256=/check_hash= need a path or URL, not an open file or bytes")
        source = download(os.fspath(source), sha256=sha256, check_hash=check_hash, storage_options=storage_options)
    loaded = read_checkpoint(source, map_location=map_location, mmap=mmap, trust=trust, allow=allow, policy=policy,
                             storage_options=storage_options, workers=workers)
    return (loaded.obj, loaded) if return_info else loaded.obj


def read_zero_optimizer(directory: str, *, policy: Policy | None = None) -> tuple[dict[str, Any], list[dict[str, Any]],
                                                                              list[dict[str, Any]]]:
    """The optimizer state of a DeepSpeed ZeRO folder (run or step folder), gathered per parameter from every
    rank's partition: ``(details, per_param, groups)``. ``per_param[i]`` is ``{"name", "group", "state"}``
    (``state``: ``step``, ``exp_avg``, ``exp_avg_sq`` shaped like the parameter), in DeepSpeed's parameter
    order; ``groups`` are the optimizer's parameter groups as saved (hyper-parameters)."""
    opts = ReadOptions(policy=policy or Policy(), mode=Mode.BUILD, read_child=read)
    layout, per_param, groups = optimizer_state(directory, opts)
    first = layout.model_states[0]
    details = {"stage": layout.stage, "world_size": layout.world, "step": first.get("global_steps"),
               "step_folder": layout.step_dir, "lr_scheduler": first.get("lr_scheduler")}
    return details, per_param, groups
