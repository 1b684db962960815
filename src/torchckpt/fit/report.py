"""LoadReport: what ``load_into`` did (or would do) with every key, for people and for machines.

``print(report)`` is a compact summary grouped by module prefix: when every key under
``layer4.`` is missing, one line says so instead of one line per key.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

__all__ = ["LoadReport", "Mismatch", "Adapted", "Origin", "group_keys"]


@dataclass
class Mismatch:
    key: str  # model key
    checkpoint_key: str
    checkpoint_shape: tuple[int, ...]
    model_shape: tuple[int, ...]
    action: str  # "error" | "skipped" | "copied overlap"
    note: str = ""  # the transform that would fit (and the argument that applies it), or why none fits


@dataclass
class Adapted:
    """A model tensor made by a transform of :mod:`torchckpt.transforms`."""

    key: str  # model key
    checkpoint_keys: tuple[str, ...]
    transform: str  # its name ("interpolate_pos_embed") or spelling ("Fuse([...], 'qkv.', dim=0)")
    detail: str  # what it did to the shapes


@dataclass
class Origin:
    """How a loaded model tensor is made from checkpoint tensors (what optimizer state can follow):
    ``copy``/``reshape`` of one key, ``cat``/``stack`` of several, ``slice``/``select`` of one, or
    ``transform`` (resized: its optimizer state starts afresh)."""

    op: str
    keys: list[str]
    dim: int = 0
    index: int = 0
    pieces: int = 1


@dataclass
class LoadReport:
    """Every key of the model and the checkpoint, and what happened to it.

    ``ok`` is True when every model tensor was loaded from the checkpoint and every checkpoint
    tensor was used (missing ``num_batches_tracked`` of pre-0.4.1 files and tied weights count as loaded).

    Like the ``_IncompatibleKeys`` that ``nn.Module.load_state_dict`` returns, it unpacks as
    ``missing_keys, unexpected_keys = load_into(...)`` (and ``report[0]``, ``report[1]``).
    """

    source: str
    format: str = ""
    weights_path: str = ""
    model_keys: int = 0
    checkpoint_keys: int = 0
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[Mismatch] = field(default_factory=list)
    renamed: dict[str, tuple[str, str]] = field(default_factory=dict)  # checkpoint key -> (model key, rule)
    cast: list[tuple[str, str, str]] = field(default_factory=list)  # (key, from dtype, to dtype)
    tied: dict[str, str] = field(default_factory=dict)  # model key -> the key it shares storage with
    ignored: list[str] = field(default_factory=list)  # missing but harmless (num_batches_tracked)
    outside: list[str] = field(default_factory=list)  # checkpoint keys outside the part ``prefix`` selected
    notes: list[str] = field(default_factory=list)
    adapted: list[Adapted] = field(default_factory=list)
    origins: dict[str, Origin] = field(default_factory=dict, repr=False)  # model key -> how it is made
    checkpoint_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)  # in file order
    dry_run: bool = False
    applied: bool = False

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or any(m.action == "error" for m in self.mismatched))

    @property
    def missing_keys(self) -> list[str]:
        """Model keys the checkpoint does not have (``nn.Module.load_state_dict``'s name; alias of ``missing``)."""
        return self.missing

    @property
    def unexpected_keys(self) -> list[str]:
        """Checkpoint keys the model does not have (``load_state_dict``'s name; alias of ``unexpected``)."""
        return self.unexpected

    def __iter__(self) -> Iterator[list[str]]:
        """``missing_keys, unexpected_keys = report``, as with ``load_state_dict``'s result."""
        return iter((self.missing, self.unexpected))

    def __getitem__(self, index: int) -> list[str]:
        return (self.missing, self.unexpected)[index]

    @property
    def skipped(self) -> list[str]:
        return [m.key for m in self.mismatched if m.action == "skipped"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "format": self.format, "weights_path": self.weights_path, "ok": self.ok,
            "dry_run": self.dry_run, "applied": self.applied, "model_keys": self.model_keys,
            "checkpoint_keys": self.checkpoint_keys, "loaded": self.loaded, "missing": self.missing,
            "unexpected": self.unexpected, "ignored": self.ignored, "outside": self.outside, "tied": self.tied,
            "mismatched": [{"key": m.key, "checkpoint_key": m.checkpoint_key,
                            "checkpoint_shape": list(m.checkpoint_shape), "model_shape": list(m.model_shape),
                            "action": m.action, "note": m.note} for m in self.mismatched],
            "adapted": [{"key": a.key, "checkpoint_keys": list(a.checkpoint_keys), "transform": a.transform,
                         "detail": a.detail} for a in self.adapted],
            "renamed": [{"checkpoint_key": c, "model_key": k, "rule": r} for c, (k, r) in self.renamed.items()],
            "cast": [{"key": k, "from": a, "to": b} for k, a, b in self.cast],
            "notes": self.notes,
        }

    def summary_line(self) -> str:
        verb = "would load" if self.dry_run or not self.applied else "loaded"
        where = f" from '{self.weights_path}'" if self.weights_path and self.weights_path != "<root>" else ""
        fmt = f" ({self.format})" if self.format else ""
        nothing = "; nothing was loaded" if not self.dry_run and not self.applied else ""
        return f"{self.source}: {verb} {len(self.loaded)} of {self.model_keys} model tensors{where}{fmt}{nothing}"

    def __str__(self) -> str:
        return self.render()

    def render(self) -> str:
        """The summary people read, grouped by module prefix (``print(report)``)."""
        universe = [m.key for m in self.mismatched] + self.loaded + self.missing + self.ignored + list(self.tied)
        lines = [self.summary_line()]
        if self.renamed:
            for rule, count in Counter(r for _, r in self.renamed.values()).most_common():
                lines.append(f"  renamed: {count} keys by {rule}")
        if self.cast:
            for (a, b), count in Counter((a, b) for _, a, b in self.cast).most_common():
                lines.append(f"  cast: {count} tensors {a} -> {b}")
        for adapted in self.adapted[:20]:
            lines.append(f"  adapted: {adapted.key} <- {', '.join(adapted.checkpoint_keys[:4])}"
                         f"{', ...' if len(adapted.checkpoint_keys) > 4 else ''} by {adapted.transform} "
                         f"({adapted.detail})")
        if len(self.adapted) > 20:
            lines.append(f"  adapted: ... {len(self.adapted) - 20} more")
        if self.tied:
            lines.append(f"  tied: {len(self.tied)} keys share storage with a loaded key "
                         f"({', '.join(list(self.tied)[:3])}{', ...' if len(self.tied) > 3 else ''})")
        if self.mismatched:
            width = max(len(m.key) for m in self.mismatched)
            lines.append(f"  shape mismatches ({len(self.mismatched)}):")
            for m in self.mismatched[:20]:
                lines.append(f"    {m.key:{width}s}  checkpoint {list(m.checkpoint_shape)}  model {list(m.model_shape)}"
                             f"  -> {m.action}")
                if m.note:
                    lines.append(f"    {'':{width}s}  {m.note}")
            if len(self.mismatched) > 20:
                lines.append(f"    ... {len(self.mismatched) - 20} more")
        if self.missing:
            lines.append(f"  missing in checkpoint (model keeps its values): {_join(group_keys(self.missing, universe))}")
        if self.unexpected:
            lines.append(f"  unexpected (in checkpoint, not in model): "
                         f"{_join(group_keys(self.unexpected, self.unexpected + self.loaded))}")
        if self.outside:
            lines.append(f"  outside the selected part (not loaded): "
                         f"{_join(group_keys(self.outside, self.outside))}")
        if self.ignored:
            lines.append(f"  ignored: {_join(group_keys(self.ignored, universe))} (absent from pre-0.4.1 files)")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _join(parts: list[str], limit: int = 12) -> str:
    shown = parts[:limit]
    more = f", ... {len(parts) - limit} more groups" if len(parts) > limit else ""
    return ", ".join(shown) + more


def _prefixes(key: str, levels: int = 32) -> list[str]:
    """The dotted prefixes of ``key``, shortest first, at most ``levels`` of them (a key of 150,000 dots
    does not make 150,000 prefixes of growing length)."""
    out: list[str] = []
    end = key.find(".")
    while end != -1 and len(out) < levels:
        out.append(key[:end])
        end = key.find(".", end + 1)
    return out


def group_keys(keys: Iterable[str], universe: Iterable[str]) -> list[str]:
    """Collapse keys into ``prefix.* (n)`` where every key of ``universe`` under that prefix is listed.

    ``universe`` is every key that could appear (the model's keys, say): a prefix is only collapsed
    when the listed keys are all of it, so the summary never hides a key that behaved differently.
    """
    keys = list(dict.fromkeys(keys))
    selected = set(keys)
    totals: Counter[str] = Counter()
    hits: Counter[str] = Counter()
    for key in set(universe) | selected:
        for prefix in _prefixes(key):
            totals[prefix] += 1
            if key in selected:
                hits[prefix] += 1
    out: list[str] = []
    done: set[str] = set()
    for key in keys:
        if key in done:
            continue
        best = None
        for prefix in _prefixes(key):
            if totals[prefix] == hits[prefix] and hits[prefix] > 1:
                best = prefix
                break
        if best is None:
            out.append(key)
            done.add(key)
        else:
            members = [k for k in keys if k.startswith(best + ".")]
            done.update(members)
            out.append(f"{best}.* ({len(members)})")
    return out
