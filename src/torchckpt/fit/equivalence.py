"""Trust a mapping: load the same checkpoint into its own layout and into the new one, run both on a probe
batch, and compare the outputs (renames and fuse/split should agree to rounding)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .load_into import load_into
from .report import LoadReport

__all__ = ["check_mapping", "MappingCheck"]


@dataclass
class MappingCheck:
    """``max_abs_delta``: the largest ``|source(probe) - target(probe)|`` over every output tensor."""

    max_abs_delta: float
    outputs: int  # how many output tensors were compared
    report: LoadReport  # how the checkpoint was loaded into the target

    def __str__(self) -> str:
        return f"max |delta| = {self.max_abs_delta:.3g} over {self.outputs} output tensors"


def check_mapping(source_model: Any, target_model: Any, checkpoint: Any, *probe: Any, **load_options: Any
                  ) -> MappingCheck:
    """Load ``checkpoint`` into ``source_model`` (its own layout, strictly) and into ``target_model``
    (with ``load_options``: ``rename=``, ``prefix=``, ``transforms=`` ...), run both in eval mode without
    gradients on ``probe`` and return the largest absolute difference of their outputs.

    Both models are modified (loaded) and left in eval mode. Outputs may be tensors or nested
    tuples/lists/dicts of them; their structure and shapes must agree.
    """
    import torch  # lazy: torchckpt imports torch only when tensors are needed

    load_into(source_model, checkpoint)
    report = load_into(target_model, checkpoint, **load_options)
    source_model.eval()
    target_model.eval()
    with torch.no_grad():
        a, b = _tensors(source_model(*probe)), _tensors(target_model(*probe))
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise ValueError(f"the two models' outputs differ in structure: {[list(x.shape) for x in a]} vs "
                         f"{[list(y.shape) for y in b]}; compare models that compute the same function")
    delta = max((float((x.double() - y.double()).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)
    return MappingCheck(delta, len(a), report)


def _tensors(value: Any) -> list[Any]:
    if hasattr(value, "shape") and hasattr(value, "double"):
        return [value]
    if isinstance(value, dict) or (hasattr(value, "keys") and hasattr(value, "__getitem__")):
        return [t for k in value.keys() for t in _tensors(value[k])]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []
