"""``torchckpt diff A B``: keys, shapes, dtypes and (with --values) tensor values that differ."""

from __future__ import annotations

import click

from .output import Output
from .storage_opt import PathOrURL, storage_option


@click.command("diff")
@click.argument("a", type=PathOrURL(exists=True, dir_okay=False))
@click.argument("b", type=PathOrURL(exists=True, dir_okay=False))
@click.option("--values", is_flag=True, help="Compare tensor values too (max abs/relative difference, NaN/Inf).")
@click.option("--atol", type=float, default=0.0, show_default=True, help="Differences up to this count as equal.")
@click.option("--key", help="Dotted path of the weights inside training dicts.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@storage_option
def command(a: str, b: str, values: bool, atol: float, key: str | None, as_json: bool,
            storage_options: dict | None) -> int:
    """Compare two checkpoints. Exit code 0 when equal, 1 when different.

    A difference only in wrapper prefixes (module., _orig_mod., model.) is reported as such.
    """
    from ..tools.diffing import diff

    out = Output(json_mode=as_json)
    with out.progress() as progress:
        task = progress.add_task("comparing", total=None)
        report = diff(a, b, values=values, key=key, atol=atol, storage_options=storage_options,
                      progress=lambda done, total: progress.update(task, completed=done, total=total))
    if as_json:
        out.json(report.to_dict())
    else:
        out.print(str(report), markup=False)
    return 0 if report.equal else 1
