"""The load plan's side of :mod:`torchckpt.transforms`: which transform adapts which key.

Key transforms (fuse, split, stack, unstack; also spelled in ``rename=``) run over the checkpoint's
keys before alignment and leave :class:`Derived` values: lazy recipes that read their source tensors
only when the module they load into is applied. Tensor transforms are chosen per shape mismatch, from
the caller's ``transforms=`` or, with ``on_mismatch="adapt"``, by shape relation and name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..errors import StateDictMismatchError
from ..read.tensors import release, to_torch
from ..transforms import (AdaptInputConv, Fuse, InterpolatePosEmbed, KeyTransform, MeanResize, ResizeRelPosTable,
                          Split, Stack, Transform, TransformSpec, Unstack, by_name)
from .align import RenameRules, RenameSpec
from .tree import TensorMeta

__all__ = ["Derived", "Rule", "split_rename", "resolve", "expand", "choose", "suggest_layouts", "AUTO"]

MAX_PIECES = 1 << 16  # Unstack makes one key per row of dim 0, a size the file declares: bounded
AUTO: tuple[Transform, ...] = (InterpolatePosEmbed(), ResizeRelPosTable(), AdaptInputConv(), MeanResize())


@dataclass
class Rule:
    transform: Transform
    keys: str | None  # full-match pattern over the model or checkpoint key; None: wherever the shapes fit


@dataclass
class Derived:
    """A checkpoint tensor made by a key transform from others, read only when applied."""

    op: str  # "cat" | "slice" | "stack" | "select"
    parts: list[str]  # the checkpoint keys it reads, in order
    values: list[Any] = field(repr=False)
    shape: tuple[int, ...]
    dim: int = 0
    index: int = 0  # slice: which piece; select: which expert
    pieces: int = 1
    transform: str = ""  # how the user spelled it, for the report

    @property
    def dtype(self) -> Any:
        first = self.values[0]
        return first.torch_dtype() if isinstance(first, TensorMeta) else first.dtype

    def materialize(self, reader: Any) -> Any:
        import torch  # lazy: torchckpt imports torch only when tensors are needed

        tensors = [to_torch(v, reader) for v in self.values]
        if self.op == "cat":
            out = torch.cat(tensors, dim=self.dim)
        elif self.op == "stack":
            out = torch.stack(tensors, dim=0)
        elif self.op == "select":
            out = tensors[0][self.index].clone()
        else:
            size = tensors[0].shape[self.dim] // self.pieces
            out = tensors[0].narrow(self.dim, self.index * size, size).clone()
        if self.op in ("cat", "stack"):  # the sources are read once: drop their file pages now
            for t in tensors:
                release(reader, t)
        return out


def split_rename(rename: RenameSpec) -> tuple[list[KeyTransform], RenameRules]:
    """``rename=`` entries that fuse (a tuple of patterns -> one replacement) or split (one pattern -> a
    list) become :class:`Fuse`/:class:`Split` on dim 0; the rest stay plain renaming rules."""
    if rename is None or callable(rename):
        return [], rename
    pairs = list(rename.items()) if isinstance(rename, Mapping) else list(rename)
    keyed: list[KeyTransform] = []
    plain: list[tuple[str, str]] = []
    for pattern, replacement in pairs:
        if isinstance(pattern, tuple):
            if not isinstance(replacement, str):
                raise ValueError(f"rename: a tuple of patterns fuses into one replacement string, got {replacement!r}")
            keyed.append(Fuse(pattern, replacement, dim=0))
        elif isinstance(replacement, (list, tuple)):
            keyed.append(Split(pattern, list(replacement), dim=0))
        else:
            plain.append((pattern, replacement))
    if not keyed:
        return [], rename
    return keyed, plain


def resolve(spec: TransformSpec) -> tuple[list[Rule], list[KeyTransform]]:
    """``transforms=`` as tensor rules and key transforms."""
    if spec is None:
        return [], []
    if isinstance(spec, (str, Transform, KeyTransform)):
        spec = [spec]
    rules: list[Rule] = []
    keyed: list[KeyTransform] = []
    if isinstance(spec, Mapping):
        for key, named in spec.items():
            rules.append(Rule(by_name(named) if isinstance(named, str) else _tensor(named), key))
        return rules, keyed
    for entry in spec:
        if isinstance(entry, KeyTransform):
            keyed.append(entry)
        else:
            t = by_name(entry) if isinstance(entry, str) else _tensor(entry)
            rules.append(Rule(t, t.keys))
    return rules, keyed


def _tensor(item: Any) -> Transform:
    if not isinstance(item, Transform):
        raise TypeError(f"transforms: expected a torchckpt.transforms transform or its name, got "
                        f"{type(item).__name__}")
    return item


def expand(tensors: dict[str, Any], keyed: Sequence[KeyTransform], shape_of: Callable[[Any], tuple[int, ...]]
           ) -> tuple[dict[str, Any], list[str]]:
    """The checkpoint's tensors with the key transforms applied (sources replaced by :class:`Derived`
    values, in the sources' place), and notes on patterns that matched only partly."""
    notes: list[str] = []
    for t in keyed:
        if isinstance(t, Fuse):
            groups: dict[str, dict[int, str]] = {}
            for k in tensors:
                for i, p in enumerate(t.sources):
                    if re.search(p, k):
                        groups.setdefault(re.sub(p, t.target, k), {})[i] = k
                        break
            for target, found in groups.items():
                if len(found) < len(t.sources):
                    notes.append(f"{t!r}: {target} not fused, only {', '.join(found.values())} found")
                    continue
                keys = [found[i] for i in range(len(t.sources))]
                parts = [tuple(shape_of(tensors[k])) for k in keys]
                d = t.dim
                if any(len(s) != len(parts[0]) or not -len(s) <= d < len(s) or s[:d % len(s)] + s[d % len(s) + 1:]
                       != parts[0][:d % len(s)] + parts[0][d % len(s) + 1:] for s in parts):
                    raise StateDictMismatchError(
                        f"cannot fuse {', '.join(keys)} on dim {d}: shapes {[list(s) for s in parts]} differ "
                        "outside that dim", hint="Fuse along another dim (transforms.Fuse(..., dim=1)) or fix "
                        "the patterns.")
                shape = list(parts[0])
                shape[d] = sum(s[d] for s in parts)
                tensors = _replace(tensors, keys, {target: Derived("cat", keys, [tensors[k] for k in keys],
                                                                   tuple(shape), dim=d, transform=repr(t))})
        elif isinstance(t, Split):
            for k in [k for k in tensors if re.search(t.source, k)]:
                s = tuple(shape_of(tensors[k]))
                n, d = len(t.targets), t.dim
                if not -len(s) <= d < len(s) or s[d] % n:
                    raise StateDictMismatchError(
                        f"cannot split {k} of shape {list(s)} evenly into {n} on dim {d}",
                        hint="Split along another dim (transforms.Split(..., dim=1)) or fix the pattern.")
                piece = list(s)
                piece[d] = s[d] // n
                new = {re.sub(t.source, r, k): Derived("slice", [k], [tensors[k]], tuple(piece), dim=d, index=i,
                                                       pieces=n, transform=repr(t)) for i, r in enumerate(t.targets)}
                tensors = _replace(tensors, [k], new)
        elif isinstance(t, Stack):
            experts: dict[str, dict[int, str]] = {}
            for k in tensors:
                m = re.search(t.source, k)
                if m:
                    experts.setdefault(re.sub(t.source, t.target, k), {})[int(m.group(1))] = k
            for target, found in experts.items():
                if sorted(found) != list(range(len(found))):
                    notes.append(f"{t!r}: {target} not stacked, expert indices {sorted(found)} are not 0..E-1")
                    continue
                keys = [found[i] for i in range(len(found))]
                parts = [tuple(shape_of(tensors[k])) for k in keys]
                if len(set(parts)) != 1:
                    raise StateDictMismatchError(f"cannot stack {', '.join(keys[:3])}...: shapes "
                                                 f"{sorted(set(parts))} differ", hint="Fix the Stack pattern.")
                tensors = _replace(tensors, keys, {target: Derived("stack", keys, [tensors[k] for k in keys],
                                                                   (len(keys),) + parts[0], transform=repr(t))})
        elif isinstance(t, Unstack):
            for k in [k for k in tensors if re.search(t.source, k)]:
                s = tuple(shape_of(tensors[k]))
                if not s:
                    continue
                if s[0] > MAX_PIECES:
                    raise StateDictMismatchError(f"{t!r}: {k} of shape {list(s)} would make {s[0]} tensors",
                                                 hint=f"Unstack takes at most {MAX_PIECES} experts; check the pattern.")
                new = {re.sub(t.source, t.target.replace("{i}", str(i)), k):
                       Derived("select", [k], [tensors[k]], s[1:], index=i, transform=repr(t)) for i in range(s[0])}
                tensors = _replace(tensors, [k], new)
    return tensors, notes


def _replace(tensors: dict[str, Any], old: list[str], new: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tensors.items():
        if k == old[0]:
            out.update(new)
        elif k not in old:
            out[k] = v
    return out


def _matches(pattern: str | None, *keys: str) -> bool:
    return pattern is None or any(k == pattern or re.fullmatch(pattern, k) for k in keys)


def choose(mkey: str, ckey: str, source: tuple[int, ...], target: tuple[int, ...], rules: Sequence[Rule],
           auto: bool, first_conv: str | None) -> tuple[Transform | None, str]:
    """The transform for one shape mismatch, and why none (or a suggestion when not adapting).

    An explicit rule keyed to this key that does not fit raises: the caller asked for it by name.
    """
    for rule in rules:
        if not _matches(rule.keys, mkey, ckey):
            continue
        why = rule.transform.why_not(mkey, source, target)
        if why is None:
            return rule.transform, ""
        if rule.keys is not None:
            raise StateDictMismatchError(
                f"{rule.transform.name} cannot adapt {mkey}: checkpoint {list(source)} -> model {list(target)}: {why}",
                hint="Remove it from transforms=, or choose the transform that fits.")
    fitting = [t for t in AUTO if t.looks_like(mkey, source, target, first_conv)]
    if auto:
        if fitting:
            return fitting[0], ""
        return None, "no transform fits: " + _why_none(mkey, source, target, first_conv)
    if fitting:
        return None, (f"fits {type(fitting[0]).__name__}: pass on_mismatch=\"adapt\" or "
                      f"transforms={{{mkey!r}: {fitting[0].name!r}}}")
    return None, ""


def _why_none(key: str, source: tuple[int, ...], target: tuple[int, ...], first_conv: str | None) -> str:
    reasons = []
    for t in AUTO:
        why = t.why_not(key, source, target)
        if why is None:
            why = "the shapes fit but the name does not look like one" + (
                " (not the model's first convolution)" if isinstance(t, AdaptInputConv) else "")
            reasons.append(f"{t.name}: {why}; pass transforms={{{key!r}: {t.name!r}}} if it is")
        else:
            reasons.append(f"{t.name}: {why}")
    return "; ".join(reasons)


def suggest_layouts(missing: Mapping[str, tuple[int, ...]], unexpected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """``rename=`` arguments that would fuse unexpected checkpoint tensors into a missing model tensor (their
    dim 0 adds up) or split one into several (dim 0 divides evenly), for the report and the error."""
    def groups(keys: Mapping[str, tuple[int, ...]]) -> dict[tuple[str, str], list[tuple[str, tuple[int, ...]]]]:
        out: dict[tuple[str, str], list[tuple[str, tuple[int, ...]]]] = {}
        for k, shape in keys.items():
            parts = k.rsplit(".", 2)
            if len(parts) >= 2 and shape:
                parent = parts[0] if len(parts) == 3 else ""
                out.setdefault((parent, parts[-1]), []).append((parts[-2], shape))
        return out

    def pattern(parent: str, name: str) -> str:
        return rf"\.{re.escape(name)}\." if parent else rf"^{re.escape(name)}\."

    def same(a: str, b: str) -> bool:
        return a == b or a.endswith("." + b) or b.endswith("." + a)

    found: list[str] = []
    ckpt_groups, model_groups = groups(unexpected), groups(missing)
    for (mparent, leaf), members in model_groups.items():
        for cparent, cleaf in ckpt_groups:
            if cleaf != leaf or not same(mparent, cparent):
                continue
            sources = ckpt_groups[(cparent, cleaf)]
            for name, shape in members:  # fuse: several checkpoint tensors -> this one
                if len(sources) > 1 and all(s[1:] == shape[1:] for _, s in sources) \
                        and sum(s[0] for _, s in sources) == shape[0]:
                    patterns = ", ".join(repr(pattern(cparent, n)) for n, _ in sources)
                    target = ("." if mparent else "") + name + "."
                    found.append(f"fuse: rename={{({patterns}): {target!r}}}")
            for name, shape in sources:  # split: this checkpoint tensor -> several
                if len(members) > 1 and all(s == members[0][1] for _, s in members) \
                        and len(members) * members[0][1][0] == shape[0] and shape[1:] == members[0][1][1:]:
                    targets = ", ".join(repr(("." if mparent else "") + n + ".") for n, _ in members)
                    found.append(f"split: rename={{{pattern(cparent, name)!r}: [{targets}]}} (check the order)")
    return list(dict.fromkeys(found))
