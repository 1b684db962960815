"""``torchckpt.convert``: any readable checkpoint to a modern ``.pt``, ``.safetensors`` or a DCP
directory, verified.

``to_file`` writes ``.pt`` and ``.safetensors`` (through the one safetensors writer,
:func:`torchckpt.read.write_safetensors`), ``to_dcp`` a torch.distributed.checkpoint directory, and
``byte_io`` holds the byte-level work both share (file-to-file copies, bitwise verification).
"""

from __future__ import annotations

from .to_dcp import convert
from .to_file import ConvertReport

__all__ = ["convert", "ConvertReport"]
