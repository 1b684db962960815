"""``torchckpt.convert``: any readable checkpoint to a modern zip ``.pt`` or to ``.safetensors``, verified.

Modern in the full sense: the output loads with plain ``torch.load(f, weights_only=True)`` on any
recent PyTorch. Whatever that loader would refuse is turned into plain data (numpy scalars into
Python numbers, arrays into tensors, Namespace into dicts, stubs into ``{"__class__": ...}``) and
every such change is listed. safetensors output is streamed tensor by tensor (memory stays near the
largest tensor); tied tensors are stored once and recorded in the metadata, non-tensor values are
kept as JSON. Every output is reloaded and compared with the source before the report is returned.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ...errors import CheckpointError, CheckpointWriteError, CorruptCheckpointError, LimitExceededError, \
    UnsupportedFormatError
from ...fit.select import lookup, select
from ...fit.tree import TensorMeta, flatten, is_module_like, is_tensor_like, module_classes, \
    state_dict_of
from ...read.opener import open_checkpoint
from ...read import FunctionRef, LuaFunction, Mode, PackedParams, Stub, T7Object, TreeMeter, is_stub_class, stub_name, \
    stub_to_plain, tensor_bytes, write_safetensors
from ...read.load import load
from ...read.tensors import dtype_name, release, to_torch
from ...read.trust import Policy, resolve_policy
from ...storage import files as storage
from ...storage.atomic import atomic_write
from ...storage.remote import is_url
from ...text import clip, summary
from . import to_sharded
from .outline import outline, plain_paths
from .options import FloatDtype, OutputFormat, float_dtype, output_format
from .byte_io import compare_all, copy_range, same_bits, verify_safetensors

__all__ = ["convert", "ConvertReport"]

DENSE_BUDGET = 64 << 20  # bytes a zero-stride view may expand to beyond the file's size when written densely
Progress = Callable[[int, int], None]


@dataclass
class ConvertReport:
    source: str
    destination: str
    source_format: str
    to: str
    tensors: int = 0
    bytes: int = 0
    changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verified: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def render(self) -> str:
        """What was written, what changed to make it loadable by plain torch, and whether it was verified."""
        lines = [f"{self.source} ({self.source_format}) -> {self.destination} ({self.to}): {self.tensors} tensors, "
                 f"{self.bytes:,} bytes, verified: {'yes' if self.verified else 'NO'}"]
        lines += [f"  changed: {c}" for c in self.changes]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = render


def convert(src: Any, dst: str, *, to: OutputFormat | None = None, dtype: FloatDtype | None = None,
            weights_only: bool = False,
            key: str | None = None, policy: Policy | None = None, trust: bool = False,
            allow: Iterable[str] | str | None = None, progress: Progress | None = None,
            storage_options: Any = None, max_shard_size: int | str | None = None) -> ConvertReport:
    """Convert ``src`` to ``dst`` and verify it. ``to`` defaults from the extension of ``dst``.

    A whole-model pickle (or a Lua ``nn`` tree) becomes its state dict, which ``load_into`` and
    ``model.load_state_dict`` take; the class of every module is kept as metadata (``_metadata`` of
    the ``.pt`` state dict, ``torchckpt.classes`` in safetensors).

    Args:
        to: ``"pt"``, ``"safetensors"`` or ``"sharded-safetensors"`` (a folder of shards and
            ``model.safetensors.index.json``, see :mod:`.to_sharded`).
        max_shard_size: the most data bytes per shard (``"5GB"`` by default); sharded output only.
        dtype: cast floating-point tensors (``"bfloat16"``, ``"float16"``, ``"float32"``); reported.
        weights_only: write only the state dict (found in a training dict, a whole-model pickle,
            a TorchScript archive or a Lua ``nn`` tree) instead of the whole tree.
        key: dotted path of the part to convert (the weights, when several candidates exist).
        policy, trust, allow: what the source's pickles may import (see :func:`torchckpt.load`).
        storage_options: options for the filesystem of a URL ``src`` or ``dst``. A URL destination is
            written and verified in a temporary local file, then uploaded whole (published at once).

    Raises:
        LimitExceededError: a zero-stride view would expand far beyond the file's size when written
            densely (safetensors output or a dtype cast); ``.pt`` output keeps views compact.
    """
    dst = os.fspath(dst)
    if is_url(dst):
        return _convert_to_url(src, dst, storage_options, to=to, dtype=dtype, weights_only=weights_only, key=key,
                               policy=policy, trust=trust, allow=allow, progress=progress,
                               max_shard_size=max_shard_size)
    to = output_format(dst, to, max_shard_size)
    if to not in ("pt", "safetensors", "sharded-safetensors"):
        raise ValueError(f"to must be 'pt', 'safetensors' or 'sharded-safetensors', not {to!r}")
    shard_limit = to_sharded.shard_size(max_shard_size) if to == "sharded-safetensors" else 0
    if to == "sharded-safetensors":
        to_sharded.check_destination(dst)
    target_dtype = float_dtype(dtype) if dtype else None
    with open_checkpoint(src, Mode.BUILD, resolve_policy(policy, trust, allow), lazy=True,
                         storage_options=storage_options) as loaded, errors_name_source(loaded.name):
        source = loaded.reader
        assert source is not None  # the opener yields an open reader inside its ``with``
        report = ConvertReport(source.name, dst, loaded.description, to, notes=list(loaded.notes))
        changes: Counter[str] = Counter()
        tree, classes = part_to_write(loaded.obj, key, weights_only, changes, loaded.tree_meter)
        tensors = flatten(tree, loaded.tree_meter)
        if target_dtype is not None:
            cast = sum(1 for _, t in tensors if _is_float(t) and dtype_name(t) != dtype_name(target_dtype))
            if cast:
                changes[f"floating-point tensors cast to {dtype_name(target_dtype)}"] += cast
        if to != "pt" or target_dtype is not None:
            check_dense(tensors, source.size, to, target_dtype)
        materialize = Materializer(source, target_dtype)
        # missing parent directories are created, as `torchckpt.save` and a `.dcp` destination do
        storage.makedirs(os.path.dirname(os.path.abspath(dst)))
        if to == "sharded-safetensors":
            left_out = plain_paths(outline(tree, loaded.tree_meter, expanded=False))
            if left_out:  # an index and its shards hold tensors only: say what the folder does not have
                shown = ", ".join(clip(p) for p in left_out[:5]) + (", ..." if len(left_out) > 5 else "")  # a path may be MBs
                changes[f"values that are not tensors left out ({shown}): a sharded-safetensors folder holds "
                        "tensors only; convert to .pt or .safetensors to keep them"] += len(left_out)
            report.bytes = to_sharded.write_sharded(dst, tensors, materialize, shard_limit, progress, report,
                                                   stream_safetensors)
        elif to == "safetensors":
            metadata = {"format": "pt"}
            if classes:
                metadata["torchckpt.classes"] = json.dumps(classes)
            elif not weights_only and key is None:
                metadata["torchckpt.tree"] = json.dumps(outline(tree, loaded.tree_meter, expanded=False))
            report.bytes = _write_safetensors(dst, tensors, metadata, materialize, progress, report)
        else:
            final = _materialize_tree(tree, materialize, {})
            if classes:
                final._metadata = {prefix: {"torchckpt.class": name} for prefix, name in classes.items()}
            with atomic_write(dst) as fh:
                import torch  # lazy: torch is imported only when tensors are written

                torch.save(final, fh)
            report.bytes = os.path.getsize(dst)
            del final
        report.tensors = len(tensors)
        report.changes[:0] = [f"{what} ({n})" for what, n in changes.items()]
        if to != "sharded-safetensors":  # the shards were verified before the folder was published
            _verify(dst, to, tensors, materialize, report)
    return report


def _convert_to_url(src: Any, dst: str, storage_options: Any, **kwargs: Any) -> ConvertReport:
    """Convert into a temporary local file (verified there), then upload it whole: the object appears
    complete or not at all."""
    staging = tempfile.mkdtemp(prefix="torchckpt-convert-")
    try:
        local = os.path.join(staging, dst.rstrip("/").rsplit("/", 1)[-1])
        kwargs["to"] = output_format(dst, kwargs.get("to"), kwargs.get("max_shard_size"))
        if kwargs["to"] == "sharded-safetensors":
            raise CheckpointWriteError(f"sharded safetensors cannot be written to a URL ({dst})", path=dst,
                                       hint="Convert into a local folder, then upload the folder.")
        report = convert(src, local, storage_options=storage_options, **kwargs)
        with open(local, "rb") as fh, storage.write_whole(dst, storage_options) as out:
            shutil.copyfileobj(fh, out, 8 << 20)
        report.destination = dst
        report.notes.append("written and verified in a temporary local file, then uploaded whole")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


@contextlib.contextmanager
def errors_name_source(name: str) -> Iterator[None]:
    """A CheckpointError raised while converting names the source file."""
    try:
        yield
    except CheckpointError as exc:
        raise exc.with_path(name)


def part_to_write(obj: Any, key: str | None, weights_only: bool, changes: Counter[str],
                  meter: TreeMeter | None = None) -> tuple[Any, dict[str, str]]:
    """What to write: the tree, the weights, or the part at ``key``; and the module classes of a model.

    Every walk charges ``meter`` (the file's :class:`TreeMeter`); a shared value is converted once and
    stays shared in the output."""
    if weights_only:
        return select(obj, key, meter=meter).state_dict, {}
    part = lookup(obj, key) if key is not None else obj
    if is_module_like(part):
        classes = module_classes(part, meter)
        changes[f"whole model ({classes.get('', 'module')}) -> its state dict; module classes kept as metadata"] += 1
        sd = state_dict_of(part, meter)
        return OrderedDict((k, _modernize(v, changes, 0, {})) for k, v in sd.items()), classes
    return _modernize(part, changes, 0, {}), {}


def check_dense(tensors: list[tuple[str, Any]], file_size: int, to: str, target_dtype: Any) -> None:
    """Refuse views whose dense copy would dwarf the file (a crafted ``expand``: stride 0 over 1 element)."""
    budget = max(file_size, 0) + DENSE_BUDGET
    total = 0
    for name, t in tensors:
        shape, stride = tuple(t.shape), _strides(t)
        if not shape or 0 in shape:
            continue
        extent = 1 + sum((n - 1) * st for n, st in zip(shape, stride))
        numel = math.prod(shape)
        if numel <= extent:
            continue
        itemsize = _itemsize(t)
        total += (numel - extent) * itemsize
        if total > budget:
            why = {"safetensors": "safetensors stores every element",
                   "sharded-safetensors": "safetensors stores every element", "dcp": "a DCP directory stores every element"}.get(
                to, "casting copies every element")
            raise LimitExceededError(
                f"tensor {name} is a view of {extent * itemsize:,} bytes that expands to {numel * itemsize:,} bytes "
                f"(shape {list(shape)}, stride {list(stride)}); {why}, which would need more than the "
                f"{budget:,}-byte budget", hint="Convert to .pt without --dtype: it keeps views compact.")


def _strides(t: Any) -> tuple[Any, ...]:
    return tuple(t.stride) if isinstance(t, TensorMeta) else tuple(t.stride()) if hasattr(t, "stride") and \
        callable(t.stride) else tuple(s // t.itemsize for s in t.strides)


def _itemsize(t: Any) -> int:
    return int(t.dtype.itemsize)


def _modernize(obj: Any, changes: Counter[str], depth: int, memo: dict[int, Any]) -> Any:
    """Turn everything torch.load(weights_only=True) would refuse into plain data; count each change."""
    if depth > 200:
        raise CorruptCheckpointError("object nesting deeper than 200 levels")
    if is_tensor_like(obj) and not isinstance(obj, np.ndarray):
        return obj
    if isinstance(obj, np.generic):  # before the plain types: np.float64 subclasses float
        changes["numpy scalars -> Python numbers"] += 1
        return obj.item()
    if obj is None or type(obj) in (bool, int, float, complex, str, bytes):
        return obj
    if isinstance(obj, (bool, int, float, complex, str, bytes)):  # subclasses (TorchVersion, IntEnum ...)
        changes[f"{type(obj).__name__} -> {type(obj).__mro__[1].__name__}"] += 1
        return type(obj).__mro__[1](obj) if type(obj).__mro__[1] is not object else str(obj)
    if id(obj) in memo:
        return memo[id(obj)][1]
    d = depth + 1

    def note(what: str) -> None:
        changes[what] += 1

    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "biufc":
            import torch

            note("numpy arrays -> tensors")
            out: Any = torch.from_numpy(np.ascontiguousarray(obj))
        else:
            note("numpy object/string arrays -> lists")
            out = _modernize(obj.tolist(), changes, d, memo)
    elif isinstance(obj, Stub):
        note(f"objects of unimported classes -> plain dicts (e.g. {stub_name(obj)})")
        out = _modernize(stub_to_plain(obj), changes, d, memo)
    elif is_stub_class(obj):
        note("references to unimported classes -> names")
        out = stub_name(obj)
    elif isinstance(obj, FunctionRef):
        note("references to torch functions -> names")
        out = obj.qualified_name
    elif isinstance(obj, T7Object):
        note("Lua Torch7 objects -> plain dicts")
        out = {"__class__": obj.typename, **({"data": _modernize(obj.data, changes, d, memo)})}
    elif isinstance(obj, LuaFunction):
        note("Lua functions -> their bytecode as hex")
        out = {"__lua_function__": obj.bytecode.hex()}
    elif isinstance(obj, dict):
        plain = type(obj) in (dict, OrderedDict)
        if not plain:
            note(f"{type(obj).__name__} -> dict")
        items = [(_key(k, changes), _modernize(v, changes, d, memo)) for k, v in obj.items()]
        out = OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    elif isinstance(obj, (list, tuple)):
        values = [_modernize(v, changes, d, memo) for v in obj]
        out = tuple(values) if isinstance(obj, tuple) and type(obj).__module__ == "builtins" or \
            isinstance(obj, PackedParams) or type(obj).__name__ == "Size" else values  # packed: (weight, bias)
        if type(obj).__name__ == "Size":
            import torch

            out = torch.Size(values)
    elif isinstance(obj, set):
        out = {(_modernize(v, changes, d, memo)) for v in obj}
    elif isinstance(obj, frozenset):
        note("frozensets -> sorted lists")
        out = sorted((_modernize(v, changes, d, memo) for v in obj), key=lambda v: summary(v, 4096))
    elif type(obj).__module__ == "torch" and type(obj).__name__ in ("device", "dtype", "Size", "layout"):
        out = obj
    elif hasattr(obj, "__dict__") and type(obj).__name__ in ("Namespace", "SimpleNamespace"):
        note(f"{type(obj).__name__} -> dict")
        out = {k: _modernize(v, changes, d, memo) for k, v in vars(obj).items()}
    elif type(obj).__module__ in ("pathlib", "pathlib._local", "uuid", "decimal", "fractions"):
        note(f"{type(obj).__name__} -> str")
        out = str(obj)
    elif hasattr(obj, "isoformat"):
        note("dates and times -> ISO strings")
        out = obj.isoformat()
    else:
        note(f"other objects -> repr strings (e.g. {type(obj).__name__})")
        out = summary(obj, 4096)
    memo[id(obj)] = (obj, out)  # the key object stays alive: a temporary's id is never reused for another
    return out


def _key(k: Any, changes: Counter[str]) -> Any:
    if isinstance(k, (str, int, float, bool)) or k is None:
        return k
    changes["non-scalar dict keys -> repr strings"] += 1
    return summary(k, 4096)


def _is_float(t: Any) -> bool:
    return dtype_name(t).startswith(("float", "bfloat", "half"))


class Materializer:
    """Source tensor -> CPU tensor in the output dtype; ``release`` drops mapped pages once it was used."""

    def __init__(self, source: Any, target_dtype: Any) -> None:
        self.source, self.target_dtype = source, target_dtype

    def __call__(self, t: Any) -> Any:
        value = to_torch(t, self.source) if isinstance(t, TensorMeta) else t  # a Parameter stays one
        if self.target_dtype is not None and value.is_floating_point():
            value = value.to(self.target_dtype)
        return value

    def file_range(self, t: Any) -> tuple[int, int] | None:
        """``(offset, nbytes)`` when ``t``'s output bytes are exactly one range of the local source file.

        True for a contiguous tensor still on disk (legacy storages) that keeps its dtype: such a
        tensor is copied file to file (``copy_file_range``) and verified against the file, never read
        into memory.
        """
        if not isinstance(t, TensorMeta) or t.storage is None or getattr(self.source, "path", None) is None:
            return None
        if self.target_dtype is not None and _is_float(t) and dtype_name(t) != dtype_name(self.target_dtype):
            return None
        base = t.storage.data_offset()
        expected = 1
        for size, stride in zip(reversed(t.shape), reversed(t.stride)):
            if size != 1 and stride != expected:
                return None
            expected *= size
        nbytes = t.nbytes
        if base is None or nbytes == 0:
            return None
        offset = base + t.storage_offset * t.dtype.itemsize
        if offset + nbytes > self.source.size:
            return None  # past the end: reading it reports the truncation
        self.source.buffer()  # map the source now, before the output may replace it (convert onto itself)
        return offset, nbytes

    def release(self, t: Any) -> None:
        if not isinstance(t, TensorMeta):
            release(self.source, t)


def _materialize_tree(tree: Any, materialize: Callable[[Any], Any], memo: dict[int, Any]) -> Any:
    """The tree with every tensor read; a shared container stays one shared container (``memo``)."""
    if is_tensor_like(tree):
        return materialize(tree)
    if id(tree) in memo:
        return memo[id(tree)][1]
    if isinstance(tree, dict):
        out: Any = type(tree)((k, _materialize_tree(v, materialize, memo)) for k, v in tree.items())
        metadata = getattr(tree, "_metadata", None)
        if metadata is not None:
            out._metadata = metadata  # torch's per-module state-dict metadata
    elif isinstance(tree, list):
        out = [_materialize_tree(v, materialize, memo) for v in tree]
    elif isinstance(tree, tuple) and type(tree) is tuple:
        out = tuple(_materialize_tree(v, materialize, memo) for v in tree)
    else:
        return tree
    memo[id(tree)] = (tree, out)
    return out


def _write_safetensors(path: str, tensors: list[tuple[str, Any]], metadata: dict[str, str],
                       materialize: Materializer, progress: Progress | None, report: ConvertReport) -> int:
    with atomic_write(path) as fh:
        written = stream_safetensors(fh, tensors, metadata, materialize, progress)
    if written.aliases:
        report.changes.append(f"tied tensors stored once ({len(written.aliases)} aliases in the metadata)")
    return int(written.size)


def stream_safetensors(fh: Any, tensors: list[tuple[str, Any]], metadata: dict[str, str], materialize: Materializer,
                       progress: Progress | None) -> Any:
    """Write ``tensors`` to ``fh`` with the one safetensors writer: a tensor still on disk in the output dtype
    is copied file to file, any other is materialized (cast) and released, one at a time."""
    def write_tensor(name: str, t: Any) -> int:
        span = materialize.file_range(t)
        if span is not None and copy_range(materialize.source, fh, *span):
            return span[1]
        data = tensor_bytes(materialize(t))
        fh.write(data)
        materialize.release(t)
        return data.nbytes

    def refuse(name: str, dtype: str) -> Exception:
        # the file is fine; the output format is what cannot hold it (exit 3 with the way out, not "corrupt")
        return UnsupportedFormatError(f"tensor {name} has dtype {dtype}, which safetensors cannot store",
                                      hint="Write a .pt file instead (--format pt keeps it), or cast the model's "
                                           "tensors to a float dtype before converting.")

    return write_safetensors(fh, tensors, metadata, dtype_of=lambda name, t: cast_name(dtype_name(t), materialize),
                             write_tensor=write_tensor, progress=progress, refuse=refuse)


def cast_name(dtype: str, materialize: Callable[[Any], Any]) -> str:
    import torch

    return dtype_name(materialize(torch.empty(0, dtype=getattr(torch, dtype))))


def _verify(dst: str, to: str, tensors: list[tuple[str, Any]], materialize: Materializer,
            report: ConvertReport) -> None:
    """Reload the output and compare every tensor with the source bit for bit, one tensor at a time."""
    if to == "pt":
        import torch  # lazy: verification reads tensors

        # torch cannot make a per-channel quantized tensor on "meta": those files are read for real (mapped)
        quantized = any(dtype_name(t).startswith(("qint", "quint")) for _, t in tensors)
        try:  # the promise: plain torch can read it
            with warnings.catch_warnings():  # torch's own rebuild of quantized tensors warns about TypedStorage
                warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
                torch.load(dst, weights_only=True, **({"mmap": True} if quantized else {"map_location": "meta"}))
        except Exception as exc:  # noqa: BLE001 - any refusal breaks the promise
            raise CorruptCheckpointError(f"plain torch.load(weights_only=True) refuses the output: {exc}"[:500],
                                         path=dst, hint="Please report this with the source file.") from None
        written = dict(flatten(load(dst, mmap=True)))
        compare_all(dst, tensors, materialize, lambda name, t: same_bits(written.get(name), materialize(t)))
    else:
        verify_safetensors(dst, tensors, materialize)
    report.verified = True
