"""Placing checkpoint tensors where the model wants them: read once, place once, release once.

:class:`Placer` turns each checkpoint value (a tensor viewing the mapped file, a tensor in memory,
or a :class:`TensorMeta` still on disk) into the tensor a module's ``_load_from_state_dict`` receives,
and afterwards releases the file pages that were only a way through:

- model on the CPU: the mapped tensor itself (the module copies it into its parameter), then its
  pages are dropped, so the file is never resident next to the model;
- model on ``meta`` (placed by assignment), CPU target, same dtype: the tensor is read with
  ``pread`` straight into new memory that becomes the parameter (one copy, never through the
  mapped pages, which are dropped), so the model never aliases the file: a later ``torch.save`` to
  the same path cannot kill it. Only with ``mmap=True`` is the mapped tensor itself the parameter
  (copy-on-write view of the file, like ``torch.load(mmap=True)`` + ``load_state_dict(assign=True)``).
  A storage already given to another parameter is copied so two untied parameters never share memory;
- CUDA target: the bytes go through two pinned staging buffers, reused for every tensor, with the
  copy into one buffer overlapping the asynchronous upload from the other;
- a cast or a device move never keeps the source: its pages are released after the module loaded.
"""

from __future__ import annotations

from typing import Any

from ..errors import CorruptCheckpointError
from ..read.tensors import TensorMeta

__all__ = ["Placer"]

STAGE_BYTES = 64 << 20  # per staging buffer; two of them, pinned, for the life of one load


class Placer:
    """One load's placement state: staging buffers, storages given to the model, pages to release."""

    def __init__(self, src: Any, *, assign: bool, mmap: bool = False) -> None:
        self.src = src
        self.assign = assign
        self.keep_mapped = mmap  # assigned tensors may stay views of the file (the caller asked for mmap=True)
        self._owned: set[int] = set()  # data pointers of mapped storages now owned by model parameters
        self._release: list[tuple[int, int]] = []
        self._stage: list[Any] = []
        self._events: list[Any] = []
        self._turn = 0
        self.mapped = 0  # tensors that became parameters as views of the file mapping

    # ------------------------------------------------------------------ placing
    def place(self, value: Any, target: Any, device: Any, shape: tuple[int, ...] | None = None) -> Any:
        """``value`` as a tensor on ``device`` in ``target``'s dtype (reshaped to ``shape`` if given)."""
        import torch

        if isinstance(value, TensorMeta) and device.type == "cuda" and self.src is not None:
            out = self._upload_meta(value, device)
        else:
            if type(value) is TensorMeta:  # a legacy stream's tensor: read here, one at a time (prefaulted)
                value = value.materialize(self.src, prefault=True)
            elif isinstance(value, TensorMeta):  # DCP, DeepSpeed: lazy tensors that read their own files
                value = value.materialize(self.src)
            if not isinstance(value, torch.Tensor):
                return value
            self._note_source(value)
            if device.type == "cuda" and value.device.type == "cpu":
                out = self._upload(value, device)
            elif self.assign and value.device == device and (target is None or value.dtype == target.dtype):
                out = self._assignable(value)
            else:
                out = value.to(device=device)
        if target is not None and out.dtype != target.dtype:
            out = out.to(dtype=target.dtype)
        return out.reshape(shape) if shape is not None else out

    def _note_source(self, value: Any) -> None:
        if self.src is None or value.device.type != "cpu":
            return
        storage = value.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes and self.src.maps(ptr, nbytes):
            self._release.append((ptr, nbytes))

    def _assignable(self, value: Any) -> Any:
        """The tensor itself when it may become a parameter; a copy when it would alias another one."""
        storage = value.untyped_storage()
        ptr = storage.data_ptr()
        if self.src is None:
            return value.clone()  # an in-memory checkpoint: never alias the caller's tensors
        if ptr in self._owned:
            return value.clone()
        if self.src.maps(ptr, storage.nbytes()):
            if not self.keep_mapped:  # its mapped pages stay listed for release: the parameter is private
                return self.src.private_copy(value)
            self.mapped += 1
        self._owned.add(ptr)
        return value

    # ------------------------------------------------------------------ releasing
    def release(self) -> None:
        """Drop the file pages of every source placed since the last call (not those that became parameters)."""
        if self.src is not None:
            for ptr, nbytes in self._release:
                if ptr not in self._owned:
                    self.src.release_pointer(ptr, nbytes)
        self._release.clear()

    def finish(self) -> None:
        """Wait for the uploads still in flight; release what is left."""
        self.release()
        for event in self._events:
            if event is not None:
                event.synchronize()

    # ------------------------------------------------------------------ CUDA staging
    def _buffers(self) -> None:
        import torch

        if not self._stage:
            self._stage = [torch.empty(STAGE_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            self._events = [None, None]

    def _next_buffer(self) -> Any:
        """A free pinned buffer: wait until the upload that last used it has finished."""
        self._buffers()
        i = self._turn
        self._turn ^= 1
        if self._events[i] is not None:
            self._events[i].synchronize()
        return i

    def _push(self, i: int, n: int, dst: Any) -> None:
        import torch

        dst.copy_(self._stage[i][:n], non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(dst.device))
        self._events[i] = event

    def _upload(self, value: Any, device: Any) -> Any:
        import torch

        value = value.contiguous()
        out = torch.empty(value.shape, dtype=value.dtype, device=device)
        if value.numel() == 0:
            return out
        src_bytes = value.reshape(-1).view(torch.uint8) if value.dim() else value.reshape(1).view(torch.uint8)
        dst_bytes = out.reshape(-1).view(torch.uint8)
        total = src_bytes.numel()
        with torch.cuda.device(device):
            for start in range(0, total, STAGE_BYTES):
                n = min(STAGE_BYTES, total - start)
                i = self._next_buffer()
                self._stage[i][:n].copy_(src_bytes[start:start + n])  # the read: page faults land here
                self._push(i, n, dst_bytes[start:start + n])
        return out

    def _upload_meta(self, meta: TensorMeta, device: Any) -> Any:
        """A tensor still in the file (legacy stream): read it chunk by chunk straight into pinned memory."""
        import torch

        dtype = meta.torch_dtype()
        if 0 in meta.shape:
            return torch.empty(meta.shape, dtype=dtype, device=device)
        offset = meta.storage.data_offset() if meta.storage is not None else None
        if offset is None:
            raise CorruptCheckpointError("tensor data location unknown (structure-only read)")
        item = meta.dtype.itemsize
        extent = 1 + sum((s - 1) * st for s, st in zip(meta.shape, meta.stride))
        start, total = offset + meta.storage_offset * item, extent * item
        flat = torch.empty(extent, dtype=dtype, device=device)
        dst_bytes = flat.view(torch.uint8)
        with torch.cuda.device(device):
            for done in range(0, total, STAGE_BYTES):
                n = min(STAGE_BYTES, total - done)
                i = self._next_buffer()
                self.src.read_into(self._stage[i].untyped_storage(), start + done, n)
                self._push(i, n, dst_bytes[done:done + n])
        return flat.as_strided(meta.shape, meta.stride)
