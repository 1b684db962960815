"""Atomic, durable file writes: temp file in the same directory, fsync, rename, fsync the directory.

A crash at any moment leaves either the old file or the new one under the final name, never a
partial file. Temp files are named ``.<name>.tmp-<pid>-<random>`` so that leftovers from a crash
can be recognised and removed (:func:`clean_temp_files`).

:class:`AtomicFiles` publishes several files of one directory together (a checkpoint's data file and
its commit record) with one directory fsync: every file is durable before its name appears, and the
names appear in the order the files were written.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import secrets
import threading
from typing import IO, Any, Callable, Iterable, Iterator, cast

from ..errors import CheckpointWriteError
from . import interrupts
from .reclaim import drain, free_later, remove_file, replace_file

__all__ = ["atomic_write", "process_alive", "AtomicFiles", "fsync_dir", "clean_temp_files", "file_sha256", "write_error",
           "os_error_in", "TEMP_MARK"]

TEMP_MARK = ".tmp-"


# fsync of a directory is not supported everywhere (some network and FUSE file systems, Windows):
# there, renames are as durable as the file system makes them, and nothing better can be done
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES, errno.EPERM,
                          errno.EISDIR, errno.ENOSYS}


def fsync_dir(directory: str, *, strict: bool = False) -> None:
    """Make the renames and removals in ``directory`` durable.

    ``strict``: an I/O error (EIO, ENOSPC ...) raises OSError instead of being ignored: a commit must
    not report success when its names may not be on disk. Where directories cannot be fsynced at all,
    nothing is raised either way.
    """
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return  # not supported on this platform/filesystem
    try:
        os.fsync(fd)
    except OSError as exc:
        if strict and exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def _temp_path(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def write_error(path: str, exc: OSError, *, written: int | None = None) -> CheckpointWriteError:
    """The CheckpointWriteError for an OSError met while writing ``path``: why, and what to do."""
    if exc.errno == errno.ENOSPC:
        why = "the disk is full"
        free = _free_bytes(os.path.dirname(os.path.abspath(path)))
        if written:
            why += f" after {_size(written)} of this file were written"
        if free is not None:
            why += f" ({_size(free)} free now)"
        hint = "Free space or choose another directory; the previous checkpoints are intact."
    elif exc.errno == errno.EFBIG:
        why = "the file would exceed the file-size limit of this process or file system"
        why += f" (stopped at {_size(written)})" if written else ""
        hint = "Raise the limit (ulimit -f) or write elsewhere; the previous checkpoints are intact."
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why, hint = "the directory is not writable", "Check the permissions or choose another directory."
    else:
        why, hint = f"{exc.strerror or exc}", "The previous checkpoints are intact."
    error = CheckpointWriteError(f"could not write the checkpoint: {why}", path=path, hint=hint)
    error.errno, error.strerror = exc.errno, exc.strerror
    return error


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, or one in its cause/context chain.

    torch's zip writer turns a failed write into ``RuntimeError: ... unexpected pos`` and keeps the
    real reason (ENOSPC ...) only in ``__context__``.
    """
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 16:
        if isinstance(current, OSError) and current.errno is not None:
            return current
        current = current.__cause__ or current.__context__
        seen += 1
    return None


def _free_bytes(directory: str) -> int | None:
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _size(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[IO[bytes]]:
    """Yield a binary file; on success it replaces ``path`` atomically and durably.

    On failure the temp file is removed and ``path`` is untouched; a failure caused by the file
    system (also when a serializer wrapped it in another exception) raises CheckpointWriteError.
    """
    with AtomicFiles(os.path.dirname(os.path.abspath(path))) as group:
        with group.write(path) as fh:
            yield fh
        group.publish()


class _Staged:
    def __init__(self, path: str, temp: str, fh: IO[bytes], out: "_Counted") -> None:
        self.path, self.temp, self.fh, self.out = path, temp, fh, out
        self.renamed = False
        self.replaced: int | None = None  # holds the content this file replaced, freed after the commit


class AtomicFiles:
    """Files of one directory, written under temp names and published together, durably.

    ``write(path)`` yields a file written under a temp name beside ``path``; ``publish()`` then

    1. fsyncs every file (at the same time: concurrent fsyncs share one journal commit and disk
       flush): the content is on disk before any name points at it;
    2. removes the names in ``remove_first`` (an old commit record that must not describe new data);
    3. renames the files in the order they were written (write the commit record last);
    4. fsyncs the directory; only then does ``publish`` return.

    Metadata changes within one directory reach the disk in the order they were made on journaling
    file systems (ext4, XFS, btrfs), so a crash at any moment, power loss included, leaves a prefix of
    steps 2-3: a name that exists holds complete content, and a file written later (the commit record)
    never exists without the ones written before it. With ``publish(verified=True)`` a set of new names
    is renamed before step 1 (see :meth:`publish`). Leaving the ``with`` block without ``publish`` (or a
    failure before the files are durable under their names) removes the temp files and any file
    already renamed. File-system failures raise CheckpointWriteError naming the first file.
    """

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        self._files: list[_Staged] = []
        self._published = False

    def __enter__(self) -> "AtomicFiles":
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._published:
            self._abort()

    @property
    def temps(self) -> dict[str, str]:
        """Final path -> temp path of every file written so far (to read back what was written)."""
        return {f.path: f.temp for f in self._files}

    @contextlib.contextmanager
    def write(self, path: str) -> Iterator[IO[bytes]]:
        """Yield a binary file that ``publish`` will put under ``path`` (which must be in this directory)."""
        path = os.path.abspath(os.fspath(path))
        if os.path.dirname(path) != self.directory:
            raise ValueError(f"{path} is not in {self.directory}")
        if not os.path.isdir(self.directory):
            raise CheckpointWriteError("the directory does not exist", path=self.directory,
                                       hint="Create it first (os.makedirs) or fix the path.")
        drain()  # the space of files removed or replaced before is free again before anything is written
        tmp = _temp_path(path)
        with interrupts.deferred():  # recorded as soon as it exists: the temp file of an interrupted save is removed
            try:
                fh = open(tmp, "wb")
            except OSError as exc:
                raise write_error(path, exc) from None
            staged = _Staged(path, tmp, fh, _Counted(fh))
            self._files.append(staged)
        try:
            yield cast(IO[bytes], staged.out)  # duck-typed: write() is wrapped, everything else delegates
            fh.flush()
        except CheckpointWriteError:
            self._abort()
            raise
        except BaseException as exc:
            self._abort()
            stop = interrupts.interruption_in(exc)
            if stop is not None and stop is not exc:  # Ctrl-C inside a write torch.save made: it reports
                raise stop from None  # "RuntimeError: unexpected pos"; the user pressed Ctrl-C
            cause = os_error_in(exc) if isinstance(exc, Exception) else None
            if cause is None:
                raise
            raise write_error(path, cause, written=staged.out.written) from None

    def publish(self, remove_first: Iterable[str] = (), *, verified: bool = False) -> None:
        """Make every file durable, remove ``remove_first``, rename the files in order, fsync the directory.

        ``verified``: the last file is a commit record that holds the size and digest of the others, and
        readers check them against it (a checkpoint's sidecar). Then, when no final name exists yet (so
        nothing can be lost), the files are renamed first and the files and the directory are fsynced
        all at once: one flush of the disk instead of two. A power loss before ``publish`` returns can
        then leave names whose content is not (all) on disk, which the commit record's check refuses;
        a kill (the kernel keeps what was written) leaves the complete files.
        """
        with interrupts.deferred():  # a Ctrl-C waits for the commit (or its undoing) to be complete
            self._publish(remove_first, verified)

    def _publish(self, remove_first: Iterable[str], verified: bool) -> None:
        if not self._files:
            return
        files, primary = self._files, self._files[0]
        remove_first = [name for name in remove_first if os.path.lexists(name)]  # (unlink on a read-only
        # file system fails even for nothing)
        early = verified and len(files) > 1 and not remove_first and not any(os.path.lexists(f.path) for f in files)
        try:
            if _sync_file_range is not None:
                for f in files:  # start all writeback now, so that the fsyncs below overlap
                    _sync_file_range(f.fh.fileno(), 0, 0, 2)  # SYNC_FILE_RANGE_WRITE
            if early:
                self._rename()
                _fsync_all([f.fh.fileno() for f in files], self.directory)
            else:
                _fsync_all([f.fh.fileno() for f in files])
                for name in remove_first:
                    with contextlib.suppress(FileNotFoundError):
                        remove_file(name)
                self._rename()
                self._published = True  # complete and durable content under every name: kept whatever follows
                fsync_dir(self.directory, strict=True)
            self._published = True
            for f in files:
                f.fh.close()
        except BaseException as exc:
            if not self._published:
                self._abort()
            else:
                self._free_replaced()
            cause = os_error_in(exc) if isinstance(exc, Exception) else None
            if cause is None:
                raise
            raise write_error(primary.path, cause, written=primary.out.written) from None
        self._free_replaced()  # the commit is durable: old content is freed in the background from now

    def abort(self) -> None:
        """Remove every file written so far, unless published (what leaving the ``with`` block without
        ``publish`` does): for a caller that publishes later, from another thread (an async save's write-through)."""
        if not self._published:
            self._abort()

    def _rename(self) -> None:
        for f in self._files:
            f.replaced = replace_file(f.temp, f.path)
            f.renamed = True

    def _free_replaced(self) -> None:
        for f in self._files:
            free_later(f.replaced)
            f.replaced = None

    def _abort(self) -> None:
        """Remove every temp file, and every file already renamed (new data without the files after it)."""
        with interrupts.deferred():  # a second Ctrl-C does not leave half of them behind
            self._free_replaced()
            for f in reversed(self._files):
                f.out.abandon()
                with contextlib.suppress(OSError):
                    f.fh.close()
                _remove_quietly(f.path if f.renamed else f.temp)
            self._files = []


def _fsync_all(fds: list[int], directory: str | None = None) -> None:
    """fsync every descriptor (and ``directory``, strictly) at the same time: concurrent fsyncs share the
    journal commit and the disk's cache flush, where one after the other each pays its own flush."""
    jobs: list[Callable[[], None]] = [functools.partial(os.fsync, fd) for fd in fds]
    if directory is not None:
        jobs.append(functools.partial(fsync_dir, directory, strict=True))
    errors: list[BaseException] = []

    def run(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            errors.append(exc)

    helpers = [threading.Thread(target=run, args=(job,), name="torchckpt-fsync") for job in jobs[1:]]
    for thread in helpers:
        thread.start()
    run(jobs[0])
    for thread in helpers:
        thread.join()
    if errors:
        raise errors[0]


class _Counted:
    """File wrapper that counts the bytes written (by ``write`` or, announced with ``appended``, by the
    kernel, e.g. copy_file_range), for the error a failed write raises.

    No writeback is started while the file grows: ``sync_file_range`` every 32 MiB made a 512 MiB save
    1.5-1.8x slower than without it (0.3-0.5 s more system time in the saving thread; bench_save and 3
    alternated fresh processes), and torch.save + fsync, the baseline, does not. ``publish`` starts the
    writeback of all files at once before their fsyncs.
    """

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh
        self._written = 0
        self._abandoned = False

    @property
    def written(self) -> int:
        return self._written

    def write(self, data: Any) -> int:
        if self._abandoned:
            return memoryview(data).nbytes
        n = self._fh.write(data)
        self._written += n
        return n

    def abandon(self) -> None:
        """The file is closed and removed: a late write goes nowhere. After a Ctrl-C inside ``torch.save``, its zip
        writer, when freed, finishes the file it could not finish, and a write that raises there aborts the
        process (``terminate called after throwing ... ValueError: write to closed file``; seen once in ~3600
        interrupted saves)."""
        self._abandoned = True

    def appended(self, n: int) -> None:
        """Count ``n`` bytes appended to the file by the kernel (copy_file_range)."""
        self._written += n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def _load_sync_file_range() -> Any:
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        # the process's own symbols include libc's; ctypes.util.find_library would run ldconfig (~2 ms per import)
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        return fn
    except (OSError, AttributeError):
        return None


_sync_file_range = _load_sync_file_range()


def file_sha256(path: str, chunk: int = 8 << 20) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while True:
            n = fh.readinto(view)
            if not n:
                break
            digest.update(view[:n])
            size += n
    return digest.hexdigest(), size


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        remove_file(path)  # a crashed writer's temp file can be as large as a checkpoint


def clean_temp_files(directory: str, *, only_dead: bool = True, is_ours: Callable[[str], bool] = lambda n: True) -> list[str]:
    """Remove ``.*.tmp-<pid>-*`` leftovers of crashed writers. Temp files of live processes are kept."""
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(".") or TEMP_MARK not in name or not is_ours(name):
            continue
        pid_text = name.rsplit(TEMP_MARK, 1)[1].split("-", 1)[0]
        if only_dead and pid_text.isdigit() and process_alive(int(pid_text)):
            continue
        _remove_quietly(os.path.join(directory, name))
        removed.append(name)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (ours, or someone else's we may not signal)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True
