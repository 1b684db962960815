"""DeepSpeed universal-checkpoint folders (written by DeepSpeed's ``ds_to_universal``).

A universal folder (``global_stepN_universal``) holds the model-state file(s) of the run it came from and
``zero/<parameter name>/fp32.pt`` (``{"param": tensor, ...}``), with ``exp_avg.pt``, ``exp_avg_sq.pt``
and ``step.pt`` beside it: every parameter already whole, independent of the number of ranks. It reads
as the fp32 state dict: buffers from the model states (floating ones in fp32, as for ZeRO folders),
parameters from their ``fp32.pt``, in the module's order. Every file goes through the safe unpickler
and every name must stay inside the folder.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

from ...errors import CorruptCheckpointError
from ...storage.source import Source, confined_path
from ..unpickle.meta import TensorMeta
from .base import Checkpoint, ReadOptions
from .deepspeed import MODEL_FILE, buffer_fp32, frozen_param, shape_of

__all__ = ["is_universal", "read_universal"]


def is_universal(path: str) -> bool:
    """A folder with ``zero/`` beside DeepSpeed model-state files."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return "zero" in names and os.path.isdir(os.path.join(path, "zero")) and any(MODEL_FILE.match(n) for n in names)


def _read(directory: str, rel: str, opts: ReadOptions) -> Any:
    assert opts.read_child is not None, "the opener passes the format dispatcher"
    path = confined_path(directory, rel, what="file", checkpoint=directory)
    with Source(path, name=os.path.join(directory, rel)) as src:
        return opts.read_child(src, opts).tree


def read_universal(directory: str, opts: ReadOptions) -> Checkpoint:
    """Read a universal-checkpoint folder as the fp32 state dict (see the module docstring)."""
    models = sorted((n for n in os.listdir(directory) if MODEL_FILE.match(n)),
                    key=lambda n: int(MODEL_FILE.match(n).group(1) or 0))  # type: ignore[union-attr]
    states = [_read(directory, m, opts) for m in models]
    first = states[0]
    if not all(isinstance(s, dict) and isinstance(s.get("module"), dict) for s in states):
        raise CorruptCheckpointError("the model-state files hold no DeepSpeed model states (module)", path=directory)
    params = set(os.listdir(os.path.join(directory, "zero")))
    buffers = set(first.get("buffer_names") or [])
    frozen = first.get("frozen_param_shapes") or {}
    shapes = {k: v for group in first.get("param_shapes") or [] for k, v in group.items()}
    tree: OrderedDict[str, Any] = OrderedDict()
    shared = first.get("shared_params") or {}
    for name, value in first["module"].items():
        if name in buffers:
            tree[name] = buffer_fp32(value)
        elif name in shared and shared[name] in tree:
            tree[name] = tree[shared[name]]  # tied: the same tensor, as in the ZeRO folder
        elif name in params:
            tree[name] = _param(directory, name, shapes.get(name), opts)
        elif name in frozen:  # ZeRO-3's universal folders leave frozen parameters in the model states
            frags = [s.get("frozen_param_fragments", {}).get(name) for s in states]
            if any(f is None for f in frags):
                raise CorruptCheckpointError(f"frozen parameter {name!r:.80} has no fragment in every model-state "
                                             "file", path=directory)
            tree[name] = frozen_param(frags, shape_of(frozen[name], name), len(states) > 1, opts)
        else:
            raise CorruptCheckpointError(f"parameter {name!r:.80} of the module has no zero/{name:.80}/fp32.pt",
                                         path=directory, hint="Run ds_to_universal again; the folder is incomplete.")
    return Checkpoint(tree=tree, format="deepspeed-universal", description="DeepSpeed universal checkpoint",
                      evidence=[f"zero/ with {len(params)} parameter folders beside {models[0]}"],
                      details={"step": first.get("global_steps"), "ds_version": first.get("ds_version"),
                               "metadata": {"deepspeed.step": str(first.get("global_steps")),
                                            "deepspeed.ds_version": str(first.get("ds_version"))}})


def _param(directory: str, name: str, shape: Any, opts: ReadOptions) -> Any:
    """``zero/<name>/fp32.pt``: ``{"param": tensor}`` (stages 1/2) or the flat tensor (stage 3), in its shape."""
    saved = _read(directory, os.path.join("zero", name, "fp32.pt"), opts)
    value: Any = saved.get("param") if isinstance(saved, dict) else saved
    if not hasattr(value, "shape"):
        raise CorruptCheckpointError(f"zero/{name}/fp32.pt holds no tensor", path=directory)
    if shape is not None and tuple(value.shape) != shape_of(shape, name):
        want = shape_of(shape, name)
        if value.numel() != _prod(want):
            raise CorruptCheckpointError(f"zero/{name}/fp32.pt holds {list(value.shape)}, the parameter is {list(want)}",
                                         path=directory)
        value = TensorMeta(want, tuple(_prod(want[i + 1:]) for i in range(len(want))), value.dtype) \
            if isinstance(value, TensorMeta) else value.reshape(want)
    return value


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
