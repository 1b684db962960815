"""How far a read goes: the one switch shared by the opener, every format reader and the VM."""

from __future__ import annotations

import enum

__all__ = ["Mode"]


class Mode(str, enum.Enum):
    """``BUILD`` makes real tensors (``load``); ``STRUCTURE`` reads structure only: tensors become
    :class:`~.meta.TensorMeta` with their file offsets, no tensor data is read and torch is not
    imported (``inspect``, ``diff``); ``RECORD`` is ``STRUCTURE`` that records a blocklisted global
    and goes on instead of refusing (``scan``). All three run the same VM, constructors and budget,
    so a file that ``BUILD`` refuses for any other reason is refused by ``RECORD`` too."""

    BUILD = "build"
    STRUCTURE = "structure"
    RECORD = "record"

    @property
    def meta(self) -> bool:
        """Structure only (no tensor data, no torch)."""
        return self is not Mode.BUILD
