"""Training checkpoints that resume bit-for-bit: ``save``, ``resume`` and ``TrainingState``.

A training checkpoint is one zip-format ``.pt`` file written atomically, plus a small JSON sidecar
(``<file>.meta.json``) that is written last. The sidecar is the commit marker: it holds step, epoch,
metrics, versions, the size and a content digest (sha256 over the members' names, sizes and the
CRC-32s torch computes while writing), so a directory can be listed without unpickling anything and
a truncated or damaged file is detected (every byte is checked against its CRC on resume).

Besides the objects given, the file records every RNG (Python ``random``, numpy, torch CPU, every
CUDA device). :class:`~torchckpt.train.sampler.ResumableSampler` (or any object with ``state_dict`` /
``load_state_dict`` passed in ``stateful``) makes the data order resume mid-epoch too.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import random
import zipfile
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..storage.atomic import atomic_write, file_sha256, write_json_atomic
from ..errors import CorruptCheckpointError, ResumeError
from ..read.formats.folders import is_accelerate_folder

__all__ = ["save", "resume", "TrainingState", "capture", "meta_path", "read_meta", "verify"]

FORMAT = "torchckpt.training/1"
META_SUFFIX = ".meta.json"


def meta_path(path: str) -> str:
    return os.fspath(path) + META_SUFFIX


@dataclass
class TrainingState:
    """What :func:`resume` restored. ``epoch``/``step``/``metrics``/``extra`` are as saved."""

    path: str
    epoch: int | None = None
    step: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: Any = None
    rng: dict[str, Any] | None = None
    report: Any = None  # the LoadReport of the model weights
    notes: list[str] = field(default_factory=list)

    def restore_rng(self) -> None:
        """Restore every RNG as saved (``resume`` does this unless ``restore_rng=False``)."""
        if self.rng:
            set_rng_state(self.rng)


# --------------------------------------------------------------------------- capture
def unwrap(model: Any) -> Any:
    """The module inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        inner = getattr(model, "_orig_mod", None)
        if inner is None and type(model).__name__ in ("DataParallel", "DistributedDataParallel") \
                and hasattr(model, "module"):
            inner = model.module
        if inner is None:
            return model
        model = inner
    return model


def clean_state_dict(model: Any) -> dict[str, Any]:
    sd = unwrap(model).state_dict()
    if any("_orig_mod." in k for k in sd):  # compiled sub-modules
        from collections import OrderedDict

        from ..fit.align import strip_compile

        sd = OrderedDict((strip_compile(k), v) for k, v in sd.items())
    return sd


def get_rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # numpy's state as a tensor and plain values: the file stays loadable by torch.load(weights_only=True)
    state: dict[str, Any] = {"python": random.getstate(),
                             "numpy": {"bit_generator": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                                       "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    mps = getattr(torch, "mps", None)
    if mps is not None and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        try:
            state["mps"] = torch.mps.get_rng_state()
        except RuntimeError:  # pragma: no cover
            pass
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    import numpy as np
    import torch

    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        saved = state["numpy"]
        if isinstance(saved, dict):
            keys = np.asarray(saved["keys"].numpy() if hasattr(saved["keys"], "numpy") else saved["keys"], np.uint32)
            saved = (saved["bit_generator"], keys, saved["pos"], saved["has_gauss"], saved["cached_gaussian"])
        np.random.set_state(tuple(saved))
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if "cuda" in state and torch.cuda.is_available():
        states = [torch.as_tensor(s, dtype=torch.uint8).cpu() for s in state["cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    if "mps" in state and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        torch.mps.set_rng_state(torch.as_tensor(state["mps"], dtype=torch.uint8).cpu())


def _state_of(obj: Any, what: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping) and not hasattr(obj, "state_dict"):
        return {name: _state_of(o, f"{what}[{name!r}]") for name, o in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_state_of(o, f"{what}[{i}]") for i, o in enumerate(obj)]
    if not hasattr(obj, "state_dict"):
        raise TypeError(f"{what} has no state_dict(): {type(obj).__name__}")
    return obj.state_dict()


def versions() -> dict[str, str]:
    import numpy
    import torch

    from .._version import __version__

    return {"torch": str(torch.__version__), "torchckpt": __version__, "python": platform.python_version(),
            "numpy": str(numpy.__version__)}


def capture(*, model: Any = None, optimizer: Any = None, scheduler: Any = None, scaler: Any = None,
            epoch: int | None = None, step: int | None = None, metrics: Mapping[str, Any] | None = None,
            extra: Any = None, stateful: Mapping[str, Any] | None = None, rng: bool = True) -> dict[str, Any]:
    """The checkpoint payload as a plain dict (tensors still live where they are)."""
    payload: dict[str, Any] = {"format": FORMAT, "epoch": epoch, "step": step,
                               "metrics": {k: _plain_number(v) for k, v in (metrics or {}).items()},
                               "extra": extra, "versions": versions(),
                               "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    if model is not None:
        payload["model"] = clean_state_dict(model)
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None:
            payload[name] = _state_of(obj, name)
    if stateful:
        payload["stateful"] = {name: _state_of(obj, f"stateful[{name!r}]") for name, obj in stateful.items()}
    if rng:
        payload["rng"] = get_rng_state()
    return payload


def _plain_number(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        return value.item()
    return value


# --------------------------------------------------------------------------- write / read
def write_payload(path: str, payload: dict[str, Any], weights_format: str = "pt") -> dict[str, Any]:
    """Write payload atomically, then its sidecar (the commit marker). Returns the sidecar document."""
    import torch

    path = os.fspath(path)
    digest: dict[str, Any] = {}
    files = [os.path.basename(path)]
    if weights_format == "safetensors" and "model" in payload:
        from safetensors.torch import save as st_save

        weights_path = path + ".safetensors"
        data = st_save(_safetensors_ready(payload["model"]))
        with atomic_write(weights_path) as fh:
            fh.write(data)
        digest["weights_sha256"] = hashlib.sha256(data).hexdigest()
        digest["weights_size"] = len(data)
        del data
        payload = {**payload, "model": None, "model_file": os.path.basename(weights_path)}
        files.append(os.path.basename(weights_path))
    elif weights_format != "pt":
        raise ValueError(f"weights_format must be 'pt' or 'safetensors', not {weights_format!r}")
    with atomic_write(path) as fh:
        torch.save(payload, fh)
    meta = {"format": FORMAT, "file": os.path.basename(path), "files": files, "content_sha256": zip_digest(path),
            "size": os.path.getsize(path), "epoch": payload.get("epoch"), "step": payload.get("step"),
            "metrics": _json_safe(payload.get("metrics") or {}), "versions": payload.get("versions"),
            "created": payload.get("created"), **digest}
    write_json_atomic(meta_path(path), meta)
    return meta


def _safetensors_ready(sd: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    seen: dict[tuple, str] = {}
    for k, v in sd.items():
        t = v.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        out[k] = t.contiguous().clone() if key in seen else t.contiguous()
        seen.setdefault(key, k)
    return out


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in value.items()} \
            if isinstance(value, dict) else repr(value)


def read_meta(path: str) -> dict[str, Any] | None:
    try:
        with open(meta_path(path), encoding="utf-8") as fh:
            meta = json.load(fh)
        return meta if isinstance(meta, dict) else None
    except (OSError, ValueError):
        return None


def zip_digest(path: str) -> str:
    """sha256 over every member's name, size and CRC-32 (which torch computes while writing the zip).

    Recording it costs a read of the zip directory, not of the data; :func:`verify` then checks the
    data against the member CRCs.
    """
    with zipfile.ZipFile(path) as zf:
        records = [(i.filename, i.file_size, i.CRC) for i in zf.infolist()]
    return hashlib.sha256(json.dumps(records).encode()).hexdigest()


def verify(path: str, meta: Mapping[str, Any] | None = None) -> None:
    """Check a checkpoint against its sidecar: size, content digest, and every byte against its CRC-32.

    Raises CorruptCheckpointError naming what does not match. Files without a sidecar are not checked.
    """
    meta = meta if meta is not None else read_meta(path)
    if meta is None:
        return
    damaged = "The file was modified or damaged after it was saved."
    try:
        size = os.path.getsize(path)
    except OSError:
        raise CorruptCheckpointError("the checkpoint file is missing although its sidecar exists", path=path) from None
    if size != meta.get("size"):
        raise CorruptCheckpointError(f"the file is {size} bytes but {meta.get('size')} were written (truncated?)",
                                     path=path, hint=damaged)
    try:
        if zip_digest(path) != meta.get("content_sha256"):
            raise CorruptCheckpointError("the content digest does not match the one recorded when it was written",
                                         path=path, hint=damaged)
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CorruptCheckpointError(f"the zip structure is damaged ({exc})", path=path, hint=damaged) from None
    if bad is not None:
        raise CorruptCheckpointError(f"member {bad} fails its CRC-32 check", path=path, hint=damaged)
    weights = meta.get("weights_sha256")
    if weights:
        wpath = path + ".safetensors"
        if not os.path.exists(wpath) or file_sha256(wpath)[0] != weights:
            raise CorruptCheckpointError("the weights file is missing or does not match its sha256", path=wpath,
                                         hint=damaged)


def save(path: str, *, model: Any = None, optimizer: Any = None, scheduler: Any = None, scaler: Any = None,
         epoch: int | None = None, step: int | None = None, metrics: Mapping[str, Any] | None = None,
         extra: Any = None, stateful: Mapping[str, Any] | None = None, weights_format: str = "pt",
         rng: bool = True) -> dict[str, Any]:
    """Write a training checkpoint atomically and durably; returns its sidecar (sha256, size, step ...).

    ``model`` may be wrapped (DataParallel, DDP, torch.compile): the weights are saved with clean
    names. ``optimizer``/``scheduler`` may also be dicts or lists of them. ``stateful`` holds any other
    objects with ``state_dict()``/``load_state_dict()`` (a :class:`~torchckpt.train.sampler.ResumableSampler`,
    an EMA helper ...). RNG states are recorded unless ``rng=False``. With
    ``weights_format="safetensors"`` the weights go to ``<path>.safetensors`` beside the training state.
    """
    payload = capture(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, epoch=epoch, step=step,
                      metrics=metrics, extra=extra, stateful=stateful, rng=rng)
    return write_payload(os.fspath(path), payload, weights_format)


def _load_payload(path: str, map_location: Any) -> dict[str, Any]:
    from ..read.load import load

    payload = load(path, map_location=map_location or "cpu")
    if not isinstance(payload, dict):
        raise ResumeError("not a training checkpoint (the file holds a "
                          f"{type(payload).__name__})", path=path,
                          hint="Use torchckpt.load_into(model, path) to load weights only.")
    model_file = payload.get("model_file")
    if model_file and payload.get("model") is None:
        payload["model"] = load(os.path.join(os.path.dirname(os.path.abspath(path)), model_file))
    return payload


def _restore(obj: Any, state: Any, what: str, path: str) -> None:
    if obj is None:
        return
    if state is None:
        raise ResumeError(f"the checkpoint has no {what} state", path=path,
                          hint=f"Do not pass {what}=..., or resume from a checkpoint saved with it.")
    if isinstance(obj, Mapping) and not hasattr(obj, "load_state_dict"):
        for name, o in obj.items():
            if name not in state:
                raise ResumeError(f"the checkpoint has no {what}[{name!r}] state (it has {sorted(state)})", path=path)
            _restore(o, state[name], f"{what}[{name!r}]", path)
        return
    if isinstance(obj, (list, tuple)):
        if not isinstance(state, list) or len(state) != len(obj):
            raise ResumeError(f"{what}: {len(obj)} objects given, the checkpoint has "
                              f"{len(state) if isinstance(state, list) else 1}", path=path)
        for i, (o, s) in enumerate(zip(obj, state)):
            _restore(o, s, f"{what}[{i}]", path)
        return
    if what.startswith("optimizer"):
        _check_param_groups(obj, state, what, path)
    try:
        obj.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise ResumeError(f"restoring {what} failed: {exc}", path=path) from None


def _check_param_groups(optimizer: Any, state: Mapping[str, Any], what: str, path: str) -> None:
    saved = state.get("param_groups") if isinstance(state, Mapping) else None
    if not isinstance(saved, list):
        raise ResumeError(f"{what} state has no param_groups", path=path)
    current = optimizer.param_groups
    if len(saved) != len(current) or any(len(a["params"]) != len(b["params"]) for a, b in zip(saved, current)):
        have = [len(g["params"]) for g in current]
        had = [len(g["params"]) for g in saved]
        raise ResumeError(f"{what} parameter groups do not fit: the checkpoint has {had} parameters per group, "
                          f"the optimizer {have}", path=path,
                          hint="Build the optimizer over the same parameters, in the same order, as when saving.")


def resume(path_or_dir: str, *, model: Any, optimizer: Any = None, scheduler: Any = None, scaler: Any = None,
           stateful: Mapping[str, Any] | None = None, map_location: Any = None, restore_rng: bool = True,
           strict: bool = True) -> TrainingState:
    """Restore a training run from a checkpoint file, or from the newest complete one in a directory.

    An accelerate ``save_state`` folder is restored as one checkpoint (model, optimizer, scheduler,
    scaler and the RNG states of process 0).

    Restores the model (through ``load_into``, so DataParallel-saved weights resume into a plain
    model and the reverse), optimizer (its state moved to the parameters' devices), scheduler,
    scaler, ``stateful`` objects and, unless ``restore_rng=False``, every RNG. Refuses clearly when
    the optimizer's parameter groups do not fit. A file whose sha256 does not match its sidecar is refused.
    """
    path = os.fspath(path_or_dir)
    if os.path.isdir(path) and not is_accelerate_folder(path):  # accelerate folders load as one payload
        from .checkpointer import Checkpointer

        return Checkpointer(path).resume(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                         stateful=stateful, map_location=map_location, restore_rng=restore_rng,
                                         strict=strict)
    verify(path)
    payload = _load_payload(path, map_location)
    state = TrainingState(path=path, epoch=payload.get("epoch"), step=payload.get("step"),
                          metrics=dict(payload.get("metrics") or {}), extra=payload.get("extra"),
                          rng=payload.get("rng"))
    if payload.get("format") != FORMAT:
        state.notes.append("not written by torchckpt.save: restored what could be recognised")
    weights = payload.get("model")
    if weights is None:
        weights = payload  # a plain training dict (state_dict / model_state_dict ...): let load_into find it
    from ..fit.load_into import load_into

    state.report = load_into(model, weights, strict=strict)
    _restore(optimizer, payload.get("optimizer", payload.get("optimizer_state_dict")), "optimizer", path)
    _restore(scheduler, payload.get("scheduler", payload.get("lr_scheduler")), "scheduler", path)
    _restore(scaler, payload.get("scaler"), "scaler", path)
    for name, obj in (stateful or {}).items():
        _restore(obj, (payload.get("stateful") or {}).get(name), f"stateful[{name!r}]", path)
    if restore_rng:
        if state.rng:
            state.restore_rng()
        else:
            state.notes.append("the checkpoint holds no RNG state; randomness will differ from the original run")
    return state

