"""``torchckpt scan PATH...``: find code-execution attempts and container tricks without running anything."""

from __future__ import annotations

import os
from typing import Any

import click

from ..read import deepspeed_kind, folder_kind, is_dcp_dir
from ..tools.scanning import scan
from .args import checkpoint_paths
from .codes import scan_exit_code
from .output import Output
from .storage_opt import storage_option


@click.command("scan")
@checkpoint_paths("paths", nargs=-1)
@click.option("-r", "--recursive", is_flag=True, help="Walk directories.")
@click.option("--strict", is_flag=True, help="Also report classes that would be stubbed (not on the allowlist).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("-v", "--verbose", is_flag=True, help="List every global of every stream, not only findings.")
@storage_option
def command(paths: tuple[str, ...], recursive: bool, strict: bool, as_json: bool, verbose: bool,
            storage_options: dict[str, Any] | None) -> int:
    """Scan checkpoints with the same parser and policy that `load` uses; nothing is executed.

    A checkpoint folder (torch.distributed.checkpoint, Hugging Face, accelerate, DeepSpeed) is scanned as
    one checkpoint; any other directory needs -r. Exit codes: 0 clean, 1 findings, 2 usage (a directory
    without -r), 3 unreadable, 130 interrupted.
    """
    for path in paths:
        # a checkpoint folder (DCP, Hugging Face, accelerate, DeepSpeed) is one checkpoint, as for `load`
        if not recursive and os.path.isdir(path) and not (is_dcp_dir(path) or folder_kind(path) or deepspeed_kind(path)):
            raise click.UsageError(f"{path} is a directory: pass -r (--recursive) to scan the files in it, "
                                   f"e.g. torchckpt scan -r {path}")
    out = Output(json_mode=as_json)
    with out.task("scanning") as progress:
        report = scan(paths, recursive=recursive, strict=strict, storage_options=storage_options,
                      progress=progress)
    code = scan_exit_code(report)
    if as_json:
        out.json({"exit_code": code, **report.to_dict()})
    else:
        out.show(report, report.render(strict=strict, verbose=verbose))
    return code
