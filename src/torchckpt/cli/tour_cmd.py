"""``torchckpt tour``: the guided demonstration of every scenario on generated checkpoints."""

from __future__ import annotations

import os
import tempfile

import click

from ..demo.tour import run_tour
from .codes import EXIT_FINDINGS, EXIT_OK
from .output import Output


@click.command("tour")
@click.option("--keep", type=click.Path(file_okay=False), help="Write the sample files here and keep them.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def command(keep: str | None, as_json: bool) -> int:
    """Generate sample checkpoints of every kind, then load and inspect each one.

    Compares with what plain torch.load(weights_only=True) does on the same file. Exits 1 if any
    scenario does not behave as expected.
    """
    out = Output(json_mode=as_json)
    if keep:
        os.makedirs(keep, exist_ok=True)
        report = run_tour(keep)
    else:
        with tempfile.TemporaryDirectory(prefix="torchckpt-tour-") as folder:
            report = run_tour(folder)
    out.show(report)
    return EXIT_OK if report.ok else EXIT_FINDINGS
