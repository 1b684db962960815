"""``torchckpt tour``: the guided demonstration of every scenario on generated checkpoints."""

from __future__ import annotations

import os
import tempfile

import click

from ..demo.tour import run_tour
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
        outcomes = run_tour(keep)
    else:
        with tempfile.TemporaryDirectory(prefix="torchckpt-tour-") as folder:
            outcomes = run_tour(folder)
    if as_json:
        out.json([o.__dict__ for o in outcomes])
    else:
        for i, o in enumerate(outcomes, 1):
            mark = "ok " if o.ok else "FAIL"
            out.print(f"[bold]{i:2d}. {o.scenario}[/]  ({o.file})  {mark}")
            if o.format and o.format != "-":
                out.print(f"    format      {o.format}")
            out.print(f"    torch.load  {o.torch_load}")
            out.print(f"    torchckpt   {o.torchckpt}")
            for line in o.details:
                for sub in line.splitlines():
                    out.print(f"      {sub}", markup=False)
        failed = [o.scenario for o in outcomes if not o.ok]
        out.print(f"\n{len(outcomes) - len(failed)} of {len(outcomes)} scenarios behaved as expected"
                  + (f"; failed: {', '.join(failed)}" if failed else "."))
    return 0 if all(o.ok for o in outcomes) else 1
