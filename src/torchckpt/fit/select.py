"""Choosing the weights in a checkpoint tree: :func:`select`, :func:`find_state_dicts`, :func:`lookup`.

:func:`select` is the one place that decides where the weights are: ``key=`` wins; otherwise the only
candidate; several are ranked by how many keys fit the model, and without a model they are ambiguous
(:class:`AmbiguousCheckpointError` lists them). Built on the one walker, :func:`torchckpt.fit.tree.walk`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import AmbiguousCheckpointError, WeightsNotFoundError
from ..read import Stub, TreeMeter
from ..text import clip, key_text
from .align import align_keys
from .tree import class_name, is_module_like, is_optimizer_state, is_state_dict, state_dict_of, tensors, walk

__all__ = ["Candidate", "find_state_dicts", "lookup", "select", "shapes"]


def lookup(obj: Any, dotted: str) -> Any:
    """The node at ``dotted`` (``"model_ema.module"``): dict keys and stub attributes, longest key first.

    Raises:
        WeightsNotFoundError: nothing is there; the hint lists where weights were found.
    """
    current, rest = obj, dotted
    while rest:
        items = dict(current) if isinstance(current, dict) else (current.stub_attributes()
                                                                 if isinstance(current, Stub) else {})
        for k in sorted((k for k in items if isinstance(k, str)), key=len, reverse=True):
            if rest == k or rest.startswith(k + "."):
                current, rest = items[k], rest[len(k) + 1:]
                break
        else:
            raise WeightsNotFoundError(f"key={dotted!r} not found in the checkpoint", hint=_candidates_hint(obj))
    return current


# -- choosing the weights --------------------------------------------------------------------------

@dataclass
class Candidate:
    """A place in the checkpoint that holds weights."""

    path: str  # "" for the root, "state_dict", "model.ema", ...
    state_dict: "OrderedDict[str, Any] | dict[str, Any]"
    source: str  # "state dict", "module object", "module stub"
    notes: list[str] = field(default_factory=list)  # how it was chosen, when that was a choice
    module_class: str = ""  # the class of the module the weights come from, for modules and stubs

    @property
    def where(self) -> str:
        return self.path or "<root>"


def find_state_dicts(obj: Any, max_depth: int = 8, meter: TreeMeter | None = None) -> list[Candidate]:
    """Every state dict or module in ``obj``, outermost first (nested ones inside a hit are skipped).

    A value shared under several paths is a candidate under each, but examined once.
    """
    found: list[Candidate] = []
    taken: set[str] = set()
    meter = meter if meter is not None else TreeMeter()
    verdicts: dict[int, "OrderedDict[str, Any] | dict[str, Any] | None"] = {}  # id -> its weights, or None
    kinds: dict[int, str] = {}

    def descend(path: str, value: Any) -> bool:
        if path in taken or is_optimizer_state(value) or is_module_like(value):
            return False  # a hit's insides, optimizer slots (exp_avg ...) and modules are not more weights
        return not isinstance(value, (list, tuple)) or len(value) <= 64

    for path, value, _ in walk(obj, max_depth=max_depth, descend=descend, meter=meter):
        if id(value) not in verdicts:
            if isinstance(value, dict) and is_state_dict(value):
                verdicts[id(value)], kinds[id(value)] = value, "state dict"
            elif is_module_like(value):
                try:
                    verdicts[id(value)], kinds[id(value)] = state_dict_of(value, meter) or None, "module"
                except WeightsNotFoundError:
                    verdicts[id(value)] = None
            else:
                verdicts[id(value)] = None
        sd = verdicts[id(value)]
        if sd is None:
            continue
        if kinds[id(value)] == "state dict":
            found.append(Candidate(path, sd, "state dict"))
            taken.add(path)
        else:
            found.append(_module_candidate(path, value, sd))
    return found


def _module_candidate(path: str, module: Any, sd: Any) -> Candidate:
    return Candidate(path, sd, "module stub" if isinstance(module, Stub) else "module object",
                     module_class=class_name(module) or type(module).__name__)


def shapes(sd: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key -> shape for the tensors of a state dict (other values are left out)."""
    return {k: tuple(v.shape) for k, v in sd.items() if isinstance(k, str) and hasattr(v, "shape")}


def select(obj: Any, key: str | None = None, model: Any = None, meter: TreeMeter | None = None) -> Candidate:
    """Choose the weights in a loaded checkpoint.

    Args:
        key: dotted path of the weights (``"state_dict"``, ``"model_ema.module"``); wins over any choice.
        model: an ``nn.Module`` (or its ``state_dict()``): among several candidates, take the one whose
            keys and shapes fit it best; the choice and the alternatives are in ``Candidate.notes``.
            Without a model, several candidates are ambiguous.
        meter: the file's :class:`TreeMeter` (``TreeMeter(policy.budget, file_size)``); every walk charges it.

    Raises:
        WeightsNotFoundError: ``key`` names nothing or no weights, or the checkpoint holds none.
        AmbiguousCheckpointError: several candidates and no way to choose; lists them.
    """
    if key is not None:
        value = lookup(obj, key)
        if is_state_dict(value):
            return Candidate(key, value, "state dict")
        if is_module_like(value):
            return _module_candidate(key, value, state_dict_of(value, meter))
        raise WeightsNotFoundError(f"key={key!r} points to a {type(value).__name__}, not weights",
                                   hint=_candidates_hint(obj))
    candidates = find_state_dicts(obj, meter=meter)
    if not candidates:
        raise WeightsNotFoundError("no state dict or module found in the checkpoint", hint=_top_level_hint(obj))
    if len(candidates) == 1:
        return candidates[0]
    if model is None:
        paths = [clip(c.where, 200) for c in candidates[:50]]
        raise AmbiguousCheckpointError(f"{len(candidates)} sets of weights in the checkpoint: {', '.join(paths)}",
                                       candidates=paths,
                                       hint=f"Choose one with key=... (--key on the command line), "
                                            f"e.g. key={paths[0]!r}.")
    model_sd = model if isinstance(model, Mapping) else model.state_dict(keep_vars=True)
    scored = []
    for cand in candidates:
        try:
            score = len(align_keys(shapes(cand.state_dict), shapes(model_sd)).mapping)
        except AmbiguousCheckpointError:
            score = 0
        scored.append((score, cand))
    scored.sort(key=lambda t: -t[0])
    (best, first), (second, other) = scored[0], scored[1]
    if best == second and not _same_tensors(first.state_dict, other.state_dict):
        tied = [clip(c.where, 200) for s, c in scored if s == best][:50]
        raise AmbiguousCheckpointError(
            f"{len(tied)} places in the checkpoint fit the model equally well ({best} keys each): "
            f"{', '.join(tied)}", candidates=tied,
            hint=f"Choose one with key=..., e.g. load_into(model, path, key={tied[0]!r}).")
    others = ", ".join(f"{c.where} ({s} keys fit)" for s, c in scored[1:])
    first.notes.append(f"weights taken from '{first.where}' ({best} keys fit); also found: {others}")
    return first


def _same_tensors(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a.keys() == b.keys() and all(a[k] is b[k] for k in a)


def _candidates_hint(obj: Any) -> str:
    found = [clip(c.where, 200) for c in find_state_dicts(obj)[:20]]
    return f"Weights found at: {', '.join(found)}." if found else _top_level_hint(obj)


def _top_level_hint(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = ", ".join(clip(key_text(k, 200), 60) for k in list(obj)[:20])
        return f"Top-level keys: {keys}. Pass key=... to point at the weights."
    return f"The checkpoint holds a {type(obj).__name__}; `torchckpt inspect FILE` shows its structure."
