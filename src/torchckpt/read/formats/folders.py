"""Model folders: Hugging Face ``save_pretrained`` folders and accelerate ``save_state`` folders.

Every file inside goes through the same readers (and the same safe unpickler) as a single file:

- **Hugging Face**: ``config.json`` beside ``model.safetensors``, ``model.safetensors.index.json``
  (shards), ``pytorch_model.bin`` or ``pytorch_model.bin.index.json``, preferred in that order, as
  ``from_pretrained`` does. The tree is the state dict; ``details["config"]`` holds config.json.
- **accelerate** (``Accelerator.save_state``): ``model.safetensors`` or ``pytorch_model.bin``
  (``model_1...`` for further models), ``optimizer.bin``, ``scheduler.bin``, ``scaler.pt``,
  ``sampler.bin``, ``random_states_<rank>.pkl`` and ``custom_checkpoint_<n>.pkl``. The tree uses the
  names of a torchckpt training checkpoint (``model``, ``optimizer``, ``scheduler``, ``scaler``,
  ``step``, ``rng``), so :func:`torchckpt.resume` restores it like one.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from ...errors import CorruptCheckpointError, UnsupportedFormatError
from ...storage.source import Source, confined_path
from .base import Checkpoint, ReadOptions, parse_json

__all__ = ["folder_kind", "read_folder", "is_accelerate_folder"]

HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
OTHER_FRAMEWORKS = {"tf_model.h5": "TensorFlow", "flax_model.msgpack": "Flax", "model.ckpt.index": "TensorFlow"}
MAX_CONFIG = 16 << 20
_RANDOM_STATES = re.compile(r"^random_states_(\d+)\.pkl$")
_CUSTOM = re.compile(r"^custom_checkpoint_(\d+)\.pkl$")
_NUMBERED = re.compile(r"^(model|pytorch_model|optimizer|scheduler|sampler)(?:_(\d+))?\.(safetensors|bin)$")


def folder_kind(path: str) -> str | None:
    """``"accelerate"``, ``"huggingface"`` or None for a directory this reader does not recognise."""
    try:
        names = set(os.listdir(path))
    except OSError:
        return None
    if any(_RANDOM_STATES.match(n) for n in names) or "optimizer.bin" in names:
        return "accelerate"
    if names & set(HF_WEIGHTS) or "config.json" in names and names & set(OTHER_FRAMEWORKS):
        return "huggingface"
    return None


def is_accelerate_folder(path: str) -> bool:
    return os.path.isdir(path) and folder_kind(path) == "accelerate"


def read_folder(directory: str, opts: ReadOptions) -> Checkpoint:
    """Read a Hugging Face or accelerate folder (see the module docstring; :func:`folder_kind` says which)."""
    if folder_kind(directory) == "accelerate":
        return _read_accelerate(directory, opts)
    return _read_huggingface(directory, opts)


def _read_file(directory: str, name: str, opts: ReadOptions) -> Checkpoint:
    """Read one file of the folder; a symlink out of the folder is refused before anything is read."""
    assert opts.read_child is not None, "the opener passes the format dispatcher"
    path = confined_path(directory, name, what="file", checkpoint=directory)
    with Source(path, name=os.path.join(directory, name)) as src:
        return opts.read_child(src, opts)


def _read_huggingface(directory: str, opts: ReadOptions) -> Checkpoint:
    names = set(os.listdir(directory))
    present = [n for n in HF_WEIGHTS if n in names]
    if not present:
        others = sorted(f"{OTHER_FRAMEWORKS[n]} ({n})" for n in names & set(OTHER_FRAMEWORKS))
        raise UnsupportedFormatError(f"this model folder holds {', '.join(others)} weights only, no PyTorch weights",
                                     path=directory, hint="Convert the model to PyTorch with transformers "
                                                          "(from_pretrained(..., from_tf=True)) and save it again.")
    chosen = present[0]
    part = _read_file(directory, chosen, opts)
    loaded = Checkpoint(tree=part.tree, format="huggingface", description=f"Hugging Face model folder ({chosen})",
                    evidence=[f"directory with {chosen}" + (" and config.json" if "config.json" in names else "")],
                    notes=[f"{chosen}: {note}" for note in part.notes], globals=part.globals,
                    details={"weights_file": chosen, **part.details})
    if len(present) > 1:
        loaded.notes.append(f"read {chosen}; the folder also holds {', '.join(present[1:])} (not read)")
    if "config.json" in names:
        config = _read_config(directory)
        loaded.details["config"] = config
        loaded.notes.append(f"config.json: {_describe_config(config)}")
        architectures = config.get("architectures")
        if isinstance(architectures, list) and architectures:
            loaded.description = f"Hugging Face model folder ({', '.join(map(str, architectures))}, {chosen})"
    return loaded


def _read_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "config.json")
    real = confined_path(directory, "config.json", what="file", checkpoint=directory)
    try:
        size = os.path.getsize(real)
        if size > MAX_CONFIG:
            raise CorruptCheckpointError(f"config.json is {size} bytes; a model config is far smaller", path=path)
        with open(real, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise CorruptCheckpointError(f"config.json cannot be read ({exc.strerror or exc})", path=path) from None
    try:
        config = parse_json(raw, "config.json")
    except CorruptCheckpointError as exc:
        raise exc.with_path(path)
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"config.json holds a {type(config).__name__}, not an object", path=path)
    return config


def _describe_config(config: dict[str, Any]) -> str:
    parts = [f"{k}={config[k]!r}" for k in ("architectures", "model_type", "torch_dtype", "dtype",
                                             "transformers_version") if k in config]
    return ", ".join(parts) or f"{len(config)} entries"


def _read_accelerate(directory: str, opts: ReadOptions) -> Checkpoint:
    names = sorted(os.listdir(directory))
    tree: dict[str, Any] = {}
    loaded = Checkpoint(tree=tree, format="accelerate", description="accelerate save_state folder",
                    evidence=["directory with " + ", ".join(n for n in names if _NUMBERED.match(n)
                                                            or _RANDOM_STATES.match(n))])
    groups: dict[str, dict[int, Any]] = {}
    for name in names:
        m = _NUMBERED.match(name)
        if not m:
            continue
        what = "model" if m.group(1) in ("model", "pytorch_model") else m.group(1)
        index = int(m.group(2) or 0)
        if what == "model" and index in groups.get("model", {}):
            continue  # model.safetensors and pytorch_model.bin both present: safetensors was read first
        groups.setdefault(what, {})[index] = _part(directory, name, opts, loaded)
    for what, parts in groups.items():
        ordered = [parts[i] for i in sorted(parts)]
        tree[what] = ordered[0] if len(ordered) == 1 else ordered
        if len(ordered) > 1:
            loaded.notes.append(f"{len(ordered)} {what} states (one per prepared {what}), as a list")
    if "scaler.pt" in names:
        tree["scaler"] = _part(directory, "scaler.pt", opts, loaded)
    ranks = sorted((int(m.group(1)), n) for n in names if (m := _RANDOM_STATES.match(n)))
    if ranks:
        states = _part(directory, ranks[0][1], opts, loaded)
        if isinstance(states, dict):
            tree["random_states"] = states
            tree["rng"] = _torchckpt_rng(states)
            if states.get("step") is not None:
                tree["step"] = states["step"]
        if len(ranks) > 1:
            loaded.notes.append(f"random states of {len(ranks)} processes; rank {ranks[0][0]}'s are used")
    custom = sorted((int(m.group(1)), n) for n in names if (m := _CUSTOM.match(n)))
    if custom:
        tree["custom_checkpoints"] = [_part(directory, n, opts, loaded) for _, n in custom]
    if "model" not in tree:
        loaded.notes.append("no model weights in this folder (FSDP/DeepSpeed models are saved elsewhere)")
    return loaded


def _part(directory: str, name: str, opts: ReadOptions, loaded: Checkpoint) -> Any:
    part = _read_file(directory, name, opts)
    loaded.notes.extend(f"{name}: {note}" for note in part.notes)
    loaded.globals.extend(part.globals)
    return part.tree


def _torchckpt_rng(states: dict[str, Any]) -> dict[str, Any]:
    """accelerate's RNG names -> the names torchckpt's training checkpoints use."""
    rng: dict[str, Any] = {}
    for ours, theirs in (("python", "random_state"), ("numpy", "numpy_random_seed"), ("torch", "torch_manual_seed"),
                         ("cuda", "torch_cuda_manual_seed")):
        if states.get(theirs) is not None:
            rng[ours] = states[theirs]
    return rng
