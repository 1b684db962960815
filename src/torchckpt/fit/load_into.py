"""``torchckpt.load_into``: any checkpoint into any model, with a plan and a report.

Steps: find the weights (the candidate that fits the model best) -> align keys (align.py) -> plan
each model key (load, cast, mismatch, missing, tied) -> apply module by module through each
module's own ``_load_from_state_dict`` (so BatchNorm's version handling and custom hooks keep working),
copying each tensor straight onto its parameter's device and releasing the mapped file pages
as soon as a module is done (peak memory stays near one copy of the model).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

from .align import RenameRules, align_keys
from .placement import Placer
from ..errors import AmbiguousCheckpointError, CheckpointError, StateDictMismatchError, WeightsNotFoundError
from .report import LoadReport, Mismatch
from .shards import is_sharded, shard_like
from .tree import Candidate, find_state_dicts, is_module_like, is_state_dict, state_dict_of
from ..read.unpickle.meta import TensorMeta

__all__ = ["load_into"]

ON_MISMATCH = ("error", "skip", "copy_overlap")


def load_into(model: Any, source: Any, *, strict: bool = True, key: str | None = None, prefix: str | None = None,
              rename: RenameRules = None, on_mismatch: str = "error", dtype: str = "model",
              map_location: Any = None, dry_run: bool = False, trust: bool = False) -> LoadReport:
    """Load the weights in ``source`` into ``model`` and report exactly what happened.

    Args:
        model: an ``nn.Module`` (wrapped in DataParallel/DDP or compiled, or built on ``meta``).
        source: anything :func:`torchckpt.load` reads, or an in-memory state dict, training dict or module.
        strict: every model tensor must be loaded and every checkpoint tensor used; otherwise raise
            :class:`StateDictMismatchError` before touching the model. ``False`` loads the intersection.
        key: dotted path of the weights inside a training dict (``"model_ema"``, ``"state_dict"``),
            when the automatic choice is ambiguous or wrong.
        prefix: the checkpoint is of a sub-module (``"backbone."`` is prepended), or the model is a
            sub-module of the checkpoint's network (``"backbone."`` is selected and removed).
        rename: explicit rules: ``{regex: replacement}``, a list of pairs, or a function of the key.
        on_mismatch: a tensor whose shape differs: ``"error"`` (default, raise listing all),
            ``"skip"`` (keep the model's values), ``"copy_overlap"`` (copy the overlapping slice).
        dtype: ``"model"`` casts to the model's dtype (reported); ``"error"`` refuses to cast.
        map_location: device for a model built on ``meta`` (default: CPU). Otherwise each tensor goes
            to the device of the parameter it loads into.
        dry_run: plan only; the model is not modified.
        trust: see :func:`torchckpt.load`.

    Returns:
        A :class:`~torchckpt.fit.report.LoadReport`; ``print(report)`` summarises it.
    """
    if on_mismatch not in ON_MISMATCH:
        raise ValueError(f"on_mismatch must be one of {ON_MISMATCH}, not {on_mismatch!r}")
    if dtype not in ("model", "error"):
        raise ValueError(f"dtype must be 'model' or 'error', not {dtype!r}")
    with _open_source(source, trust) as (obj, name, fmt, notes, src):
        try:
            report = _plan_and_apply(model, obj, name, fmt, notes, src, strict=strict, key=key, prefix=prefix,
                                     rename=rename, on_mismatch=on_mismatch, dtype=dtype,
                                     map_location=map_location, dry_run=dry_run)
        except CheckpointError as exc:
            raise exc.with_path(name)
    return report


@contextlib.contextmanager
def _open_source(source: Any, trust: bool) -> Iterator[tuple[Any, str, str, list[str], Any]]:
    import torch

    if isinstance(source, torch.nn.Module):
        yield source, "<module>", "in-memory module", [], None
        return
    if isinstance(source, (dict, list)) or type(source).__name__ == "Stub" or is_module_like(source):
        yield source, "<in-memory checkpoint>", "in-memory", [], None
        return
    from ..read.opener import open_checkpoint
    from ..read.unpickle.policy import Policy

    with open_checkpoint(source, "build", Policy.make(trust), lazy=True) as ckpt:
        yield ckpt.tree, ckpt.name, ckpt.description, list(ckpt.notes), ckpt.reader


def _select(obj: Any, key: str | None, model_sd: Mapping[str, Any]) -> tuple[Candidate, list[str]]:
    notes: list[str] = []
    if key is not None:
        value = _lookup(obj, key)
        if is_state_dict(value):
            return Candidate(key, value, "state dict"), notes
        if is_module_like(value):
            return Candidate(key, state_dict_of(value), "module"), notes
        raise WeightsNotFoundError(f"key={key!r} points to a {type(value).__name__}, not weights",
                                   hint=_candidates_hint(obj))
    candidates = find_state_dicts(obj)
    if not candidates:
        raise WeightsNotFoundError("no state dict or module found in the checkpoint", hint=_top_level_hint(obj))
    if len(candidates) == 1:
        return candidates[0], notes
    scored = []
    for cand in candidates:
        try:
            score = len(align_keys(_shapes(cand.state_dict), _shapes(model_sd)).mapping)
        except AmbiguousCheckpointError:
            score = 0
        scored.append((score, cand))
    scored.sort(key=lambda t: -t[0])
    (best, first), (second, other) = scored[0], scored[1]
    if best == second and not _same_tensors(first.state_dict, other.state_dict):
        tied = [c.path or "<root>" for s, c in scored if s == best]
        raise AmbiguousCheckpointError(
            f"{len(tied)} places in the checkpoint fit the model equally well ({best} keys each): "
            f"{', '.join(tied)}", candidates=tied,
            hint=f"Choose one with key=..., e.g. load_into(model, path, key={tied[0]!r}).")
    others = ", ".join(f"{c.path or '<root>'} ({s} keys fit)" for s, c in scored[1:])
    notes.append(f"weights taken from '{first.path or '<root>'}' ({best} keys fit); also found: {others}")
    return first, notes


def _same_tensors(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a.keys() == b.keys() and all(a[k] is b[k] for k in a)


def _lookup(obj: Any, dotted: str) -> Any:
    current, rest = obj, dotted
    while rest:
        items = dict(current) if isinstance(current, dict) else (current.stub_attributes()
                                                                 if hasattr(current, "stub_attributes") else {})
        for k in sorted((k for k in items if isinstance(k, str)), key=len, reverse=True):
            if rest == k or rest.startswith(k + "."):
                current, rest = items[k], rest[len(k) + 1:]
                break
        else:
            raise WeightsNotFoundError(f"key={dotted!r} not found in the checkpoint", hint=_candidates_hint(obj))
    return current


def _candidates_hint(obj: Any) -> str:
    found = [c.path or "<root>" for c in find_state_dicts(obj)]
    return f"Weights found at: {', '.join(found)}." if found else _top_level_hint(obj)


def _top_level_hint(obj: Any) -> str:
    if isinstance(obj, dict):
        return f"Top-level keys: {', '.join(map(str, list(obj)[:20]))}. Pass key=... to point at the weights."
    return f"The checkpoint holds a {type(obj).__name__}; `torchckpt inspect FILE` shows its structure."


def _shapes(sd: Mapping[str, Any]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in sd.items() if isinstance(k, str) and hasattr(v, "shape")}


def _as_tensor(value: Any) -> Any:
    import numpy as np
    import torch

    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    return value


def _dtype(value: Any) -> Any:
    return value.torch_dtype() if isinstance(value, TensorMeta) else value.dtype




def _materialize(value: Any, src: Any) -> Any:
    return value.materialize(src) if isinstance(value, TensorMeta) else value


def _plan_and_apply(model: Any, obj: Any, name: str, fmt: str, notes: list[str], src: Any, *, strict: bool,
                    key: str | None, prefix: str | None, rename: RenameRules, on_mismatch: str, dtype: str,
                    map_location: Any, dry_run: bool) -> LoadReport:
    import torch

    model_sd = model.state_dict(keep_vars=True)
    candidate, select_notes = _select(obj, key, model_sd)
    ckpt = {(k.decode("utf-8", "replace") if isinstance(k, bytes) else k): v for k, v in candidate.state_dict.items()}
    report = LoadReport(source=name, format=fmt, weights_path=candidate.path or "<root>", model_keys=len(model_sd),
                        checkpoint_keys=len(ckpt), notes=notes + select_notes, dry_run=dry_run)
    tensors = {k: _as_tensor(v) for k, v in ckpt.items() if hasattr(v, "shape")}
    alignment = align_keys(_shapes(tensors), _shapes(model_sd), rename=rename, prefix=prefix)
    by_model = {m: c for c, m in alignment.mapping.items()}
    for c, m in alignment.mapping.items():
        if c != m:
            report.renamed[c] = (m, alignment.rules.get(c, "renamed"))
    prepared: dict[str, Any] = {}
    owner: dict[int, str] = {}
    for mkey, target in model_sd.items():
        ckey = by_model.get(mkey)
        if ckey is None and mkey in ckpt and not hasattr(ckpt[mkey], "shape"):
            prepared[mkey] = ckpt[mkey]  # non-tensor extra state, passed through
            report.loaded.append(mkey)
            continue
        if ckey is None:
            tie = owner.get(id(target)) if isinstance(target, torch.Tensor) else None
            if tie is None and isinstance(target, torch.Tensor):
                tie = next((k for k, v in model_sd.items() if v is target and k != mkey and k in by_model), None)
            if tie is not None:
                report.tied[mkey] = tie
            elif mkey.endswith("num_batches_tracked"):
                report.ignored.append(mkey)
            else:
                report.missing.append(mkey)
            continue
        value = tensors[ckey]
        owner.setdefault(id(target), mkey)
        if not isinstance(target, torch.Tensor):
            prepared[mkey] = value
            report.loaded.append(mkey)
            continue
        if tuple(value.shape) != tuple(target.shape):
            if value.numel() == target.numel() and [s for s in value.shape if s != 1] == \
                    [s for s in target.shape if s != 1]:
                value = ("reshape", value)
                report.notes.append(f"{mkey}: reshaped {list(tensors[ckey].shape)} -> {list(target.shape)}")
            else:
                action = {"error": "error", "skip": "skipped", "copy_overlap": "copied overlap"}[on_mismatch]
                if action == "copied overlap" and value.dim() != target.dim():
                    action = "error"
                report.mismatched.append(Mismatch(mkey, ckey, tuple(value.shape), tuple(target.shape), action))
                if action == "copied overlap":
                    prepared[mkey] = ("overlap", value)
                continue
        vdtype = _dtype(tensors[ckey])
        if vdtype != target.dtype:
            if dtype == "error":
                raise StateDictMismatchError(f"{ckey} is {vdtype} but the model's {mkey} is {target.dtype}",
                                             hint="Pass dtype='model' to cast (the default).", report=report)
            report.cast.append((mkey, str(vdtype).replace("torch.", ""), str(target.dtype).replace("torch.", "")))
        prepared[mkey] = value
        report.loaded.append(mkey)
    report.unexpected = [c for c in ckpt if c not in alignment.mapping and hasattr(ckpt[c], "shape")
                         and not (c in model_sd and c in prepared)]
    errors = [m for m in report.mismatched if m.action == "error"]
    if errors:
        raise StateDictMismatchError(_mismatch_message(report, errors), report=report,
                                     hint='Pass on_mismatch="skip" to keep the model\'s values for these, '
                                          'on_mismatch="copy_overlap" to copy the overlapping part, or rename=...')
    if strict and not report.ok:
        raise StateDictMismatchError(
            f"the checkpoint does not fit the model exactly:\n{report}",
            hint="Pass strict=False to load the matching part (the report lists the rest), "
                 "or rename=/prefix= to align names.", report=report)
    if dry_run:
        return report
    _apply(model, prepared, ckpt, alignment.mapping, src, map_location, report)
    report.applied = True
    return report


def _mismatch_message(report: LoadReport, errors: list[Mismatch]) -> str:
    width = max(len(m.key) for m in errors)
    rows = "\n".join(f"  {m.key:{width}s}  checkpoint {list(m.checkpoint_shape)}  model {list(m.model_shape)}"
                     for m in errors)
    return (f"{len(errors)} of {report.model_keys} tensors did not fit the model:\n{rows}\n"
            f"The other {len(report.loaded)} fit; nothing was loaded.")


def _apply(model: Any, prepared: dict[str, Any], ckpt: dict, mapping: dict[str, str], src: Any, map_location: Any,
           report: LoadReport) -> None:
    import torch

    metadata = getattr(ckpt, "_metadata", None) or {}
    inverse = {m: c for c, m in mapping.items()}
    on_meta = any(p.device.type == "meta" for p in model.parameters())
    target_device = torch.device(map_location) if isinstance(map_location, (str, torch.device)) else \
        torch.device("cpu")
    ties = _tie_groups(model) if on_meta else []
    placer = Placer(src, assign=on_meta)
    for module_prefix, module in model.named_modules():
        prefix = module_prefix + "." if module_prefix else ""
        local = {}
        for name in list(module._parameters) + list(module._buffers) + ["_extra_state"]:
            full = prefix + name
            if full not in prepared:
                continue
            value = prepared[full]
            target = module._parameters.get(name, module._buffers.get(name))
            device = target_device if on_meta or target is None else target.device
            if isinstance(value, tuple) and value[0] == "overlap":
                value = _overlap(target, _materialize(value[1], src))
            elif isinstance(value, tuple) and value[0] == "reshape":
                value = placer.place(value[1], target, device, tuple(target.shape))
            elif target is not None and is_sharded(target):
                value = shard_like(value, target, src)  # FSDP2 / DTensor: this rank reads only its slice
            else:
                value = placer.place(value, target, device)
            local[full] = value
        if not local:
            continue
        ckpt_prefix = inverse.get(next(iter(local)), "").rsplit(".", 1)[0]
        local_metadata = dict(metadata.get(ckpt_prefix, metadata.get(module_prefix, {})))
        if on_meta:
            local_metadata["assign_to_params_buffers"] = True
        missing: list[str] = []
        unexpected: list[str] = []
        errors: list[str] = []
        with torch.no_grad():
            module._load_from_state_dict(local, prefix, local_metadata, False, missing, unexpected, errors)
        if errors:
            raise StateDictMismatchError(f"loading {module_prefix or 'the model'} failed: {'; '.join(errors)}",
                                         report=report)
        placer.release()
    placer.finish()
    if placer.mapped:
        report.notes.append(f"{placer.mapped} tensors were placed without a copy: they map the file copy-on-write "
                            "(like torch.load(mmap=True)); replace the file atomically (torchckpt.save does), "
                            "never overwrite it in place, while the model is in use")
    for module_name, attr, source_key in ties:
        _retie(model, module_name, attr, source_key)
    if on_meta:
        left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if left:
            report.notes.append(f"still on the meta device (not in the checkpoint): {', '.join(left[:5])}")
    incompatible = torch.nn.modules.module._IncompatibleKeys(report.missing, report.unexpected)
    for module in model.modules():
        for hook in module._load_state_dict_post_hooks.values():
            hook(module, incompatible)


def _overlap(target: Any, value: Any) -> Any:
    out = target.detach().clone()
    region = tuple(slice(0, min(a, b)) for a, b in zip(out.shape, value.shape))
    out[region] = value[region].to(device=out.device, dtype=out.dtype)
    return out


def _tie_groups(model: Any) -> list[tuple[str, str, str]]:
    """(module name, attribute, key of the first owner) for parameters shared under several names."""
    first: dict[int, str] = {}
    ties = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is None:
                continue
            full = f"{module_name}.{attr}" if module_name else attr
            if id(param) in first:
                ties.append((module_name, attr, first[id(param)]))
            else:
                first[id(param)] = full
    return ties


def _retie(model: Any, module_name: str, attr: str, source_key: str) -> None:
    owner_name, _, owner_attr = source_key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    module = model.get_submodule(module_name) if module_name else model
    setattr(module, attr, getattr(owner, owner_attr))
