"""Key alignment between a checkpoint and a model: wrapper prefixes, compile markers, explicit rules.

The automatic part handles every single/multi-GPU combination with no option: ``module.``
(DataParallel/DDP) on either side, ``_orig_mod.`` (torch.compile) anywhere, Lightning's ``model.``/``net.``
and any other prefix shared by *all* keys of one side. Among the candidate transforms it picks the one
that matches the most keys with equal shapes; it is applied only when that choice is unique and the
mapping is one-to-one. Explicit ``rename`` rules and ``prefix`` run first, and every rename is reported
with the rule that made it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union

from ..errors import AmbiguousCheckpointError

__all__ = ["Alignment", "align_keys", "RenameRules", "RenameSpec", "strip_compile"]

RenameRules = Union[Mapping[str, str], Sequence[tuple[str, str]], Callable[[str], str], None]
# what callers may pass to load_into/resume: the rules above, plus fuse (a tuple of patterns -> one
# replacement) and split (one pattern -> a list of replacements), which fit/adapt.py turns into transforms
RenameSpec = Union[Mapping[str, str], Mapping[Any, Any], Sequence[tuple[Any, Any]], Callable[[str], str], None]
COMPILE = "_orig_mod"
OUTSIDE = "\0outside:"  # marks a checkpoint key that ``prefix`` left out of the selected part
WRAPPERS = ("module", "_orig_mod", "model", "net", "network")  # what wraps a whole network's keys
WRAPPER_NAMES = {"module": "DataParallel/DDP", "_orig_mod": "torch.compile", "model": "Lightning",
                 "net": "Lightning", "network": "wrapper", "backbone": "backbone"}


@dataclass
class Alignment:
    mapping: dict[str, str]  # checkpoint key -> model key
    rules: dict[str, str] = field(default_factory=dict)  # checkpoint key -> rule that renamed it
    description: str = ""
    outside: list[str] = field(default_factory=list)  # checkpoint keys outside the part ``prefix`` selected


def strip_compile(key: str) -> str:
    """``a._orig_mod.b`` -> ``a.b`` (the marker torch.compile puts in state-dict keys)."""
    if COMPILE not in key:
        return key
    return ".".join(p for p in key.split(".") if p != COMPILE)


def _shared_leading(keys: Sequence[str], limit: int = 4) -> list[str]:
    """Leading dotted components every key shares (never a whole key)."""
    if not keys:
        return []
    split = [k.split(".") for k in keys]
    shared: list[str] = []
    for i in range(limit):
        first = split[0][i] if len(split[0]) > i + 1 else None
        if first is None or any(len(p) <= i + 1 or p[i] != first for p in split):
            break
        shared.append(first)
    return shared


def _apply_rules(keys: Sequence[str], rename: RenameRules) -> tuple[dict[str, str], dict[str, str]]:
    """checkpoint key -> renamed key, and checkpoint key -> rule text for the ones that changed."""
    out = {k: k for k in keys}
    rules: dict[str, str] = {}
    if rename is None:
        return out, rules
    if callable(rename):
        for k in keys:
            new = rename(k)
            if new != k:
                out[k], rules[k] = new, f"rename function {getattr(rename, '__name__', 'callable')}"
        return out, rules
    pairs = list(rename.items()) if isinstance(rename, Mapping) else list(rename)
    compiled = [(re.compile(p), r, p) for p, r in pairs]
    for k in keys:
        new = k
        for rx, repl, text in compiled:
            changed = rx.sub(repl, new)
            if changed != new:
                rules[k] = f"rule {text!r} -> {repl!r}"
                new = changed
        out[k] = new
    return out, rules


def _prefix_rule(renamed: dict[str, str], model_keys: set[str], prefix: str | None,
                 rules: dict[str, str]) -> dict[str, str]:
    if not prefix:
        return renamed
    p = prefix if prefix.endswith(".") else prefix + "."
    has_c = sum(v.startswith(p) for v in renamed.values())
    has_m = sum(k.startswith(p) for k in model_keys)
    lead = _shared_leading(list(renamed.values()), 1)
    if not has_c and not has_m and lead and lead[0] in WRAPPERS:  # the part sits inside a DDP/Lightning wrapper
        w = lead[0] + "."
        if any(v[len(w):].startswith(p) for v in renamed.values()):
            for c in renamed:
                rules[c] = f"removing {w!r}{_why(lead)}"
            renamed = {c: v[len(w):] for c, v in renamed.items()}
            has_c = sum(v.startswith(p) for v in renamed.values())
    if has_c and not has_m:  # a full network's checkpoint into one of its parts: keep and strip that part
        out = {}
        for c, v in renamed.items():
            if v.startswith(p):
                out[c] = v[len(p):]
                rules[c] = f"prefix {p!r} removed (sub-module of the checkpoint)"
            else:
                out[c] = OUTSIDE + v
        return out
    if has_m and not has_c:  # a part's checkpoint into a full network: prepend
        for c in renamed:
            rules[c] = f"prefix {p!r} added (checkpoint of a sub-module)"
        return {c: p + v for c, v in renamed.items()}
    return renamed


def align_keys(ckpt_shapes: Mapping[str, tuple[int, ...]], model_shapes: Mapping[str, tuple[int, ...]], *,
               rename: RenameRules = None, prefix: str | None = None) -> Alignment:
    """Map checkpoint keys to model keys. Unmapped checkpoint keys are absent from ``mapping``."""
    rules: dict[str, str] = {}
    renamed, rules = _apply_rules(list(ckpt_shapes), rename)
    model_keys = set(model_shapes)
    renamed = _prefix_rule(renamed, model_keys, prefix, rules)
    outside = [c for c, v in renamed.items() if v.startswith(OUTSIDE)]
    renamed = {c: v for c, v in renamed.items() if not v.startswith(OUTSIDE)}
    # torch.compile markers are normalised away on both sides when that is one-to-one.
    norm_c = {c: strip_compile(v) for c, v in renamed.items()}
    norm_m = {strip_compile(k): k for k in model_keys}
    if len(set(norm_c.values())) != len(norm_c) or len(norm_m) != len(model_keys):
        norm_c = dict(renamed)
        norm_m = {k: k for k in model_keys}
    compile_note = any(norm_c[c] != renamed[c] for c in norm_c) or any(a != b for a, b in norm_m.items())
    ckpt_lead = _shared_leading(list(norm_c.values()))
    model_lead = _shared_leading(list(norm_m))
    scored: list[tuple[int, int, int, int]] = []  # (matches, -cost, i, j)
    for i in range(len(ckpt_lead) + 1):
        for j in range(len(model_lead) + 1):
            if i and j and ckpt_lead[:i] == model_lead[:j]:
                continue  # removing the same prefix from both sides is the identity
            pre_m = ".".join(model_lead[:j]) + "." if j else ""
            matches = 0
            for c, v in norm_c.items():
                target = norm_m.get(pre_m + _drop(v, i))
                if target is not None and tuple(ckpt_shapes[c]) == tuple(model_shapes[target]):
                    matches += 1
            scored.append((matches, -(i + j), i, j))
    scored.sort(reverse=True)
    best = scored[0]
    if len(scored) > 1 and scored[1][0] == best[0] and scored[1][1] == best[1] and best[0] > 0:
        raise AmbiguousCheckpointError(
            "the checkpoint keys can be aligned to the model in two equally good ways "
            f"(remove {'.'.join(ckpt_lead[:best[2]]) or 'nothing'} vs {'.'.join(ckpt_lead[:scored[1][2]]) or 'nothing'})",
            hint="Pass prefix=... or rename={...} to say which.")
    _, _, i, j = best
    pre_m = ".".join(model_lead[:j]) + "." if j else ""
    mapping: dict[str, str] = {}
    for c, v in norm_c.items():
        target = norm_m.get(pre_m + _drop(v, i))
        if target is not None:
            mapping[c] = target
    if not prefix and rename is None and len(mapping) < min(len(norm_c), len(norm_m)):
        part = _submodule_alignment(norm_c, norm_m, ckpt_shapes, model_shapes, len(mapping))
        if part is not None:
            mapping, description = part
            for c, m in mapping.items():
                rules[c] = description
            return Alignment(mapping, rules, description, outside)
    parts = []
    if i:
        removed = ".".join(ckpt_lead[:i]) + "."
        parts.append(f"removing {removed!r}" + _why(ckpt_lead[:i]))
    if j:
        parts.append(f"adding {pre_m!r}" + _why(model_lead[:j]))
    if compile_note:
        parts.append("ignoring '_orig_mod.' (torch.compile)")
    description = " and ".join(parts)
    for c, m in mapping.items():
        if c != m and c not in rules:
            rules[c] = description or "normalised name"
    return Alignment(mapping, rules, description, outside)


def _submodule_alignment(norm_c: dict[str, str], norm_m: dict[str, str], ckpt_shapes: Mapping[str, tuple[int, ...]],
                         model_shapes: Mapping[str, tuple[int, ...]], baseline: int) -> tuple[dict[str, str], str] | None:
    """A whole network's checkpoint into one of its parts (select ``bert.``), or a part's checkpoint into
    the whole network (prepend ``bert.``). Applied only when exactly one choice maps every key of one
    side, one-to-one, with equal shapes."""
    options: list[tuple[int, dict[str, str], str]] = []
    for first in sorted({v.split(".", 1)[0] for v in norm_c.values() if "." in v}):
        p = first + "."
        mapping = {c: norm_m[v[len(p):]] for c, v in norm_c.items()
                   if v.startswith(p) and v[len(p):] in norm_m
                   and tuple(ckpt_shapes[c]) == tuple(model_shapes[norm_m[v[len(p):]]])}
        if len(mapping) == len(norm_m):
            options.append((len(mapping), mapping, f"selecting the checkpoint's sub-module {p!r}"))
    for first in sorted({k.split(".", 1)[0] for k in norm_m if "." in k}):
        p = first + "."
        mapping = {c: norm_m[p + v] for c, v in norm_c.items()
                   if p + v in norm_m and tuple(ckpt_shapes[c]) == tuple(model_shapes[norm_m[p + v]])}
        if len(mapping) == len(norm_c):
            options.append((len(mapping), mapping, f"loading into the model's sub-module {p!r}"))
    options = [o for o in options if o[0] > baseline]
    if len(options) != 1:
        return None
    _, mapping, description = options[0]
    return mapping, description + " (pass prefix= to choose another)"


def _drop(key: str, n: int) -> str:
    return key.split(".", n)[-1] if n else key


def _why(components: list[str]) -> str:
    labels = [WRAPPER_NAMES[c] for c in components if c in WRAPPER_NAMES]
    return f" ({', '.join(dict.fromkeys(labels))})" if labels else ""

