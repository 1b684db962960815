"""How a conversion is asked for: the output format (from ``to=`` or the destination's extension) and the
floating-point dtype a cast names (``fp16``, ``bf16``, ``half`` ... as people type them)."""

from __future__ import annotations

from typing import Any, Literal

from ...read.tensors import dtype_name
from . import to_sharded

__all__ = ["DTYPE_ALIASES", "FloatDtype", "OutputFormat", "PT_EXTENSIONS", "output_format", "float_dtype"]

# what people type for a floating-point dtype -> torch's name (torch.half, "fp16", "bf16" ...)
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "single": "float32", "fp16": "float16", "half": "float16",
                 "bf16": "bfloat16", "fp64": "float64", "double": "float64"}
FloatDtype = Literal["float32", "float16", "bfloat16", "float64", "fp32", "float", "single", "fp16", "half", "bf16",
                     "fp64", "double"]
OutputFormat = Literal["pt", "safetensors", "sharded-safetensors", "dcp"]
# destination extensions that mean a torch.save file; anything else needs an explicit ``to``
PT_EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl", ".pickle")


def output_format(dst: str, to: OutputFormat | None, max_shard_size: int | str | None = None) -> OutputFormat:
    """``to``, or the format ``dst``'s extension names; an unknown extension is refused (no silent .pt).

    Sharded safetensors is asked for by ``to="sharded-safetensors"``, or by ``max_shard_size`` with a
    destination folder that has no extension; a destination naming the index file, or ``max_shard_size``
    with another format, is refused (:class:`~torchckpt.errors.AmbiguousOutputError`)."""
    if to_sharded.asked_for(dst, to, max_shard_size, (".safetensors", ".dcp", *PT_EXTENSIONS)):
        return "sharded-safetensors"
    if to:
        return to
    name = dst.rstrip("/\\").lower()
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith(".dcp"):
        return "dcp"
    if name.endswith(PT_EXTENSIONS):
        return "pt"
    raise ValueError(f"cannot tell the output format from {dst!r}: use a .pt/.pth/.bin/.ckpt, .safetensors or .dcp "
                     "name, or pass to='pt' / 'safetensors' / 'sharded-safetensors' / 'dcp' (--to / --format on the "
                     "command line)")


def float_dtype(name: str) -> Any:
    import torch  # lazy: only a cast needs torch's dtype objects

    name = DTYPE_ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    value = getattr(torch, dtype_name(name), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype name (bfloat16, float16, float32), not {name!r}")
    return value
