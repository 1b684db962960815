"""Weight adaptations for :func:`torchckpt.load_into`: when the architecture changed, adapt, don't skip.

Two kinds, both applied one tensor at a time while the weights stream into the model (never a
second copy of the model), and each named in the :class:`~torchckpt.LoadReport` and in ``dry_run``:

* **tensor transforms** turn one checkpoint tensor into the model's shape:
  :class:`InterpolatePosEmbed` (ViT/DeiT/CLIP position embeddings at a new image size, as timm's
  ``resample_abs_pos_embed``), :class:`AdaptInputConv` (RGB -> grayscale or multispectral stems, as
  timm's ``adapt_input_conv``), :class:`MeanResize` (a vocabulary or classifier grown: new rows are the
  mean of the old rows, as transformers' ``resize_token_embeddings(mean_resizing=True)`` without its
  noise; shrinking keeps the leading rows), :class:`ResizeRelPosTable` (relative-position bias tables
  at a new window size, as timm's ``resize_rel_pos_bias_table``);
* **key transforms** change the layout: :class:`Fuse` (``q``,``k``,``v`` -> ``qkv``), :class:`Split`
  (``qkv`` -> ``q``,``k``,``v``), :class:`Stack` (per-expert MoE weights -> one stacked tensor) and
  :class:`Unstack` (the reverse). ``rename=`` spells fuse and split too: a tuple of patterns mapping to
  one replacement fuses on dim 0, one pattern mapping to a list splits evenly on dim 0.

Spell them ``load_into(model, ckpt, transforms=[InterpolatePosEmbed(), "adapt_input_conv"])``, or
``transforms={"pos_embed": "interpolate_pos_embed"}`` for chosen keys, or let
``on_mismatch="adapt"`` choose the one that fits each mismatch by its shape and name.
torch is imported only when a transform runs.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence, Union

__all__ = ["Transform", "InterpolatePosEmbed", "AdaptInputConv", "MeanResize", "ResizeRelPosTable", "KeyTransform",
           "Fuse", "Split", "Stack", "Unstack", "TransformSpec", "by_name", "NAMES"]

Shape = tuple[int, ...]


class Transform:
    """A tensor transform: one checkpoint tensor -> the model tensor's shape.

    ``keys`` (a regular expression, matched in full against the model key or the checkpoint key)
    limits where it applies; ``None`` applies it to every mismatch whose shapes it fits.
    """

    name = ""

    def __init__(self, keys: str | None = None) -> None:
        self.keys = keys

    def why_not(self, key: str, source: Shape, target: Shape) -> str | None:
        """``None`` when this transform turns ``source`` into ``target``; otherwise why it cannot."""
        raise NotImplementedError

    def looks_like(self, key: str, source: Shape, target: Shape, first_conv: str | None) -> bool:
        """Whether ``on_mismatch="adapt"`` should pick it for ``key`` (name and shape relation)."""
        return False

    def __call__(self, tensor: Any, target: Shape) -> Any:
        raise NotImplementedError

    def describe(self, source: Shape, target: Shape) -> str:
        """What it does to these shapes, in a few words, for the report."""
        return f"{list(source)} -> {list(target)}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class InterpolatePosEmbed(Transform):
    """Resample absolute position embeddings ``[1, prefix + H*W, D]`` (or ``[prefix + H*W, D]``) to a new
    grid, keeping the prefix (class, distillation) tokens: timm's ``resample_abs_pos_embed``; ``[1, H, W, D]``
    grids as its ``resample_abs_pos_embed_nhwc``.

    Args:
        num_prefix_tokens: tokens before the grid; ``None`` takes the smallest count (0..8) that leaves a
            square grid on both sides.
        old_size, new_size: ``(H, W)`` grids for non-square images (default: square).
        interpolation, antialias: as ``torch.nn.functional.interpolate`` (timm's defaults).
    """

    name = "interpolate_pos_embed"

    def __init__(self, num_prefix_tokens: int | None = None, *, old_size: tuple[int, int] | None = None,
                 new_size: tuple[int, int] | None = None, interpolation: str = "bicubic", antialias: bool = True,
                 keys: str | None = None) -> None:
        super().__init__(keys)
        self.num_prefix_tokens, self.old_size, self.new_size = num_prefix_tokens, old_size, new_size
        self.interpolation, self.antialias = interpolation, antialias

    def _grids(self, source: Shape, target: Shape) -> tuple[int, tuple[int, int], tuple[int, int]] | str:
        if len(source) == 4 and len(target) == 4 and source[0] == target[0] == 1 and source[3] == target[3]:
            return 0, (source[1], source[2]), (target[1], target[2])  # [1, H, W, D] (SAM, ViTDet)
        if len(source) != len(target) or len(source) not in (2, 3) or source[:-2] != target[:-2] \
                or source[-1] != target[-1] or (len(source) == 3 and source[0] != 1):
            return "position embeddings are [1, tokens, dim] or [tokens, dim] with the same dim on both sides"
        n_old, n_new = source[-2], target[-2]
        choices = [self.num_prefix_tokens] if self.num_prefix_tokens is not None else range(9)
        for p in choices:
            old = self.old_size or _square(n_old - p)
            new = self.new_size or _square(n_new - p)
            if old and new and old[0] * old[1] == n_old - p and new[0] * new[1] == n_new - p:
                return p, old, new
        return (f"{n_old} and {n_new} tokens are not prefix tokens plus a square grid "
                "(pass num_prefix_tokens=, old_size=, new_size=)")

    def why_not(self, key: str, source: Shape, target: Shape) -> str | None:
        grids = self._grids(source, target)
        return grids if isinstance(grids, str) else None

    def looks_like(self, key: str, source: Shape, target: Shape, first_conv: str | None) -> bool:
        return bool(re.search(r"pos(ition)?_?(al_?)?emb", key, re.I)) and self.why_not(key, source, target) is None

    def __call__(self, tensor: Any, target: Shape) -> Any:
        import torch  # lazy: torchckpt imports torch only when tensors are needed
        import torch.nn.functional as F

        grids = self._grids(tuple(tensor.shape), target)
        assert not isinstance(grids, str), grids
        p, old, new = grids
        flat = tensor.reshape(1, -1, tensor.shape[-1])
        prefix, grid = flat[:, :p], flat[:, p:]
        dim = grid.shape[-1]
        grid = grid.float().reshape(1, old[0], old[1], dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=new, mode=self.interpolation, antialias=self.antialias)
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(tensor.dtype)
        return torch.cat([prefix, grid], dim=1).reshape(target)

    def describe(self, source: Shape, target: Shape) -> str:
        grids = self._grids(source, target)
        if isinstance(grids, str):
            return grids
        p, old, new = grids
        return (f"{self.interpolation} {old[0]}x{old[1]} -> {new[0]}x{new[1]} grid, "
                f"{p} prefix token{'s' if p != 1 else ''} kept")


class AdaptInputConv(Transform):
    """Adapt a stem convolution ``[out, in, kh, kw]`` to another number of input channels: timm's
    ``adapt_input_conv`` (one channel: the sum over the old channels; more: the old channels repeated
    and scaled by ``old / new`` so that activations keep their size)."""

    name = "adapt_input_conv"

    def why_not(self, key: str, source: Shape, target: Shape) -> str | None:
        if len(source) != 4 or len(target) != 4 or source[0] != target[0] or source[2:] != target[2:]:
            return "an input convolution is [out, in, kh, kw] and only 'in' may differ"
        if source[1] == target[1]:
            return "the input channels are equal"
        return None

    def looks_like(self, key: str, source: Shape, target: Shape, first_conv: str | None) -> bool:
        named = bool(re.search(r"(^|\.)(stem|patch_embed|conv_stem|conv1|patch_embeddings)\b", key))
        return (key == first_conv or named) and self.why_not(key, source, target) is None

    def __call__(self, tensor: Any, target: Shape) -> Any:
        base, channels = tensor.shape[1], target[1]
        weight = tensor.float()
        if channels == 1:
            weight = weight.sum(dim=1, keepdim=True)
        else:
            repeat = int(math.ceil(channels / base))
            weight = weight.repeat(1, repeat, 1, 1)[:, :channels, :, :] * (base / float(channels))
        return weight.to(tensor.dtype)

    def describe(self, source: Shape, target: Shape) -> str:
        how = "summed" if target[1] == 1 else f"repeated and scaled by {source[1]}/{target[1]}"
        return f"{source[1]} -> {target[1]} input channels ({how})"


class MeanResize(Transform):
    """Resize dim 0 (vocabulary rows, classes): kept rows are copied, new rows are the mean of the old
    rows (transformers' ``resize_token_embeddings(mean_resizing=True)`` without its 1e-9-scaled noise);
    shrinking keeps the leading rows."""

    name = "mean_resize"

    def why_not(self, key: str, source: Shape, target: Shape) -> str | None:
        if len(source) != len(target) or not source or source[1:] != target[1:]:
            return "only the first dimension (rows) may differ"
        if source[0] == 0:
            return "the checkpoint tensor has no rows to take the mean of"
        return None

    def looks_like(self, key: str, source: Shape, target: Shape, first_conv: str | None) -> bool:
        named = bool(re.search(r"(embed|wte|tok|vocab|lm_head|head|classifier|logits|shared|(^|\.)fc|output)",
                               key, re.I))
        return named and self.why_not(key, source, target) is None

    def __call__(self, tensor: Any, target: Shape) -> Any:
        import torch  # lazy: torchckpt imports torch only when tensors are needed

        if target[0] <= tensor.shape[0]:
            return tensor[: target[0]].clone()
        mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
        return torch.cat([tensor, mean.expand(target[0] - tensor.shape[0], *tensor.shape[1:])], dim=0)

    def describe(self, source: Shape, target: Shape) -> str:
        if target[0] <= source[0]:
            return f"{source[0]} -> {target[0]} rows (leading rows kept)"
        return f"{source[0]} -> {target[0]} rows (new rows = mean of the old)"


class ResizeRelPosTable(Transform):
    """Resize a relative-position bias table to a new window: timm's ``resize_rel_pos_bias_table`` (BEiT's
    geometric-progression grid, linear interpolation per head; extra class-token rows kept). Flat tables
    are ``[(2*Wh-1)*(2*Ww-1) + extra, heads]``; ``[heads, 2*Wh-1, 2*Ww-1]`` tables (MaxViT) work too.

    Args:
        old_window, new_window: ``(Wh, Ww)`` for non-square windows (default: square, from the shapes).
    """

    name = "resize_rel_pos_table"

    def __init__(self, *, old_window: tuple[int, int] | None = None, new_window: tuple[int, int] | None = None,
                 keys: str | None = None) -> None:
        super().__init__(keys)
        self.old_window, self.new_window = old_window, new_window

    def _sizes(self, source: Shape, target: Shape) -> tuple[tuple[int, int], tuple[int, int], int] | str:
        if not all(source) or any(s > 1 << 24 for s in source):
            return f"the checkpoint's table {list(source)} is empty or implausibly large"
        if len(source) == 3 and max(source[1:]) > 4095:
            return f"the checkpoint's table {list(source)} is implausibly large (over 4095 relative positions a side)"
        if len(source) == 3 and len(target) == 3 and source[0] == target[0]:
            return (source[1], source[2]), (target[1], target[2]), 0
        if len(source) != 2 or len(target) != 2 or source[1] != target[1]:
            return "a relative-position table is [positions, heads] (or [heads, H, W]) with the same heads"
        for extra in range(4):
            old = _table(self.old_window) or _square(source[0] - extra)
            if old and old[0] > 4095:
                return f"the checkpoint's table {list(source)} is implausibly large"
            new = _table(self.new_window) or _square(target[0] - extra)
            if old and new and old[0] % 2 and new[0] % 2 and old[0] * old[1] == source[0] - extra \
                    and new[0] * new[1] == target[0] - extra:
                return old, new, extra
        return (f"{source[0]} and {target[0]} positions are not a (2W-1)^2 table plus up to 3 extra rows "
                "(pass old_window=, new_window=)")

    def why_not(self, key: str, source: Shape, target: Shape) -> str | None:
        sizes = self._sizes(source, target)
        return sizes if isinstance(sizes, str) else None

    def looks_like(self, key: str, source: Shape, target: Shape, first_conv: str | None) -> bool:
        return bool(re.search(r"rel(ative)?_pos(ition)?", key)) and self.why_not(key, source, target) is None

    def __call__(self, tensor: Any, target: Shape) -> Any:
        import torch  # lazy: torchckpt imports torch only when tensors are needed

        sizes = self._sizes(tuple(tensor.shape), target)
        assert not isinstance(sizes, str), sizes
        src, dst, extra = sizes
        flat = tensor.dim() == 2
        rows = tensor[tensor.shape[0] - extra:] if extra else None
        table = tensor[: tensor.shape[0] - extra] if extra else tensor
        points = [torch.tensor(_progression(src[0], dst[0])), torch.tensor(_progression(src[1], dst[1]))]
        ty, tx = dst[0] // 2.0, dst[1] // 2.0
        grid = torch.meshgrid(torch.arange(-ty, ty + 0.1, 1.0), torch.arange(-tx, tx + 0.1, 1.0), indexing="ij")
        heads = []
        for i in range(table.shape[1] if flat else table.shape[0]):
            z = table[:, i].reshape(src).float() if flat else table[i].float()
            r = _linear(points, z, grid)
            heads.append(r.reshape(-1, 1) if flat else r)
        out = torch.cat(heads, dim=-1) if flat else torch.stack(heads, dim=0)
        if rows is not None:
            out = torch.cat([out, rows.float()], dim=0)
        return out.to(tensor.dtype)

    def describe(self, source: Shape, target: Shape) -> str:
        sizes = self._sizes(source, target)
        if isinstance(sizes, str):
            return sizes
        src, dst, extra = sizes
        return f"{src[0]}x{src[1]} -> {dst[0]}x{dst[1]} relative positions" + (f", {extra} extra rows kept" if extra
                                                                               else "")


def _table(window: tuple[int, int] | None) -> tuple[int, int] | None:
    return (2 * window[0] - 1, 2 * window[1] - 1) if window else None


def _progression(src: int, dst: int) -> list[float]:
    """BEiT's source coordinates: spaced by a geometric progression so that ``src`` points span ``dst``."""
    left, right = 1.01, 1.5
    q = left
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
            right = q
        else:
            left = q
    dis: list[float] = []
    cur = 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return [-d for d in reversed(dis)] + [0.0] + dis


def _linear(points: list[Any], values: Any, at: Sequence[Any]) -> Any:
    """Linear interpolation of ``values`` on the rectilinear grid ``points`` at the coordinates ``at``
    (clamped at the edges), as scipy's RegularGridInterpolator(method="linear") and timm's copy of it."""
    import itertools

    import torch  # lazy: torchckpt imports torch only when tensors are needed

    idxs, dists, overall = [], [], []
    for p, x in zip(points, at):
        right = torch.bucketize(x, p)
        right[right >= p.shape[0]] = p.shape[0] - 1
        left = (right - 1).clamp(0, p.shape[0] - 1)
        d_left, d_right = x - p[left], p[right] - x
        d_left[d_left < 0] = 0.0
        d_right[d_right < 0] = 0.0
        both = (d_left == 0) & (d_right == 0)
        d_left[both] = d_right[both] = 1.0
        idxs.append((left, right))
        dists.append((d_left, d_right))
        overall.append(d_left + d_right)
    numerator: Any = 0.0
    for corner in itertools.product([0, 1], repeat=len(points)):
        index = [idx[c] for c, idx in zip(corner, idxs)]
        weight = [dist[1 - c] for c, dist in zip(corner, dists)]
        numerator = numerator + values[tuple(index)] * torch.prod(torch.stack(weight), dim=0)
    return numerator / torch.prod(torch.stack(overall), dim=0)


class KeyTransform:
    """A layout change over checkpoint keys (several tensors -> one, or one -> several), applied before
    the keys are aligned with the model. Patterns are regular expressions searched in each checkpoint
    key and replaced like ``re.sub`` (the same spelling as ``rename=``)."""

    name = ""


class Fuse(KeyTransform):
    """Concatenate the tensors whose keys match ``sources`` (in that order) along ``dim`` into the key
    made by ``target``: ``Fuse([r"\\.q_proj\\.", r"\\.k_proj\\.", r"\\.v_proj\\."], ".qkv.")``."""

    name = "fuse"

    def __init__(self, sources: Sequence[str], target: str, dim: int = 0) -> None:
        if isinstance(sources, str) or len(sources) < 2:
            raise ValueError(f"Fuse needs two or more source patterns, got {sources!r}")
        self.sources, self.target, self.dim = tuple(sources), target, dim

    def __repr__(self) -> str:
        return f"Fuse({list(self.sources)!r}, {self.target!r}, dim={self.dim})"


class Split(KeyTransform):
    """Split the tensor whose key matches ``source`` evenly along ``dim`` into one key per replacement in
    ``targets`` (in order): ``Split(r"\\.qkv\\.", [".q_proj.", ".k_proj.", ".v_proj."])``."""

    name = "split"

    def __init__(self, source: str, targets: Sequence[str], dim: int = 0) -> None:
        if isinstance(targets, str) or len(targets) < 2:
            raise ValueError(f"Split needs two or more target replacements, got {targets!r}")
        self.source, self.targets, self.dim = source, tuple(targets), dim

    def __repr__(self) -> str:
        return f"Split({self.source!r}, {list(self.targets)!r}, dim={self.dim})"


class Stack(KeyTransform):
    """Stack per-expert tensors into one along a new dim 0: ``source`` has one group capturing the expert
    index, ``Stack(r"\\.experts\\.(\\d+)\\.w1\\.", ".experts.w1.")`` turns ``experts.0.w1.weight`` ...
    ``experts.7.w1.weight`` into ``experts.w1.weight`` of shape ``[8, ...]`` (indices must be 0..E-1)."""

    name = "stack"

    def __init__(self, source: str, target: str) -> None:
        if re.compile(source).groups != 1:
            raise ValueError(f"Stack's source pattern needs exactly one group (the expert index): {source!r}")
        self.source, self.target = source, target

    def __repr__(self) -> str:
        return f"Stack({self.source!r}, {self.target!r})"


class Unstack(KeyTransform):
    """Split a stacked tensor along dim 0 into one key per expert: ``target`` contains ``{i}``,
    ``Unstack(r"\\.experts\\.w1\\.", ".experts.{i}.w1.")``."""

    name = "unstack"

    def __init__(self, source: str, target: str) -> None:
        if "{i}" not in target:
            raise ValueError(f"Unstack's target needs '{{i}}' where the expert index goes: {target!r}")
        self.source, self.target = source, target

    def __repr__(self) -> str:
        return f"Unstack({self.source!r}, {self.target!r})"


NAMES: dict[str, type[Transform]] = {c.name: c for c in (InterpolatePosEmbed, AdaptInputConv, MeanResize,
                                                          ResizeRelPosTable)}

TransformSpec = Union[str, Transform, KeyTransform, Sequence[Union[str, Transform, KeyTransform]],
                      Mapping[str, Union[str, Transform]], None]


def by_name(name: str, keys: str | None = None) -> Transform:
    """The tensor transform called ``name`` (``"interpolate_pos_embed"``, ``"adapt_input_conv"``,
    ``"mean_resize"``), limited to ``keys`` when given."""
    cls = NAMES.get(name)
    if cls is None:
        raise ValueError(f"unknown transform {name!r}; the named ones are {', '.join(sorted(NAMES))} "
                         "(Fuse/Split/Stack/Unstack take arguments: pass torchckpt.transforms.Fuse(...))")
    return cls(keys=keys)


def _square(n: int) -> tuple[int, int] | None:
    if n <= 0:
        return None
    side = math.isqrt(n)
    return (side, side) if side * side == n else None
