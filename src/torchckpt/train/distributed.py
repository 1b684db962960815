"""Sharded training checkpoints on torch.distributed.checkpoint (DCP): rank-aware save, commit, resume.

Under an initialised process group (``torchrun``), or for a model whose parameters are DTensors
(FSDP2 ``fully_shard``, tensor parallel), :class:`~torchckpt.train.checkpointer.Checkpointer` writes
``ckpt-<step>.dcp/`` through DCP instead of one file: every rank writes only its own shards, and
replicated state (DDP, scheduler, plain values) is written once (DCP's planner deduplicates it).

Commit protocol: ``dcp.save`` returns on a rank only after every rank wrote its data and the
coordinator wrote ``.metadata``; rank 0 then fsyncs the directory and writes the sidecar
``ckpt-<step>.dcp.meta.json`` atomically (the commit marker, listing every file and its size),
and a barrier lets every rank return only after the commit. A directory without its marker is
never listed: a crash of any rank mid-save leaves the previous checkpoint as the latest one.

Resume loads into the model's *current* sharding (DCP reshards: saved on N ranks, resumed on M),
restores optimizer, scheduler, scaler and per-rank RNG / ``stateful`` states (each rank its own
when the world size is unchanged). torch is imported lazily: ``import torchckpt`` stays light.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shutil
import sys
import warnings
from typing import Any, Callable, Iterator, Mapping

from ..errors import CheckpointNotFoundError, CheckpointWriteError, CorruptCheckpointError, ResumeError
from ..read.load import read_checkpoint
from ..read import TensorMeta
from ..storage.atomic import fsync_dir
from .restore import restore_object, restore_rng_state
from .store import Entry
from . import sidecar
from .training import TrainingState, get_rng_state, json_safe, plain_number, versions

__all__ = ["in_use", "rank_and_world", "is_committer", "DcpSaver", "entries", "is_dcp", "reclaim", "resume_dcp",
           "resume_one",
           "remove", "DCP_FORMAT", "DCP_NAME"]

DCP_FORMAT = "torchckpt.training.dcp/1"
DCP_NAME = re.compile(r"^ckpt-(\d+)\.dcp$")


# --------------------------------------------------------------------------- where are we
def _dist() -> Any:
    import torch.distributed as dist  # lazy: torch only when a checkpoint is written or read

    return dist if dist.is_available() and dist.is_initialized() else None


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def is_committer() -> bool:
    """True on the rank that commits, holds the directory's writer lock and applies retention (rank 0, or
    the only process). No process group exists before torch.distributed is imported: torch stays unloaded."""
    return "torch.distributed" not in sys.modules or rank_and_world()[0] == 0


def has_dtensors(model: Any) -> bool:
    """Whether ``model`` has DTensor parameters. No DTensor exists before torch.distributed.tensor is
    imported: a plain model never pays for that import (seconds)."""
    tensor_mod = sys.modules.get("torch.distributed.tensor")
    if tensor_mod is None or model is None or not hasattr(model, "parameters"):
        return False
    return any(isinstance(p, tensor_mod.DTensor) for p in model.parameters())


def in_use(model: Any) -> bool:
    """Whether checkpoints go through DCP: a process group is initialised or the model is sharded."""
    return _dist() is not None or has_dtensors(model)


def dcp_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"ckpt-{step:010d}.dcp")


# --------------------------------------------------------------------------- capture
def _model_and_optim(model: Any, optimizer: Any) -> dict[str, Any]:
    """Model and optimizer state in DCP's canonical form: parameter names as keys, shards as DTensors."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    out: dict[str, Any] = {}
    if model is not None:
        out["model"] = get_model_state_dict(model)
    if optimizer is not None:
        if model is None:
            raise TypeError("a distributed checkpoint of an optimizer needs model=... (its parameter names)")
        out["optimizer"] = _each(optimizer, lambda o: get_optimizer_state_dict(model, o))
    return out


def _each(obj: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(obj, Mapping) and not hasattr(obj, "state_dict"):
        return {str(k): _each(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return {str(i): _each(v, fn) for i, v in enumerate(obj)}  # DCP keys are strings
    return fn(obj)


def _plain_state(obj: Any) -> Any:
    return None if obj is None else _each(obj, lambda o: o.state_dict())


def capture_dcp(*, model: Any, optimizer: Any, scheduler: Any, scaler: Any, stateful: Mapping[str, Any] | None,
                extra: Any, info: Mapping[str, Any], rng: bool = True) -> dict[str, Any]:
    """This rank's part of the checkpoint: sharded model/optimizer, replicated values, its own RNG."""
    rank, _ = rank_and_world()
    state = _model_and_optim(model, optimizer)
    for name, obj in (("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None:
            state[name] = _plain_state(obj)
    if extra is not None:
        state["extra"] = extra
    state["info"] = dict(info)
    own: dict[str, Any] = {}
    if rng:
        own["rng"] = _compact_rng(get_rng_state())
    if stateful:
        own["stateful"] = {str(k): _plain_state(v) for k, v in stateful.items()}
    if own:
        state["ranks"] = {str(rank): own}  # each rank adds only its own key: nothing is deduplicated away
    return state


# --------------------------------------------------------------------------- save + commit
class DcpSaver:
    """Writes DCP checkpoints for one Checkpointer; keeps the async stager (warm buffers) and process group."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._stager: Any = None
        self._group: Any = None  # a gloo group of its own for background saves (never the training group)

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any], *,
             async_save: bool) -> tuple[str, Callable[[], None] | None]:
        """Write ``state`` to ``ckpt-<step>.dcp``. Returns (path, finish): ``finish`` is None when the
        checkpoint is committed already, else a callable that completes and commits it (blocking)."""
        import torch.distributed.checkpoint as dcp

        path = dcp_path(self.directory, step)
        dist = _dist()
        if dist is not None and dist.get_rank() == 0:
            _discard_uncommitted(path)
        if dist is not None:
            _barrier(dist, None, path, step, "before writing")  # nobody writes into the directory before it is clean
        if not async_save:
            try:
                with _single_process_quiet():
                    dcp.save(state, checkpoint_id=path, no_dist=dist is None)
            except _failures() as exc:  # any rank's failure surfaces here, on every rank
                raise _write_error(path, exc, step) from None
            self._commit(path, meta, None, step)
            return path, None
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        if self._stager is None:  # reused: staged CPU buffers stay warm from one save to the next
            self._stager = DefaultStager(StagingOptions(False, False, False, False))
        if dist is not None and self._group is None:
            # the caller's timeout, not gloo's 30-minute default: a hung rank must fail every live rank's save
            self._group = dist.new_group(backend="gloo", timeout=caller_timeout(dist))
        try:
            future: Any = dcp.async_save(state, checkpoint_id=path, async_stager=self._stager,
                                    process_group=self._group, no_dist=dist is None)
        except _failures() as exc:
            raise _write_error(path, exc, step) from None

        def finish() -> None:
            try:
                future.result()
            except _failures() as exc:
                raise _write_error(path, exc, step) from None
            self._commit(path, meta, self._group, step)

        return path, finish

    def _commit(self, path: str, meta: dict[str, Any], group: Any, step: int) -> None:
        """Every rank's data and ``.metadata`` are on disk: rank 0 writes the marker, then all meet."""
        dist = _dist()
        if dist is None or dist.get_rank() == 0:
            files = {}
            for name in sorted(os.listdir(path)):
                full = os.path.join(path, name)
                if os.path.isfile(full):
                    files[name] = os.path.getsize(full)
            fsync_dir(path)
            sidecar.write(path, {**meta, "format": DCP_FORMAT, "file": os.path.basename(path), "files": files,
                                 "size": sum(files.values())})
        if dist is not None:
            _barrier(dist, group, path, step, "after the commit")

    def close(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager = None


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it 'assumes the intent' of one process even when told so (no_dist=True)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


def _failures() -> tuple[type[BaseException], ...]:
    """What a DCP save or load raises: any error, and DCP's CheckpointException (a BaseException that
    carries every failed rank's error; DCP raises it on every rank)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return Exception, CheckpointException


def _describe(exc: BaseException) -> str:
    """One line per failed rank (``rank 1: OSError: [Errno 27] File too large``), not DCP's tracebacks."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for rank, wrapped in sorted(failures.items()):
            inner = wrapped[0] if isinstance(wrapped, tuple) and wrapped else wrapped
            parts.append(f"rank {rank}: {_one_line(inner)}")
        return "; ".join(parts)
    return _one_line(exc)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _write_error(path: str, exc: BaseException, step: int | None = None) -> CheckpointWriteError:
    what = f"distributed save of step {step}" if step is not None else "distributed save"
    return CheckpointWriteError(f"{what} failed (seen on rank {rank_and_world()[0]}): {_describe(exc)}",
                                path=path, hint="The previous checkpoint stays the latest one; this directory was "
                                "not committed. Check the failing rank's disk and log, then save again.")


def caller_timeout(dist: Any) -> Any:
    """The timeout of the caller's default process group (``init_process_group(timeout=...)``), for the
    groups torchckpt creates; None (torch's default) when it cannot be read."""
    import torch

    world = dist.group.WORLD
    for device in ("cpu", "cuda"):
        try:
            return world._get_backend(torch.device(device)).options._timeout
        except (AttributeError, RuntimeError, ValueError):
            continue
    return None


def _barrier(dist: Any, group: Any, path: str, step: int, when: str) -> None:
    """A barrier under the group's timeout; a rank that does not arrive (hung, killed) is a typed error."""
    try:
        dist.barrier(group=group)
    except _failures() as exc:
        err = _write_error(path, exc, step)
        raise CheckpointWriteError(f"{err.reason} (waiting for every rank {when}; a rank hung or died?)",
                                   path=path, hint=err.hint) from None


def _discard_uncommitted(path: str) -> None:
    if os.path.isdir(path) and not os.path.exists(sidecar.path_of(path)):
        shutil.rmtree(path, ignore_errors=True)


def remove(path: str) -> None:
    """Delete a DCP checkpoint: the marker first (it stops being a checkpoint), then its directory."""
    try:
        os.remove(sidecar.path_of(path))
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def base_meta(step: int, epoch: int | None, metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    _, world = rank_and_world()
    return {"kind": "dcp", "step": step, "epoch": epoch, "world_size": world,
            "metrics": json_safe({k: plain_number(v) for k, v in (metrics or {}).items()}),
            "versions": versions(), "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}


# --------------------------------------------------------------------------- listing
def is_dcp(path: str) -> bool:
    return DCP_NAME.match(os.path.basename(path)) is not None


def entries(directory: str) -> list[Entry]:
    """Every ``ckpt-<step>.dcp`` directory (or its marker), with what is wrong with it (None: committed).

    A directory without its commit marker is ``unfinished``: a save that is running or was killed.
    """
    try:
        names = set(os.listdir(directory))
    except FileNotFoundError:
        return []
    out = []
    for name in sorted({sidecar.base_name(n) for n in names}):
        m = DCP_NAME.match(name)
        if not m:
            continue
        path = os.path.join(directory, name)
        meta = sidecar.read(path) if os.path.basename(sidecar.path_of(name)) in names else None
        if meta is None:
            problem: str | None = ("it has no commit marker (its save never finished)" if name in names
                                   else "its files are gone")
            out.append(Entry(int(m.group(1)), path, None, problem, unfinished=name in names))
            continue
        problem = None
        if meta.get("format") != DCP_FORMAT or meta.get("file") != name or not isinstance(meta.get("files"), dict):
            problem = "its commit marker was not written by torchckpt for this directory"
        else:
            try:
                verify_dcp(path, meta)
            except CorruptCheckpointError as exc:
                problem = exc.reason
        out.append(Entry(int(m.group(1)), path, meta, problem))
    return out


def resume_one(path: str, *, map_location: Any = None, **objects: Any) -> Any:
    """Resume from one ``ckpt-<step>.dcp`` directory (``map_location`` is not used: DCP loads into the
    objects' own devices). Raises CheckpointNotFoundError if it was never committed, CorruptCheckpointError
    if its files no longer match the commit marker."""
    entry = next((e for e in entries(os.path.dirname(os.path.abspath(path))) if e.path == os.path.abspath(path)),
                 None)
    if entry is None or entry.meta is None:
        raise CheckpointNotFoundError("this sharded checkpoint was never committed (its save did not finish)",
                                      path=path, hint="Resume from the directory that holds it: the newest "
                                      "committed checkpoint is used.")
    if entry.problem is not None:
        raise CorruptCheckpointError(entry.problem, path=path,
                                     hint="Resume from the directory that holds it to fall back to an older one.")
    return resume_dcp(path, entry.meta, **objects)


def reclaim(directory: str) -> list[str]:
    """Remove the directories of sharded saves that never committed (call under the writer lock)."""
    removed = []
    for entry in entries(directory):
        if entry.unfinished:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(os.path.basename(entry.path))
    if removed:
        fsync_dir(directory)
    return removed


def verify_dcp(path: str, meta: Mapping[str, Any]) -> None:
    """Every file the marker lists exists with its recorded size."""
    for name, size in (meta.get("files") or {}).items():
        full = os.path.join(path, name)
        try:
            actual = os.path.getsize(full)
        except OSError:
            raise CorruptCheckpointError(f"{name} is missing from the checkpoint directory", path=path,
                                         hint="The directory was modified after it was committed.") from None
        if actual != size:
            raise CorruptCheckpointError(f"{name} is {actual} bytes but {size} were written", path=path,
                                         hint="The directory was modified after it was committed.")


# --------------------------------------------------------------------------- resume
def resume_dcp(path: str, meta: Mapping[str, Any], *, model: Any, optimizer: Any = None, scheduler: Any = None,
               scaler: Any = None, stateful: Mapping[str, Any] | None = None, restore_rng: bool = True,
               strict: bool = True) -> Any:
    """Load a DCP training checkpoint into the current (possibly differently sharded) objects."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    verify_dcp(path, meta)
    rank, world = rank_and_world()
    saved_world = int(meta.get("world_size") or 1)
    state = TrainingState(path=path, epoch=meta.get("epoch"), step=meta.get("step"),
                          metrics=dict(meta.get("metrics") or {}))
    if saved_world != world:
        state.notes.append(f"saved on {saved_world} rank(s), resumed on {world}: the state was resharded")
    target = _model_and_optim(model, optimizer)
    for name, obj in (("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None:
            target[name] = _plain_state(obj)
    saved = _saved(path)
    if "extra" in saved:
        target["extra"] = _template(saved["extra"])
    source_rank = rank if rank < saved_world else 0
    own: dict[str, Any] = {}
    if restore_rng and rank < saved_world:
        saved_rng = ((saved.get("ranks") or {}).get(str(source_rank)) or {}).get("rng")
        # the template asks for numpy's state exactly when the checkpoint holds it (it is captured only
        # when numpy.random was imported at save time)
        own["rng"] = _compact_rng(get_rng_state(numpy=isinstance(saved_rng, dict) and "numpy" in saved_rng))
    if stateful:
        own["stateful"] = {str(k): _plain_state(v) for k, v in stateful.items()}
    if own:
        target["ranks"] = {str(source_rank): own}
    try:
        with _single_process_quiet():
            dcp.load(target, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=not strict),
                     no_dist=_dist() is None)
    except _failures() as exc:  # DCP reports missing keys, shapes and damage with many types, on every rank
        raise ResumeError(f"loading the distributed checkpoint failed: {_describe(exc)}", path=path,
                          hint="Resume with the same model and optimizer structure as when saving.") from None
    options = StateDictOptions(strict=strict)
    if model is not None:
        result = set_model_state_dict(model, target["model"], options=options)
        if strict and (result.missing_keys or result.unexpected_keys):
            raise ResumeError(f"model keys do not fit: missing {result.missing_keys}, unexpected "
                              f"{result.unexpected_keys}", path=path)
    if optimizer is not None:
        _each_pair(optimizer, target["optimizer"], lambda o, s: set_optimizer_state_dict(model, o, s, options=options))
    for name, obj in (("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None:
            def restore(o: Any, s: Any, what: str = name) -> None:
                restore_object(o, s, what, path)

            _each_pair(obj, target[name], restore)
    mine = (target.get("ranks") or {}).get(str(source_rank)) or {}
    for name, obj in (stateful or {}).items():
        restore_object(obj, (mine.get("stateful") or {}).get(str(name)), f"stateful[{name!r}]", path)
    if source_rank != rank and stateful:
        state.notes.append(f"rank {rank} did not exist when saving: its stateful objects took rank 0's state")
    state.extra = target.get("extra")
    state.rng = _expand_rng(mine.get("rng"))
    if restore_rng:
        if state.rng:
            restore_rng_state(state)  # all or nothing
        else:
            state.notes.append(f"no RNG state for rank {rank} in the checkpoint; randomness will differ")
    return state


def _compact_rng(state: dict[str, Any]) -> dict[str, Any]:
    """Python's RNG state as a tensor (625 ints): staged for an async save as one copy, not 625 objects."""
    import torch

    version, internal, gauss = state["python"]
    return {**state, "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                                "gauss": gauss}}


def _expand_rng(state: Any) -> Any:
    if not isinstance(state, dict) or not isinstance(state.get("python"), dict):
        return state
    py = state["python"]
    return {**state, "python": (py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"])}


def _each_pair(objs: Any, states: Any, fn: Callable[[Any, Any], Any]) -> None:
    if isinstance(objs, Mapping) and not hasattr(objs, "state_dict"):
        for k, v in objs.items():
            _each_pair(v, states[str(k)], fn)
    elif isinstance(objs, (list, tuple)):
        for i, v in enumerate(objs):
            _each_pair(v, states[str(i)], fn)
    else:
        fn(objs, states)


def _saved(path: str) -> dict[str, Any]:
    """The checkpoint's structure (tensors as shapes and dtypes; no tensor data is read)."""
    obj = read_checkpoint(path, meta=True).obj
    return obj if isinstance(obj, dict) else {}


def _template(value: Any) -> Any:
    """A load target for ``value``: DCP fills tensors in place and replaces everything else."""
    if isinstance(value, TensorMeta):
        import torch

        return torch.empty(value.shape, dtype=value.torch_dtype())
    if isinstance(value, dict):
        return {k: _template(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_template(v) for v in value]
    return value
