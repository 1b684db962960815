"""``torchckpt report CKPT -o report.html``: a self-contained HTML page of a checkpoint, a load plan and a diff."""

from __future__ import annotations

from typing import Any

import click

from ..tools.report import MissingExtraError, report, require_extra
from .codes import EXIT_OK
from .output import Output
from .plan import build_model
from .storage_opt import storage_option


@click.command("report")
@click.argument("checkpoint")
@click.option("-o", "--output", default="report.html", show_default=True, help="Where to write the HTML page.")
@click.option("--against", metavar="MODULE:FACTORY", help="Show the load plan into the model this factory builds.")
@click.option("--diff", "other", metavar="OTHER", help="Show the per-layer relative change against another checkpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print the report's numbers as one JSON document too.")
@storage_option
def command(checkpoint: str, output: str, against: str | None, other: str | None, as_json: bool,
            storage_options: dict[str, Any] | None) -> int:
    """Write one HTML file showing what CHECKPOINT holds: format, safety verdict, totals, a treemap of
    the bytes, per-tensor statistics and health warnings, and optionally a load plan and a diff.

    The page needs no network to be viewed. Needs the report extra: pip install "torchckpt[report]".
    Exit codes: 0 written, 2 usage (missing extra), 3 unreadable input, 4 unsafe checkpoint.
    """
    try:
        require_extra(diff=other is not None)
    except MissingExtraError as exc:
        raise click.UsageError(f"{exc}") from None
    model = None
    if against:
        model = build_model(against)
    out = Output(json_mode=as_json)
    with out.task("reading tensors") as progress:
        result = report(checkpoint, against=model, diff=other, output=output, progress=progress,
                        storage_options=storage_options)
    out.show(result)  # str(): the text summary (render() is the HTML page)
    return EXIT_OK
