"""Format readers behind one entry point, :func:`read`: sniff the content, dispatch, post-process.

Post-processing common to every format: Python 2 byte strings left in the tree are decoded as text
(and said so), and errors get the file name attached.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import struct
import tarfile
import zipfile
from typing import Any, Iterator

from ...errors import CheckpointError, CorruptCheckpointError, NotACheckpointError, TruncatedCheckpointError, \
    UnsupportedFormatError
from ..sniff import LUA_T7, NUMPY, PICKLE, SAFETENSORS, TORCH_LEGACY, TORCH_TAR, TORCH_ZIP, TORCHSCRIPT, \
    Sniffed, sniff
from ...storage.source import Source
from ..unpickle.py2 import decode_py2_text
from .base import Loaded, ReadOptions

__all__ = ["read", "open_checkpoint", "ReadOptions", "Loaded", "diagnose"]


@contextlib.contextmanager
def open_checkpoint(source: Any, opts: ReadOptions, *, stream_legacy: bool = False) -> Iterator[tuple[Loaded, Source]]:
    """Read any source (path, bytes, file object, torch.distributed.checkpoint directory) and keep its
    :class:`Source` open while the caller uses the result.

    ``stream_legacy``: legacy files, which cannot be mapped, are read as structure with file offsets
    (``TensorMeta``); the caller reads each tensor from the open Source when it needs it, so the
    checkpoint is never held in memory as a whole.
    """
    from .dcp import is_dcp_dir, read_dcp

    if isinstance(source, (str, os.PathLike)) and is_dcp_dir(os.fspath(source)):
        path = os.fspath(source)
        with Source(b"", name=path) as src:  # the items are read inside read_dcp
            try:
                loaded = read_dcp(path, opts, lazy=stream_legacy)  # callers that stream read tensors one by one
            except CheckpointError as exc:
                raise exc.with_path(path)
            yield loaded, src
        return
    with Source(source) as src:
        sniffed = sniff(src)
        if stream_legacy and sniffed.kind == TORCH_LEGACY and src.path is not None:
            opts = dataclasses.replace(opts, meta=True)
        yield read(src, opts, sniffed), src


def read(src: Source, opts: ReadOptions, sniffed: Sniffed | None = None) -> Loaded:
    """Read ``src`` whatever its format. Raises a :class:`CheckpointError` naming the file."""
    try:
        sniffed = sniffed or sniff(src)
        loaded = _dispatch(src, opts, sniffed)
        loaded.evidence[:0] = sniffed.evidence
        if loaded.details.get("python2"):
            loaded.obj, count = decode_py2_text(loaded.obj)
            loaded.notes.append("Python 2 file: byte-string keys and values decoded as text"
                                + (f" ({count} non-ASCII)" if count else ""))
        return loaded
    except CheckpointError as exc:
        raise exc.with_path(src.name)
    except RecursionError:
        raise CorruptCheckpointError("object graph too deeply nested", path=src.name) from None
    except MemoryError:
        raise CorruptCheckpointError("not enough memory to read this checkpoint", path=src.name) from None
    except (OSError, ValueError, EOFError, IndexError, KeyError, TypeError, OverflowError, struct.error,
            zipfile.BadZipFile, tarfile.TarError) as exc:
        # A malformed structure that a container library tripped over: still a typed, named error.
        raise CorruptCheckpointError(f"malformed {getattr(sniffed, 'description', 'file')} "
                                     f"({type(exc).__name__}: {exc})", path=src.name) from None


def _dispatch(src: Source, opts: ReadOptions, sniffed: Sniffed) -> Loaded:
    kind = sniffed.kind
    if kind in (TORCH_ZIP, TORCHSCRIPT):
        from .torch_zip import read_torch_zip

        return read_torch_zip(src, opts, sniffed.details["prefix"], torchscript=kind == TORCHSCRIPT)
    if kind == TORCH_LEGACY:
        from .torch_legacy import read_torch_legacy

        return read_torch_legacy(src, opts)
    if kind == TORCH_TAR:
        from .torch_legacy import read_torch_tar

        return read_torch_tar(src, opts)
    if kind == SAFETENSORS:
        from .simple import read_safetensors

        return read_safetensors(src, opts)
    if kind == PICKLE:
        from .simple import read_pickle

        return read_pickle(src, opts)
    if kind == NUMPY:
        from .simple import read_numpy

        return read_numpy(src, opts)
    if kind == "json" and src.path is not None:
        from .sharded import read_sharded_index

        loaded = read_sharded_index(src, opts)
        if loaded is not None:
            return loaded
    if kind == LUA_T7:
        try:
            from .lua_t7 import read_t7
        except ImportError:
            raise UnsupportedFormatError(
                "this is a Lua Torch7 (.t7) file, written by the Lua version of Torch, not by PyTorch",
                format=LUA_T7, hint="Reading Lua Torch7 files is not supported yet.") from None
        return read_t7(src, opts)
    raise diagnose(src, sniffed)


def diagnose(src: Source, sniffed: Sniffed) -> CheckpointError:
    """The error for content that is not a checkpoint torchckpt reads."""
    kind, d = sniffed.kind, sniffed.details
    if kind == "empty":
        return TruncatedCheckpointError("the file is empty (0 bytes)", actual_size=0,
                                        hint="The save or download did not complete: fetch or save it again.")
    if kind == "git-lfs":
        size = f" of {d['lfs_size']} bytes" if d.get("lfs_size") else ""
        return NotACheckpointError(
            f"this is a git-lfs pointer ({src.size} bytes of text), not the model{size}",
            hint="The repository was cloned without its large files: run `git lfs pull` "
                 "(or `git lfs install` first), then load the file again.")
    if kind == "html":
        title = f" titled {d['title']!r}" if d.get("title") else ""
        return NotACheckpointError(
            f"this is an HTML page{title}, not a checkpoint",
            hint="The download failed (a login, quota or error page was saved instead): "
                 "check the URL and download it again.")
    if kind == "json":
        return NotACheckpointError("this is JSON text, not a checkpoint",
                                   hint="Is this a config or index file? Pass the weights file it refers to.")
    if kind == "bad-zip":
        return TruncatedCheckpointError(
            f"a zip archive (the PyTorch format) whose central directory is missing or damaged; "
            f"the file is {src.size} bytes", actual_size=src.size)
    if kind == "ambiguous-zip":
        return UnsupportedFormatError(f"zip archive with several data.pkl members: {d.get('candidates')}")
    if kind == "zip":
        return UnsupportedFormatError(f"a zip archive that is not a PyTorch checkpoint (members: {d.get('names')})",
                                      hint="Unpack it and pass the checkpoint file inside.")
    if kind in ("gzip", "7z", "bzip2", "xz"):
        return UnsupportedFormatError(f"this is a {kind}-compressed file", format=kind,
                                      hint="Decompress it first and load the file inside.")
    if kind == "tar":
        return UnsupportedFormatError("a tar archive that is not a PyTorch checkpoint",
                                      hint="Unpack it (tar xf) and pass the checkpoint file inside.")
    if kind == "dcp":
        return UnsupportedFormatError("a torch.distributed.checkpoint directory member",
                                      hint="Use torch.distributed.checkpoint to load DCP checkpoints.")
    if kind in ("hdf5", "protobuf", "gguf"):
        return UnsupportedFormatError(f"this is not a PyTorch checkpoint ({sniffed.evidence[0]})", format=kind)
    return UnsupportedFormatError(
        f"unrecognised content ({'; '.join(sniffed.evidence)}; {src.size} bytes)",
        hint="Expected a PyTorch (.pt/.pth/.bin/.ckpt), safetensors, pickle or numpy file.")
