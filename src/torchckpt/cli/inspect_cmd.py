"""``torchckpt inspect FILE``: format, tree values, tensors and totals, without reading tensor data."""

from __future__ import annotations

import click

from .output import Output
from .storage_opt import storage_option


def _fmt_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


@click.command("inspect")
@click.argument("file", type=click.Path(allow_dash=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of tables.")
@click.option("--max-tensors", default=60, show_default=True, help="Tensors listed in the table (all in --json).")
@click.option("--against", metavar="MODULE:FACTORY",
              help="Import your model factory (e.g. mypkg.models:build) and show the load plan for it.")
@click.option("--trust", is_flag=True, help="Import the real classes the file names (runs their code).")
@storage_option
def inspect_command(file: str, as_json: bool, max_tensors: int, against: str | None, trust: bool,
                    storage_options: dict | None) -> int:
    """Show what a checkpoint holds: format with evidence, values, tensors, totals, classes.

    Tensor data is never read, so this takes the same time for a 1 KiB or a 100 GiB file.
    """
    from ..tools.inspection import inspect

    out = Output(json_mode=as_json)
    report = inspect(file, trust=trust, storage_options=storage_options)
    plan = None
    if against:
        from .plan import plan_against

        plan = plan_against(file, against, trust=trust, storage_options=storage_options)
    if as_json:
        doc = report.to_dict()
        if plan is not None:
            doc["plan"] = plan.to_dict()
        out.json(doc)
        return 0 if plan is None or plan.ok else 1
    render(out, report, max_tensors)
    if plan is not None:
        out.print()
        out.print(str(plan))
        return 0 if plan.ok else 1
    return 0


def render(out: Output, report: "object", max_tensors: int) -> None:
    from rich.table import Table

    r = report  # InspectReport
    out.print(f"[bold]{r.path}[/]  {_fmt_bytes(r.file_size) if r.file_size >= 0 else ''}")
    out.print(f"format: {r.description}")
    for line in r.evidence:
        out.print(f"  - {line}")
    if r.values:
        table = Table(title="values", show_edge=False, title_justify="left")
        for col in ("path", "type", "value"):
            table.add_column(col, overflow="fold")
        for path, typ, value in r.values:
            table.add_row(path, typ, value)
        out.print(table)
    if r.tensors:
        table = Table(title="tensors", show_edge=False, title_justify="left")
        table.add_column("key", overflow="fold")
        table.add_column("shape")
        table.add_column("dtype")
        table.add_column("bytes", justify="right")
        for t in r.tensors[:max_tensors]:
            table.add_row(t.key, "[" + ", ".join(map(str, t.shape)) + "]", t.dtype, _fmt_bytes(t.nbytes))
        if len(r.tensors) > max_tensors:
            table.add_row(f"... {len(r.tensors) - max_tensors} more (see --json)", "", "", "")
        out.print(table)
    out.print(f"totals: {len(r.tensors)} tensors, {r.total_parameters:,} parameters, {_fmt_bytes(r.total_bytes)}")
    if r.weights:
        where = ", ".join(f"{p} ({s}, {n} tensors)" for p, s, n in r.weights)
        out.print(f"weights: {where}")
    if r.classes:
        stubbed = r.stubbed_classes
        out.print(f"classes: {len(r.classes)} referenced" + (f", {len(stubbed)} stubbed (not imported):" if stubbed
                                                             else ""))
        for name in stubbed:
            out.print(f"  - {name}")
    for key, value in r.metadata.items():
        out.print(f"metadata {key}: {value[:200]}")
    for note in r.notes:
        out.print(f"note: {note}")
