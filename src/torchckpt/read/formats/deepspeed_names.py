"""DeepSpeed's file and folder names: whether a folder is a DeepSpeed checkpoint and whether a file is one rank's
part of one, from names alone.

Kept apart from the reader (:mod:`.deepspeed`) because every load asks: ``open_checkpoint`` notes a lone rank file
and looks at every folder, and a plain zip load must not import the DeepSpeed reader to do so.
"""

from __future__ import annotations

import os
import re

__all__ = ["MODEL_FILE", "OPTIM_FILE", "STEP_DIR", "list_names", "rank_file_kind", "deepspeed_kind", "rank_file_note"]

MODEL_FILE = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
OPTIM_FILE = re.compile(r"^(?:(?:bf16|fp16)_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
STEP_DIR = re.compile(r"^global_step\d+$")


def rank_file_kind(name: str) -> str | None:
    """``"model"`` / ``"optimizer"`` for the base name of one DeepSpeed rank file, else None."""
    base = os.path.basename(name)
    return "model" if MODEL_FILE.match(base) else "optimizer" if OPTIM_FILE.match(base) else None


def list_names(path: str) -> list[str]:
    """The sorted names in folder ``path``; none when it cannot be listed."""
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def deepspeed_kind(path: str) -> str | None:
    """``"run"`` (``latest`` or ``global_step*`` folders with rank files), ``"step"`` (rank files),
    ``"universal"`` (``zero/`` beside model states: ``ds_to_universal``'s output) or None."""
    names = list_names(path)
    if "zero" in names and os.path.isdir(os.path.join(path, "zero")) and any(MODEL_FILE.match(n) for n in names):
        return "universal"
    if any(rank_file_kind(n) for n in names):
        return "step"
    if "latest" in names and os.path.isfile(os.path.join(path, "latest")):
        return "run"
    if any(STEP_DIR.match(n) and any(rank_file_kind(m) for m in list_names(os.path.join(path, n))) for n in names):
        return "run"
    return None


def rank_file_note(path: str) -> dict[str, str] | None:
    """For one rank file of a DeepSpeed folder: ``{"kind", "folder", "note"}`` saying where its weights live."""
    kind = rank_file_kind(path)
    if kind is None:
        return None
    step_dir = os.path.dirname(os.path.abspath(path))
    parent = os.path.dirname(step_dir)
    folder = parent if os.path.isfile(os.path.join(parent, "latest")) else step_dir
    stage3 = os.path.basename(path).startswith("zero_pp_rank_") and kind == "model"
    what = ("one rank's ZeRO-3 model states (its parameters are empty)" if stage3 else
            "one rank's slice of the ZeRO optimizer state" if kind == "optimizer" else
            "DeepSpeed's model states (the module in its training dtype)")
    return {"kind": "partial" if stage3 or kind == "optimizer" else kind, "folder": folder,
            "note": f"this file is {what}; the consolidated fp32 weights live in the DeepSpeed folder: load {folder}"}
