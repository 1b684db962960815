"""Restoring a training run from one checkpoint file: model, optimizer, scheduler, scaler, RNGs.

Every value comes from an untrusted file: each piece is checked before it reaches the objects it
restores, and what does not fit raises :class:`~torchckpt.errors.ResumeError` (or a
:class:`~torchckpt.errors.CheckpointError` for a damaged file) naming the file and the difference.
The directory side (newest complete checkpoint, fallbacks) is :mod:`torchckpt.train.checkpointer`.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import CheckpointError, ResumeError
from ..storage.source import confined_path
from .optimizer_map import remap_optimizer_state
from .training import FORMAT, TrainingState, get_rng_state, set_rng_state, verify

if TYPE_CHECKING:  # names for type checkers only: fit/ is imported when a resume runs
    from ..fit.align import RenameSpec
    from ..transforms import TransformSpec

__all__ = ["resume_file", "load_payload", "read_payload"]

IN_MEMORY = "<in-memory checkpoint>"  # the name load_into gives a dict; resume puts the file name back


def load_payload(path: str, map_location: Any) -> dict[str, Any]:
    """The payload of a training checkpoint file as a dict, its separate weights file (confined) loaded in."""
    return read_payload(path, map_location)[0]


def read_payload(path: str, map_location: Any) -> tuple[dict[str, Any], str]:
    """:func:`load_payload` and the file's format description (``"PyTorch zip format (torch >= 1.6)"``)."""
    from ..read.load import load  # start-up cost: the readers load on the first resume, not with torchckpt.save

    payload, info = load(path, map_location=map_location or "cpu", return_info=True)
    if not isinstance(payload, dict):
        raise ResumeError("not a training checkpoint (the file holds a "
                          f"{type(payload).__name__})", path=path,
                          hint="Use torchckpt.load_into(model, path) to load weights only.")
    model_file = payload.get("model_file")
    if model_file is not None and payload.get("model") is None:
        # the payload is untrusted: the weights file it names must lie beside it
        payload["model"] = load(confined_path(os.path.dirname(os.path.abspath(path)), model_file,
                                              what="weights file", checkpoint=path), map_location=map_location or "cpu")
    return payload, info.description


# top-level keys of the training dicts people write by hand (PyTorch tutorials, ImageNet example,
# Lightning): what resume restores itself; every other key is kept in TrainingState.extra
_RESTORED_KEYS = frozenset({"format", "epoch", "step", "global_step", "metrics", "extra", "versions", "created",
                            "model", "model_file", "state_dict", "model_state_dict", "optimizer",
                            "optimizer_state_dict", "scheduler", "lr_scheduler", "scaler", "stateful", "rng"})


def _foreign_extra(payload: Mapping[str, Any], weights_key: str) -> dict[str, Any]:
    top = weights_key.split(".", 1)[0] if weights_key and weights_key != "<root>" else None
    return {k: v for k, v in payload.items() if k not in _RESTORED_KEYS and k != top}


def restore_object(obj: Any, state: Any, what: str, path: str) -> None:
    if obj is None:
        return
    if state is None:
        raise ResumeError(f"the checkpoint has no {what} state", path=path,
                          hint=f"Do not pass {what}=..., or resume from a checkpoint saved with it.")
    if isinstance(obj, Mapping) and not hasattr(obj, "load_state_dict"):
        if not isinstance(state, Mapping):
            raise ResumeError(f"{what}: a dict of {len(obj)} objects given, the checkpoint holds a "
                              f"{type(state).__name__}", path=path)
        for name, o in obj.items():
            if name not in state:
                raise ResumeError(f"the checkpoint has no {what}[{name!r}] state (it has {sorted(map(str, state))})",
                                  path=path)
            restore_object(o, state[name], f"{what}[{name!r}]", path)
        return
    if isinstance(obj, (list, tuple)):
        if not isinstance(state, list) or len(state) != len(obj):
            raise ResumeError(f"{what}: {len(obj)} objects given, the checkpoint has "
                              f"{len(state) if isinstance(state, list) else 1}", path=path)
        for i, (o, s) in enumerate(zip(obj, state)):
            restore_object(o, s, f"{what}[{i}]", path)
        return
    if what.startswith("optimizer"):
        _check_optimizer_state(obj, state, what, path)
        _check_optimizer_values(obj, state, what, path)
    elif what.startswith(("scheduler", "scaler")):
        _check_like_current(obj, state, what, path)
    try:
        obj.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError, OverflowError) as exc:
        raise ResumeError(f"restoring {what} ({type(obj).__name__}) failed: {type(exc).__name__}: {exc}",
                          path=path, hint="The saved state does not fit this object, or it is damaged.") from None


# flags torch added to every optimizer over the versions; their presence says nothing about the type
_OPTIMIZER_FLAGS = frozenset({"params", "maximize", "foreach", "capturable", "differentiable", "fused",
                              "decoupled_weight_decay", "weight_decay", "lr"})


def _check_optimizer_state(optimizer: Any, state: Any, what: str, path: str) -> None:
    """Refuse, naming the difference, optimizer state that cannot fit: its groups or its type."""
    hint = "Build the optimizer over the same parameters, in the same order, as when saving."
    saved = state.get("param_groups") if isinstance(state, Mapping) else None
    if not isinstance(saved, list) or not all(isinstance(g, Mapping) and isinstance(g.get("params"), list)
                                              for g in saved) or not isinstance(state.get("state", {}), Mapping):
        raise ResumeError(f"{what} state is malformed (it needs 'param_groups', a list of groups with 'params', "
                          "and 'state', a dict)", path=path, hint=hint)
    current = optimizer.param_groups
    if len(saved) != len(current) or any(len(a["params"]) != len(b["params"]) for a, b in zip(saved, current)):
        have = [len(g["params"]) for g in current]
        had = [len(g["params"]) for g in saved]
        raise ResumeError(f"{what} parameter groups do not fit: the checkpoint has {had} parameters per group, "
                          f"the optimizer {have}", path=path, hint=hint)
    for i, (had, have) in enumerate(zip(saved, current)):
        for key in sorted(set(had) & set(have) - {"params"}, key=str):
            if not _same_kind(had[key], have[key]):
                raise ResumeError(f"{what} parameter group {i}: {key} is {had[key]!r} in the checkpoint, but a "
                                  f"{type(have[key]).__name__} in the optimizer", path=path,
                                  hint="The checkpoint is damaged or was edited by hand.")
    defaults = set(getattr(optimizer, "defaults", {}) or {})
    known = defaults | {k for g in current for k in g}
    saved_keys = {k for g in saved for k in g if isinstance(k, str)}
    foreign = sorted(saved_keys - known - _OPTIMIZER_FLAGS)
    lacking = sorted(defaults - saved_keys - _OPTIMIZER_FLAGS)
    if foreign and lacking:
        guess = _optimizer_type_of(saved_keys)
        saved_type = f"{guess} state" if guess else "state of another optimizer type"
        raise ResumeError(f"{what}: the checkpoint holds {saved_type} (hyper-parameters {', '.join(foreign)}), "
                          f"but the optimizer is {type(optimizer).__name__} (expects {', '.join(lacking)})",
                          path=path, hint=f"Build the same optimizer type as when saving"
                          f"{f' (torch.optim.{guess})' if guess else ''}, or do not pass {what}=... to start "
                          "the optimizer afresh.")


# per-parameter optimizer state that has the parameter's shape (torch.optim's Adam*, SGD, RMSprop,
# Adagrad, Adadelta, ASGD, Rprop, NAdam, RAdam); other keys (Adafactor's factors, LBFGS) are not checked
_PARAM_SHAPED = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "momentum_buffer", "square_avg",
                           "acc_delta", "grad_avg", "sum", "ax", "prev", "step_size"})


def _check_optimizer_values(optimizer: Any, state: Mapping[str, Any], what: str, path: str) -> None:
    """Refuse per-parameter state that torch would accept but that fails (or silently misleads) at ``step()``."""
    import torch

    hint = "The checkpoint is damaged or was edited by hand; do not pass optimizer=... to start it afresh."
    ids = [i for g in state["param_groups"] for i in g["params"]]
    if not all(type(i) in (int, str) for i in ids) or len(set(ids)) != len(ids):  # str: names (DCP-style)
        raise ResumeError(f"{what} state is malformed: parameter ids must be distinct integers or names, got "
                          f"{_short(ids)}", path=path, hint=hint)
    params = dict(zip(ids, (p for g in optimizer.param_groups for p in g["params"])))
    for key, entry in state.get("state", {}).items():
        if key not in params:
            raise ResumeError(f"{what} state names parameter {key!r}, which no parameter group holds "
                              f"(groups hold {_short(ids)})", path=path, hint=hint)
        if not isinstance(entry, Mapping):
            raise ResumeError(f"{what} state of parameter {key} is a {type(entry).__name__}, not a dict",
                              path=path, hint=hint)
        param = params[key]
        for name, value in entry.items():
            if name not in _PARAM_SHAPED or value is None:
                continue
            if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.is_complex()):
                got = f"{value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
                raise ResumeError(f"{what} state {name} of parameter {key} is a {got}, not a floating-point tensor",
                                  path=path, hint=hint)
            if tuple(value.shape) != tuple(param.shape):
                raise ResumeError(f"{what} state {name} of parameter {key} has shape {list(value.shape)}, but the "
                                  f"parameter has shape {list(param.shape)}", path=path,
                                  hint="Build the optimizer over the same parameters, in the same order, as when "
                                  "saving (or the checkpoint is damaged).")


def _check_like_current(obj: Any, state: Any, what: str, path: str) -> None:
    """A scheduler or scaler loads its state into its attributes unchecked: each saved value must be
    of the kind the object holds now (sequences of the same length), and no saved key may replace
    an attribute the object does not save (its optimizer)."""
    if not isinstance(state, Mapping):
        raise ResumeError(f"{what} state is a {type(state).__name__}, not a dict", path=path)
    try:
        current = obj.state_dict()
    except Exception:  # noqa: BLE001 - an object that cannot describe itself is restored as is
        return
    if not isinstance(current, Mapping):
        return
    hint = f"The checkpoint is damaged, or {what} was built differently when saving (another type or arguments)."
    hidden = set(getattr(obj, "__dict__", {})) - set(current)
    for key, value in state.items():
        if key in hidden:
            raise ResumeError(f"{what} state sets {key!r}, which {type(obj).__name__} never saves", path=path,
                              hint=hint)
        if key not in current:
            continue  # a newer torch may save more; torch restores it as is
        have = current[key]
        if not _same_kind(value, have) or (_kind(value) == "sequence" and _kind(have) == "sequence"
                                           and len(value) != len(have)):
            raise ResumeError(f"{what} ({type(obj).__name__}): {key} is {_short(value)} in the checkpoint, but "
                              f"{_short(have)} in the object", path=path, hint=hint)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return "flag"
    if isinstance(value, (int, float)) or (hasattr(value, "numel") and hasattr(value, "item")):
        return "number"
    if isinstance(value, (tuple, list)):
        return "sequence"
    if isinstance(value, Mapping):
        return "mapping"
    return type(value).__name__


def _same_kind(a: Any, b: Any) -> bool:
    ka, kb = _kind(a), _kind(b)
    return ka is None or kb is None or ka == kb or {ka, kb} == {"flag", "number"}


def _optimizer_type_of(keys: set[str]) -> str | None:
    """The torch.optim class whose hyper-parameters are most like ``keys`` (None when nothing is close)."""
    best, score = None, 0.0
    for name, defaults in _optimizer_defaults().items():
        s = len(keys & defaults) / len(keys | defaults)
        if s > score:
            best, score = name, s
    return best if score >= 0.6 else None


@functools.lru_cache(maxsize=1)
def _optimizer_defaults() -> dict[str, frozenset[str]]:
    import torch

    out = {}
    param = torch.nn.Parameter(torch.zeros(1))
    for name in dir(torch.optim):
        cls: Any = getattr(torch.optim, name)
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
            try:
                subclass: Any = cls  # called with its own signature, not Optimizer's
                out[name] = frozenset(subclass([param]).defaults) | {"params"}
            except Exception:  # noqa: BLE001 - an optimizer that needs more arguments is simply not a candidate
                continue
    return out


def _remap(optimizer: Any, saved: Any, model: Any, state: TrainingState, path: str) -> None:
    """The optimizer state carried through the load plan (the model's architecture changed)."""
    try:
        remap = remap_optimizer_state(saved, optimizer=optimizer, model=model, report=state.report)
    except ResumeError as exc:
        exc.path = path
        raise
    restore_object(optimizer, remap.state_dict, "optimizer", path)  # checked like any saved state
    state.optimizer = remap
    state.notes.append(remap.summary())
    state.notes.extend(remap.notes)


def restore_rng_state(state: TrainingState) -> None:
    before = get_rng_state()
    try:
        if not isinstance(state.rng, Mapping):
            raise TypeError(f"a {type(state.rng).__name__}, not a dict")
        state.restore_rng()
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError, AttributeError, OverflowError) as exc:
        set_rng_state(before)  # all or nothing
        raise ResumeError(f"the RNG state in the checkpoint is malformed ({type(exc).__name__}: {exc})",
                          path=state.path, hint="Pass restore_rng=False to resume without it (randomness will "
                          "then differ from the original run).") from None


def resume_file(path: str, *, model: Any, optimizer: Any = None, scheduler: Any = None, scaler: Any = None,
                stateful: Mapping[str, Any] | None = None, map_location: Any = None, restore_rng: bool = True,
                strict: bool = True, verified: bool = False, rename: RenameSpec = None, prefix: str | None = None,
                transforms: TransformSpec = None) -> TrainingState:
    """Restore a training run from one checkpoint file (see :func:`torchckpt.resume`).

    The file is first checked against its sidecar unless the caller did that already (``verified``).
    With ``rename``/``prefix``/``transforms``, or ``strict=False`` and a model that differs from the
    checkpoint's, the optimizer state is remapped through the load plan (:mod:`.optimizer_map`).
    """
    path = os.fspath(path)
    if not verified:
        verify(path)
    payload, description = read_payload(path, map_location)
    ours = payload.get("format") == FORMAT
    step = payload.get("step", payload.get("global_step"))
    state = TrainingState(path=path, epoch=payload.get("epoch"), step=step,
                          metrics=dict(payload.get("metrics") or {}) if isinstance(payload.get("metrics"), Mapping)
                          else {}, extra=payload.get("extra"), rng=payload.get("rng"))
    weights = payload.get("model")
    if weights is None:
        weights = payload  # a plain training dict (state_dict / model_state_dict ...): let load_into find it
    from ..fit.load_into import load_into  # start-up cost: as load above

    try:
        state.report = load_into(model, weights, strict=strict, rename=rename, prefix=prefix, transforms=transforms)
    except CheckpointError as exc:
        exc.path = path if exc.path in (None, IN_MEMORY) else exc.path
        raise
    state.report.source, state.report.format = path, description  # the file, not the dict it was read into
    if not ours:
        state.notes.append("not written by torchckpt.save: restored what could be recognised")
        state.extra = _foreign_extra(payload, state.report.weights_path if weights is payload else "model")
        if state.extra:
            state.notes.append(f"kept the other top-level keys in state.extra: {', '.join(map(str, state.extra))}")
    saved_optimizer = payload.get("optimizer", payload.get("optimizer_state_dict"))
    report = state.report
    changed = rename is not None or prefix is not None or transforms is not None or bool(
        report.missing or report.unexpected or report.mismatched or report.adapted)
    if changed and optimizer is not None and hasattr(optimizer, "param_groups") and saved_optimizer is not None:
        _remap(optimizer, saved_optimizer, model, state, path)
    else:
        restore_object(optimizer, saved_optimizer, "optimizer", path)
    restore_object(scheduler, payload.get("scheduler", payload.get("lr_scheduler")), "scheduler", path)
    restore_object(scaler, payload.get("scaler"), "scaler", path)
    saved_stateful = payload.get("stateful") or {}
    for name, obj in (stateful or {}).items():
        restore_object(obj, saved_stateful.get(name) if isinstance(saved_stateful, Mapping) else None,
                 f"stateful[{name!r}]", path)
    if restore_rng:
        if state.rng:
            restore_rng_state(state)
        else:
            state.notes.append("the checkpoint holds no RNG state; randomness will differ from the original run")
    return state
