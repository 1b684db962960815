"""Where checkpoint bytes come from: a path, an open binary file, bytes, or a remote URL.

:class:`Source` gives every reader the same few operations (size, head, random access buffer,
file-range reads into tensors) and owns what it opened. Local paths are memory-mapped read-only,
so reading a pickle at the start of a large file never reads the rest. URLs (any fsspec protocol,
with ``storage_options``) are read by byte ranges: a zip's central directory or a safetensors
header costs kilobytes, whatever the size of the object; only :meth:`Source.buffer` reads it whole.
"""

from __future__ import annotations

import io
import mmap
import os
from typing import IO, Any, Union

from ..errors import CheckpointNotFoundError, NotACheckpointError, TruncatedCheckpointError, UnsafeCheckpointError
from .prefault import PREFAULT_PIECE, prefault_pages
from .remote import RemoteFile, StorageOptions, is_url, join, ranged_reader, strip_file_scheme

__all__ = ["Source", "SourceLike", "confined_path"]

SourceLike = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, IO[bytes]]


def confined_path(directory: str, name: Any, *, what: str = "file", checkpoint: str | None = None) -> str:
    """Resolve ``name``, a path a checkpoint names (a shard, a DCP data file, a sidecar's data file),
    against ``directory``, the checkpoint's own directory (local, with symlinks followed, or a URL prefix).

    Returns the resolved path (or URL). Raises :class:`UnsafeCheckpointError` if it is absolute, empty, a
    URL, or resolves (through ``..`` or a symlink) outside ``directory``. Nothing is read from the target,
    so no byte of a foreign file can appear in an error message.
    """
    shown = f"{name!r:.120}"
    if not isinstance(name, str) or not name or "\x00" in name or os.path.isabs(name) \
            or (os.name == "nt" and os.path.splitdrive(name)[0]) or "://" in name:
        raise UnsafeCheckpointError(f"the checkpoint names {what} {shown}, which is not a relative path inside "
                                    "its directory", path=checkpoint, hint=_CONFINED_HINT)
    if is_url(directory):  # object stores have no links: only the name itself can leave the prefix
        if ".." in name.replace("\\", "/").split("/") or name.startswith("/"):
            raise UnsafeCheckpointError(f"the checkpoint names {what} {shown}, which resolves outside its "
                                        f"directory {directory}", path=checkpoint, hint=_CONFINED_HINT)
        return join(directory, name)
    root = os.path.realpath(directory)
    target = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, target]) != root and not _hf_cache_blob(root, target):
        raise UnsafeCheckpointError(f"the checkpoint names {what} {shown}, which resolves outside its directory "
                                    f"{directory}", path=checkpoint, hint=_CONFINED_HINT)
    return target


def _hf_cache_blob(root: str, target: str) -> bool:
    """The Hugging Face cache links ``<repo>/snapshots/<rev>/<file>`` to ``<repo>/blobs/<sha>``: that is
    the same checkpoint, not a foreign file."""
    path = root
    while os.path.dirname(path) != path:
        parent = os.path.dirname(path)
        if os.path.basename(parent) == "snapshots":
            return os.path.dirname(target) == os.path.join(os.path.dirname(parent), "blobs")
        path = parent
    return False


_CONFINED_HINT = ("A checkpoint may only refer to files in its own directory. If you made this layout on purpose, "
                  "copy the files into the checkpoint's directory instead of linking them.")


class Source:
    """A readable checkpoint source. Use as a context manager, or call :meth:`close`."""

    def __init__(self, source: SourceLike, *, name: str | None = None,
                 storage_options: StorageOptions | None = None) -> None:
        self._owned: list[Any] = []
        self.path: str | None = None
        self.url: str | None = None
        self.storage_options = dict(storage_options or {})
        self._remote: RemoteFile | None = None
        self._mmap: mmap.mmap | None = None
        self._fd: int | None = None
        self._exported = False
        self._map_base: int | None = None
        self._bytes: bytes | None = None
        self._file: IO[bytes] | None = None
        self.mapped_children: list[Source] = []  # sources of the same read whose mappings tensors view
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._bytes = bytes(source)
            self.name = name or "<bytes>"
        elif isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if isinstance(path, bytes):
                path = os.fsdecode(path)
            if is_url(path):
                self.name = name or path
                self.url = path
                self._remote = RemoteFile(path, storage_options)
                if self._remote.is_dir:
                    raise NotACheckpointError("this is a directory, not a checkpoint file", path=path,
                                              hint="Pass one object inside it, or use torchckpt.Checkpointer(url) "
                                                   "for a directory of training checkpoints.")
            else:
                path = strip_file_scheme(path)
                self.name = name or path
                if os.path.isdir(path):
                    raise NotACheckpointError("this is a directory, not a checkpoint file", path=path,
                                              hint="Pass one file inside it, or use torchckpt.Checkpointer(dir) "
                                                   "for a directory of training checkpoints (torchckpt.load "
                                                   "reads torch.distributed.checkpoint directories).")
                if not os.path.exists(path):
                    raise CheckpointNotFoundError("no such file", path=path,
                                                  hint="Check the path and the current directory.")
                self.path = path
        elif hasattr(source, "read"):
            self.name = name or str(getattr(source, "name", "<file object>"))
            if _seekable(source):
                self._file = source
            else:
                self._bytes = source.read()
        else:
            raise TypeError(f"cannot read a checkpoint from a {type(source).__name__}; pass a path, "
                            "an open binary file or bytes")
        self.size = self._compute_size()

    def _compute_size(self) -> int:
        if self._bytes is not None:
            return len(self._bytes)
        if self._remote is not None:
            return self._remote.size
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

    def _descriptor(self) -> int:
        if self._fd is None:
            assert self.path is not None
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return self._fd

    def read_at(self, offset: int, n: int) -> bytes:
        """Exactly the bytes ``[offset, offset+n)`` clipped to the end of the file (no mmap involved)."""
        if self._bytes is not None:
            return self._bytes[offset:offset + n]
        if self._remote is not None:
            return self._remote.read_range(offset, offset + n)
        if self.path is not None:
            return os.pread(self._descriptor(), max(0, min(n, self.size - offset)), offset) if n > 0 else b""
        assert self._file is not None
        self._file.seek(self._base + offset)
        return self._file.read(n)

    def buffer(self) -> Any:
        """The whole content as a bytes-like object with slicing (a private mmap for local files)."""
        if self._bytes is not None:
            return self._bytes
        if self.path is not None:
            if self._mmap is None:
                if self.size == 0:
                    return b""
                with open(self.path, "rb") as fh:
                    self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
                self._owned.append(self._mmap)
            return self._mmap
        if self._remote is not None:  # the whole object, once
            self._bytes = self._remote.read_range(0, self.size)
            return self._bytes
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
        if self._remote is not None:
            reader = self._remote.reader()
            self._owned.append(reader)
            return reader
        assert self._file is not None
        if self._base == 0:
            self._file.seek(0)
            return self._file
        return io.BytesIO(self.buffer())

    def window(self, offset: int, length: int, name: str | None = None) -> "Source":
        """The bytes ``[offset, offset+length)`` of this source as a source of their own (one item of a DCP data
        file), checked against this source's size first. For a local file nothing is read until the reader
        asks: its reads (and :meth:`read_into`, straight into a tensor) go to this file at an offset, so a
        large item is never held as bytes. Other sources give the range read whole, as bytes. The window
        does not own this source: close it first, and do not use it after this source is closed. A range of
        at most :data:`WHOLE_WINDOW` bytes is read whole at once (one ``pread``: parsing it costs no more calls)."""
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0 or offset + length > self.size:
            raise TruncatedCheckpointError(f"bytes {offset!r:.30}..+{length!r:.30} lie outside the file "
                                           f"({self.size} bytes)", path=self.name, actual_size=self.size)
        if self.path is None or isinstance(self, _Window) or length <= WHOLE_WINDOW:
            data = self.read_at(offset, length)
            if len(data) != length:
                raise TruncatedCheckpointError(f"the file ended while reading bytes {offset}..+{length}",
                                               path=self.name, expected_size=offset + length, actual_size=self.size)
            return Source(data, name=name)
        return _Window(self, offset, length, name or f"{self.name}[{offset}:{offset + length}]")

    @property
    def bytes_read(self) -> int:
        """Bytes moved from remote storage so far (0 for local sources)."""
        return self._remote.bytes_read if self._remote is not None else 0

    @property
    def folder(self) -> str:
        """The directory this source is in (a URL prefix for URLs; the working directory for bytes
        and file objects): where the files it names (shards, DCP data files) are looked up."""
        if self.url is not None:
            return self.url.rsplit("/", 1)[0]
        return os.path.dirname(os.path.abspath(self.path or "."))

    @property
    def can_map(self) -> bool:
        return self.path is not None and self.size > 0

    def mapped_storage(self, offset: int, nbytes: int) -> Any:
        """A CPU ``UntypedStorage`` viewing ``[offset, offset+nbytes)`` of the file, zero copy (copy-on-write)."""
        import torch

        if nbytes == 0:
            return torch.UntypedStorage(0)
        # torch keeps a reference to the mmap object (not a buffer export): the mapping lives exactly as
        # long as the last tensor on it, so close() must never unmap it explicitly.
        self._exported = True
        storage = torch.frombuffer(self.buffer(), dtype=torch.uint8, count=nbytes, offset=offset).untyped_storage()
        if self._map_base is None:
            self._map_base = storage.data_ptr() - offset
        return storage

    def release(self, offset: int, nbytes: int) -> None:
        """Drop mapped pages of ``[offset, offset+nbytes)`` from memory (they are re-read if touched again).

        Only for ranges whose tensors were never written to (copy-on-write pages would be lost).
        """
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = -(-offset // page) * page
        end = (offset + nbytes) // page * page
        if end > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)

    def maps(self, pointer: int, nbytes: int) -> bool:
        """Whether ``[pointer, pointer+nbytes)`` lies inside this source's file mapping (a mapped storage),
        or inside that of one of its :attr:`mapped_children` (the shards or files of the same read)."""
        return self._owner(pointer, nbytes) is not None

    def _owner(self, pointer: int, nbytes: int) -> "Source | None":
        for src in (self, *self.mapped_children):
            if src._mmap is not None and src._map_base is not None \
                    and 0 <= pointer - src._map_base and pointer - src._map_base + nbytes <= src.size:
                return src
        return None

    def mapped_offset(self, tensor: Any) -> int | None:
        """Where the bytes of ``tensor`` start in this file if it is a contiguous CPU view of this source's own
        mapping (then ``pread`` can copy them without touching the mapped pages); None otherwise."""
        nbytes = tensor.numel() * tensor.element_size()
        mine = tensor.device.type == "cpu" and nbytes and tensor.is_contiguous() and self._owner(tensor.data_ptr(), nbytes) is self
        return int(tensor.data_ptr() - self._map_base) if mine and self._map_base is not None else None

    def release_pointer(self, pointer: int, nbytes: int) -> None:
        """:meth:`release` for a mapped storage given by its data pointer (no-op if not ours)."""
        owner = self._owner(pointer, nbytes)
        if owner is not None:
            assert owner._map_base is not None
            owner.release(pointer - owner._map_base, nbytes)

    def private_copy(self, tensor: Any) -> Any:
        """A copy of ``tensor`` (a contiguous CPU view of this read's file mapping) in the process's own
        memory, read with ``pread`` straight into the new tensor, never through the mapped pages; None if
        ``tensor`` does not map the file. What a caller keeps must not alias the file: a later
        ``torch.save`` to the same path truncates it under a mapping (SIGBUS, a 0-byte file). The new
        memory is prefaulted piece by piece (see :meth:`read_into`): the one caller, ``load_into``'s
        placement, reads one tensor at a time on one thread."""
        import torch

        nbytes = tensor.numel() * tensor.element_size()
        owner = self._owner(tensor.data_ptr(), nbytes) if tensor.device.type == "cpu" and nbytes else None
        if owner is None:
            return None
        assert owner._map_base is not None
        if not tensor.is_contiguous():
            return tensor.clone(memory_format=torch.contiguous_format)
        out = torch.empty(tensor.shape, dtype=tensor.dtype)
        owner.read_into(out.untyped_storage(), tensor.data_ptr() - owner._map_base, nbytes, prefault=True)
        return out

    def read_into_storage(self, offset: int, nbytes: int, *, prefault: bool = False) -> Any:
        """A new CPU ``UntypedStorage`` holding a copy of ``[offset, offset+nbytes)`` (64-byte aligned);
        ``prefault`` as in :meth:`read_into`."""
        import torch

        storage = torch.empty(nbytes, dtype=torch.uint8).untyped_storage()
        self.read_into(storage, offset, nbytes, prefault=prefault)
        return storage

    def read_into(self, target: Any, offset: int, nbytes: int, *, prefault: bool = False) -> None:
        """Copy ``[offset, offset+nbytes)`` into an existing ``UntypedStorage`` on any device.

        Local files are read with pread straight into the destination: the data never passes
        through a mapping, so it does not count twice in the process's memory. ``prefault`` (fresh
        memory, a local file): each 8 MiB piece of the destination is mapped with one
        ``madvise(MADV_POPULATE_WRITE)`` before its pread, instead of one page fault per 4 KiB inside
        the copy (about a fifth less system time). Only for a caller that reads on one thread: the
        madvise holds the process's ``mmap_lock`` while it faults, so another thread's allocation
        waits for the piece, and a pool of reader threads serialises (measured; see ``prefault_pages``).
        """
        import numpy as np
        import torch

        self._check_range(offset, nbytes)
        if nbytes == 0:
            return
        if target.device.type != "cpu":
            staged = self.read_into_storage(offset, nbytes)
            dst = torch.empty(0, dtype=torch.uint8, device=target.device).set_(target)[:nbytes]
            dst.copy_(torch.empty(0, dtype=torch.uint8).set_(staged))
            return
        view: Any = torch.empty(0, dtype=torch.uint8).set_(target)[:nbytes].numpy()
        if self._remote is not None:  # ranged reads of bounded size straight into the destination
            step = 64 << 20
            for start in range(0, nbytes, step):
                data = self._remote.read_ahead(offset + start, offset + min(nbytes, start + step))
                if len(data) != min(step, nbytes - start):
                    raise TruncatedCheckpointError(f"object ended while reading {nbytes} bytes at {offset}",
                                                   expected_size=offset + nbytes, actual_size=self.size)
                view[start:start + len(data)] = np.frombuffer(data, dtype=np.uint8)
        elif self.path is not None:
            fd = self._descriptor()
            address = target.data_ptr() if prefault else 0
            done = 0
            while done < nbytes:
                chunk = min(nbytes - done, PREFAULT_PIECE if prefault else 1 << 28)
                if prefault:
                    prefault_pages(address + done, chunk)
                got = os.preadv(fd, [view[done:done + chunk]], offset + done)
                if got <= 0:
                    raise TruncatedCheckpointError(f"file ended at byte {offset + done} while reading "
                                                   f"{nbytes} bytes at {offset}", expected_size=offset + nbytes,
                                                   actual_size=self.size)
                done += got
        elif self._bytes is not None:  # a view, not a sliced copy: the data is in memory once more, not twice
            view[:] = np.frombuffer(memoryview(self._bytes)[offset:offset + nbytes], dtype=np.uint8)
        else:
            view[:] = np.frombuffer(self.read_at(offset, nbytes), dtype=np.uint8)

    def read_into_views(self, offset: int, views: list[Any]) -> None:
        """The bytes of this local file from ``offset`` on into ``views`` (writable contiguous buffers, one after
        another) by ``preadv``: the GIL released once per :data:`IOV_MAX` views, not once per piece."""
        assert self.path is not None and self._bytes is None, "a local file (see mapped_offset)"
        views = [v for v in views if memoryview(v).nbytes]
        sizes = [memoryview(v).nbytes for v in views]
        self._check_range(offset, sum(sizes))
        fd, i, skip = self._descriptor(), 0, 0
        while i < len(views):
            batch = [memoryview(views[i]).cast("B")[skip:]] + list(views[i + 1:i + IOV_MAX])
            got = os.preadv(fd, batch, offset)
            if got <= 0:
                raise TruncatedCheckpointError(f"file ended at byte {offset} while reading {sum(sizes)} bytes",
                                               expected_size=offset + sum(sizes[i:]) - skip, actual_size=self.size)
            offset += got
            while got and i < len(views):  # step over the views filled (the last one perhaps in part)
                take = min(got, sizes[i] - skip)
                got, skip = got - take, skip + take
                if skip == sizes[i]:
                    i, skip = i + 1, 0

    def _check_range(self, offset: int, nbytes: int) -> None:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise TruncatedCheckpointError(f"bytes {offset}..+{nbytes} lie outside these {self.size} bytes",
                                           expected_size=offset + nbytes, actual_size=self.size)

    def close(self) -> None:
        """Close what this source opened. A mapping that tensors view stays known (not unmapped), so the
        pages of a closed shard can still be released or copied while its parent read is open."""
        for obj in reversed(self._owned):
            if obj is self._mmap and self._exported:
                continue  # tensors view it; refcounting unmaps it with the last of them
            try:
                obj.close()
            except (BufferError, OSError):
                pass  # an exported view keeps an mmap alive; it is released with the last view
        self._owned.clear()
        if not self._exported:
            self._mmap = None
        children, self.mapped_children = self.mapped_children, []
        for child in children:
            child.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


WHOLE_WINDOW = 64 << 10
IOV_MAX = 1024  # buffers per preadv (POSIX's minimum for IOV_MAX is 16; Linux and macOS allow 1024)


class _Window(Source):
    """:meth:`Source.window` of a local file: every read goes to the parent's descriptor at an offset."""

    def __init__(self, parent: Source, start: int, length: int, name: str) -> None:  # no super(): nothing to open
        self._owned, self.path, self.url, self.storage_options = [], None, None, parent.storage_options
        self._remote, self._mmap, self._fd, self._exported, self._map_base = None, None, None, False, None
        self._bytes, self._file, self.mapped_children = None, None, []
        self._parent, self._start, self.name, self.size = parent, start, name, length

    def read_at(self, offset: int, n: int) -> bytes:
        n = min(n, self.size - offset)
        return self._parent.read_at(self._start + offset, n) if n > 0 and offset >= 0 else b""

    def head(self, n: int) -> bytes:
        return self.read_at(0, n)

    def buffer(self) -> Any:
        if self._bytes is None:
            self._bytes = self.read_at(0, self.size)
        return self._bytes

    def open(self) -> IO[bytes]:
        reader = ranged_reader(lambda start, end: self.read_at(start, end - start), self.size, 8 << 10)
        self._owned.append(reader)
        return reader

    @property
    def folder(self) -> str:
        return self._parent.folder

    def read_into(self, target: Any, offset: int, nbytes: int, *, prefault: bool = False) -> None:
        self._check_range(offset, nbytes)
        self._parent.read_into(target, self._start + offset, nbytes, prefault=prefault)


def _seekable(f: Any) -> bool:
    try:
        return bool(f.seekable()) if hasattr(f, "seekable") else False
    except (OSError, ValueError):
        return False
