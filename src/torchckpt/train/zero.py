"""Resuming a DeepSpeed ZeRO run in plain PyTorch: the consolidated fp32 weights into the model, and the
optimizer state (Adam moments and step) gathered from every rank's partition into a plain optimizer.

DeepSpeed keeps one flat optimizer state per parameter group; :func:`torchckpt.read.read_zero_optimizer`
cuts it back into one state per parameter, and here each is matched to the plain optimizer's parameter
by name (the model's ``named_parameters``), group by group. DeepSpeed is never imported.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from ..errors import ResumeError
from ..read import read_zero_optimizer
from .restore import restore_object
from .training import TrainingState

__all__ = ["resume_deepspeed"]


def resume_deepspeed(path: str, *, model: Any, optimizer: Any = None, scheduler: Any = None, scaler: Any = None,
                     stateful: Mapping[str, Any] | None = None, map_location: Any = None, restore_rng: bool = True,
                     strict: bool = True) -> TrainingState:
    """Restore a DeepSpeed run folder (``latest``) or step folder into a plain model and optimizer."""
    from ..fit.load_into import load_into  # start-up cost: the readers load on resume, not with torchckpt.save

    path = os.fspath(path)
    report = load_into(model, path, strict=strict)
    state = TrainingState(path=path, report=report)
    if optimizer is not None:
        details, per_param, groups = read_zero_optimizer(path)
        state.step = details.get("step")
        restore_object(optimizer, plain_optimizer_state(optimizer, model, per_param, groups, path), "optimizer", path)
        state.notes.append(f"optimizer state gathered from the {details['world_size']} ranks' ZeRO-{details['stage']} "
                           "partitions")
        if scheduler is not None:
            restore_object(scheduler, details.get("lr_scheduler"), "scheduler", path)
    elif scheduler is not None:
        raise ResumeError("restoring a scheduler needs the optimizer too", path=path,
                          hint="Pass optimizer=... as well.")
    if scaler is not None or stateful:
        raise ResumeError("a DeepSpeed folder holds no GradScaler or other stateful objects of yours", path=path,
                          hint="Do not pass scaler= / stateful= when resuming from DeepSpeed.")
    if restore_rng:
        state.notes.append("DeepSpeed checkpoints hold no RNG state; randomness will differ from the original run")
    if map_location is not None:
        state.notes.append("tensors were placed on the model's and optimizer's own devices (map_location unused)")
    return state


def plain_optimizer_state(optimizer: Any, model: Any, per_param: list[dict[str, Any]], groups: list[dict[str, Any]],
                          path: str) -> dict[str, Any]:
    """A ``state_dict`` for ``optimizer`` (a plain torch optimizer over ``model``'s parameters) from DeepSpeed's
    per-parameter state: each of its parameters is found by name, its group must be DeepSpeed's group."""
    names = {id(p): n for n, p in model.named_parameters()}
    saved = {entry["name"]: entry for entry in per_param}
    if len(optimizer.param_groups) != len(groups):
        raise ResumeError(f"the optimizer has {len(optimizer.param_groups)} parameter groups, the DeepSpeed "
                          f"checkpoint {len(groups)}", path=path,
                          hint="Build the optimizer with the same parameter groups as the DeepSpeed run.")
    out_state: dict[int, Any] = {}
    out_groups = []
    index = 0
    for g, group in enumerate(optimizer.param_groups):
        ids = []
        for p in group["params"]:
            name = names.get(id(p))
            if name is None:
                raise ResumeError(f"a parameter of optimizer group {g} (shape {list(p.shape)}) is not a parameter "
                                  "of the model", path=path, hint="Pass the model the optimizer was built on.")
            entry = saved.get(name)
            if entry is None:
                raise ResumeError(f"the DeepSpeed checkpoint has no optimizer state for {name!r} (frozen or "
                                  f"absent there; it has {len(saved)} trainable parameters)", path=path,
                                  hint="Leave frozen parameters out of the optimizer, as in the DeepSpeed run.")
            if entry["group"] != g:
                raise ResumeError(f"{name!r} is in optimizer group {g} here but in group {entry['group']} in the "
                                  "DeepSpeed run", path=path, hint="Build the parameter groups in the same order.")
            out_state[index] = {k: (v.view(p.shape) if k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
                                    and hasattr(v, "view") else v) for k, v in entry["state"].items()}
            ids.append(index)
            index += 1
        hyper = {k: v for k, v in groups[g].items() if k != "params" and k in group}
        out_groups.append({**{k: v for k, v in group.items() if k != "params"}, **hyper, "params": ids})
    return {"state": out_state, "param_groups": out_groups}
