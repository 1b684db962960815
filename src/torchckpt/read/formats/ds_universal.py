"""DeepSpeed universal-checkpoint folders (written by DeepSpeed's ``ds_to_universal``).

A universal folder (``global_stepN_universal``) holds the model-state file(s) of the run it came from and
``zero/<parameter name>/fp32.pt`` (``{"param": tensor, ...}``), with ``exp_avg.pt``, ``exp_avg_sq.pt``
and ``step.pt`` beside it: every parameter already whole, independent of the number of ranks. It reads
as the fp32 state dict: buffers from the model states (floating ones in fp32, as for ZeRO folders),
parameters from their ``fp32.pt``, in the module's order. Every file goes through the safe unpickler
and every name must stay inside the folder.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Any

from ...errors import CorruptCheckpointError
from ...storage.source import Source, confined_path
from ..unpickle.meta import TensorMeta, contiguous_stride
from .base import Checkpoint, ReadOptions
from .parallel import read_parts
from .deepspeed import buffer_fp32, frozen_param, shape_of
from .deepspeed_names import MODEL_FILE

__all__ = ["is_universal", "read_universal"]


def is_universal(path: str) -> bool:
    """A folder with ``zero/`` beside DeepSpeed model-state files."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return "zero" in names and os.path.isdir(os.path.join(path, "zero")) and any(MODEL_FILE.match(n) for n in names)


def _read(directory: str, rels: list[str], opts: ReadOptions) -> list[Any]:
    """The trees of the files ``rels``, read side by side (:func:`read_parts`, ``workers=``)."""
    paths = {rel: confined_path(directory, rel, what="file", checkpoint=directory) for rel in rels}  # all before any read

    def read_one(rel: str, part_opts: ReadOptions) -> Any:
        assert part_opts.read_child is not None, "the opener passes the format dispatcher"
        with Source(paths[rel], name=os.path.join(directory, rel)) as src:
            return part_opts.read_child(src, part_opts).tree

    return list(read_parts(opts, rels, read_one))


def read_universal(directory: str, opts: ReadOptions) -> Checkpoint:
    """Read a universal-checkpoint folder as the fp32 state dict (see the module docstring)."""
    models = sorted((n for n in os.listdir(directory) if MODEL_FILE.match(n)),
                    key=lambda n: int(MODEL_FILE.match(n).group(1) or 0))  # type: ignore[union-attr]
    states = _read(directory, models, opts)
    first = states[0]
    if not all(isinstance(s, dict) and isinstance(s.get("module"), dict) for s in states):
        raise CorruptCheckpointError("the model-state files hold no DeepSpeed model states (module)", path=directory)
    if not all(isinstance(k, str) for k in first["module"]):
        raise CorruptCheckpointError("the module's state dict in the model states has keys that are not names",
                                     path=directory)
    params = set(os.listdir(os.path.join(directory, "zero")))
    buffers = set(first.get("buffer_names") or [])
    frozen = first.get("frozen_param_shapes") or {}
    shapes = {k: v for group in first.get("param_shapes") or [] for k, v in group.items()}
    tree: OrderedDict[str, Any] = OrderedDict()
    shared = first.get("shared_params") or {}
    names, earlier = [], set()  # the parameters the loop below reads from zero/: not buffers, not tied to an earlier name
    for name in first["module"]:
        if name not in buffers and not (name in shared and shared[name] in earlier) and name in params:
            names.append(name)
        earlier.add(name)
    saved = dict(zip(names, _read(directory, [os.path.join("zero", n, "fp32.pt") for n in names], opts)))
    for name, value in first["module"].items():
        if name in buffers:
            tree[name] = buffer_fp32(value)
        elif name in shared and shared[name] in tree:
            tree[name] = tree[shared[name]]  # tied: the same tensor, as in the ZeRO folder
        elif name in params:
            tree[name] = _param(directory, name, saved[name], shapes.get(name))
        elif name in frozen:  # ZeRO-3's universal folders leave frozen parameters in the model states
            frags = [s.get("frozen_param_fragments", {}).get(name) for s in states]
            if any(f is None for f in frags):
                raise CorruptCheckpointError(f"frozen parameter {name!r:.80} has no fragment in every model-state "
                                             "file", path=directory)
            tree[name] = frozen_param(frags, shape_of(frozen[name], name), len(states) > 1, opts)
        else:
            raise CorruptCheckpointError(f"parameter {name!r:.80} of the module has no zero/{name!r:.80}/fp32.pt",
                                         path=directory, hint="Run ds_to_universal again; the folder is incomplete.")
    return Checkpoint(tree=tree, format="deepspeed-universal", description="DeepSpeed universal checkpoint",
                      evidence=[f"zero/ with {len(params)} parameter folders beside {models[0]}"],
                      details={"step": first.get("global_steps"), "ds_version": first.get("ds_version"),
                               "metadata": {"deepspeed.step": str(first.get("global_steps")),
                                            "deepspeed.ds_version": str(first.get("ds_version"))}})


def _param(directory: str, name: str, saved: Any, shape: Any) -> Any:
    """What ``zero/<name>/fp32.pt`` holds (``{"param": tensor}`` (stages 1/2) or the flat tensor (stage 3)), in
    its shape."""
    value: Any = saved.get("param") if isinstance(saved, dict) else saved
    if not hasattr(value, "shape"):
        raise CorruptCheckpointError(f"zero/{name}/fp32.pt holds no tensor", path=directory)
    if shape is not None and tuple(value.shape) != shape_of(shape, name):
        want = shape_of(shape, name)
        if value.numel() != math.prod(want):
            raise CorruptCheckpointError(f"zero/{name}/fp32.pt holds {list(value.shape)}, the parameter is {list(want)}",
                                         path=directory)
        value = TensorMeta(want, contiguous_stride(want), value.dtype) \
            if isinstance(value, TensorMeta) else value.reshape(want)
    return value
