"""TorchScript archives from before torch 1.2: ``model.json`` + ``tensors/<n>``, no ``data.pkl``.

``model.json`` is the JSON form of the ``torch.ModelDef`` protobuf: ``mainModule`` (a ``ModuleDef`` with
``parameters`` ``[{name, tensorId, isBuffer}]`` and ``submodules``) and ``tensors``, a list of
``TensorDef`` ``{dims, offset, strides, requiresGrad, dataType, data: {key}, device}`` whose bytes are the
stored member ``data.key``. The weights are plain tensors: they come back as a state dict
(``"sub.weight"``); the code is never run.
"""

from __future__ import annotations

import math
import zipfile
from collections import OrderedDict
from typing import Any

from ...errors import CorruptCheckpointError, LimitExceededError
from ...storage.source import Source
from ..unpickle.meta import MetaStorage, TensorMeta, check_view, meta_dtype
from ..sniff import DESCRIPTIONS, TORCHSCRIPT
from ..unpickle.mode import Mode
from .base import Checkpoint, ReadOptions, parse_json
from .torch_zip import check_zip, member_data_offset, open_zip, read_member

__all__ = ["read_torchscript_v1"]

# caffe2.TensorProto.DataType names, as protobuf's JSON mapping writes them
_DTYPES = {"FLOAT": "float32", "INT32": "int32", "BYTE": "uint8", "BOOL": "bool", "UINT8": "uint8", "INT8": "int8",
           "INT16": "int16", "INT64": "int64", "FLOAT16": "float16", "DOUBLE": "float64"}
MAX_JSON = 64 << 20
MAX_MODULES = 100_000


def _int(value: Any, what: str) -> int:
    """protobuf JSON writes int64 as a string."""
    try:
        out = int(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    except ValueError:
        out = None
    if out is None or not -(1 << 62) < out < 1 << 62:
        raise CorruptCheckpointError(f"model.json: {what} is {value!r:.40}, not an integer")
    return out


def read_torchscript_v1(src: Source, opts: ReadOptions, prefix: str) -> Checkpoint:
    loaded = Checkpoint(format=TORCHSCRIPT, description=DESCRIPTIONS[TORCHSCRIPT] + " (torch < 1.2)")
    with open_zip(src) as zf:
        if opts.mode is Mode.RECORD:
            check_zip(src, zf, opts, loaded_members=lambda name: name.startswith(
                (f"{prefix}/tensors/", f"{prefix}/model.json")))
        return _read(src, zf, prefix, opts, loaded)


def _read(src: Source, zf: zipfile.ZipFile, prefix: str, opts: ReadOptions, loaded: Checkpoint) -> Checkpoint:
    info = zf.getinfo(f"{prefix}/model.json")
    if info.file_size > MAX_JSON:
        raise LimitExceededError(f"model.json declares {info.file_size} bytes")
    model = parse_json(read_member(zf, info, src, opts), "TorchScript model.json")
    if not isinstance(model, dict) or not isinstance(model.get("mainModule"), dict):
        raise CorruptCheckpointError("model.json has no mainModule")
    defs = model.get("tensors") or []
    if not isinstance(defs, list):
        raise CorruptCheckpointError("model.json: tensors is not a list")
    infos = {i.filename: i for i in zf.infolist()}
    cache: dict[int, Any] = {}

    def tensor(tid: int) -> Any:
        if tid in cache:
            return cache[tid]
        if not 0 <= tid < len(defs) or not isinstance(defs[tid], dict):
            raise CorruptCheckpointError(f"model.json: parameter refers to tensor {tid}, which is not defined")
        d = defs[tid]
        dtype = _DTYPES.get(d.get("dataType", "FLOAT"))
        if dtype is None:
            raise CorruptCheckpointError(f"model.json: tensor {tid} has data type {d.get('dataType')!r:.40}")
        dims = [_int(x, "a dimension") for x in d.get("dims") or []]
        strides = [_int(x, "a stride") for x in d.get("strides") or []]
        key = (d.get("data") or {}).get("key") if isinstance(d.get("data"), dict) else None
        member = infos.get(f"{prefix}/{key}") if isinstance(key, str) else None
        if member is None:
            raise CorruptCheckpointError(f"model.json: tensor {tid} refers to member {key!r:.60}, which is missing")
        mdtype = meta_dtype(dtype)
        count = member.file_size // mdtype.itemsize
        offset, size, stride = check_view(count, _int(d.get("offset", 0), "an offset"), dims, strides)
        storage = MetaStorage(mdtype, count * mdtype.itemsize, str(d.get("device") or "cpu"))
        if member.compress_type == zipfile.ZIP_STORED:
            storage.file_offset = member_data_offset(src, member)
            if storage.file_offset + member.file_size > src.size:
                raise CorruptCheckpointError(f"member {member.filename} runs past the end of the file")
            opts.trace.ranges.append((src.name, storage.file_offset, member.file_size))
        meta = TensorMeta(size, stride, mdtype, offset, storage)
        if opts.meta:
            cache[tid] = meta
        else:
            import numpy as np
            import torch  # lazy: structure-only reads never import torch

            raw = bytearray(read_member(zf, member, src, opts)[:count * mdtype.itemsize])
            flat = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy()).view(meta.torch_dtype())
            cache[tid] = flat.as_strided(size, stride, offset).clone()
            if d.get("requiresGrad") is True and cache[tid].is_floating_point():
                cache[tid].requires_grad_(True)
        return cache[tid]

    state: OrderedDict[str, Any] = OrderedDict()
    todo: list[tuple[str, Any]] = [("", model["mainModule"])]
    seen = 0
    while todo:
        path, module = todo.pop()
        seen += 1
        if not isinstance(module, dict) or seen > MAX_MODULES:
            raise CorruptCheckpointError("model.json: a module is not a record (or there are too many)")
        for p in module.get("parameters") or []:
            if not isinstance(p, dict) or not isinstance(p.get("name"), str):
                raise CorruptCheckpointError(f"model.json: malformed parameter {p!r:.80}")
            state[path + p["name"]] = tensor(_int(p.get("tensorId"), "a tensorId"))
        subs = module.get("submodules") or []
        if not isinstance(subs, list):
            raise CorruptCheckpointError("model.json: submodules is not a list")
        for sub in reversed(subs):
            name = sub.get("name") if isinstance(sub, dict) else None
            if not isinstance(name, str):
                raise CorruptCheckpointError("model.json: a submodule has no name")
            todo.append((f"{path}{name}.", sub))
    loaded.tree = state
    loaded.evidence.append("model.json and tensors/ (TorchScript written by torch < 1.2)")
    loaded.notes.append("TorchScript archive from before torch 1.2: its parameters were read as a state dict "
                        "(the code was not run)")
    loaded.details["producer"] = str(model.get("producerVersion", ""))[:40]
    return loaded
