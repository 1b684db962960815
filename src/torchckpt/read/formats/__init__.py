"""Format readers behind one entry point, :func:`read`: sniff the content, dispatch, post-process.

Post-processing common to every format: Python 2 byte strings left in the tree are decoded as text
(and said so), and errors get the file name attached.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import struct
import tarfile
import zipfile
from typing import TYPE_CHECKING, Any, Callable

from ...errors import CheckpointError, CorruptCheckpointError, LimitExceededError, NotACheckpointError, TruncatedCheckpointError, \
    PartialCheckpointError, UnsupportedFormatError
from ...storage.source import Source
from ..sniff import DCP_SHARD, LUA_T7, NUMPY, PICKLE, SAFETENSORS, TORCH_LEGACY, TORCH_TAR, TORCH_ZIP, TORCHSCRIPT, \
    Sniffed, sniff
from ..unpickle.mode import Mode
from ..unpickle.py2 import decode_py2_text
from .base import Check, Checkpoint, Loaded, ReadOptions, Trace
from .deepspeed_names import deepspeed_kind
from .torch_zip import check_zip, expected_zip_size, open_zip, read_torch_zip

__all__ = ["read", "read_dcp", "is_dcp_dir", "read_folder", "folder_kind", "deepspeed_kind", "read_deepspeed", "read_universal",
           "optimizer_state", "ReadOptions", "Checkpoint", "Loaded", "Trace", "diagnose"]


def _imported(module: str, name: str) -> Any:
    return getattr(importlib.import_module(f".{module}", __name__), name)


def _on_first_call(module: str, name: str) -> Callable[..., Any]:
    """``module.name``, imported when it is first called."""
    def call(*args: Any, **kwargs: Any) -> Any:
        return _imported(module, name)(*args, **kwargs)
    call.__name__ = call.__qualname__ = name
    return call


# Start-up: every reader but torch_zip's is imported when a file or folder of its kind is first read, so that
# loading a torch zip file imports no other reader (tests/package/test_import_cost.py). The folder readers come
# as functions that import their module on their first call; type checkers see the real ones.
if TYPE_CHECKING:
    from .dcp import is_dcp_dir, read_dcp
    from .deepspeed import optimizer_state, read_deepspeed
    from .ds_universal import read_universal
    from .folders import folder_kind, read_folder
else:
    is_dcp_dir, read_dcp = _on_first_call("dcp", "is_dcp_dir"), _on_first_call("dcp", "read_dcp")
    read_deepspeed, optimizer_state = _on_first_call("deepspeed", "read_deepspeed"), \
        _on_first_call("deepspeed", "optimizer_state")
    read_universal = _on_first_call("ds_universal", "read_universal")
    folder_kind, read_folder = _on_first_call("folders", "folder_kind"), _on_first_call("folders", "read_folder")


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


# The formats whose reader needs nothing from the sniff but the source: kind -> (module, reader), imported on use.
_READERS: dict[str, tuple[str, str]] = {
    TORCH_LEGACY: ("torch_legacy", "read_torch_legacy"), TORCH_TAR: ("torch_legacy", "read_torch_tar"),
    SAFETENSORS: ("simple", "read_safetensors"), PICKLE: ("simple", "read_pickle"), NUMPY: ("simple", "read_numpy"),
    LUA_T7: ("lua_t7", "read_t7")}


def _dispatch(src: Source, opts: ReadOptions, sniffed: Sniffed) -> Checkpoint:
    kind = sniffed.kind
    reader: Callable[..., Checkpoint]
    if kind == TORCHSCRIPT and sniffed.details.get("model_json"):
        reader = _imported("torchscript_v1", "read_torchscript_v1")
        return reader(src, opts, sniffed.details["prefix"])
    if kind in (TORCH_ZIP, TORCHSCRIPT):
        return read_torch_zip(src, opts, sniffed.details["prefix"], torchscript=kind == TORCHSCRIPT,
                              archive=sniffed.take_archive())
    if kind in _READERS:
        reader = _imported(*_READERS[kind])
        return reader(src, opts)
    if kind == "json" and (src.path is not None or src.url is not None):
        index_reader: Callable[[Source, ReadOptions], Checkpoint | None] = _imported("sharded", "read_sharded_index")
        loaded = index_reader(src, opts)
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


_Reason = Callable[[Source, Sniffed], str]
_COMPRESSED = ("gzip", "7z", "bzip2", "xz")
_FOREIGN = ("hdf5", "protobuf", "gguf")

# What content that is no checkpoint we read is, and what to do: kind -> (wording, hint), one table per error.
_TRUNCATED: dict[str, tuple[_Reason, str | None]] = {
    "empty": (lambda src, s: "the file is empty (0 bytes)",
              "The save or download did not complete: fetch or save it again."),
}
_UNSUPPORTED: dict[str, tuple[type[UnsupportedFormatError], _Reason, str | None]] = {
    "git-lfs": (NotACheckpointError,
                lambda src, s: f"this is a git-lfs pointer ({src.size} bytes of text), not the model"
                               + (f" of {s.details['lfs_size']} bytes" if s.details.get("lfs_size") else ""),
                "The repository was cloned without its large files: run `git lfs pull` "
                "(or `git lfs install` first), then load the file again."),
    "html": (NotACheckpointError,
             lambda src, s: "this is an HTML page" + (f" titled {s.details['title']!r}" if s.details.get("title")
                                                      else "") + ", not a checkpoint",
             "The download failed (a login, quota or error page was saved instead): "
             "check the URL and download it again."),
    "json": (NotACheckpointError, lambda src, s: "this is JSON text, not a checkpoint",
             "Is this a config or index file? Pass the weights file it refers to."),
    "ambiguous-zip": (UnsupportedFormatError,
                      lambda src, s: f"zip archive with several data.pkl members: {s.details.get('candidates')}", None),
    "zip": (UnsupportedFormatError,
            lambda src, s: f"a zip archive that is not a PyTorch checkpoint (members: {s.details.get('names')})",
            "Unpack it and pass the checkpoint file inside."),
    **{kind: (UnsupportedFormatError, lambda src, s: f"this is a {s.kind}-compressed file",
              "Decompress it first and load the file inside.") for kind in _COMPRESSED},
    "tar": (UnsupportedFormatError, lambda src, s: "a tar archive that is not a PyTorch checkpoint",
            "Unpack it (tar xf) and pass the checkpoint file inside."),
    "dcp": (UnsupportedFormatError, lambda src, s: "a torch.distributed.checkpoint directory member",
            "Use torch.distributed.checkpoint to load DCP checkpoints."),
    **{kind: (UnsupportedFormatError, lambda src, s: f"this is not a PyTorch checkpoint ({s.evidence[0]})", None)
       for kind in _FOREIGN},
}
_UNRECOGNISED: tuple[type[UnsupportedFormatError], _Reason, str | None] = (
    UnsupportedFormatError, lambda src, s: f"unrecognised content ({'; '.join(s.evidence)}; {src.size} bytes)",
    "Expected a PyTorch (.pt/.pth/.bin/.ckpt), safetensors, pickle or numpy file.")


def _shard_error(src: Source) -> PartialCheckpointError:
    """A lone shard of a DCP folder: name the folder that holds it and its ``.metadata``, when there is one."""
    parent = os.path.dirname(os.path.abspath(src.path)) if src.path is not None else None
    folder = parent if parent is not None and os.path.isfile(os.path.join(parent, ".metadata")) else None
    hint = (f"Load the folder instead: torchckpt.load({folder!r}) (or `torchckpt inspect {folder}`)." if folder
            else "Load the torch.distributed.checkpoint folder this file came from (the one with a .metadata file); "
                 "its other shards and .metadata are needed to put the tensors together.")
    return PartialCheckpointError(
        "this is one shard of a torch.distributed.checkpoint folder (several torch.save archives back to back, "
        f"{src.size} bytes): read alone it would give one piece of one tensor, so it is not loaded",
        folder=folder, hint=hint, format="dcp-shard")


def diagnose(src: Source, sniffed: Sniffed) -> CheckpointError:
    """The error for content that is not a checkpoint torchckpt reads."""
    kind = sniffed.kind
    if kind == DCP_SHARD:
        return _shard_error(src)
    if kind == "bad-zip":
        expected, exact, missing = expected_zip_size(src)
        size = f"{'' if exact else 'at least '}{expected:,} bytes expected" if expected else "expected size unknown"
        return TruncatedCheckpointError(f"a zip archive (the PyTorch format) cut short: the file is {src.size:,} bytes, "
                                        f"{size}; {missing}", expected_size=expected, actual_size=src.size)
    if kind in _TRUNCATED:
        reason, hint = _TRUNCATED[kind]
        return TruncatedCheckpointError(reason(src, sniffed), hint=hint, actual_size=src.size)
    cls, wording, hint = _UNSUPPORTED.get(kind, _UNRECOGNISED)
    return cls(wording(src, sniffed), hint=hint, format=kind if kind in _COMPRESSED + _FOREIGN else None)
