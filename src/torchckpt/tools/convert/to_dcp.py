"""``convert(src, "out.dcp")``: any readable checkpoint to a torch.distributed.checkpoint directory, streamed.

DCP itself writes the directory (one process, no process group). Its planner sees placeholder
tensors on the ``meta`` device (shape and dtype only); the writer asks for each tensor's data
when it writes that tensor, and only then is it read from the source (or taken from the mapped
file), so memory stays near the largest tensor, not the model. The directory is then read back
with torchckpt's own DCP reader and compared with the source tensor by tensor.

The other direction (a DCP directory to ``.pt`` / ``.safetensors``) is the ordinary ``convert``:
the DCP reader hands it lazy tensors, assembled from their chunks one at a time.
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from collections import Counter
from typing import Any

from ...errors import CorruptCheckpointError
from ...fit.tree import expanded_size, flatten, is_tensor_like
from ...read.opener import open_checkpoint
from ...read.trust import Policy
from ...read import Mode
from .options import FloatDtype, float_dtype
from .to_file import ConvertReport, Materializer, Progress, check_dense, errors_name_source, part_to_write
from .byte_io import same_bits

__all__ = ["convert_to_dcp"]


def convert_to_dcp(src: Any, dst: str, *, dtype: FloatDtype | None = None, weights_only: bool = False,
                   key: str | None = None, policy: Policy | None = None,
                   progress: Progress | None = None, storage_options: Any = None) -> ConvertReport:
    """Write ``src`` as a DCP directory ``dst`` (which must not exist yet) and verify it."""
    import torch.distributed.checkpoint as dcp  # lazy: torch only when tensors are written

    dst = os.fspath(dst)
    if os.path.exists(dst):
        raise FileExistsError(f"{dst} exists; converting into a DCP directory needs a new path")
    target_dtype = float_dtype(dtype) if dtype else None
    with open_checkpoint(src, Mode.BUILD, policy or Policy(), lazy=True, storage_options=storage_options) as loaded, \
            errors_name_source(loaded.name):
        source = loaded.reader
        assert source is not None  # the opener yields an open reader inside its ``with``
        report = ConvertReport(source.name, dst, loaded.description, "dcp", notes=list(loaded.notes))
        changes: Counter[str] = Counter()
        tree, classes = part_to_write(loaded.tree, key, weights_only, changes, loaded.tree_meter)
        if classes:
            report.notes.append("module classes are not kept in a DCP directory: " +
                                ", ".join(sorted(set(classes.values())))[:200])
        if not isinstance(tree, dict):
            tree = {"state": tree}
            report.notes.append("the checkpoint is not a dict: stored under the key 'state'")
        materialize = Materializer(source, target_dtype)
        tensors = flatten(tree, loaded.tree_meter)
        check_dense(tensors, source.size, "dcp", target_dtype)  # DCP writes every element of a view
        # DCP names every value by its full path: a shared container is written under each path, so its
        # expanded size (counted with each value once) is charged before anything is built
        loaded.tree_meter.visit(n=expanded_size(tree, _plain_children))
        sources: dict[int, Any] = {}
        plan_tree = _placeholders(tree, sources, materialize)
        total = sum(t.numel() * _out_itemsize(t, materialize) for _, t in tensors)
        planner = _planner_class()(sources, materialize, progress, total)
        tmp = dst + ".tmp-dcp"
        shutil.rmtree(tmp, ignore_errors=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
            dcp.save(plan_tree, checkpoint_id=tmp, planner=planner, no_dist=True)
        planner.finish()
        os.replace(tmp, dst)  # the directory appears complete or not at all
        report.tensors = len(tensors)
        report.bytes = sum(os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst))
        report.changes[:0] = [f"{what} ({n})" for what, n in changes.items()]
        if target_dtype is not None:
            report.changes.append(f"floating-point tensors cast to {str(target_dtype)[6:]}")
        _verify(dst, tensors, materialize, report)
    return report


def _out_itemsize(t: Any, materialize: Materializer) -> int:
    import torch

    dtype = t.torch_dtype() if hasattr(t, "torch_dtype") else t.dtype
    if materialize.target_dtype is not None and dtype.is_floating_point:
        dtype = materialize.target_dtype
    return torch.empty(0, dtype=dtype).element_size()


def _plain_children(tree: Any) -> Any:
    if is_tensor_like(tree):
        return ()
    return tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()


def _placeholders(tree: Any, sources: dict[int, Any], materialize: Materializer) -> Any:
    """The tree with every tensor replaced by a ``meta`` tensor of the output shape and dtype."""
    import torch

    if is_tensor_like(tree):
        dtype = tree.torch_dtype() if hasattr(tree, "torch_dtype") else tree.dtype
        if materialize.target_dtype is not None and dtype.is_floating_point:
            dtype = materialize.target_dtype
        placeholder = torch.empty(tuple(tree.shape), dtype=dtype, device="meta")
        sources[id(placeholder)] = (placeholder, tree)
        return placeholder
    if isinstance(tree, dict):
        return {str(k): _placeholders(v, sources, materialize) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and any(is_tensor_like(v) or isinstance(v, (dict, list, tuple)) for v in tree):
        return [_placeholders(v, sources, materialize) for v in tree]  # DCP stores tuples whole, lists by item
    return tree


@functools.cache
def _planner_class() -> Any:
    """DCP's default planner, except that a tensor's data is read when the writer asks for it (defined on
    first use: torch.distributed is imported only when a DCP directory is written)."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class _StreamingPlanner(DefaultSavePlanner):
        """DCP's default planner, except that a tensor's data is read when the writer asks for it."""

        def __init__(self, sources: dict[int, Any], materialize: Materializer, progress: Progress | None,
                     total: int) -> None:
            super().__init__()
            self._sources, self._materialize, self._progress, self._total = sources, materialize, progress, total
            self._previous: Any = None
            self._done = 0

        def lookup_object(self, index: Any) -> Any:
            import torch

            value = super().lookup_object(index)
            entry = self._sources.get(id(value))
            if entry is None:
                return value
            self.finish()  # the writer asks for the next tensor only after writing the previous one
            value = self._materialize(entry[1]).detach()
            # A copy with a storage of its own and exactly its size: DCP's writer keeps a reference to every
            # tensor of a file until the file is closed, so finish() frees this storage once it is written.
            data = torch.empty(value.shape, dtype=value.dtype).copy_(value)
            del value
            self._materialize.release(entry[1])
            self._previous = data
            self._done += data.numel() * data.element_size()
            if self._progress is not None:
                self._progress(self._done, self._total)
            return data

        def finish(self) -> None:
            if self._previous is not None:
                self._previous.untyped_storage().resize_(0)
                self._previous = None

    return _StreamingPlanner


def _verify(dst: str, tensors: list[tuple[str, Any]], materialize: Materializer, report: ConvertReport) -> None:
    """Read the directory back with torchckpt's DCP reader; compare every tensor, one at a time."""
    with open_checkpoint(dst, Mode.BUILD, lazy=True) as loaded:
        written = dict(flatten(loaded.tree))
        for name, t in tensors:
            got = written.get(name)
            want = materialize(t)
            got = got.materialize() if got is not None and hasattr(got, "materialize") else got
            ok = got is not None and got.dtype == want.dtype and same_bits(got, want)  # bitwise: NaN == NaN
            materialize.release(t)
            del got, want
            if not ok:
                raise CorruptCheckpointError(f"verification failed: tensor {name} differs after writing", path=dst,
                                             hint="Please report this; the destination is not trustworthy.")
    report.verified = True
