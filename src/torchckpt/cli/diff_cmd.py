"""``torchckpt diff A B``: keys, shapes, dtypes, plain values and tensor values that differ."""

from __future__ import annotations

from typing import Any

import click

from ..tools.diffing import diff
from .args import checkpoint_paths, policy_from, policy_options
from .codes import EXIT_FINDINGS, EXIT_OK
from .output import Output
from .storage_opt import storage_option


@click.command("diff")
@checkpoint_paths("a", "b")
@click.option("--values/--structure-only", default=True, show_default=True,
              help="Compare tensor values (default: max abs/relative difference, NaN/Inf), or only keys, shapes, "
                   "dtypes and plain values (fast, reads no tensor data; never reports the files as equal).")
@click.option("--atol", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Differences up to this count as equal (>= 0).")
@click.option("--key", help="Dotted path of the weights inside training dicts.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@policy_options
@storage_option
def command(a: str, b: str, values: bool, atol: float, key: str | None, as_json: bool, trust: bool,
            allow: tuple[str, ...], storage_options: dict[str, Any] | None) -> int:
    """Compare two checkpoints: keys, shapes, dtypes, plain values (epoch, lr, config) and tensor values.

    Exit code 0 when nothing that was compared differs, 1 when something differs. With
    --structure-only, 0 means "same structure and plain values"; the JSON then says "equal": null
    and lists what was compared. A difference only in wrapper prefixes (module., _orig_mod., model.)
    is reported as such. Exit codes besides: 2 usage, 3 unreadable (a file), 4 unsafe checkpoint.
    """
    out = Output(json_mode=as_json)
    with out.task("comparing") as progress:
        report = diff(a, b, values=values, key=key, atol=atol, policy=policy_from(trust, allow),
                      storage_options=storage_options, progress=progress)
    out.show(report)
    return EXIT_FINDINGS if report.equal is False else EXIT_OK
