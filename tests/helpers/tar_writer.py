"""Writes the tar checkpoint format of the first PyTorch releases (test data only)."""

from __future__ import annotations

import io
import pickle
import struct
import tarfile

import torch


def write_torch_tar(obj, path) -> None:
    tensors: dict[int, torch.Tensor] = {}

    class MainPickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, torch.Tensor):
                tensors.setdefault(id(o), o)
                return str(id(o))
            return None

    main = io.BytesIO()
    MainPickler(main, protocol=2).dump(obj)
    storages: dict[int, torch.Tensor] = {}
    for t in tensors.values():
        storages.setdefault(t.untyped_storage().data_ptr(), t)
    sto = io.BytesIO()
    sto.write(pickle.dumps(len(storages), protocol=2))
    for key, t in storages.items():
        raw = bytes(torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).numpy().tobytes())
        sto.write(pickle.dumps((key, "cpu", torch.FloatStorage), protocol=2))
        sto.write(struct.pack("<q", len(raw) // t.element_size()) + raw)
    sto.write(pickle.dumps([], protocol=2))
    ten = io.BytesIO()
    ten.write(pickle.dumps(len(tensors), protocol=2))
    for key, t in tensors.items():
        ten.write(pickle.dumps((key, t.untyped_storage().data_ptr(), None), protocol=2))
        ten.write(struct.pack("<i", t.dim()) + b"\0" * 4)
        ten.write(struct.pack(f"<{t.dim()}q", *t.size()) + struct.pack(f"<{t.dim()}q", *t.stride()))
        ten.write(struct.pack("<q", t.storage_offset()))
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in (("sys_info", pickle.dumps({"protocol_version": 1000}, protocol=2)),
                           ("pickle", main.getvalue()), ("storages", sto.getvalue()), ("tensors", ten.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
