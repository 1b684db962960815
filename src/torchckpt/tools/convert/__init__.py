"""``torchckpt.convert``: any readable checkpoint to a modern ``.pt``, ``.safetensors``, a folder of
sharded safetensors or a DCP directory, verified.

``to_file`` writes ``.pt`` and ``.safetensors`` (through the one safetensors writer,
:func:`torchckpt.read.write_safetensors`), ``to_sharded`` Hugging Face's sharded layout with the same
writer, ``to_dcp`` a torch.distributed.checkpoint directory, and
``byte_io`` holds the byte-level work both share (file-to-file copies, bitwise verification).
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from ...read import Policy, resolve_policy
from .to_dcp import convert_to_dcp
from ...storage.source import SourceLike
from .options import FloatDtype, OutputFormat, output_format
from .to_file import ConvertReport, Progress
from .to_file import convert as convert_file

__all__ = ["convert", "ConvertReport"]


def convert(src: SourceLike, dst: str | os.PathLike[str], *, to: OutputFormat | None = None,
            dtype: FloatDtype | None = None, weights_only: bool = False, key: str | None = None, policy: Policy | None = None, trust: bool = False,
            allow: Iterable[str] | str | None = None, progress: Progress | None = None,
            storage_options: Any = None, max_shard_size: int | str | None = None) -> ConvertReport:
    """Convert ``src`` to ``dst`` and verify it; ``to`` defaults from the extension of ``dst``.

    ``to``: ``"pt"``, ``"safetensors"`` (see :func:`.to_file.convert`), ``"sharded-safetensors"``: a folder
    ``dst`` with ``model-00001-of-0000N.safetensors`` ... and ``model.safetensors.index.json``, shards of at most
    ``max_shard_size`` data bytes (default ``"5GB"``; ints, ``"500MB"``, ``"2GiB"``; giving it with a folder
    name without extension also asks for shards), or ``"dcp"``, a torch.distributed.checkpoint directory (also
    chosen by a destination ending in ``.dcp``).

    Raises:
        AmbiguousOutputError: ``dst`` names an index file, or ``max_shard_size`` is given for a single-file
            or DCP output.
    """
    dst = os.fspath(dst)
    if output_format(dst, to, max_shard_size) == "dcp":
        return convert_to_dcp(src, dst, dtype=dtype, weights_only=weights_only, key=key,
                              policy=resolve_policy(policy, trust, allow), progress=progress,
                              storage_options=storage_options)
    return convert_file(src, dst, to=to, dtype=dtype, weights_only=weights_only, key=key, policy=policy, trust=trust,
                        allow=allow, progress=progress, storage_options=storage_options, max_shard_size=max_shard_size)
