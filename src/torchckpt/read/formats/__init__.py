"""Format readers behind one entry point, :func:`read`: sniff the content, dispatch, post-process.

Post-processing common to every format: Python 2 byte strings left in the tree are decoded as text
(and said so), and errors get the file name attached.
"""

from __future__ import annotations

import dataclasses
import struct
import tarfile
import zipfile

from ...errors import CheckpointError, CorruptCheckpointError, LimitExceededError, NotACheckpointError, TruncatedCheckpointError, \
    UnsupportedFormatError
from ...storage.source import Source
from ..sniff import LUA_T7, NUMPY, PICKLE, SAFETENSORS, TORCH_LEGACY, TORCH_TAR, TORCH_ZIP, TORCHSCRIPT, \
    Sniffed, sniff
from ..unpickle.mode import Mode
from ..unpickle.py2 import decode_py2_text
from .base import Check, Checkpoint, Loaded, ReadOptions, Trace
from .dcp import is_dcp_dir, read_dcp
from .folders import folder_kind, read_folder
from .lua_t7 import read_t7
from .sharded import read_sharded_index
from .simple import read_numpy, read_pickle, read_safetensors
from .torch_legacy import read_torch_legacy, read_torch_tar
from .torch_zip import check_zip, open_zip, read_torch_zip
from .torchscript_v1 import read_torchscript_v1

__all__ = ["read", "read_dcp", "is_dcp_dir", "read_folder", "folder_kind", "ReadOptions", "Checkpoint", "Loaded", "Trace", "diagnose"]


def read(src: Source, opts: ReadOptions, sniffed: Sniffed | None = None) -> Checkpoint:
    """Read ``src`` whatever its format. Raises a :class:`CheckpointError` naming the file."""
    if opts.read_child is None:
        opts = dataclasses.replace(opts, read_child=read)
    try:
        sniffed = sniffed or sniff(src)
        opts.trace.format = opts.trace.format or sniffed.kind
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
        raise LimitExceededError("object graph too deeply nested", path=src.name) from None
    except MemoryError:
        raise LimitExceededError("not enough memory to read this checkpoint", path=src.name) from None
    except (OSError, ValueError, EOFError, IndexError, KeyError, TypeError, OverflowError, struct.error,
            zipfile.BadZipFile, tarfile.TarError, NotImplementedError, AttributeError) as exc:
        # A malformed structure that a container library tripped over: still a typed, named error.
        raise CorruptCheckpointError(f"malformed {getattr(sniffed, 'description', 'file')} "
                                     f"({type(exc).__name__}: {exc})", path=src.name) from None


def _dispatch(src: Source, opts: ReadOptions, sniffed: Sniffed) -> Checkpoint:
    kind = sniffed.kind
    if kind == TORCHSCRIPT and sniffed.details.get("model_json"):
        return read_torchscript_v1(src, opts, sniffed.details["prefix"])
    if kind in (TORCH_ZIP, TORCHSCRIPT):
        return read_torch_zip(src, opts, sniffed.details["prefix"], torchscript=kind == TORCHSCRIPT)
    if kind == TORCH_LEGACY:
        return read_torch_legacy(src, opts)
    if kind == TORCH_TAR:
        return read_torch_tar(src, opts)
    if kind == SAFETENSORS:
        return read_safetensors(src, opts)
    if kind == PICKLE:
        return read_pickle(src, opts)
    if kind == NUMPY:
        return read_numpy(src, opts)
    if kind == LUA_T7:
        return read_t7(src, opts)
    if kind == "json" and (src.path is not None or src.url is not None):
        loaded = read_sharded_index(src, opts)
        if loaded is not None:
            return loaded
    if opts.mode is Mode.RECORD:
        _record_refused(src, opts, sniffed)
    raise diagnose(src, sniffed)


def _record_refused(src: Source, opts: ReadOptions, sniffed: Sniffed) -> None:
    """Record mode, content load refuses: what a scanner still has to say about it."""
    if sniffed.kind in ("zip", "ambiguous-zip"):
        with open_zip(src) as zf:
            check_zip(src, zf, opts)
    elif sniffed.kind in ("gzip", "7z", "bzip2", "xz"):
        opts.trace.checks.append(Check(f"{sniffed.kind}-compressed wrapper: its contents cannot be checked without "
                                       "unpacking (torch.load does not unpack it either)"))


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
