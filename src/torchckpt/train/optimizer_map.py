"""The optimizer follows the weights: remap a saved optimizer ``state_dict`` through ``load_into``'s plan.

A saved optimizer names its parameters by position. Those positions are turned into the checkpoint's
parameter names (the names torch >= 2.6 saves in ``param_groups[i]["param_names"]`` when the optimizer
was built from ``named_parameters()``; otherwise the checkpoint's parameter keys in order, checked
against every saved state's shape), followed through the plan (renames, prefixes, fuse/split/stack/
unstack by concatenation or slicing of the per-parameter state), and put at the current optimizer's
positions. A new, resized or adapted parameter starts afresh; a state is never given to a parameter of
another shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import ResumeError
from ..fit.report import LoadReport, Origin

__all__ = ["remap_optimizer_state", "OptimizerRemap"]

_BUFFER = re.compile(r"(^|\.)(running_mean|running_var|num_batches_tracked)$")


@dataclass
class OptimizerRemap:
    """What :func:`remap_optimizer_state` did: the state dict to load and, per model key, where its
    optimizer state came from (``carried``) or why it starts afresh (``fresh``)."""

    state_dict: dict[str, Any]
    carried: dict[str, str] = field(default_factory=dict)  # model key -> how ("exp_avg, step from q.weight")
    fresh: dict[str, str] = field(default_factory=dict)  # model key -> why it starts afresh
    dropped: list[str] = field(default_factory=list)  # saved parameter names whose state went nowhere
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        fresh = f"; fresh: {', '.join(list(self.fresh)[:5])}{' ...' if len(self.fresh) > 5 else ''}" \
            if self.fresh else ""
        dropped = f"; dropped the state of {len(self.dropped)} saved parameters" if self.dropped else ""
        return f"optimizer state carried for {len(self.carried)} parameters{fresh}{dropped}"


def remap_optimizer_state(saved: Mapping[str, Any], *, optimizer: Any, model: Any, report: LoadReport,
                          names: Sequence[str] | None = None) -> OptimizerRemap:
    """``saved`` (an optimizer ``state_dict()`` of the checkpoint's model) remapped onto ``optimizer``
    (built over ``model``), following the plan in ``report`` (what ``load_into(model, ...)`` returned).

    Args:
        names: the checkpoint's parameter names in the saved optimizer's order, when neither the saved
            state (``param_names``) nor the checkpoint's keys can tell them.

    Returns:
        An :class:`OptimizerRemap`: ``optimizer.load_state_dict(result.state_dict)`` restores it.

    Raises:
        ResumeError: the saved state is malformed, or its positions cannot be named with certainty.
    """
    import torch  # lazy: torchckpt imports torch only when tensors are needed

    groups, state = _checked(saved)
    ids = [i for g in groups for i in g["params"]]
    saved_names = _saved_names(groups, ids, state, report, model, names)
    by_name = {n: state[i] for n, i in zip(saved_names, ids) if i in state}
    param_key = {id(p): k for k, p in model.named_parameters()}
    shapes = report.checkpoint_shapes
    out = OptimizerRemap({"state": {}, "param_groups": []})
    used: set[str] = set()
    position = 0
    for gi, group in enumerate(optimizer.param_groups):
        new_group = {k: v for k, v in group.items() if k != "params"}
        if len(groups) == len(optimizer.param_groups):
            new_group.update({k: v for k, v in groups[gi].items() if k not in ("params", "param_names")})
        new_group["params"] = list(range(position, position + len(group["params"])))
        out.state_dict["param_groups"].append(new_group)
        for param in group["params"]:
            mkey = param_key.get(id(param), f"<parameter {position}>")
            origin = report.origins.get(mkey)
            entry, why = _follow(origin, by_name, shapes, tuple(param.shape), torch) if origin is not None \
                else (None, "not loaded from the checkpoint")
            if entry is not None:
                out.state_dict["state"][position] = entry
                out.carried[mkey] = f"{origin.op} of {', '.join(origin.keys)}" if origin else ""
                used.update(origin.keys if origin else [])
            else:
                out.fresh[mkey] = why
            position += 1
    if len(groups) != len(optimizer.param_groups):
        out.notes.append(f"the checkpoint has {len(groups)} parameter groups, the optimizer "
                         f"{len(optimizer.param_groups)}: kept the optimizer's hyper-parameters")
    out.dropped = [n for n in by_name if n not in used]
    return out


def _checked(saved: Any) -> tuple[list[Mapping[str, Any]], Mapping[Any, Any]]:
    hint = "The checkpoint is damaged or was edited by hand; do not pass optimizer=... to start it afresh."
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    state = saved.get("state", {}) if isinstance(saved, Mapping) else None
    if not isinstance(groups, list) or not all(isinstance(g, Mapping) and isinstance(g.get("params"), list)
                                               for g in groups) or not isinstance(state, Mapping):
        raise ResumeError("the optimizer state is malformed (it needs 'param_groups', a list of groups with "
                          "'params', and 'state', a dict)", hint=hint)
    ids = [i for g in groups for i in g["params"]]
    if not all(type(i) in (int, str) for i in ids) or len(set(ids)) != len(ids) \
            or not all(isinstance(e, Mapping) for e in state.values()):
        raise ResumeError("the optimizer state is malformed: parameter ids must be distinct and each state a dict",
                          hint=hint)
    return groups, state


def _saved_names(groups: list[Mapping[str, Any]], ids: list[Any], state: Mapping[Any, Any], report: LoadReport,
                 model: Any, names: Sequence[str] | None) -> list[str]:
    """The checkpoint's name for each saved position."""
    if names is None and all(isinstance(g.get("param_names"), list) and len(g["param_names"]) == len(g["params"])
                             for g in groups):
        names = [n for g in groups for n in g["param_names"]]
        how = "the names saved with the optimizer"
    elif names is None:
        if len(groups) != 1:
            raise ResumeError(
                f"cannot tell which parameter each of the {len(groups)} saved optimizer groups holds (the "
                "optimizer was built without parameter names)",
                hint="Build the optimizer from model.named_parameters() when saving (torch >= 2.6 saves the "
                     "names), pass names= to remap_optimizer_state, or do not pass optimizer=... to start afresh.")
        names = _inferred(report, model)
        how = "the checkpoint's parameter keys in order"
    else:
        how = "the names given"
    names = [str(n) for n in names]
    if len(names) != len(ids):
        raise ResumeError(f"the saved optimizer holds {len(ids)} parameters, but {how} give {len(names)}",
                          hint="Pass names= (the checkpoint's parameter names in the optimizer's order), or do "
                               "not pass optimizer=... to start the optimizer afresh.")
    shapes = report.checkpoint_shapes
    for name, i in zip(names, ids):
        for key, value in state.get(i, {}).items():
            shape = tuple(getattr(value, "shape", ()))
            if shape and key in _PARAM_SHAPED and name in shapes and shape != tuple(shapes[name]):
                raise ResumeError(f"the saved optimizer's parameter {i} has {key} of shape {list(shape)}, but "
                                  f"{how} name it {name} of shape {list(shapes[name])}",
                                  hint="Pass names= (the checkpoint's parameter names in the optimizer's order), "
                                       "or do not pass optimizer=... to start the optimizer afresh.")
    return names


def _inferred(report: LoadReport, model: Any) -> list[str]:
    """The checkpoint's keys that were parameters (not buffers), in order, ties counted once."""
    params = {k: p for k, p in model.named_parameters(remove_duplicate=False)}
    buffers = {k for k, _ in model.named_buffers(remove_duplicate=False)}
    kind: dict[str, str] = {}
    owner: dict[str, str] = {}  # checkpoint key -> the model parameter it loads into
    for mkey, origin in report.origins.items():
        for c in origin.keys:
            kind[c] = "param" if mkey in params else "buffer" if mkey in buffers else kind.get(c, "")
            if mkey in params:
                owner[c] = mkey
    out: list[str] = []
    first: dict[int, str] = {}  # parameter -> the first model key it was reached under
    for c in report.checkpoint_shapes:
        what = kind.get(c) or ("buffer" if _BUFFER.search(c) else "param")
        if what != "param":
            continue
        if c in owner:
            mkey = first.setdefault(id(params[owner[c]]), owner[c])
            if mkey != owner[c]:
                continue  # tied to a parameter already counted: one optimizer entry
        out.append(c)
    return out


# per-parameter optimizer state with the parameter's shape (torch.optim's Adam*, SGD, RMSprop, Adagrad,
# Adadelta, ASGD, Rprop, NAdam, RAdam)
_PARAM_SHAPED = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "momentum_buffer", "square_avg",
                           "acc_delta", "grad_avg", "sum", "ax", "prev", "step_size", "mu_product"})


def _follow(origin: Origin, by_name: Mapping[str, Mapping[str, Any]], shapes: Mapping[str, tuple[int, ...]],
            target: tuple[int, ...], torch: Any) -> tuple[dict[str, Any] | None, str]:
    if origin.op in ("transform", "overlap"):
        return None, "resized by a transform: its optimizer state starts afresh"
    entries = [by_name.get(k) for k in origin.keys]
    if any(e is None for e in entries):
        lacking = [k for k, e in zip(origin.keys, entries) if e is None]
        return None, f"no saved optimizer state for {', '.join(lacking)}"
    first = entries[0]
    assert first is not None
    if any(set(e or {}) != set(first) for e in entries):
        return None, f"the saved states of {', '.join(origin.keys)} hold different entries"
    out: dict[str, Any] = {}
    for name in first:
        values = [e[name] for e in entries if e is not None]
        shaped = [isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) == tuple(shapes.get(k, ()))
                  for v, k in zip(values, origin.keys)]
        if all(shaped):
            if origin.op == "cat":
                value = torch.cat(values, dim=origin.dim)
            elif origin.op == "stack":
                value = torch.stack(values, dim=0)
            elif origin.op == "slice":
                size = values[0].shape[origin.dim] // origin.pieces
                value = values[0].narrow(origin.dim, origin.index * size, size).clone()
            elif origin.op == "select":
                value = values[0][origin.index].clone()
            elif values[0].numel() == _numel(target):
                value = values[0].reshape(target)
            else:
                return None, f"{name} has {values[0].numel()} elements, the parameter {_numel(target)}"
        elif any(shaped) or (name in _PARAM_SHAPED and isinstance(values[0], torch.Tensor) and values[0].dim() > 0):
            return None, f"{name} does not have its parameter's shape in the checkpoint"
        elif origin.op not in ("copy",) and isinstance(values[0], torch.Tensor) and values[0].dim() > 0:
            return None, f"{name} (shape {list(values[0].shape)}) cannot follow a {origin.op}"
        elif all(_same(v, values[0], torch) for v in values):
            value = values[0]
        else:
            return None, f"{name} differs between {', '.join(origin.keys)}"
        if name in _PARAM_SHAPED and isinstance(value, torch.Tensor) and value.dim() > 0 \
                and tuple(value.shape) != target:
            return None, f"{name} would have shape {list(value.shape)}, the parameter {list(target)}"
        out[name] = value
    return out, ""


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _same(a: Any, b: Any, torch: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return bool(a == b)
