"""Where checkpoint bytes come from: a path, an open binary file, bytes, or a remote URL.

:class:`Source` gives every reader the same few operations (size, head, random access buffer,
file-range reads into tensors) and owns what it opened. Local paths are memory-mapped read-only,
so reading a pickle at the start of a large file never reads the rest.
"""

from __future__ import annotations

import io
import mmap
import os
from typing import IO, Any, Union

from .errors import CheckpointError, CheckpointNotFoundError, NotACheckpointError

__all__ = ["Source", "SourceLike"]

SourceLike = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, IO[bytes]]


class Source:
    """A readable checkpoint source. Use as a context manager, or call :meth:`close`."""

    def __init__(self, source: SourceLike, *, name: str | None = None) -> None:
        self._owned: list[Any] = []
        self.path: str | None = None
        self._mmap: mmap.mmap | None = None
        self._bytes: bytes | None = None
        self._file: IO[bytes] | None = None
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._bytes = bytes(source)
            self.name = name or "<bytes>"
        elif isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if isinstance(path, bytes):
                path = os.fsdecode(path)
            if "://" in path and not path.startswith("file://"):
                self._bytes = _read_remote(path)
                self.name = name or path
            else:
                path = path[len("file://"):] if path.startswith("file://") else path
                self.name = name or path
                if os.path.isdir(path):
                    raise NotACheckpointError("this is a directory, not a checkpoint file", path=path,
                                              hint="Pass one file inside it, or use torchckpt.Checkpointer(dir) "
                                                   "for a directory of training checkpoints.")
                if not os.path.exists(path):
                    raise CheckpointNotFoundError("no such file", path=path,
                                                  hint="Check the path and the current directory.")
                self.path = path
        elif hasattr(source, "read"):
            self.name = name or str(getattr(source, "name", "<file object>"))
            if _seekable(source):
                self._file = source  # type: ignore[assignment]
            else:
                self._bytes = source.read()  # type: ignore[union-attr]
        else:
            raise TypeError(f"cannot read a checkpoint from a {type(source).__name__}; pass a path, "
                            "an open binary file or bytes")
        self.size = self._compute_size()

    def _compute_size(self) -> int:
        if self._bytes is not None:
            return len(self._bytes)
        if self.path is not None:
            return os.path.getsize(self.path)
        assert self._file is not None
        here = self._file.tell()
        self._file.seek(0, io.SEEK_END)
        size = self._file.tell() - here
        self._file.seek(here)
        self._base = here
        return size

    # ------------------------------------------------------------------ access
    def head(self, n: int) -> bytes:
        if self._bytes is not None:
            return self._bytes[:n]
        return self.read_at(0, min(n, self.size))

    def read_at(self, offset: int, n: int) -> bytes:
        """Exactly the bytes ``[offset, offset+n)`` clipped to the end of the file."""
        if self._bytes is not None:
            return self._bytes[offset:offset + n]
        if self.path is not None:
            return bytes(self.buffer()[offset:offset + n])
        assert self._file is not None
        self._file.seek(self._base + offset)
        return self._file.read(n)

    def buffer(self) -> Any:
        """The whole content as a bytes-like object with slicing (an mmap for local files)."""
        if self._bytes is not None:
            return self._bytes
        if self.path is not None:
            if self._mmap is None:
                if self.size == 0:
                    return b""
                with open(self.path, "rb") as fh:
                    self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                self._owned.append(self._mmap)
            return self._mmap
        assert self._file is not None
        self._file.seek(self._base)
        self._bytes = self._file.read()
        return self._bytes

    def open(self) -> IO[bytes]:
        """A seekable binary file positioned at the start of the checkpoint (owned by this Source)."""
        if self.path is not None:
            fh = open(self.path, "rb")
            self._owned.append(fh)
            return fh
        if self._bytes is not None:
            return io.BytesIO(self._bytes)
        assert self._file is not None
        if self._base == 0:
            self._file.seek(0)
            return self._file
        return io.BytesIO(self.buffer())

    def read_into_storage(self, offset: int, nbytes: int) -> Any:
        """A new CPU ``UntypedStorage`` holding ``[offset, offset+nbytes)`` (64-byte aligned copy)."""
        import numpy as np
        import torch

        t = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            view = t.numpy()
            if self.path is not None:
                view[:] = np.frombuffer(self.buffer(), dtype=np.uint8, count=nbytes, offset=offset)
            else:
                view[:] = np.frombuffer(self.read_at(offset, nbytes), dtype=np.uint8)
        return t.untyped_storage()

    def read_into(self, target: Any, offset: int, nbytes: int) -> None:
        """Copy ``[offset, offset+nbytes)`` into an existing ``UntypedStorage`` on any device."""
        import numpy as np
        import torch

        if nbytes == 0:
            return
        dst = torch.empty(0, dtype=torch.uint8, device=target.device).set_(target)[:nbytes]
        if target.device.type == "cpu":
            raw = self.buffer() if self.path is not None else self.read_at(offset, nbytes)
            start = offset if self.path is not None else 0
            dst.numpy()[:] = np.frombuffer(raw, dtype=np.uint8, count=nbytes, offset=start)
        else:
            dst.copy_(torch.empty(0, dtype=torch.uint8).set_(self.read_into_storage(offset, nbytes)))

    def close(self) -> None:
        for obj in reversed(self._owned):
            try:
                obj.close()
            except (BufferError, OSError):
                pass  # an exported view keeps an mmap alive; it is released with the last view
        self._owned.clear()
        self._mmap = None

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _seekable(f: Any) -> bool:
    try:
        return bool(f.seekable()) if hasattr(f, "seekable") else False
    except (OSError, ValueError):
        return False


def _read_remote(url: str) -> bytes:
    try:
        import fsspec
    except ImportError:
        raise CheckpointError("reading remote URLs needs fsspec", path=url,
                              hint="pip install 'torchckpt[remote]'") from None
    try:
        with fsspec.open(url, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise CheckpointNotFoundError("no such remote file", path=url) from None
