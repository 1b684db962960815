"""The one way in: :func:`open_checkpoint` turns any source into a :class:`Checkpoint` record.

Every front end (``load``, ``load_into``, ``inspect``, ``scan``, ``diff``, ``convert``, ``resume``) opens
through here, choosing how far the read goes with a :class:`Mode`:

* ``build``: real tensors (``load``);
* ``structure``: tensors as ``TensorMeta`` with their file offsets, no tensor data read (``inspect``);
* ``record``: structure, and a blocklisted global is recorded instead of refused (``scan``).

The record carries the :class:`Trace` of every pickle stream, byte range and container check the
format reader made, so ``scan`` reports on exactly what ``load`` reads.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping

from ..errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, NotACheckpointError
from ..storage.files import list_sizes
from ..storage.remote import is_url
from ..storage.source import Source, SourceLike
from ..text import clip, escape_terminal
from .devices import MapLocation, Relocator
from .formats import Checkpoint, ReadOptions, Trace, deepspeed_kind, folder_kind, is_dcp_dir, read, read_dcp, \
    read_deepspeed, read_folder, read_universal
from .formats.deepspeed_names import rank_file_note
from .sniff import TORCH_LEGACY, sniff
from .unpickle.budget import TreeMeter
from .unpickle.mode import Mode
from .unpickle.policy import Policy

__all__ = ["open_checkpoint", "Checkpoint", "Mode", "Trace"]


@contextlib.contextmanager
def open_checkpoint(source: SourceLike, mode: Mode | str = Mode.BUILD, policy: Policy | None = None, *,
                    map_location: MapLocation = "cpu", mmap: bool | None = None, lazy: bool = False,
                    trace: Trace | None = None, storage_options: Mapping[str, Any] | None = None,
                    workers: int | None = None) -> Iterator[Checkpoint]:
    """Open any checkpoint: a file path, bytes, a binary file, a URL, or a directory (torch.distributed.checkpoint,
    Hugging Face ``save_pretrained`` or accelerate ``save_state``).

    Args:
        mode: ``"build"``, ``"structure"`` or ``"record"`` (see the module docstring).
        policy: what pickles may import, and the work budget (default: stubs, no trust).
        map_location, mmap: as for :func:`torchckpt.load` (``build`` mode).
        lazy: in ``build`` mode, read legacy-format files (which cannot be mapped) as structure with
            file offsets; the caller materialises each tensor from ``checkpoint.reader`` when needed.
            DCP directories give ``DcpTensor`` leaves that read their own chunks (``materialize()``,
            or one rank's slice with ``read_region()``).
        trace: collect the trace here (``scan`` keeps what was recorded even when the read fails).
        storage_options: options for a URL's fsspec filesystem, also used for the files it names
            (shards, DCP data files). URLs are read by byte ranges.
        workers: threads that read the parts of a checkpoint side by side: the shards of an index, the
            data files of a DCP directory, the rank files of a DeepSpeed folder (default: one per core,
            at most 8; a ``structure`` or ``record`` read uses one); 1 reads them one by one.

    Yields the :class:`Checkpoint`; its ``reader`` stays open inside the ``with`` block.
    Raises :class:`~torchckpt.errors.CheckpointError` subclasses naming the file.
    """
    mode = Mode(mode)
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise ValueError(f"workers must be a positive number of threads, not {workers!r} "
                         "(workers=1 reads the shards one after another; None: one per core, at most 8)")
    trace = trace if trace is not None else Trace()
    relocator = Relocator(map_location)
    opts = ReadOptions(relocator=relocator, mmap=mmap, policy=policy or Policy(), mode=mode, trace=trace,
                       read_child=read, storage_options=dict(storage_options) if storage_options else None,
                       workers=workers)
    path = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    if path is not None and is_url(path):
        if is_dcp_dir(path, opts.storage_options):  # a DCP directory under a URL prefix
            try:
                ckpt = read_dcp(path, opts)
            except CheckpointError as exc:
                raise exc.with_path(path)
            with Source(b"", name=path) as empty:
                _finish(ckpt, opts, path, sum(list_sizes(path, opts.storage_options).values()), empty)
                yield ckpt
            return
    elif path is not None and os.path.isdir(path) and (is_dcp_dir(path) or folder_kind(path) or deepspeed_kind(path)):
        try:  # DCP, Hugging Face, accelerate or DeepSpeed folders; lazy DCP tensors open their own data files
            ckpt = read_dcp(path, opts, lazy=lazy and mode is Mode.BUILD) if is_dcp_dir(path) \
                else read_universal(path, opts) if deepspeed_kind(path) == "universal" \
                else read_deepspeed(path, opts, lazy=lazy and mode is Mode.BUILD) if deepspeed_kind(path) \
                else read_folder(path, opts)
        except CheckpointError as exc:
            raise exc.with_path(path)
        except (TypeError, AttributeError, ValueError, KeyError, IndexError, RuntimeError) as exc:
            # a folder reader met a value of a type its files never hold (a crafted model_states.pt, index,
            # metadata): a typed error naming the folder, never a traceback from inside the reader
            raise CorruptCheckpointError(f"the files of this folder hold values of unexpected types "
                                         f"({type(exc).__name__}: {escape_terminal(clip(str(exc), 200))})", path=path,
                                         hint="The folder is damaged or was crafted: its files are not what "
                                              f"{'DeepSpeed' if deepspeed_kind(path) else 'its writer'} saves.") \
                from None
        try:
            with Source(b"", name=path) as empty:  # items were read inside the reader
                _finish(ckpt, opts, path, _dir_size(path), empty)
                yield ckpt
        finally:
            for resource in ckpt.resources:  # rank files a lazy DeepSpeed tree reads from
                resource.close()
        return
    if path is not None and not is_url(path) and os.path.isdir(path):
        raise _unrecognised_folder(path)
    with Source(source, storage_options=opts.storage_options) as src:
        sniffed = sniff(src)
        if lazy and mode is Mode.BUILD and sniffed.kind == TORCH_LEGACY and src.path is not None:
            opts.mode = Mode.STRUCTURE
        ckpt = read(src, opts, sniffed)
        rank_file = rank_file_note(src.path) if src.path is not None else None
        if rank_file is not None:  # one part of a multi-file checkpoint is never taken for the whole silently
            ckpt.details["deepspeed_rank_file"] = rank_file
            ckpt.notes.append(rank_file["note"])
        _finish(ckpt, opts, src.name, src.size, src)
        yield ckpt


def _finish(ckpt: Checkpoint, opts: ReadOptions, name: str, size: int, reader: Source | None) -> None:
    ckpt.name, ckpt.size, ckpt.reader, ckpt.trace = name, size, reader, opts.trace
    ckpt.tree_meter = TreeMeter(opts.policy.budget, size, name)
    if reader is not None:  # shards and a folder's files: their pages are released (or copied) through the reader
        reader.mapped_children = [s for s in opts.mapped if s is not reader]
    ckpt.globals = opts.trace.globals
    relocator = opts.relocator
    if relocator.fallbacks:
        ckpt.notes.append(f"storages saved on {', '.join(sorted(relocator.fallbacks))} were loaded to the CPU "
                          "(that device is not available here)")
    elif relocator.moves and not opts.meta:
        moves = ", ".join(f"{a} -> {b}" for a, b in sorted(relocator.moves.items()))
        ckpt.notes.append(f"storages moved: {moves}")


def _dir_size(path: str) -> int:
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file(follow_symlinks=False))


def _unrecognised_folder(path: str) -> CheckpointError:
    """What a folder that is no checkpoint layout we know holds, and what each layout would need."""
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as exc:
        return CheckpointNotFoundError(f"the folder cannot be listed ({exc.strerror or exc})", path=path)
    files = [e for e in entries if e.is_file()]
    folders = [e.name + "/" for e in entries if e.is_dir()]
    pointers = []
    for e in files[:256]:
        with Source(e.path) as src:
            if sniff(src).kind == "git-lfs":
                pointers.append(e.name)
    shown = ", ".join(_printable(n) for n in [e.name for e in files][:8] + folders[:4])
    reason = (f"this is a directory, not a checkpoint file nor a checkpoint folder torchckpt knows: {len(files)} files "
              f"and {len(folders)} folders"
              f"{' (' + shown + (' ...' if len(files) > 8 or len(folders) > 4 else '') + ')' if shown else ''}")
    if pointers:
        reason += f"; {len(pointers)} of its files are git-lfs pointers ({', '.join(map(_printable, pointers[:4]))})"
    return NotACheckpointError(reason, path=path, hint=(
        "Run `git lfs pull` for the pointers. " if pointers else "") + (
        "Known folders have: .metadata (torch.distributed.checkpoint), config.json with model.safetensors / "
        "pytorch_model.bin (Hugging Face), optimizer.bin or random_states_0.pkl (accelerate), latest or "
        "*_model_states.pt (DeepSpeed). Otherwise pass one checkpoint file inside it, or use "
        "torchckpt.Checkpointer(dir) for a directory of training checkpoints."))


def _printable(name: str) -> str:
    return name.encode("unicode_escape", "backslashreplace").decode("ascii")[:80]
