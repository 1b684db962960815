"""DeepSpeed checkpoint folders (``engine.save_checkpoint``), ZeRO stages 0-3, read as one fp32 state dict.

A run folder holds ``latest`` (the tag, e.g. ``global_step300``) and one folder per tag; a step folder holds

* ``mp_rank_00_model_states.pt`` (stages 0-2): the module in its training dtype, ``buffer_names``,
  ``param_shapes`` (the trainable parameters of each optimizer group, in order), frozen parameters,
  ``shared_params`` (tied weights), the step;
* ``zero_pp_rank_<r>_mp_rank_00_model_states.pt`` (stage 3, one per rank): the same, with empty
  parameters and each rank's slice of the frozen ones;
* ``[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` (stages 1-3): rank r's slice of the fp32
  master weights of every group and the optimizer state (Adam moments) aligned with it.

``load`` gives what DeepSpeed's ``zero_to_fp32`` gives, bit for bit: buffers (floating ones in fp32), frozen
parameters, the trainable ones gathered from every rank's fp32 slice, tied names as the same tensor. Every
file goes through the safe unpickler (DeepSpeed's classes become inert stubs, DeepSpeed is never imported)
and lies inside the folder. The files are parsed one by one while each parsed rank's slices are read
(``pread``) into the full tensors on a pool of ``workers`` threads (:class:`.zero.RankCopies`); ``lazy``:
each is a :class:`ZeroTensor`. :func:`optimizer_state` gathers the Adam moments for :func:`torchckpt.resume`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import OrderedDict
from typing import Any, Callable

from ...errors import CheckpointError, CorruptCheckpointError, NotACheckpointError, UnsupportedFormatError
from ...storage.source import Source, confined_path
from ..devices import Relocator
from ..sniff import sniff
from ..unpickle.meta import MetaStorage, TensorMeta, contiguous_stride, dtype_name, meta_dtype
from ..unpickle.stubs import Stub
from .base import Checkpoint, ReadOptions
from .deepspeed_names import MODEL_FILE, OPTIM_FILE, STEP_DIR, deepspeed_kind, list_names
from .parallel import collector_paused
from .zero import ParamPlan, RankCopies, files_size, gather, plan_stage2, plan_stage3

__all__ = ["read_deepspeed", "ZeroTensor", "optimizer_state", "step_folder", "buffer_fp32", "frozen_param", "shape_of"]

MAX_TAG = 4096


def _tag(directory: str) -> str:
    """The step folder a run folder's ``latest`` names (confined to the run folder)."""
    latest = os.path.join(directory, "latest")
    steps = [n for n in list_names(directory) if STEP_DIR.match(n)]
    if not os.path.isfile(latest):
        raise CorruptCheckpointError(f"DeepSpeed run folder without a 'latest' file; it holds {len(steps)} step "
                                     f"folders ({', '.join(steps[-5:]) or 'none'})", path=directory,
                                     hint="Pass one step folder, e.g. " + os.path.join(directory, steps[-1])
                                     if steps else "Pass the step folder (global_stepN) that holds the rank files.")
    with open(confined_path(directory, "latest", what="file", checkpoint=directory), "rb") as fh:
        raw = fh.read(MAX_TAG + 1)
    if raw.startswith(b"version https://git-lfs"):
        raise NotACheckpointError("'latest' is a git-lfs pointer", path=latest, hint="Run `git lfs pull`.")
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        tag = ""
    if not tag or len(raw) > MAX_TAG or "\n" in tag or "\x00" in tag:
        raise CorruptCheckpointError(f"'latest' does not hold a step folder name ({raw[:60]!r})", path=latest)
    step = confined_path(directory, tag, what="step folder", checkpoint=directory)
    if not os.path.isdir(step):
        raise CorruptCheckpointError(f"'latest' names {tag!r}, which is not a folder here; step folders: "
                                     f"{', '.join(steps[-5:]) or 'none'}", path=directory,
                                     hint="Pass one of the step folders, or fix 'latest'.")
    return tag


@dataclasses.dataclass
class _Files:
    model: dict[int, str]  # rank (0 for stages 0-2) -> file name
    optim: dict[int, str]

    @property
    def stage3(self) -> bool:
        return any(MODEL_FILE.match(n).group(1) is not None for n in self.model.values())  # type: ignore[union-attr]


def _files(step_dir: str) -> _Files:
    names = list_names(step_dir)
    model: dict[int, str] = {}
    optim: dict[int, str] = {}
    for name in names:
        m, o = MODEL_FILE.match(name), OPTIM_FILE.match(name)
        if (m and int(m.group(2))) or (o and int(o.group(2))):
            raise UnsupportedFormatError(f"tensor-parallel DeepSpeed checkpoint ({name}): merging model-parallel "
                                         "ranks is not supported", path=step_dir,
                                         hint="Convert it with DeepSpeed's ds_to_universal.py first.")
        if m:
            model[int(m.group(1) or 0)] = name
        elif o:
            optim[int(o.group(1))] = name
    if not model:
        others = [n for n in names if n.endswith(".pt")]
        raise CorruptCheckpointError(
            f"DeepSpeed step folder without model states (mp_rank_00_model_states.pt); it holds {len(optim)} "
            f"optimizer partitions and {len(names)} files ({', '.join((others or names)[:6])})", path=step_dir,
            hint="Copy the whole step folder as DeepSpeed saved it.")
    for files, what in ((model, "model states"), (optim, "optimizer partitions")):
        if files and sorted(files) != list(range(len(files))):
            # the rank numbers are the file names': at most as many checks as files (a name may say rank 10^15)
            missing = [r for r in range(len(files)) if r not in files]
            beyond = sorted(r for r in files if r >= len(files))
            raise CorruptCheckpointError(f"DeepSpeed {what} of ranks {_few(missing)} are missing: {len(files)} files "
                                         f"are numbered up to rank {_few(beyond)}", path=step_dir,
                                         hint="Copy every rank's files of this step folder.")
    return _Files(model, optim)


def _few(ranks: list[int]) -> str:
    return str(ranks[:8])[:-1] + (f", ... {len(ranks) - 8} more]" if len(ranks) > 8 else "]")


def _lfs_check(step_dir: str, names: list[str]) -> None:
    pointers = []
    for name in names:
        with Source(confined_path(step_dir, name, what="file", checkpoint=step_dir)) as src:
            if sniff(src).kind == "git-lfs":
                pointers.append(name)
    if pointers:
        raise NotACheckpointError(f"{len(pointers)} of the {len(names)} DeepSpeed files are git-lfs pointers, not "
                                  f"the data ({', '.join(pointers[:4])}{' ...' if len(pointers) > 4 else ''})",
                                  path=step_dir, hint="The repository was cloned without its large files: run "
                                                      "`git lfs pull`, then load the folder again.")


def _get(mapping: Any, key: str, what: str, file: str) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise CorruptCheckpointError(f"{file} has no {key!r} ({what}); not a DeepSpeed checkpoint file as expected")
    return mapping[key]


def _stage_of(value: Any) -> int:
    if isinstance(value, Stub):  # deepspeed.runtime.zero.config.ZeroStageEnum(2)
        args: Any = value.__dict__.get("stub_args") or ()
        value = args[0] if isinstance(args, tuple) and len(args) == 1 else None
    if type(value) is not int or not 0 <= value <= 3:
        raise CorruptCheckpointError(f"ZeRO stage {value!r:.40} is not 0-3")
    return value


def shape_of(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > 64 or not all(type(v) is int and 0 <= v < 1 << 48
                                                                          for v in value):
        raise CorruptCheckpointError(f"{what}: shape {value!r:.80} is not a list of sizes")
    return tuple(value)


class _Ranks:
    """The open rank files of one step folder: their trees (tensors map the files) and their Sources."""

    def __init__(self, step_dir: str, opts: ReadOptions) -> None:
        self.step_dir, self.opts = step_dir, opts
        self.sources: dict[str, Source] = {}
        self.globals: list[Any] = []
        self.notes: list[str] = []

    def read(self, name: str) -> Any:
        """The tree of the rank file ``name``, parsed in this thread (the VM holds the GIL; copies run meanwhile)."""
        src, part = self._read_one(name, self.opts)
        self.sources[name] = src
        self.globals.extend(part.globals)
        self.notes.extend(f"{name}: {n}" for n in part.notes)
        return part.tree

    def _read_one(self, name: str, opts: ReadOptions) -> tuple[Source, Checkpoint]:
        assert opts.read_child is not None, "the opener passes the format dispatcher"
        src = Source(confined_path(self.step_dir, name, what="file", checkpoint=self.step_dir),
                     name=os.path.join(self.step_dir, name))
        try:
            return src, opts.read_child(src, opts)
        except BaseException:
            src.close()
            raise

    def release(self, name: str, view: Any) -> None:
        src = self.sources.get(name)
        if src is not None and view.is_contiguous():
            src.release_pointer(view.data_ptr(), view.numel() * view.element_size())

    def close(self) -> None:
        for src in self.sources.values():
            src.close()
        self.sources.clear()


class ZeroTensor(TensorMeta):
    """A consolidated parameter of a ZeRO checkpoint, gathered from the ranks' slices on ``materialize()``."""

    __slots__ = ("plan", "slices", "ranks", "names")

    def __init__(self, plan: ParamPlan, slices: list[list[Any]], ranks: _Ranks, names: list[str]) -> None:
        fp32 = meta_dtype("float32")  # its own storage: tensors are told apart (and tied ones found) by storage
        super().__init__(plan.shape, contiguous_stride(plan.shape), fp32, storage=MetaStorage(fp32, plan.numel * fp32.itemsize))
        self.plan, self.slices, self.ranks, self.names = plan, slices, ranks, names

    def materialize(self, source: Any = None, *, prefault: bool = False) -> Any:
        """The parameter as a new fp32 tensor (``source`` and ``prefault`` are unused: the rank files are held open)."""
        import torch  # lazy: only building tensors needs torch

        return gather(self.plan, lambda r, g: self.slices[r][g], torch.float32,
                      lambda r, view: self.ranks.release(self.names[r], view))


@dataclasses.dataclass
class ZeroLayout:
    """What one step folder holds, parsed (trees map the files; nothing consolidated yet)."""

    step_dir: str
    stage: int
    world: int
    model_states: list[Any]  # per rank for stage 3, else one
    optim: list[Any]  # per rank: the 'optimizer_state_dict' dict
    optim_names: list[str]
    plans: list[ParamPlan]
    ranks: _Ranks
    copies: RankCopies | None = None  # the parameters being copied as the files were parsed (a full load)

    def slices(self, key: str) -> list[list[Any]]:
        return [list(_get(o, key, "fp32 partitions", self.optim_names[r])) for r, o in enumerate(self.optim)]


def parse_step(step_dir: str, opts: ReadOptions, copy: bool = False) -> ZeroLayout:
    """Read every rank file of a step folder (build: mapped, structure: shapes only) and plan the gathering:
    rank 0's model states, the optimizer partitions rank by rank, the other model states. ``copy``: each rank's
    fp32 slices are copied into the full tensors while the next file is parsed (``layout.copies``)."""
    files = _files(step_dir)
    models = [files.model[r] for r in sorted(files.model)]
    optim_names = [files.optim[r] for r in sorted(files.optim)]
    # Rank files are read mapped, on the CPU: consolidation copies out of them (never kept by the caller)
    inner = dataclasses.replace(opts, mmap=True, relocator=Relocator("cpu")) if not opts.meta else opts
    ranks = _Ranks(step_dir, inner)
    copies = RankCopies(opts, len(optim_names), files_size(step_dir, optim_names)) if copy and optim_names else None
    try:
        with collector_paused():
            return _parse(step_dir, files, models, optim_names, ranks, copies)
    except BaseException as exc:
        if copies is not None:
            copies.close()
        ranks.close()
        if isinstance(exc, NotACheckpointError):
            _lfs_check(step_dir, models + optim_names)  # a clone without `git lfs pull`: one error says so
        raise


def _parse(step_dir: str, files: _Files, models: list[str], optim_names: list[str], ranks: _Ranks,
           copies: RankCopies | None) -> ZeroLayout:
    first = ranks.read(models[0])
    _model_states(first, models[0], step_dir)
    shapes = [OrderedDict((str(k), shape_of(v, f"param_shapes[{k!r:.60}]")) for k, v in g.items())
              for g in _get(first, "param_shapes", "parameter shapes", models[0]) or []]
    optim = []
    for r, name in enumerate(optim_names):
        optim.append(_get(ranks.read(name), "optimizer_state_dict", "ZeRO optimizer state", name))
        early = _early(optim, shapes) if copies is not None else None
        if copies is not None and early is not None:
            planner, slices, counts = early
            if r == 0:
                copies.begin(planner, shapes, counts)
            copies.add(r, slices, counts, ranks.sources[name])
    model_states = [first] + [ranks.read(name) for name in models[1:]]
    for r, ms in enumerate(model_states):
        _model_states(ms, models[r], step_dir)
    if files.stage3 and not optim:
        raise CorruptCheckpointError(
            f"ZeRO-3 step folder without its optimizer partitions: the weights live flattened in "
            f"zero_pp_rank_<r>_mp_rank_00_optim_states.pt, and none is here (the {len(model_states)} model-state "
            "files hold empty parameters)", path=step_dir,
            hint="Copy the *_optim_states.pt files of this step folder too (save_checkpoint writes them), or load "
                 "a folder saved with stage3_gather_16bit_weights_on_model_save.")
    stage = _stage_of(_get(optim[0], "zero_stage", "ZeRO stage", optim_names[0])) if optim else 0
    if stage == 3 and not files.stage3 or stage in (1, 2) and files.stage3:
        raise CorruptCheckpointError(f"the optimizer partitions say ZeRO stage {stage} but the model-state files "
                                     f"are named for stage {3 if files.stage3 else '0-2'}", path=step_dir)
    world = len(optim) or 1
    if optim:
        count = optim[0].get("partition_count")
        count = max(count) if isinstance(count, list) and count and all(type(c) is int for c in count) else count
        if stage < 3 and type(count) is int and count != world:
            raise CorruptCheckpointError(f"the partitions were written by {count} ranks but {world} "
                                         f"*_optim_states.pt files are here (found {optim_names})", path=step_dir,
                                         hint="Copy every rank's optimizer file of this step folder.")
    if stage == 3 and len(model_states) != world:
        raise CorruptCheckpointError(f"{len(model_states)} model-state files but {world} optimizer partitions",
                                     path=step_dir)
    plans: list[ParamPlan] = []
    if optim:
        key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
        parts = [_get(o, key, "fp32 partitions", optim_names[r]) for r, o in enumerate(optim)]
        if not all(isinstance(p, list) and len(p) == len(shapes) for p in parts):
            raise CorruptCheckpointError(f"the fp32 partitions do not have one entry per parameter group "
                                         f"({len(shapes)})", path=step_dir)
        sizes = [[_numel(t, optim_names[r]) for t in p] for r, p in enumerate(parts)]
        if stage == 3:  # every rank's slices have rank 0's sizes: name the first file that differs
            other = next((r for r in range(world) if sizes[r] != sizes[0]), None)
            if other is not None:
                raise CorruptCheckpointError(f"ZeRO-3 partitions differ in size between ranks: rank {other} holds "
                                             f"{sizes[other][:8]}, rank 0 {sizes[0][:8]}",
                                             path=os.path.join(step_dir, optim_names[other]))
        plans = (plan_stage3 if stage == 3 else plan_stage2)(shapes, sizes)
    return ZeroLayout(step_dir, stage, world, model_states, optim, optim_names, plans, ranks, copies)


def _model_states(ms: Any, name: str, step_dir: str) -> None:
    if not isinstance(ms, dict) or "buffer_names" not in ms or "module" not in ms:
        raise CorruptCheckpointError(f"{name} holds no DeepSpeed model states (module, buffer_names)", path=step_dir)


def _early(optim: list[Any], shapes: list["OrderedDict[str, tuple[int, ...]]"]) -> tuple[Any, list[Any], list[int]] | None:
    """``(planner, slices, sizes)`` of the last optimizer file parsed, to copy it early; None when anything is
    off (the checks once every file is parsed raise, in load and scan alike)."""
    if not (isinstance(optim[0], dict) and isinstance(optim[-1], dict)):
        return None
    try:
        stage = _stage_of(optim[0].get("zero_stage"))
        parts = optim[-1].get("fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups")
        if stage == 0 or not isinstance(parts, list) or len(parts) != len(shapes):
            return None
        return plan_stage3 if stage == 3 else plan_stage2, parts, [_numel(t, "") for t in parts]
    except CheckpointError:
        return None


def _numel(t: Any, file: str) -> int:
    if not hasattr(t, "numel") or not hasattr(t, "shape") or len(t.shape) != 1:
        raise CorruptCheckpointError(f"{file}: a ZeRO partition is {type(t).__name__}, not a flat tensor")
    return int(t.numel())


def _floating(t: Any) -> bool:
    return dtype_name(t.dtype).startswith(("float", "bfloat", "complex")) if isinstance(t, TensorMeta) \
        else bool(t.is_floating_point())


def buffer_fp32(t: Any) -> Any:
    """A buffer as zero_to_fp32 returns it: floating ones in fp32; a new tensor, never a view of the file."""
    if isinstance(t, TensorMeta):
        return TensorMeta(t.shape, t.stride, meta_dtype("float32")) if _floating(t) else t
    import torch  # lazy: only building tensors needs torch

    return t.detach().to(torch.float32, copy=True) if _floating(t) else t.detach().clone()


def consolidate(layout: ZeroLayout, opts: ReadOptions, lazy: bool = False) -> "OrderedDict[str, Any]":
    """The fp32 state dict, in zero_to_fp32's order: buffers, frozen parameters, trainable ones, tied names."""
    first = layout.model_states[0]
    module = _get(first, "module", "the module's state dict", "the model states")
    out: OrderedDict[str, Any] = OrderedDict()
    for name in first.get("buffer_names") or []:
        if name in module:
            out[name] = buffer_fp32(module[name])
    if layout.stage == 0:  # no partitions: the module holds the weights in their training dtype
        for name, value in module.items():
            if name not in out:
                out[name] = value if opts.meta else value.detach().clone()
        return out
    frozen = first.get("frozen_param_shapes") or {}
    for name, shape in frozen.items():
        frags = [ms.get("frozen_param_fragments", {}).get(name) for ms in layout.model_states]
        if any(f is None for f in frags):
            raise CorruptCheckpointError(f"frozen parameter {name!r:.80} has no fragment in every model-state file")
        out[name] = frozen_param(frags, shape_of(shape, f"frozen {name!r:.60}"), layout.stage == 3, opts)
    key = "fp32_flat_groups" if layout.stage == 3 else "single_partition_of_fp32_groups"
    slices = layout.slices(key)
    if layout.copies is not None and not (opts.meta or lazy):  # read by the ranks' copies (parse_step)
        tensors = layout.copies.finish(layout.plans, slices, [layout.ranks.sources[n] for n in layout.optim_names])
    else:
        tensors = [TensorMeta(plan.shape, contiguous_stride(plan.shape), meta_dtype("float32")) if opts.meta
                   else ZeroTensor(plan, slices, layout.ranks, layout.optim_names) for plan in layout.plans]
    out.update((plan.name, tensor) for plan, tensor in zip(layout.plans, tensors))
    for alias, target in (first.get("shared_params") or {}).items():
        if target in out:
            out[str(alias)] = out[target]
    return out


def frozen_param(frags: list[Any], shape: tuple[int, ...], stage3: bool, opts: ReadOptions) -> Any:
    """A frozen parameter from the model states' fragments (whole in stages 0-2, one slice per rank in stage 3)."""
    if opts.meta:
        return TensorMeta(shape, contiguous_stride(shape), frags[0].dtype)
    import torch  # lazy: only building tensors needs torch

    if not stage3:
        return frags[0].detach().clone()
    return torch.cat([f.detach().reshape(-1) for f in frags]).narrow(0, 0, math.prod(shape)).view(shape).clone()


def _dtype_of(layout: ZeroLayout) -> str:
    config = layout.model_states[0].get("ds_config")
    if isinstance(config, dict):
        for name in ("bf16", "fp16"):
            section = config.get(name)
            if isinstance(section, dict) and section.get("enabled") is True:
                return "bfloat16" if name == "bf16" else "float16"
    return "float32"


def step_folder(directory: str) -> tuple[str, str | None]:
    """``(step folder, tag)``: a run folder's ``latest`` step folder, or a step folder itself (tag None)."""
    tag = _tag(directory) if deepspeed_kind(directory) == "run" else None
    return (os.path.join(directory, tag) if tag else directory), tag


def read_deepspeed(directory: str, opts: ReadOptions, lazy: bool = False) -> Checkpoint:
    """Read a DeepSpeed run folder (``latest``) or step folder as the consolidated fp32 state dict."""
    step_dir, tag = step_folder(directory)
    layout = parse_step(step_dir, opts, copy=not (opts.meta or lazy))
    try:
        tree = consolidate(layout, opts, lazy=lazy and not opts.meta)
    except BaseException as exc:  # Ctrl-C too: the files are closed, the copies stopped
        layout.ranks.close()
        raise exc.with_path(step_dir) if isinstance(exc, CheckpointError) else exc
    finally:
        if layout.copies is not None:
            layout.copies.close()
    first = layout.model_states[0]
    step = first.get("global_steps")
    ckpt = Checkpoint(tree=tree, format="deepspeed",
                      description=f"DeepSpeed ZeRO stage {layout.stage} checkpoint ({layout.world} ranks)",
                      evidence=[f"{'run folder with latest -> ' + tag if tag else 'step folder'}: "
                                f"{len(layout.model_states)} model-state and {len(layout.optim)} optimizer files"],
                      notes=list(layout.ranks.notes), globals=list(layout.ranks.globals),
                      details={"stage": layout.stage, "world_size": layout.world, "step": step,
                               "dtype": _dtype_of(layout), "tag": tag, "ds_version": first.get("ds_version"),
                               "step_folder": step_dir})
    ckpt.details["metadata"] = {f"deepspeed.{k}": str(ckpt.details[k]) for k in
                                ("stage", "world_size", "step", "dtype", "tag", "ds_version")}
    config = first.get("ds_config")
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    configured = zero.get("stage") if isinstance(zero, dict) else None
    if layout.stage == 0 and type(configured) is int and configured > 0:
        ckpt.notes.append(f"the run used ZeRO stage {configured} but no *_optim_states.pt file is here: these are "
                          f"the module's weights in the training dtype ({_dtype_of(layout)}), not the fp32 master "
                          "weights; copy the optimizer files too for those")
    elif layout.stage == 0:
        ckpt.notes.append("ZeRO stage 0: the weights are the module's, in the training dtype")
    else:
        ckpt.notes.append(f"consolidated {len(layout.plans)} trainable parameters from the fp32 partitions of "
                          f"{layout.world} ranks (as DeepSpeed's zero_to_fp32 does)")
    if lazy and not opts.meta:
        ckpt.resources.append(layout.ranks)
    else:
        layout.ranks.close()
    return ckpt


def optimizer_state(directory: str, opts: ReadOptions) -> tuple[ZeroLayout, list[dict[str, Any]], list[dict[str, Any]]]:
    """The Adam state of each trainable parameter, gathered like the weights: ``(layout, per_param, groups)``
    where ``per_param[i]`` is ``{"name", "group", "state": {"step", "exp_avg", "exp_avg_sq", ...}}`` in
    ``param_shapes`` order and ``groups`` the base optimizer's parameter groups (hyper-parameters)."""
    import torch  # lazy: only building tensors needs torch

    step_dir, _ = step_folder(directory)
    if deepspeed_kind(step_dir) == "universal":
        raise UnsupportedFormatError("resuming the optimizer from a DeepSpeed universal checkpoint is not supported "
                                     "(its weights load)", path=step_dir,
                                     hint="Resume from the ZeRO step folder it was made from, or pass only model=.")
    layout = parse_step(step_dir, opts)
    try:
        if layout.stage == 0:
            raise UnsupportedFormatError("ZeRO stage 0 folder: its optimizer state is the plain one in "
                                         "mp_rank_00_model_states.pt ('optimizer')", path=step_dir)
        key = "optimizer_state_dict" if layout.stage == 3 else "base_optimizer_state"
        bases = [_get(o, key, "the base optimizer's state", layout.optim_names[r]) for r, o in enumerate(layout.optim)]
        groups = _get(bases[0], "param_groups", "parameter groups", layout.optim_names[0])
        partition_key = "fp32_flat_groups" if layout.stage == 3 else "single_partition_of_fp32_groups"
        sizes = [[_numel(t, layout.optim_names[r]) for t in parts]
                 for r, parts in enumerate(layout.slices(partition_key))]
        states = [_get(b, "state", "optimizer state", layout.optim_names[r]) for r, b in enumerate(bases)]
        slot_names = sorted(k for k, v in (states[0].get(0) or {}).items() if hasattr(v, "shape") and len(v.shape) == 1)
        per_param = []
        for plan in layout.plans:
            state: dict[str, Any] = {}
            for slot in slot_names:
                slices = [[_slot(states[r], g, slot, sizes[r][g], layout.optim_names[r]) for g in range(len(sizes[r]))]
                          for r in range(layout.world)]
                state[slot] = gather(plan, _indexer(slices), torch.float32,
                                     lambda r, view: layout.ranks.release(layout.optim_names[r], view))
            for name, value in (states[0].get(plan.group) or {}).items():
                if name not in state:  # the scalar 'step' (one per group in ZeRO)
                    state[name] = value.detach().clone() if hasattr(value, "clone") else value
            per_param.append({"name": plan.name, "group": plan.group, "state": state})
        return layout, per_param, list(groups)
    finally:
        layout.ranks.close()


def _indexer(slices: list[list[Any]]) -> Callable[[int, int], Any]:
    return lambda rank, group: slices[rank][group]


def _slot(state: Any, group: int, slot: str, size: int, file: str) -> Any:
    value = (state.get(group) or {}).get(slot) if isinstance(state, dict) else None
    if value is None or not hasattr(value, "numel") or value.numel() < size:
        raise CorruptCheckpointError(f"{file}: optimizer state {slot!r} of group {group} is missing or shorter "
                                     f"than its fp32 partition ({size})")
    return value.detach()[:size]
