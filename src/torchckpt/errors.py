"""The one exception hierarchy of torchckpt.

Every failure on bad input raises a subclass of :class:`CheckpointError`. Each class also
subclasses the built-in exception a caller would naturally catch (``ValueError`` for a malformed
file, ``EOFError`` for a truncated one, ``FileNotFoundError`` ...), so existing ``except`` clauses
keep working. Messages follow one template: the file, what is wrong, and the next step.

This module is stdlib-only so that it can be imported without torch.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Sequence

from .text import escape_terminal

__all__ = [
    "CheckpointError",
    "UnsupportedFormatError",
    "NotACheckpointError",
    "CorruptCheckpointError",
    "AmbiguousOutputError",
    "TruncatedCheckpointError",
    "LimitExceededError",
    "UnsafeCheckpointError",
    "WeightsNotFoundError",
    "AmbiguousCheckpointError",
    "StateDictMismatchError",
    "ResumeError",
    "CheckpointWriteError",
    "CheckpointNotFoundError",
    "DeviceUnavailableError",
    "RemoteStorageError",
    "RemoteNotFoundError",
    "RemoteAuthError",
    "RemoteUnreachableError",
    "RemoteConnectionRefusedError",
    "IntegrityError",
]


def _display_name(path: Any) -> str | None:
    if path is None:
        return None
    try:
        return os.fspath(path) if not isinstance(path, str) else path
    except TypeError:
        return str(path)


class CheckpointError(Exception):
    """Base class of every error torchckpt raises about a checkpoint.

    Attributes:
        path: the file (or a description of the source) the error is about, if known.
        reason: what is wrong, without the file name.
        hint: the suggested next step, if any.
    """

    def __init__(self, reason: str, *, path: Any = None, hint: str | None = None) -> None:
        self.reason = reason
        self.path = _display_name(path)
        self.hint = hint
        super().__init__(reason)

    def with_path(self, path: Any) -> "CheckpointError":
        """Fill in the file name if the raiser did not know it; returns self."""
        if self.path is None:
            self.path = _display_name(path)
        return self

    def __str__(self) -> str:
        """The message, safe to print: the reason and path often quote the file (a key, a member name, a
        value), so control characters (ESC ...) are shown escaped wherever it is printed (a traceback, a
        warning, a log); ``reason``/``path`` and :meth:`to_dict` keep the exact text."""
        # the path is one line: a newline in it (a file or key name from the file) is shown escaped too
        head = f"{escape_terminal(self.path, keep_newlines=False)}: {self.reason}" if self.path else self.reason
        return escape_terminal(f"{head}\n{self.hint}" if self.hint else head)

    def to_dict(self) -> dict[str, Any]:
        return {"error": type(self).__name__, "path": self.path, "reason": self.reason, "hint": self.hint}


class UnsupportedFormatError(CheckpointError, ValueError):
    """The file is readable but not in a format torchckpt can load (or not implemented yet)."""

    def __init__(self, reason: str, *, path: Any = None, hint: str | None = None, format: str | None = None,
                 member: str | None = None):
        super().__init__(reason, path=path, hint=hint)
        self.format = format
        self.member = member


class NotACheckpointError(UnsupportedFormatError):
    """The file is something else entirely: a git-lfs pointer, an HTML page, JSON text, empty."""


class PartialCheckpointError(UnsupportedFormatError):
    """The file is one part of a multi-file checkpoint (a shard of a torch.distributed.checkpoint folder):
    read alone it would give a fraction of the weights, so it is refused. ``folder`` is the checkpoint to
    load instead, when it was found next to the file."""

    def __init__(self, reason: str, *, folder: str | None = None, path: Any = None, hint: str | None = None,
                 format: str | None = None):
        super().__init__(reason, path=path, hint=hint, format=format)
        self.folder = folder


class AmbiguousOutputError(CheckpointError, ValueError):
    """A conversion's destination and options do not say one output format (an index file named as the
    destination, a shard size for a single-file output)."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """The file claims a known format but its content is inconsistent or malformed."""

    def __init__(self, reason: str, *, path: Any = None, hint: str | None = None, offset: int | None = None,
                 member: str | None = None):
        super().__init__(reason, path=path, hint=hint)
        self.offset = offset
        self.member = member


class TruncatedCheckpointError(CorruptCheckpointError, EOFError):
    """The file ends before the data it declares (an interrupted download or copy)."""

    def __init__(self, reason: str, *, path: Any = None, hint: str | None = None, offset: int | None = None,
                 member: str | None = None, expected_size: int | None = None, actual_size: int | None = None):
        super().__init__(reason, path=path, hint=hint or _TRUNCATED_HINT, offset=offset, member=member)
        self.expected_size = expected_size
        self.actual_size = actual_size


_TRUNCATED_HINT = "The download or copy was probably cut short: fetch the file again and compare its size or checksum."


class LimitExceededError(CorruptCheckpointError):
    """A declared size, depth or count exceeds a safety limit (hostile or corrupt input)."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The file references a callable that can execute code or touch the system.

    Attributes:
        global_name: the dotted name of the offending global (``"os.system"``).
        offset: byte offset of the opcode that imported it, within ``member`` (or the file).
        member: the zip/tar member or stream holding the pickle, if any.
    """

    def __init__(self, reason: str, *, path: Any = None, hint: str | None = None, global_name: str | None = None,
                 offset: int | None = None, member: str | None = None):
        super().__init__(reason, path=path, hint=hint or _UNSAFE_HINT)
        self.global_name = global_name
        self.offset = offset
        self.member = member

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(global_name=self.global_name, offset=self.offset, member=self.member)
        return out


_UNSAFE_HINT = ("Loading it would run code from the file. Do not load it unless you trust its author; "
                "`torchckpt scan FILE` lists every global it imports.")


class WeightsNotFoundError(CheckpointError, LookupError):
    """No state dict could be located in the checkpoint (or ``key=`` named nothing)."""


class AmbiguousCheckpointError(CheckpointError, LookupError):
    """Several candidate state dicts fit equally well; the caller must choose one."""

    def __init__(self, reason: str, *, path: Any = None, hint: str | None = None,
                 candidates: Sequence[str] = ()):
        super().__init__(reason, path=path, hint=hint)
        self.candidates = list(candidates)


class StateDictMismatchError(CheckpointError, RuntimeError):
    """The checkpoint does not fit the model under the requested strictness.

    ``report`` is the :class:`~torchckpt.fit.report.LoadReport` describing every key.
    """

    def __init__(self, reason: str, *, path: Any = None, hint: str | None = None, report: Any = None):
        super().__init__(reason, path=path, hint=hint)
        self.report = report


class ResumeError(CheckpointError, RuntimeError):
    """A training checkpoint cannot be resumed into the given objects."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed; the previous files are untouched."""

    def __init__(self, reason: str, *, path: Any = None, hint: str | None = None):
        CheckpointError.__init__(self, reason, path=path, hint=hint)

    def __str__(self) -> str:  # OSError has its own __str__
        return CheckpointError.__str__(self)


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path does not exist, or a directory holds no complete checkpoint."""

    def __init__(self, reason: str, *, path: Any = None, hint: str | None = None):
        CheckpointError.__init__(self, reason, path=path, hint=hint)

    def __str__(self) -> str:
        return CheckpointError.__str__(self)


class DeviceUnavailableError(CheckpointError, RuntimeError):
    """``map_location`` sends tensors to a device this machine does not have (the file is fine).

    Attributes:
        device: the target device (``"cuda:0"``); ``saved_on``: where the file says the tensor lived.
    """

    def __init__(self, reason: str, *, path: Any = None, hint: str | None = None, device: str | None = None,
                 saved_on: str | None = None):
        super().__init__(reason, path=path, hint=hint)
        self.device = device
        self.saved_on = saved_on


class RemoteStorageError(CheckpointError, OSError):
    """Remote storage (an fsspec URL) failed; ``path`` is the URL. The subclasses say why."""

    def __init__(self, reason: str, *, path: Any = None, hint: str | None = None):
        CheckpointError.__init__(self, reason, path=path, hint=hint)

    def __str__(self) -> str:
        return CheckpointError.__str__(self)


class RemoteNotFoundError(CheckpointNotFoundError, RemoteStorageError):
    """The URL names no object (or its bucket does not exist)."""


class RemoteAuthError(RemoteStorageError, PermissionError):
    """The storage refused the credentials (missing, invalid, or without access to the object)."""


class RemoteUnreachableError(RemoteStorageError, ConnectionError):
    """The endpoint did not answer: unknown host, timeout, or network down."""


class RemoteConnectionRefusedError(RemoteStorageError, ConnectionRefusedError):
    """The endpoint's host answered but nothing listens on that port (connection refused)."""


class IntegrityError(CorruptCheckpointError):
    """A downloaded file does not have the sha256 it was expected to have."""

    def __init__(self, reason: str, *, path: Any = None, hint: str | None = None, expected: str | None = None,
                 actual: str | None = None):
        super().__init__(reason, path=path, hint=hint)
        self.expected = expected
        self.actual = actual
