"""TorchScript archives from before torch 1.2: ``model.json`` + ``tensors/<n>``, no ``data.pkl``.

``model.json`` is the JSON form of the ``torch.ModelDef`` protobuf: ``mainModule`` (a ``ModuleDef`` with
``parameters`` ``[{name, tensorId, isBuffer}]`` and ``submodules``) and ``tensors``, a list of
``TensorDef`` ``{dims, offset, strides, requiresGrad, dataType, data: {key}, device, isQuantized, scale,
zeroPoint}`` whose bytes are the stored member ``data.key``. Module attributes (``attributes: [{type, name,
id}]``, and ``getStateAttributeId``) index the tuple pickled in ``attributes.pkl``, where a tensor is
``torch.jit._pickle.build_tensor_from_id(n)``: tensor ``n`` of the same table. That pickle goes through the
one safe unpickler with the table as its only source of tensors. Parameters, buffers and tensor attributes
come back as one state dict (``"sub.weight"``), tensors shared by several names stay shared, and a tensor
no name refers to (a constant of the code) is listed in ``details["constants"]``. The code is never run.
Field names are read in protobuf's JSON spelling (``tensorId``) and in the proto's own (``tensor_id``), as
torch's parser accepts both.
"""

from __future__ import annotations

import re
import zipfile
from collections import OrderedDict
from typing import Any

from ...errors import CorruptCheckpointError, LimitExceededError
from ...storage.source import Source
from ..unpickle.meta import MetaStorage, TensorMeta, check_view, meta_dtype
from ..unpickle.quantized import QUANTIZED_DTYPES
from ..sniff import DESCRIPTIONS, TORCHSCRIPT
from ..unpickle.mode import Mode
from .base import Checkpoint, ReadOptions, parse_json, run_pickle
from .torch_zip import check_zip, member_data_offset, open_zip, read_member

__all__ = ["read_torchscript_v1"]

# caffe2.TensorProto.DataType names, as protobuf's JSON mapping writes them
_DTYPES = {"FLOAT": "float32", "INT32": "int32", "BYTE": "uint8", "BOOL": "bool", "UINT8": "uint8", "INT8": "int8",
           "INT16": "int16", "INT64": "int64", "FLOAT16": "float16", "DOUBLE": "float64"}
MAX_JSON = 64 << 20
MAX_MODULES = 100_000
_QUANTIZED = {"int8": "qint8", "uint8": "quint8", "int32": "qint32"}  # toQIntType of a quantized TensorDef
_KEY = re.compile(r"[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-][A-Za-z0-9_.\-]*)*")  # a record key; no "..", no absolute path


def _field(d: dict[str, Any], camel: str, default: Any = None) -> Any:
    """A ModelDef field in protobuf's JSON name (``tensorId``) or the proto's own (``tensor_id``)."""
    if camel in d:
        return d[camel]
    return d.get(re.sub("([A-Z])", lambda m: "_" + m.group(1).lower(), camel), default)


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
                (f"{prefix}/tensors/", f"{prefix}/model.json", f"{prefix}/attributes.pkl")))
        return _read(src, zf, prefix, opts, loaded)


def _model_def(src: Source, zf: zipfile.ZipFile, prefix: str, opts: ReadOptions) -> dict[str, Any]:
    info = zf.getinfo(f"{prefix}/model.json")
    if info.file_size > MAX_JSON:
        raise LimitExceededError(f"model.json declares {info.file_size} bytes")
    model = parse_json(read_member(zf, info, src, opts), "TorchScript model.json")
    if not isinstance(model, dict) or not isinstance(_field(model, "mainModule"), dict):
        raise CorruptCheckpointError("model.json has no mainModule")
    return model


class _Table:
    """The tensor table of ``model.json``: each tensor made once (validated against its member), storages
    shared by every tensor whose ``data.key`` names the same member, as torch's importer shares them."""

    def __init__(self, src: Source, zf: zipfile.ZipFile, prefix: str, opts: ReadOptions, defs: list[Any]) -> None:
        self.src, self.zf, self.prefix, self.opts, self.defs = src, zf, prefix, opts, defs
        self.infos = {i.filename: i for i in zf.infolist()}
        self.cache: dict[int, Any] = {}
        self.storages: dict[str, Any] = {}
        self.used: set[int] = set()

    def __call__(self, tid: int) -> Any:
        if tid in self.cache:
            return self.cache[tid]
        if not 0 <= tid < len(self.defs) or not isinstance(self.defs[tid], dict):
            raise CorruptCheckpointError(f"model.json refers to tensor {tid}, but its table has {len(self.defs)} "
                                         "tensors")
        self.cache[tid] = self._make(tid, self.defs[tid])
        self.used.add(tid)
        return self.cache[tid]

    def _member(self, tid: int, d: dict[str, Any]) -> zipfile.ZipInfo:
        data = _field(d, "data")
        key = data.get("key") if isinstance(data, dict) else None
        if not isinstance(key, str) or len(key) > 512 or not _KEY.fullmatch(key) or ".." in key.split("/") \
                or key in ("model.json", "attributes.pkl") or key.startswith("code/"):
            raise CorruptCheckpointError(f"model.json: tensor {tid} names the record {key!r:.80}, which is not a "
                                         "tensor record of this archive")
        member = self.infos.get(f"{self.prefix}/{key}")
        if member is None:
            raise CorruptCheckpointError(f"model.json: tensor {tid} refers to member {key!r:.60}, which is missing")
        return member

    def _make(self, tid: int, d: dict[str, Any]) -> Any:
        dtype = _DTYPES.get(_field(d, "dataType", "FLOAT"))
        if dtype is None:
            raise CorruptCheckpointError(f"model.json: tensor {tid} has data type {_field(d, 'dataType')!r:.40}")
        quantized = _field(d, "isQuantized") is True
        if quantized:
            dtype = _QUANTIZED.get(dtype, "")
            scale, zero_point = _field(d, "scale"), _int(_field(d, "zeroPoint", 0), "a zero point")
            low, high = QUANTIZED_DTYPES.get(dtype, (1, 0))
            if not dtype or not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale < 1e38 \
                    or not low <= zero_point <= high:
                raise CorruptCheckpointError(f"model.json: quantized tensor {tid} ({_field(d, 'dataType')}, scale "
                                             f"{scale!r:.30}, zero point {zero_point}) is not one torch can make")
        dims = [_int(x, "a dimension") for x in _field(d, "dims") or []]
        strides = [_int(x, "a stride") for x in _field(d, "strides") or []]
        member = self._member(tid, d)
        mdtype = meta_dtype(dtype)
        count = member.file_size // mdtype.itemsize
        offset, size, stride = check_view(count, _int(_field(d, "offset", 0), "an offset"), dims, strides)
        device = _field(d, "device") or "cpu"
        if not isinstance(device, str) or not re.fullmatch(r"(cpu|cuda)(:[0-9]{1,3})?", device):
            raise CorruptCheckpointError(f"model.json: tensor {tid} is on device {device!r:.40} (cpu or cuda saved)")
        nbytes = count * mdtype.itemsize
        storage = MetaStorage(mdtype, nbytes, device)
        if member.flag_bits & 1:
            raise CorruptCheckpointError(f"member {member.filename} is encrypted", member=member.filename)
        if member.compress_type == zipfile.ZIP_STORED:  # read at its offset in both modes, as torch_zip does
            storage.file_offset = member_data_offset(self.src, member)
            if storage.file_offset + member.file_size > self.src.size:
                raise CorruptCheckpointError(f"member {member.filename} runs past the end of the file")
            self.opts.trace.ranges.append((self.src.name, storage.file_offset, member.file_size))
        elif self.opts.mode is Mode.RECORD and member.filename not in self.storages:
            read_member(self.zf, member, self.src, self.opts)  # load inflates it: so does scan, under the same bound
            self.storages[member.filename] = None
        meta = TensorMeta(size, stride, mdtype, offset, storage)
        if self.opts.meta:
            return meta
        import numpy as np
        import torch  # lazy: structure-only reads never import torch

        raw = self.storages.get(member.filename)
        if raw is None:
            data = bytearray(self.src.read_at(storage.file_offset, nbytes) if storage.file_offset is not None
                             else read_member(self.zf, member, self.src, self.opts)[:nbytes])
            raw = self.storages[member.filename] = torch.from_numpy(np.frombuffer(data, dtype=np.uint8))
        if quantized:
            base = torch._empty_affine_quantized([0], scale=float(scale), zero_point=zero_point,
                                                 dtype=meta.torch_dtype())
            typed = torch.storage.TypedStorage(wrap_storage=raw.untyped_storage(), dtype=meta.torch_dtype(),
                                               _internal=True)
            t = base.set_(typed, offset, size, stride)
        else:
            t = raw.view(meta.torch_dtype()).as_strided(size, stride, offset)
        if _field(d, "requiresGrad") is True and t.is_floating_point():
            t.requires_grad_(True)
        return t


def _attributes(src: Source, zf: zipfile.ZipFile, prefix: str, opts: ReadOptions, table: _Table) -> Any:
    """The values ``attributes.pkl`` holds (a list for protoVersion 2, a tuple after), or () without one."""
    try:
        info = zf.getinfo(f"{prefix}/attributes.pkl")
    except KeyError:
        return ()
    data = read_member(zf, info, src, opts)
    values, _ = run_pickle(opts, data, src, info.filename, tensor_table=table)
    if not isinstance(values, (list, tuple)):
        raise CorruptCheckpointError(f"attributes.pkl holds a {type(values).__name__}, not the table of attribute "
                                     "values")
    return values


def _attribute_tensors(name: str, value: Any, out: "OrderedDict[str, Any]", tensor_types: tuple[type, ...]) -> None:
    if isinstance(value, tensor_types):
        out.setdefault(name, value)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if isinstance(item, tensor_types):
                out.setdefault(f"{name}.{i}", item)


def _read(src: Source, zf: zipfile.ZipFile, prefix: str, opts: ReadOptions, loaded: Checkpoint) -> Checkpoint:
    model = _model_def(src, zf, prefix, opts)
    defs = _field(model, "tensors") or []
    if not isinstance(defs, list):
        raise CorruptCheckpointError("model.json: tensors is not a list")
    table = _Table(src, zf, prefix, opts, defs)
    values = _attributes(src, zf, prefix, opts, table)
    tensor_types: tuple[type, ...] = (TensorMeta,)
    if not opts.meta:
        import torch  # lazy: structure-only reads never import torch

        tensor_types = (torch.Tensor,)
    state: OrderedDict[str, Any] = OrderedDict()
    todo: list[tuple[str, Any]] = [("", _field(model, "mainModule"))]
    seen = 0
    while todo:
        path, module = todo.pop()
        seen += 1
        if not isinstance(module, dict) or seen > MAX_MODULES:
            raise CorruptCheckpointError("model.json: a module is not a record (or there are too many)")
        for p in _field(module, "parameters") or []:
            if not isinstance(p, dict) or not isinstance(p.get("name"), str):
                raise CorruptCheckpointError(f"model.json: malformed parameter {p!r:.80}")
            state[path + p["name"]] = table(_int(_field(p, "tensorId"), "a tensorId"))
        for a in _field(module, "attributes") or []:
            if not isinstance(a, dict) or not isinstance(a.get("name"), str):
                raise CorruptCheckpointError(f"model.json: malformed attribute {a!r:.80}")
            index = _int(a.get("id", -1), "an attribute id")
            if index >= len(values):
                raise CorruptCheckpointError(f"model.json: attribute {path}{a['name']} is value {index} of "
                                             f"attributes.pkl, which holds {len(values)}")
            if index >= 0:
                _attribute_tensors(path + a["name"], values[index], state, tensor_types)
        index = _int(_field(module, "getStateAttributeId", -1), "a state attribute id")
        if 0 <= index < len(values):
            _attribute_tensors(path + "__getstate__", values[index], state, tensor_types)
        elif index >= len(values):
            raise CorruptCheckpointError(f"model.json: module {path or 'main'} has state {index} of attributes.pkl, "
                                         f"which holds {len(values)}")
        subs = _field(module, "submodules") or []
        if not isinstance(subs, list):
            raise CorruptCheckpointError("model.json: submodules is not a list")
        for sub in reversed(subs):
            name = sub.get("name") if isinstance(sub, dict) else None
            if not isinstance(name, str):
                raise CorruptCheckpointError("model.json: a submodule has no name")
            todo.append((f"{path}{name}.", sub))
    used = set(table.used)
    constants = [table(i) for i in range(len(defs)) if i not in used]
    loaded.tree = state
    loaded.evidence.append("model.json and tensors/ (TorchScript written by torch < 1.2)")
    loaded.notes.append("TorchScript archive from before torch 1.2: its parameters, buffers and tensor attributes "
                        "were read as a state dict (the code was not run)")
    if constants:
        loaded.details["constants"] = constants
        loaded.notes.append(f"{len(constants)} tensors of model.json are named by no module (constants of the code): "
                            "they are in details['constants'], not in the state dict")
    loaded.details["producer"] = str(_field(model, "producerVersion", ""))[:40]
    return loaded
