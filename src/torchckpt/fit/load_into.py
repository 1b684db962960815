"""``torchckpt.load_into``: any checkpoint into any model, with a plan and a report.

Steps: find the weights (the candidate that fits the model best) -> align keys (align.py) -> plan
each model key (load, cast, mismatch, missing, tied) -> apply module by module through each
module's own ``_load_from_state_dict`` (so BatchNorm's version handling and custom hooks keep working),
copying each tensor straight onto its parameter's device and releasing the mapped file pages
as soon as a module is done (peak memory stays near one copy of the model).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Literal, Mapping, get_args

from ..errors import CheckpointError, StateDictMismatchError, WeightsNotFoundError
from ..read.opener import open_checkpoint
from ..read.tensors import dtype_name, release, to_torch
from ..read.trust import Policy, resolve_policy
from ..read import Mode, Stub, TreeMeter
from ..transforms import TransformSpec
from .adapt import Derived, choose, expand, resolve, split_rename, suggest_layouts
from .align import RenameSpec, align_keys
from .placement import Placer
from .plan import LoadOptions, Opened, Plan, Step
from .report import Adapted, LoadReport, Mismatch, Origin
from .shards import is_sharded, shard_like
from .select import select, shapes
from .tree import TensorMeta, is_module_like

if TYPE_CHECKING:  # torch stays lazy: only type checkers import it here
    import torch

    from ..storage.source import SourceLike

__all__ = ["load_into", "OnMismatch", "DtypeRule"]

OnMismatch = Literal["error", "skip", "copy_overlap", "adapt"]
DtypeRule = Literal["model", "error"]
ON_MISMATCH = get_args(OnMismatch)
ACTIONS = {"error": "error", "skip": "skipped", "copy_overlap": "copied overlap"}


def load_into(model: "torch.nn.Module", source: "SourceLike | Mapping[str, Any] | torch.nn.Module", *,
              strict: bool = True, key: str | None = None, prefix: str | None = None,
              rename: RenameSpec = None, on_mismatch: OnMismatch | None = None, dtype: DtypeRule = "model",
              map_location: Any = None, dry_run: bool = False, assign: bool = False, policy: Policy | None = None,
              trust: bool = False, allow: Iterable[str] | str | None = None,
              storage_options: Mapping[str, Any] | None = None, mmap: bool = False,
              transforms: TransformSpec = None) -> LoadReport:
    """Load the weights in ``source`` into ``model`` and report exactly what happened.

    Args:
        model: an ``nn.Module`` (wrapped in DataParallel/DDP or compiled, or built on ``meta``).
        source: anything :func:`torchckpt.load` reads, or an in-memory state dict, training dict or module.
        strict: every model tensor must be loaded and every checkpoint tensor used; otherwise raise
            :class:`StateDictMismatchError` before touching the model. ``False`` loads the intersection
            and reports the rest (resized tensors are skipped unless ``on_mismatch`` says otherwise).
        key: dotted path of the weights inside a training dict (``"model_ema"``, ``"state_dict"``),
            when the automatic choice is ambiguous or wrong.
        prefix: the checkpoint is of a sub-module (``"backbone."`` is prepended), or the model is a
            sub-module of the checkpoint's network (``"backbone."`` is selected and removed; the rest
            of the network is reported as outside the selected part, not as unexpected).
        rename: explicit rules: ``{regex: replacement}``, a list of pairs, or a function of the key.
            A tuple of patterns mapping to one replacement fuses the matches (concatenated on dim 0 in
            the tuple's order); one pattern mapping to a list splits the match evenly on dim 0. Fuse and
            split entries run before the plain rules; the report names each under ``adapted``.
        on_mismatch: a tensor whose shape differs: ``"error"`` (raise listing all; the default when
            ``strict``), ``"skip"`` (keep the model's values; the default when not ``strict``),
            ``"copy_overlap"`` (copy the overlapping slice), ``"adapt"`` (apply the transform of
            :mod:`torchckpt.transforms` that fits the shapes and the name, or fail naming why none fits).
        dtype: ``"model"`` casts to the model's dtype (reported); ``"error"`` refuses to cast.
        map_location: device for a model built on ``meta`` (default: CPU). Otherwise each tensor goes
            to the device of the parameter it loads into.
        dry_run: plan only: the model is not modified, and nothing raises for a mismatch (the report says).
        assign: put the checkpoint's tensors into the model instead of copying into its tensors
            (``nn.Module.load_state_dict(assign=True)``), cast and moved like a copy would be.
        policy, trust, allow: what the file's pickles may import; see :func:`torchckpt.load`.
        storage_options: options for a URL ``source``'s fsspec filesystem (see :func:`torchckpt.load`).
        mmap: only matters when tensors become parameters (a model on ``meta``, or ``assign=True``).
            ``False`` (the default): each is read into the process's own memory (``pread`` straight into
            the parameter, one copy), so the model never aliases the file and ``torch.save(
            model.state_dict(), same_path)`` is safe. ``True``: zip and safetensors tensors at local
            paths become copy-on-write views of the file (no copy, like ``torch.load(mmap=True)`` +
            ``load_state_dict(assign=True)``); truncating or rewriting that file in place while the model
            lives then kills the process (SIGBUS). A model with real parameters is always copied into,
            and the file's pages are released as it goes, whatever ``mmap`` says.
        transforms: adaptations from :mod:`torchckpt.transforms`: a transform or its name
            (``"interpolate_pos_embed"``, ``"adapt_input_conv"``, ``"mean_resize"``), a list of them,
            or ``{key: name}``; each runs per tensor while streaming and is named in the report.

    Returns:
        A :class:`~torchckpt.fit.report.LoadReport`; ``print(report)`` summarises it.
    """
    if on_mismatch is None:
        on_mismatch = "error" if strict else "skip"
    if on_mismatch not in ON_MISMATCH:
        raise ValueError(f"on_mismatch must be one of {ON_MISMATCH}, not {on_mismatch!r}")
    if dtype not in ("model", "error"):
        raise ValueError(f"dtype must be 'model' or 'error', not {dtype!r}")
    options = LoadOptions(strict=strict, key=key, prefix=prefix, rename=rename, on_mismatch=on_mismatch, dtype=dtype,
                          map_location=map_location, dry_run=dry_run, assign=assign, mmap=mmap, transforms=transforms)
    with _open_source(source, resolve_policy(policy, trust, allow), storage_options) as opened:
        try:
            report = _plan_and_apply(model, opened, options)
        except CheckpointError as exc:
            raise exc.with_path(opened.name)
    saved_on = opened.saved_on
    if saved_on and report.loaded:
        import torch  # lazy: torchckpt imports torch only when tensors are needed

        devices = sorted({str(t.device) for t in model.state_dict().values() if isinstance(t, torch.Tensor)})
        verb = "would be" if dry_run else "were"
        report.notes.append(f"tensors saved on {', '.join(sorted(saved_on))} {verb} copied onto each "
                            f"parameter's device ({', '.join(devices)})")
    return report


@contextlib.contextmanager
def _open_source(source: Any, policy: Policy, storage_options: Mapping[str, Any] | None = None) -> Iterator[Opened]:
    if isinstance(source, (dict, list, Stub)) or is_module_like(source):
        what = "in-memory module" if is_module_like(source) and not isinstance(source, Stub) else "in-memory"
        yield Opened(source, "<module>" if what == "in-memory module" else "<in-memory checkpoint>", what, [], None,
                     frozenset(), TreeMeter(policy.budget))
        return
    with open_checkpoint(source, Mode.BUILD, policy, lazy=True, storage_options=storage_options) as ckpt:
        rank_file = ckpt.details.get("deepspeed_rank_file")
        if rank_file is not None and rank_file["kind"] == "partial":
            raise WeightsNotFoundError(f"one rank file of a DeepSpeed ZeRO checkpoint: {rank_file['note']}",
                                       path=ckpt.name, hint=f"Pass the folder: load_into(model, {rank_file['folder']!r})")
        saved_on = {loc for loc in (ckpt.details.get("locations") or {}) if loc not in ("cpu", "meta")}
        yield Opened(ckpt.tree, ckpt.name, ckpt.description, list(ckpt.notes), ckpt.reader, frozenset(saved_on),
                     ckpt.tree_meter)


QUANTIZED_MODULES = ("torch.ao.nn.quantized.", "torch.ao.nn.intrinsic.quantized.", "torch.nn.quantized.",
                     "torch.nn.intrinsic.quantized.")


def _as_tensor(value: Any) -> Any:
    import numpy as np
    import torch  # lazy: torchckpt imports torch only when tensors are needed

    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    return value


def _dtype(value: Any) -> Any:
    return value.torch_dtype() if isinstance(value, TensorMeta) else value.dtype


def _plan_and_apply(model: Any, opened: Opened, options: LoadOptions) -> LoadReport:
    plan = _plan(model, opened, options)
    report = plan.report
    if options.dry_run:
        return report  # the plan, whatever it says: the caller reads report.ok
    errors = [m for m in report.mismatched if m.action == "error"]
    if errors or (options.strict and not report.ok):
        raise _misfit_error(report, errors, options.strict)
    _apply(model, plan, opened.reader, options)
    report.applied = True
    return report


def _plan(model: Any, opened: Opened, options: LoadOptions) -> Plan:
    """One :class:`Step` per model key that gets a value, and the report of everything else (raises only for
    ``dtype="error"`` or an unadaptable shape, and never when ``dry_run``)."""
    import torch  # lazy: torchckpt imports torch only when tensors are needed

    dry_run, on_mismatch = options.dry_run, options.on_mismatch
    model_sd = model.state_dict(keep_vars=True)
    candidate = select(opened.tree, options.key, model_sd, opened.meter)
    ckpt = {(k.decode("utf-8", "replace") if isinstance(k, bytes) else k): v for k, v in candidate.state_dict.items()}
    report = LoadReport(source=opened.name, format=opened.format, weights_path=candidate.where,
                        model_keys=len(model_sd), checkpoint_keys=len(ckpt), notes=opened.notes + candidate.notes,
                        dry_run=dry_run)
    if candidate.source == "module stub":
        report.notes.append(f"whole-model pickle read through inert stubs ({candidate.module_class} was not "
                            "imported, no code from the file ran); weights taken from its modules")
    tensors = {k: _as_tensor(v) for k, v in ckpt.items() if hasattr(v, "shape")}
    report.checkpoint_shapes = shapes(tensors)
    keyed, plain = split_rename(options.rename)
    rules, more = resolve(options.transforms)
    tensors, adapt_notes = expand(tensors, keyed + more, lambda v: tuple(v.shape))
    report.notes.extend(adapt_notes)
    first_conv = next((k for k, v in model_sd.items() if k.endswith("weight") and getattr(v, "ndim", 0) == 4), None)
    alignment = align_keys(shapes(tensors), shapes(model_sd), rename=plain, prefix=options.prefix)
    report.outside = list(alignment.outside)
    by_model = {m: c for c, m in alignment.mapping.items()}
    for c, m in alignment.mapping.items():
        if c != m:
            report.renamed[c] = (m, alignment.rules.get(c, "renamed"))
    steps: dict[str, Step] = {}
    owner: dict[int, str] = {}
    for mkey, target in model_sd.items():
        ckey = by_model.get(mkey)
        if ckey is None and mkey in ckpt and not hasattr(ckpt[mkey], "shape"):
            steps[mkey] = Step(mkey, mkey, "load", ckpt[mkey])  # non-tensor extra state, passed through
            report.loaded.append(mkey)
            continue
        if ckey is None:
            tie = owner.get(id(target)) if isinstance(target, torch.Tensor) else None
            if tie is None and isinstance(target, torch.Tensor):
                tie = next((k for k, v in model_sd.items() if v is target and k != mkey and k in by_model), None)
            if tie is not None:
                report.tied[mkey] = tie
            elif _pre_041_counter(mkey, by_model, tensors):
                report.ignored.append(mkey)
            else:
                report.missing.append(mkey)
            continue
        value = tensors[ckey]
        owner.setdefault(id(target), mkey)
        origin = _origin(value, ckey)
        if not isinstance(target, torch.Tensor):
            steps[mkey] = Step(mkey, ckey, "load", value)
            report.loaded.append(mkey)
            continue
        step = Step(mkey, ckey, "load", value)
        if tuple(value.shape) != tuple(target.shape):
            vshape, tshape = tuple(value.shape), tuple(target.shape)
            transform, note = None, ""
            reshape = [s for s in vshape if s != 1] == [s for s in tshape if s != 1]
            try:
                if not reshape:
                    transform, note = choose(mkey, ckey, vshape, tshape, rules, on_mismatch == "adapt", first_conv)
            except StateDictMismatchError as exc:
                if not dry_run:
                    raise
                transform, note = None, "error: " + exc.reason
            if reshape:
                step = Step(mkey, ckey, "reshape", value)
                origin = Origin("reshape", origin.keys) if origin.op == "copy" else Origin("transform", origin.keys)
                report.notes.append(f"{mkey}: reshaped {list(vshape)} -> {list(tshape)}")
            elif transform is not None:
                step = Step(mkey, ckey, "transform", value, transform)
                report.adapted.append(Adapted(mkey, tuple(origin.keys), transform.name,
                                              transform.describe(vshape, tshape)))
                origin = Origin("transform", origin.keys)
            else:
                action = "error" if on_mismatch == "adapt" or note.startswith("error") else ACTIONS[on_mismatch]
                if action == "copied overlap" and len(vshape) != len(tshape):
                    action = "error"
                report.mismatched.append(Mismatch(mkey, ckey, vshape, tshape, action, note))
                if action == "copied overlap":
                    steps[mkey] = Step(mkey, ckey, "copy_overlap", value)
                continue
        if isinstance(tensors[ckey], Derived):
            d = tensors[ckey]
            report.adapted.append(Adapted(mkey, tuple(d.parts), d.transform, f"{d.op} -> {list(d.shape)}"))
        report.origins[mkey] = origin
        vdtype = _dtype(tensors[ckey])
        if vdtype != target.dtype:
            if options.dtype == "error" and not dry_run:
                raise StateDictMismatchError(f"{ckey} is {vdtype} but the model's {mkey} is {target.dtype}",
                                             hint="Pass dtype='model' to cast (the default).", report=report)
            report.cast.append((mkey, dtype_name(vdtype), dtype_name(target.dtype)))
        steps[mkey] = step
        report.loaded.append(mkey)
    report.unexpected = [c for c in tensors if c not in alignment.mapping
                         and c not in alignment.outside and not (c in model_sd and c in steps)]
    if report.missing and report.unexpected:
        report.notes.extend("would fit with " + hint for hint in suggest_layouts(
            {k: tuple(model_sd[k].shape) for k in report.missing if hasattr(model_sd[k], "shape")},
            {c: tuple(tensors[c].shape) for c in report.unexpected}))
    return Plan(report, steps, dict(alignment.mapping), getattr(ckpt, "_metadata", None) or {})


def _pre_041_counter(mkey: str, by_model: Mapping[str, str], tensors: Mapping[str, Any]) -> bool:
    """A BatchNorm's ``num_batches_tracked`` that the file lacks because of its era (torch < 0.4.1 did not
    have it): the checkpoint has this layer's running statistics, and no counter anywhere. A layer that is
    new in the model (no running statistics in the file) is missing, not old."""
    if not mkey.endswith("num_batches_tracked"):
        return False
    prefix = mkey[:-len("num_batches_tracked")]
    return prefix + "running_mean" in by_model and not any(k.endswith("num_batches_tracked") for k in tensors)


def _misfit_error(report: LoadReport, errors: list[Mismatch], strict: bool) -> StateDictMismatchError:
    """One error for everything that did not fit, counts first, with the one change that makes the call succeed."""
    missing, unexpected = (report.missing, report.unexpected) if strict else ([], [])
    counts = [f"{len(missing)} missing" if missing else "", f"{len(unexpected)} unexpected" if unexpected else "",
              f"{len(errors)} with another shape" if errors else ""]
    head = (f"the checkpoint does not fit the model: {', '.join(c for c in counts if c)}; nothing was loaded "
            f"({len(report.loaded)} of {report.model_keys} model tensors fit; the checkpoint has "
            f"{report.checkpoint_keys})")
    fix = []
    if missing or unexpected:
        fix.append("strict=False")
    if errors:
        fix.append('on_mismatch="skip"')
    what = ("load the {n} tensors that fit and keep the model's values for the rest"
            .format(n=len(report.loaded)))
    hint = f"Pass {', '.join(fix)} to {what}"
    if not report.loaded:  # "load the 0 tensors that fit" is no way forward: the file or the names are wrong
        hint = (f"No tensor fits: check that this checkpoint is for this model, or align names with prefix=/rename= "
                f"({', '.join(fix)} would succeed but load no tensor)")
    elif report.model_keys and len(report.loaded) * 2 < report.model_keys:
        hint = (f"Most of the model did not fit: check that this checkpoint is for this model (or align names "
                f"with prefix=/rename=). {hint}")
    details = report.render().split("\n", 1)[1:]  # the listing, without its summary line (head says it)
    return StateDictMismatchError("\n".join([head, *details]), hint=hint + ".", report=report)


def _apply(model: Any, plan: Plan, src: Any, options: LoadOptions) -> None:
    """Carry out ``plan``'s steps module by module (``src`` reads the tensors still in the file)."""
    import torch  # lazy: torchckpt imports torch only when tensors are needed

    report, steps, metadata = plan.report, plan.steps, plan.metadata
    assign, map_location = options.assign, options.map_location
    inverse = {m: c for c, m in plan.mapping.items()}
    on_meta = any(p.device.type == "meta" for p in model.parameters())
    target_device = torch.device(map_location) if isinstance(map_location, (str, torch.device)) else \
        torch.device("cpu")
    ties = _tie_groups(model) if on_meta else []
    placer = Placer(src, assign=on_meta or assign, mmap=options.mmap)
    own: dict[str, list[str]] = {}  # module path -> the keys it saves itself (quantized modules: weight, scale, ...)
    for full in steps:
        path, _, leaf = full.rpartition(".")
        own.setdefault(path, []).append(leaf)
    for module_prefix, module in model.named_modules():
        prefix = module_prefix + "." if module_prefix else ""
        local = {}
        names = list(module._parameters) + list(module._buffers) + ["_extra_state"]
        for name in names + [n for n in own.get(module_prefix, ()) if n not in names]:
            full = prefix + name
            if full not in steps:
                continue
            step = steps[full]
            value = step.value
            target = module._parameters.get(name, module._buffers.get(name))
            device = target_device if on_meta or target is None else target.device
            if step.action == "copy_overlap":
                value = _overlap(target, _read(value, src))
            elif step.action == "transform":
                value = placer.place(_transformed(step.transform, _read(value, src), target, full, src), target, device)
            elif step.action == "reshape":
                raw = _read(value, src) if isinstance(value, Derived) else value
                value = placer.place(raw, target, device, tuple(target.shape))
            elif isinstance(value, Derived):
                value = placer.place(value.materialize(src), target, device)
            elif target is not None and is_sharded(target):
                value = shard_like(value, target, src)  # FSDP2 / DTensor: this rank reads only its slice
            else:
                value = placer.place(value, target, device)
            local[full] = value
        if not local:
            continue
        ckpt_prefix = inverse.get(next(iter(local)), "").rsplit(".", 1)[0]
        local_metadata = dict(metadata.get(ckpt_prefix, metadata.get(module_prefix, {})))
        if "version" not in local_metadata and type(module).__module__.startswith(QUANTIZED_MODULES):
            # state_dict_of and the readers give a quantized module's keys in today's layout; without a
            # version its _load_from_state_dict would look for the layout of torch 1.4
            local_metadata["version"] = getattr(module, "_version", None)
        if on_meta or assign:
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
                            "(mmap=True, like torch.load(mmap=True)); replace the file atomically (torchckpt.save does), "
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


def _transformed(transform: Any, tensor: Any, target: Any, key: str, src: Any) -> Any:
    try:
        out = transform(tensor, tuple(target.shape))
        release(src, tensor)  # read once: drop its file pages now (the output is new memory)
        return out
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:  # values torch cannot resample
        raise StateDictMismatchError(f"{transform.name} failed on {key} ({list(tensor.shape)} -> "
                                     f"{list(target.shape)}): {type(exc).__name__}: {exc}",
                                     hint="Leave this key out of transforms= (strict=False skips it).") from None


def _read(value: Any, src: Any) -> Any:
    return value.materialize(src) if isinstance(value, Derived) else to_torch(value, src)


def _origin(value: Any, ckey: str) -> Origin:
    """How a model tensor is made from checkpoint tensors (what the optimizer state can follow)."""
    if isinstance(value, Derived):
        return Origin(value.op, list(value.parts), value.dim, value.index, value.pieces)
    return Origin("copy", [ckey])


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
