"""``convert(src, "out_dir", to="sharded-safetensors")``: a folder laid out as Hugging Face does it.

``model-00001-of-0000N.safetensors`` ... and ``model.safetensors.index.json``
(``{"metadata": {"total_size": data bytes}, "weight_map": {name: shard file}}``). Shards are cut in
key order as transformers cuts them: a shard closes when the next tensor would take it past
``max_shard_size`` (a tensor larger than that gets a shard of its own). Every shard is written by the
one safetensors writer, tensor by tensor (memory stays near the largest tensor). Tied tensors are
stored once; the other names are recorded in the index metadata as ``torchckpt.aliases`` (they are not
in the weight_map, as in transformers' own shards) and :func:`torchckpt.load` restores them.

The folder is written into a temporary folder beside the destination, every shard is verified bit for
bit against the source, and only then is it renamed into place; a previous output under that name is
replaced only after that (and only if it is a sharded checkpoint itself).
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
from typing import Any, Callable

from ...errors import AmbiguousOutputError, CheckpointWriteError
from ...read import SAFETENSORS_DTYPES, dtype_name, split_tied
from ...storage.atomic import TEMP_MARK, fsync_dir, write_error
from .byte_io import verify_safetensors

__all__ = ["write_sharded", "asked_for", "shard_size", "check_destination", "INDEX", "DEFAULT_MAX_SHARD_SIZE"]

INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' default for save_pretrained
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_ITEMSIZE = {name: size for name, size in SAFETENSORS_DTYPES.values()}


def asked_for(dst: str, to: str | None, max_shard_size: int | str | None, file_extensions: tuple[str, ...]) -> bool:
    """Whether ``dst``, ``to`` and ``max_shard_size`` ask for sharded output: ``to="sharded-safetensors"``, or
    ``max_shard_size`` with a folder name without extension. Spellings that could mean two things are refused."""
    name = dst.rstrip("/\\").lower()
    if name.endswith(".index.json"):
        raise AmbiguousOutputError(
            f"{dst!r} names the index file of a sharded checkpoint, not its folder",
            hint="Pass the folder the shards go in: torchckpt convert SRC OUT_DIR --to sharded-safetensors "
                 "(convert(src, 'out_dir', to='sharded-safetensors')); it writes model.safetensors.index.json there.")
    if max_shard_size is not None and (to or "sharded-safetensors") != "sharded-safetensors":
        raise AmbiguousOutputError(
            f"max_shard_size={max_shard_size!r} was given but the output is {to!r}, a single file or a DCP directory",
            hint="Drop --max-shard-size, or ask for shards: --to sharded-safetensors with a folder destination.")
    if to is None and max_shard_size is not None and name.endswith(file_extensions):
        raise AmbiguousOutputError(
            f"max_shard_size={max_shard_size!r} was given but {dst!r} names a single file or a DCP directory",
            hint="Name a folder without an extension (or pass --to sharded-safetensors) to get shards.")
    return to == "sharded-safetensors" or (to is None and max_shard_size is not None)


def shard_size(value: int | str | None) -> int:
    """Bytes from ``max_shard_size``: an int, or ``"500MB"`` / ``"2GiB"`` (KB/MB/GB decimal as in transformers,
    KiB/MiB/GiB binary); ``None`` is the default ``"5GB"``."""
    value = DEFAULT_MAX_SHARD_SIZE if value is None else value
    n: float = -1
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", value.lower())
        if m:
            n = float(m[1]) * _UNITS[m[2] or ""]
    if n < 1:
        raise ValueError(f"max_shard_size must be a positive number of bytes such as 500000000, '500MB' or '2GiB', "
                         f"not {value!r}")
    return int(n)


def check_destination(dst: str) -> None:
    """Refuse a destination that exists and is not a sharded checkpoint folder (it would be replaced)."""
    if os.path.lexists(dst) and not (os.path.isdir(dst) and not os.path.islink(dst)
                                     and os.path.isfile(os.path.join(dst, INDEX))):
        raise CheckpointWriteError(f"{dst} exists and is not a sharded safetensors folder; converting would replace it",
                                   path=dst, hint="Choose a new folder name, or remove it first.")


def _out_bytes(t: Any, target_dtype: Any) -> int:
    name = dtype_name(t)
    if target_dtype is not None and name.startswith(("float", "bfloat", "half")):
        name = dtype_name(target_dtype)
    return int(t.numel()) * _ITEMSIZE.get(name, 0)  # a dtype safetensors cannot store is refused by the writer


def plan_shards(tensors: list[tuple[str, Any]], target_dtype: Any, limit: int
                ) -> tuple[list[list[tuple[str, Any]]], list[int], dict[str, str]]:
    """The shards (stored tensors in key order), their data bytes, and the tied names ``{alias: stored}``."""
    stored, aliases = split_tied(tensors)
    shards: list[list[tuple[str, Any]]] = [[]]
    sizes = [0]
    for name, t in stored:
        nbytes = _out_bytes(t, target_dtype)
        if shards[-1] and sizes[-1] + nbytes > limit:
            shards.append([])
            sizes.append(0)
        shards[-1].append((name, t))
        sizes[-1] += nbytes
    return shards, sizes, aliases


def write_sharded(dst: str, tensors: list[tuple[str, Any]], materialize: Any, limit: int,
                  progress: Callable[[int, int], None] | None, report: Any, stream: Callable[..., Any]) -> int:
    """Write, verify and publish the folder ``dst``; the bytes written (shards and index).

    ``stream(fh, tensors, metadata, materialize, progress)`` is the convert package's safetensors
    streamer (:func:`.to_file.stream_safetensors`)."""
    shards, sizes, aliases = plan_shards(tensors, materialize.target_dtype, limit)
    total = sum(sizes)
    parent, base = os.path.split(os.path.abspath(dst))
    tmp = os.path.join(parent, f".{base}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    written = 0
    current = tmp
    try:
        os.mkdir(tmp)
        done = 0
        for name, part, size in zip(names, shards, sizes):
            current = os.path.join(tmp, name)
            with open(current, "wb") as fh:
                before = done
                stream(fh, part, {"format": "pt"}, materialize,
                       None if progress is None else lambda d, _t, b=before: progress(b + d, total))
                fh.flush()
                os.fsync(fh.fileno())
                written += fh.tell()
            done += size
        metadata: dict[str, Any] = {"total_size": total}
        if aliases:
            metadata["torchckpt.aliases"] = aliases
        index = {"metadata": metadata,
                 "weight_map": {key: name for name, part in zip(names, shards) for key, _ in part}}
        current = os.path.join(tmp, INDEX)
        with open(current, "w", encoding="utf-8") as out:
            json.dump(index, out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
            written += out.tell()
        for name, part in zip(names, shards):  # bit for bit, before anything is published
            verify_safetensors(os.path.join(tmp, name), part, materialize)
        fsync_dir(tmp, strict=True)
        _publish(tmp, dst, parent, base)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, CheckpointWriteError):
            raise
        error = write_error(current, exc, written=written or None)
        if exc.errno == errno.ENOSPC:
            error.hint = f"Free space or choose another folder; nothing was written to {dst}."
        raise error from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.verified = True
    report.notes.append(f"{len(shards)} shards of at most {limit:,} data bytes, index {INDEX}")
    if aliases:
        report.changes.append(f"tied tensors stored once ({len(aliases)} aliases in the index metadata)")
    return written


def _publish(tmp: str, dst: str, parent: str, base: str) -> None:
    """Rename the complete folder into place; a previous sharded folder there is moved aside first and
    removed after (a crash in between leaves it under its ``.tmp-`` name, removed as a leftover)."""
    old = None
    if os.path.lexists(dst):
        check_destination(dst)  # still a sharded folder (it was checked before the work began)
        old = os.path.join(parent, f".{base}.old{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except OSError:
        if old is not None:
            os.rename(old, dst)
        raise
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
