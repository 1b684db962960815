"""TorchScript archives of torch < 1.2 (``model.json`` + ``tensors/N`` + ``attributes.pkl``): every tensor loads
under its name, from parameters, buffers and attributes of nested submodules, shared tensor ids stay shared,
the ``torch.jit._pickle`` helpers are safe references for scan, and forged tables are refused by load and scan.

No torch today writes this format, so the archives are written here field by field after the ModelDef of
caffe2/proto/torch.proto (protobuf's JSON mapping: camelCase names, int64 as strings) and the records torch
1.1's ScriptModuleSerializer wrote (``<archive>/model.json``, ``<archive>/tensors/<n>``, ``<archive>/code/``,
``<archive>/attributes.pkl``: a pickle, protocol 2, of the tuple of attribute values, where a tensor is
``torch.jit._pickle.build_tensor_from_id(n)``).
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile

import pytest
import torch
import torch.jit._pickle

import torchckpt
from torchckpt.errors import CorruptCheckpointError, UnsafeCheckpointError

_TYPES = {torch.float32: "FLOAT", torch.int64: "INT64", torch.float64: "DOUBLE", torch.uint8: "UINT8",
          torch.int32: "INT32", torch.float16: "FLOAT16"}


class _TensorRef:
    """Pickles as ``torch.jit._pickle.build_tensor_from_id(n)``, what torch 1.1 wrote for a tensor attribute."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __reduce__(self):
        return torch.jit._pickle.build_tensor_from_id, (self.n,)


class _IntList:
    def __init__(self, items) -> None:
        self.items = items

    def __reduce__(self):
        return torch.jit._pickle.build_intlist, (self.items,)


def tensor_def(t: torch.Tensor, key: str, offset: int = 0) -> dict:
    return {"dims": [str(d) for d in t.shape], "offset": str(offset), "strides": [str(s) for s in t.stride()],
            "requiresGrad": t.requires_grad, "dataType": _TYPES[t.dtype], "data": {"key": key}, "device": "cpu"}


def write_archive(path, model: dict, records: dict[str, bytes], attributes: bytes | None = None,
                  name: str = "model") -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}/version", "1\n")
        zf.writestr(f"{name}/model.json", json.dumps(model))
        zf.writestr(f"{name}/code/model.py", "op_version_set = 0\ndef forward(self, x):\n  return x\n")
        for key, data in records.items():
            zf.writestr(f"{name}/{key}", data)
        if attributes is not None:
            zf.writestr(f"{name}/attributes.pkl", attributes)


def _module(name: str, parameters=(), attributes=(), submodules=(), **extra) -> dict:
    return {"name": name, "parameters": list(parameters), "attributes": list(attributes),
            "submodules": list(submodules), "optimize": True,
            "torchscriptArena": {"key": f"code/{name or 'model'}.py"}, **extra}


def _param(name: str, tid: int, buffer: bool = False) -> dict:
    return {"isBuffer": buffer, "tensorId": str(tid), "name": name}


@pytest.fixture
def old_archive(tmp_path):
    """A 1.1-era archive: nested submodules, a buffer, tied weights (two tensorIds on one record, and one
    tensorId under two names), a tensor attribute and a list-of-tensors attribute in attributes.pkl, a view
    with an offset, and a constant of the code that no module names."""
    torch.manual_seed(0)
    conv_w, conv_b = torch.randn(4, 3, 3, 3), torch.randn(4)
    mean, emb = torch.randn(4), torch.randn(10, 4)
    big = torch.randn(20)  # one storage: fc.weight is its first 12 elements, fc.bias the last 3
    steps = torch.tensor([3, 1, 4], dtype=torch.int64)
    anchors = [torch.randn(2), torch.randn(5)]
    const = torch.arange(6.0)
    table = [(conv_w, "tensors/0", 0), (conv_b, "tensors/1", 0), (mean, "tensors/2", 0), (emb, "tensors/3", 0),
             (big[:12].view(3, 4), "tensors/4", 0), (big[17:], "tensors/4", 17), (steps, "tensors/5", 0),
             (anchors[0], "tensors/6", 0), (anchors[1], "tensors/7", 0), (const, "tensors/8", 0)]
    records = {"tensors/0": conv_w.numpy().tobytes(), "tensors/1": conv_b.numpy().tobytes(),
               "tensors/2": mean.numpy().tobytes(), "tensors/3": emb.numpy().tobytes(),
               "tensors/4": big.numpy().tobytes(), "tensors/5": steps.numpy().tobytes(),
               "tensors/6": anchors[0].numpy().tobytes(), "tensors/7": anchors[1].numpy().tobytes(),
               "tensors/8": const.numpy().tobytes()}
    defs = [tensor_def(t.contiguous(), key, off) if off == 0 else
            {**tensor_def(t.contiguous(), key), "offset": str(off)} for t, key, off in table]
    defs[4]["strides"] = ["4", "1"]
    attributes = pickle.dumps((_TensorRef(7), [_TensorRef(7), _TensorRef(8)], _IntList([1, 2]), 0.5), protocol=2)
    main = _module("model", parameters=[_param("steps", 6, buffer=True)],
                   attributes=[{"type": "Tensor", "name": "anchor", "id": "0"},
                               {"type": "List[Tensor]", "name": "anchors", "id": "1"},
                               {"type": "List[int]", "name": "sizes", "id": "2"},
                               {"type": "float", "name": "ratio", "id": "3"}],
                   submodules=[
                       _module("backbone", submodules=[
                           _module("conv", parameters=[_param("weight", 0), _param("bias", 1)]),
                           _module("bn", parameters=[_param("running_mean", 2, buffer=True)])]),
                       _module("embed", parameters=[_param("weight", 3)]),
                       _module("fc", parameters=[_param("weight", 4), _param("bias", 5)]),
                       _module("decoder", parameters=[_param("weight", 3)])])  # tied to embed.weight
    model = {"protoVersion": "3", "producerName": "pytorch", "producerVersion": "1.1", "tensors": defs,
             "mainModule": main}
    path = tmp_path / "old.pt"
    write_archive(path, model, records, attributes)
    expected = {"steps": steps, "anchor": anchors[0], "anchors.0": anchors[0], "anchors.1": anchors[1],
                "backbone.conv.weight": conv_w, "backbone.conv.bias": conv_b, "backbone.bn.running_mean": mean,
                "embed.weight": emb, "fc.weight": big[:12].view(3, 4), "fc.bias": big[17:], "decoder.weight": emb}
    return path, model, records, attributes, expected, const


def test_every_tensor_loads_with_its_name(old_archive):
    path, _, _, _, expected, const = old_archive
    tree, info = torchckpt.load(path, return_info=True)
    assert info.format == "torchscript"
    assert sorted(tree) == sorted(expected)
    for name, t in expected.items():
        assert tree[name].dtype == t.dtype and torch.equal(tree[name], t), name
    assert tree["decoder.weight"] is tree["embed.weight"]  # one tensorId, one tensor
    assert tree["anchors.0"] is tree["anchor"]
    assert tree["fc.weight"].untyped_storage().data_ptr() == tree["fc.bias"].untyped_storage().data_ptr()
    assert len(info.details["constants"]) == 1 and torch.equal(info.details["constants"][0], const)


def test_scan_calls_the_jit_helpers_safe_and_agrees_with_load(old_archive):
    path, *_ = old_archive
    report = torchckpt.scan(path)
    assert report.status == "clean", report.render()
    names = {g.fullname: g.verdict.value for g in report.files[0].globals}
    assert names["torch.jit._pickle.build_tensor_from_id"] == "allowed"
    assert names["torch.jit._pickle.build_intlist"] == "allowed"
    listing = torchckpt.inspect(path)
    assert "backbone.conv.weight" in str(listing) or "backbone.conv.weight" in json.dumps(listing.to_dict())


def test_load_into_a_model_from_an_old_archive(tmp_path):
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    records, defs, params = {}, [], []
    for i, (name, t) in enumerate(net.state_dict().items()):
        records[f"tensors/{i}"] = t.numpy().tobytes()
        defs.append(tensor_def(t, f"tensors/{i}"))
        params.append((name, i))
    subs = {}
    for name, i in params:
        mod, leaf = name.split(".")
        subs.setdefault(mod, []).append(_param(leaf, i))
    main = _module("model", submodules=[_module(m, parameters=p) for m, p in subs.items()])
    path = tmp_path / "seq.pt"
    write_archive(path, {"protoVersion": "2", "mainModule": main, "tensors": defs}, records)
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    torchckpt.load_into(fresh, path)
    for k, v in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_snake_case_field_names_load_too(tmp_path):
    t = torch.randn(3)
    main = {"name": "m", "parameters": [{"is_buffer": False, "tensor_id": "0", "name": "w"}]}
    model = {"proto_version": "2", "main_module": main,
             "tensors": [{"dims": ["3"], "offset": "0", "strides": ["1"], "data_type": "FLOAT",
                          "data": {"key": "tensors/0"}, "device": "cpu"}]}
    write_archive(tmp_path / "s.pt", model, {"tensors/0": t.numpy().tobytes()})
    assert torch.equal(torchckpt.load(tmp_path / "s.pt")["w"], t)


# --------------------------------------------------------------------------- attacks
def _one(tmp_path, defs=None, params=None, attributes=None, attr_defs=(), records=None, name="x.pt"):
    t = torch.arange(4.0)
    defs = defs if defs is not None else [tensor_def(t, "tensors/0")]
    params = params if params is not None else [_param("w", 0)]
    main = _module("m", parameters=params, attributes=list(attr_defs))
    path = tmp_path / name
    write_archive(path, {"protoVersion": "3", "mainModule": main, "tensors": defs},
                  records if records is not None else {"tensors/0": t.numpy().tobytes()}, attributes)
    return path


def _refused_by_both(path, error=CorruptCheckpointError):
    with pytest.raises(error):
        torchckpt.load(path)
    assert torchckpt.scan(path).status in ("unreadable", "findings")


@pytest.mark.parametrize("tid", ["1", "-1", "99999999999"])
def test_tensor_id_out_of_range(tmp_path, tid):
    _refused_by_both(_one(tmp_path, params=[_param("w", 0), {"isBuffer": False, "tensorId": tid, "name": "v"}]))


def test_attribute_tensor_id_out_of_range(tmp_path):
    attributes = pickle.dumps((_TensorRef(7),), protocol=2)
    _refused_by_both(_one(tmp_path, attributes=attributes,
                          attr_defs=[{"type": "Tensor", "name": "a", "id": "0"}]))


def test_attribute_index_out_of_range(tmp_path):
    attributes = pickle.dumps((_TensorRef(0),), protocol=2)
    _refused_by_both(_one(tmp_path, attributes=attributes, attr_defs=[{"type": "Tensor", "name": "a", "id": "5"}]))


@pytest.mark.parametrize("key", ["../tensors/0", "tensors/../model.json", "/etc/passwd", "model.json",
                                 "attributes.pkl", "code/model.py", "tensors/0\\..\\x", "tensors/missing"])
def test_record_keys_outside_the_tensor_records(tmp_path, key):
    t = torch.arange(4.0)
    _refused_by_both(_one(tmp_path, defs=[tensor_def(t, key)]))


def test_view_beyond_its_record(tmp_path):
    d = tensor_def(torch.arange(4.0), "tensors/0")
    d["dims"], d["strides"] = ["1099511627776"], ["1"]
    _refused_by_both(_one(tmp_path, defs=[d]))


def test_unknown_data_type_and_device(tmp_path):
    d = tensor_def(torch.arange(4.0), "tensors/0")
    _refused_by_both(_one(tmp_path, defs=[{**d, "dataType": "STRING"}], name="a.pt"))
    _refused_by_both(_one(tmp_path, defs=[{**d, "device": "evil:0"}], name="b.pt"))


def test_dangerous_global_in_attributes_is_refused_and_flagged(tmp_path):
    class Evil:
        def __reduce__(self):
            import os
            return os.system, ("true",)

    path = _one(tmp_path, attributes=pickle.dumps((Evil(),), protocol=2),
                attr_defs=[{"type": "int", "name": "a", "id": "0"}])
    with pytest.raises(UnsafeCheckpointError):
        torchckpt.load(path)
    assert torchckpt.scan(path).status == "findings"


def test_build_tensor_from_id_outside_an_old_archive_is_refused(tmp_path):
    buf = io.BytesIO()
    torch.save({"w": _TensorRef(0)}, buf)
    (tmp_path / "new.pt").write_bytes(buf.getvalue())
    _refused_by_both(tmp_path / "new.pt")
