"""Training checkpoints that resume bit-for-bit: the writing side (``save``, capture, verify).

A training checkpoint is one zip-format ``.pt`` file written atomically, plus a small JSON sidecar
(``<file>.meta.json``) that is written last. The sidecar is the commit marker: it holds step, epoch,
metrics, versions, the size and a content digest (sha256 over the members' names, sizes and the
CRC-32s torch computes while writing), so a directory can be listed without unpickling anything and
a truncated or damaged file is detected (every byte is checked against its CRC on resume).

Besides the objects given, the file records every RNG (Python ``random``, numpy, torch CPU, every
CUDA device). :class:`~torchckpt.train.sampler.ResumableSampler` (or any object with ``state_dict`` /
``load_state_dict`` passed in ``stateful``) makes the data order resume mid-epoch too.
Reading one back is :mod:`torchckpt.train.restore`; a directory of them is
:mod:`torchckpt.train.checkpointer`, which also holds the public ``resume``.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import platform
import random
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from .._version import __version__
from ..errors import CheckpointWriteError, CorruptCheckpointError
from ..fit.align import strip_compile
from ..storage.atomic import AtomicFiles, file_sha256
from .. import read  # the face is lazy: the readers load when a safetensors file is first written
from ..storage.reclaim import remove_file
from . import sidecar

__all__ = ["write_payload", "StagedPayload", "write_data", "discard", "TrainingState", "capture", "verify"]

FORMAT = "torchckpt.training/1"


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
    optimizer: Any = None  # an OptimizerRemap when the optimizer state was remapped (the model changed)
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        """Short: the RNG states are summarised (they are hundreds of numbers), the load report is one line."""
        rng = f"<{', '.join(map(str, self.rng))}>" if isinstance(self.rng, dict) else repr(self.rng)
        report = self.report.summary_line() if hasattr(self.report, "summary_line") else repr(self.report)
        extra = repr(self.extra)
        extra = extra if len(extra) <= 200 else extra[:197] + "..."
        return (f"TrainingState(path={self.path!r}, epoch={self.epoch!r}, step={self.step!r}, "
                f"metrics={self.metrics!r}, extra={extra}, rng={rng}, report={report!r}, notes={self.notes!r})")

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
    sd: dict[str, Any] = unwrap(model).state_dict()
    if any("_orig_mod." in k for k in sd):  # compiled sub-modules
        from collections import OrderedDict

        sd = OrderedDict((strip_compile(k), v) for k, v in sd.items())
    return sd


def get_rng_state(*, numpy: bool | None = None) -> dict[str, Any]:
    """Every RNG's state. numpy's global generator only when ``numpy.random`` is already imported
    (``numpy=None``): before that import the generator does not exist, so there is nothing to restore,
    and importing it costs ~90 ms on the first save. ``numpy=True`` captures it anyway (a resume
    template for a checkpoint that holds it), ``numpy=False`` never."""
    import torch

    state: dict[str, Any] = {"python": random.getstate()}
    if numpy or (numpy is None and "numpy.random" in sys.modules):
        import numpy as np  # lazy: only when the program uses (or the checkpoint holds) numpy's RNG

        legacy_state: Any = np.random.get_state()  # legacy=True: (kind, keys, pos, has_gauss, cached)
        kind, keys, pos, has_gauss, cached = legacy_state
        # numpy's state as a tensor and plain values: the file stays loadable by torch.load(weights_only=True)
        state["numpy"] = {"bit_generator": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                          "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state["torch"] = torch.get_rng_state()
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
    """Restores the RNGs ``state`` holds; numpy (imported only then) only when it holds numpy's."""
    import torch

    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np  # lazy: a checkpoint without numpy's state leaves numpy unimported

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
    import torch

    out = {"torch": str(torch.__version__), "torchckpt": __version__, "python": platform.python_version()}
    numpy = sys.modules.get("numpy")  # not imported for this: torch imports it when it is installed
    if numpy is not None:
        out["numpy"] = str(numpy.__version__)
    return out


def capture(*, model: Any = None, optimizer: Any = None, scheduler: Any = None, scaler: Any = None,
            epoch: int | None = None, step: int | None = None, metrics: Mapping[str, Any] | None = None,
            extra: Any = None, stateful: Mapping[str, Any] | None = None, rng: bool = True) -> dict[str, Any]:
    """The checkpoint payload as a plain dict (tensors still live where they are)."""
    payload: dict[str, Any] = {"format": FORMAT, "epoch": epoch, "step": step,
                               "metrics": {k: plain_number(v) for k, v in (metrics or {}).items()},
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


def plain_number(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        return value.item()
    return value


# --------------------------------------------------------------------------- write / read
def write_payload(path: str, payload: dict[str, Any], weights_format: str = "pt") -> dict[str, Any]:
    """Write payload and its sidecar (the commit record) atomically and durably. Returns the sidecar document.

    The data file(s) and the sidecar are written under temp names (:meth:`StagedPayload.write`) and renamed
    with the sidecar last, after the old sidecar (when overwriting) is removed (:meth:`StagedPayload.publish`).
    Overwriting, every file is durable before it replaces anything: a crash at any moment leaves the old
    files, or old or new data without a sidecar (complete, unverified), or the new checkpoint; never new
    data beside the old sidecar. A new checkpoint is renamed first and fsynced together with its
    directory (one disk flush, not two): a power loss before the save returns can leave it incomplete
    under its names, which its sidecar's size and digest refuse (a Checkpointer then resumes the previous
    one; a kill leaves it complete). The save returns only once everything is durable. If anything cannot
    be written, no file of this checkpoint stays under its final name.
    """
    staged = StagedPayload(path)
    try:
        staged.write(payload, weights_format)
        staged.publish()
    finally:
        staged.abort()  # (nothing once published; on a failure its files are removed already)
    return staged.meta


class StagedPayload:
    """One save of the checkpoint at ``path`` in two phases (:class:`~torchckpt.train.store.Staging`):
    :meth:`write` puts its data file(s) and sidecar under temp names beside it (neither durable nor visible),
    :meth:`publish` commits them, :meth:`abort` removes them. Made before anything is written, so that its
    owner can always remove what an interrupted write left. An async save's write-through publishes it in the
    writer's thread."""

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        self.meta: dict[str, Any] = {}
        self._group = AtomicFiles(os.path.dirname(os.path.abspath(self.path)))

    def write(self, payload: dict[str, Any], weights_format: str = "pt") -> None:
        """Write the files under temp names and stage the sidecar; if anything fails (Ctrl-C included, which stops
        the writing), nothing of it stays."""
        try:
            self.meta = write_data(self.path, payload, weights_format, group=self._group)
            sidecar.write_into(self._group, self.path, self.meta)
        except BaseException as exc:
            self._group.abort()
            if isinstance(exc, CheckpointWriteError) and getattr(exc, "errno", None) == errno.ENOSPC:
                exc.reason += f"; this checkpoint needs about {_mib(_payload_nbytes(payload))} for its tensors alone"
            raise

    def publish(self) -> None:
        """fsync, rename (the sidecar last, the old sidecar removed first), fsync the directory; on failure no
        file of it stays under its final name (:meth:`AtomicFiles.publish`)."""
        try:
            self._group.publish(remove_first=[sidecar.path_of(self.path)], verified=True)  # the sidecar checks the data
        except CheckpointWriteError as exc:
            if getattr(exc, "errno", None) == errno.ENOSPC:
                size = int(self.meta.get("size") or 0) + int(self.meta.get("weights_size") or 0)
                exc.reason += f"; this checkpoint needs about {_mib(size)}"
            raise

    def abort(self) -> None:
        """Remove every file of it (nothing once published)."""
        self._group.abort()


def data_files(path: str) -> list[str]:
    """Every file of the checkpoint at ``path``: data, weights, sidecar (sidecar first)."""
    return [sidecar.path_of(path), path, path + ".safetensors"]


def discard(path: str, *, quiet: bool = False) -> None:
    """Remove every file of the checkpoint at ``path`` that exists (sidecar first); ``quiet``: best effort."""
    for victim in data_files(path):
        with contextlib.suppress(OSError if quiet else FileNotFoundError):
            remove_file(victim)  # the name goes now; a large file's content is freed in the background


def _payload_nbytes(payload: Any) -> int:
    import torch

    seen: set[int] = set()
    total = 0
    stack = [payload]
    while stack:
        value = stack.pop()
        if id(value) in seen:  # each shared tensor or container once (a DAG is not walked 2^depth times)
            continue
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        # by type(), not isinstance(): an async snapshot's stand-in for an object reports the original's class
        elif issubclass(type(value), Mapping):
            stack.extend(value.values())
        elif issubclass(type(value), (list, tuple)):
            stack.extend(value)
    return total


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def write_data(path: str, payload: dict[str, Any], weights_format: str = "pt",
               group: AtomicFiles | None = None) -> dict[str, Any]:
    """Write the data file(s) of a checkpoint; returns the sidecar document (not yet written).

    Without ``group`` the files are published atomically and durably here; with one, they are only
    written into it (the caller adds the sidecar and publishes them all together).
    """
    import torch

    path = os.fspath(path)
    if group is None:
        with AtomicFiles(os.path.dirname(os.path.abspath(path))) as own:
            meta = write_data(path, payload, weights_format, group=own)
            own.publish()
        return meta
    digest: dict[str, Any] = {}
    files = [os.path.basename(path)]
    if weights_format == "safetensors" and "model" in payload:
        weights_path = path + ".safetensors"
        with group.write(weights_path) as fh:
            digest["weights_sha256"], digest["weights_size"] = _write_safetensors(fh, payload["model"])
        payload = {**payload, "model": None, "model_file": os.path.basename(weights_path)}
        files.append(os.path.basename(weights_path))
    elif weights_format != "pt":
        raise ValueError(f"weights_format must be 'pt' or 'safetensors', not {weights_format!r}")
    with group.write(path) as fh:
        torch.save(payload, fh)
    written = group.temps[os.path.abspath(path)]  # read back before publishing: the digest goes in the sidecar
    meta = {"format": FORMAT, "file": os.path.basename(path), "files": files, "content_sha256": zip_digest(written),
            "size": os.path.getsize(written), "epoch": payload.get("epoch"), "step": payload.get("step"),
            "metrics": json_safe(payload.get("metrics") or {}), "versions": payload.get("versions"),
            "created": payload.get("created"), **digest}
    return meta


def _write_safetensors(fh: Any, sd: Mapping[str, Any]) -> tuple[str, int]:
    """Stream ``sd`` to ``fh`` as safetensors, one tensor at a time; returns (sha256, size) of what was written.

    The digest is computed in the same pass over the same bytes (no second copy of the model in memory,
    no re-read of the file). Tied tensors are stored once (:func:`torchckpt.read.write_safetensors`).
    """
    sha = hashlib.sha256()
    written = read.write_safetensors(fh, sd.items(), {"format": "pt"}, on_bytes=sha.update, refuse=_refuse_dtype)
    return sha.hexdigest(), written.size


def _refuse_dtype(name: str, dtype: str) -> Exception:
    return ValueError(f"weights_format='safetensors' cannot store {name} of dtype {dtype}; use weights_format='pt'")


def json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in value.items()} \
            if isinstance(value, dict) else repr(value)


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
    meta = meta if meta is not None else sidecar.read(path)
    if meta is None:
        return
    damaged = "The file was modified or damaged after it was saved."
    if not isinstance(meta.get("size"), int) or not isinstance(meta.get("content_sha256"), str):
        raise CorruptCheckpointError("the sidecar lacks the size or content digest of the file", path=sidecar.path_of(path),
                                     hint=damaged)
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
    except CorruptCheckpointError:
        raise
    # zipfile raises whatever a damaged header leads to: unknown compression or encryption flags
    # (NotImplementedError, RuntimeError), undecodable names (UnicodeDecodeError), bad numbers ...
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError, ValueError, KeyError,
            struct.error, zlib.error, OverflowError) as exc:
        raise CorruptCheckpointError(f"the zip structure is damaged ({type(exc).__name__}: {exc})", path=path,
                                     hint=damaged) from None
    if bad is not None:
        raise CorruptCheckpointError(f"member {bad} fails its CRC-32 check", path=path, hint=damaged)
    weights = meta.get("weights_sha256")
    if weights:
        wpath = path + ".safetensors"
        if not os.path.exists(wpath) or file_sha256(wpath)[0] != weights:
            raise CorruptCheckpointError("the weights file is missing or does not match its sha256", path=wpath,
                                         hint=damaged)
