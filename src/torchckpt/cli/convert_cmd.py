"""``torchckpt convert SRC DST``: any readable checkpoint to a modern .pt, .safetensors, sharded
safetensors folder or DCP directory, verified."""

from __future__ import annotations

from typing import Any, cast

import click

from ..tools.convert import convert
from ..tools.convert.options import DTYPE_ALIASES, FloatDtype, OutputFormat, output_format
from ..tools.convert.to_sharded import shard_size
from .args import checkpoint_paths, policy_from, policy_options
from .codes import EXIT_OK
from .output import Output
from .storage_opt import storage_option


@click.command("convert")
@checkpoint_paths("src")
@click.argument("dst", type=click.Path())
@click.option("--to", "--format", "to", type=click.Choice(["pt", "safetensors", "sharded-safetensors", "dcp"]),
              help="Output format (default: from DST's extension; an unknown extension needs this). "
                   "sharded-safetensors: DST is a folder, written as Hugging Face does "
                   "(model-00001-of-0000N.safetensors ... and model.safetensors.index.json).")
@click.option("--max-shard-size", metavar="SIZE",
              help="Most data bytes per shard, e.g. 500MB, 2GiB or 1000000 (default 5GB); implies "
                   "--to sharded-safetensors for a DST folder without extension.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16", *DTYPE_ALIASES], case_sensitive=False),
              help="Cast floating-point tensors (fp32, fp16, bf16, half, ... accepted).")
@click.option("--weights-only", is_flag=True, help="Write only the model's state dict.")
@click.option("--key", help="Dotted path of the part to convert (the weights inside a training dict).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document.")
@policy_options
@storage_option
def command(src: str, dst: str, to: str | None, max_shard_size: str | None, dtype: str | None, weights_only: bool,
            key: str | None,
            as_json: bool, trust: bool, allow: tuple[str, ...], storage_options: dict[str, Any] | None) -> int:
    """Convert SRC (any era or format) to DST, reload it and check every tensor.

    The output loads with plain torch.load(weights_only=True); every change needed for that is listed.
    A whole-model pickle becomes its state dict (module classes kept as metadata). Missing parent
    directories of DST are created. Exit codes: 0 written and verified, 2 usage, 3 unreadable input
    or an output that cannot be written, 4 unsafe checkpoint, 130 interrupted (DST left untouched).

    \b
    Sharded safetensors (Hugging Face layout, for from_pretrained):
      torchckpt convert big.pt out_dir --to sharded-safetensors --max-shard-size 2GB
    """
    shard_limit: int | str | None = int(max_shard_size) if max_shard_size and max_shard_size.isdigit() else \
        max_shard_size
    try:
        output_format(dst, cast("OutputFormat | None", to), shard_limit)
        if shard_limit is not None:
            shard_size(shard_limit)
    except ValueError as exc:
        hint = getattr(exc, "hint", None)
        text = str(getattr(exc, "reason", exc)) + (f"\n{hint}" if hint else "")
        raise click.UsageError(text.replace("to='pt' / 'safetensors' / 'sharded-safetensors' / 'dcp' (--to / --format "
                                            "on the command line)",
                                            "--format pt / safetensors / sharded-safetensors / dcp")) from None
    out = Output(json_mode=as_json)
    with out.task("converting", bytes_=True) as progress:
        report = convert(src, dst, to=cast("OutputFormat | None", to), dtype=cast("FloatDtype | None", dtype),
                         weights_only=weights_only, key=key, max_shard_size=shard_limit,
                         policy=policy_from(trust, allow), progress=progress, storage_options=storage_options)
    out.show(report)
    return EXIT_OK
