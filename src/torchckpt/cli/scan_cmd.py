"""``torchckpt scan PATH...``: find code-execution attempts and container tricks without running anything."""

from __future__ import annotations

import os
from typing import Any

import click

from ..read.formats.dcp import is_dcp_dir
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

    Exit codes: 0 clean, 1 findings, 2 usage, 3 unreadable.
    """
    out = Output(json_mode=as_json)
    with out.progress() as progress:
        task = progress.add_task("scanning", total=None)
        report = scan(paths, recursive=recursive, strict=strict, storage_options=storage_options,
                      progress=lambda done, total: progress.update(task, completed=done, total=total))
    for f in report.files:
        if f.status == "unreadable" and not recursive and os.path.isdir(f.path) and not is_dcp_dir(f.path):
            f.error = "is a directory: pass -r (--recursive) to scan the files in it"  # the CLI's spelling
    if as_json:
        out.json(report.to_dict())
        return scan_exit_code(report)
    for f in report.files:
        label = {"clean": "clean", "findings": "FINDINGS", "unreadable": "unreadable", "skipped": "skipped"}[f.status]
        out.print(f"{f.path}: {label} ({f.format}, {len(f.streams)} pickle streams, {len(f.globals)} globals)",
                  markup=False)
        if f.error:
            out.print(f"  {f.error}", markup=False)
            if f.hint and f.status == "unreadable":
                out.print(f"  {f.hint}", markup=False)
        for finding in f.findings:
            where = "".join([f" [{finding.member}]" if finding.member else "",
                             f" @{finding.offset}" if finding.offset is not None else ""])
            out.print(f"  {finding.kind}: {finding.message}{where}", markup=False)
        stubbed = sorted({g.fullname for g in f.globals if g.verdict.value == "unknown"})
        if stubbed and not strict:
            out.print(f"  would be stubbed (not imported): {', '.join(stubbed[:8])}"
                      + (f" and {len(stubbed) - 8} more" if len(stubbed) > 8 else ""), markup=False)
        if verbose:
            for s in f.streams:
                for g in s["globals"]:
                    out.print(f"    {s['member'] or '<file>'} @{g.offset}: {g.fullname} ({g.verdict.value})",
                              markup=False)
    counts = {k: sum(f.status == k for f in report.files) for k in ("clean", "findings", "unreadable", "skipped")}
    out.print(f"{len(report.files)} files: {counts['clean']} clean, {counts['findings']} with findings, "
              f"{counts['unreadable']} unreadable, {counts['skipped']} skipped (not checkpoints)")
    return scan_exit_code(report)
