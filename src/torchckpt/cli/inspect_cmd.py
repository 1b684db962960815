"""``torchckpt inspect FILE``: format, tree values, tensors and totals, without reading tensor data."""

from __future__ import annotations

import os
from typing import Any

import click

from ..storage.remote import is_url
from ..tools.inspection import inspect
from ..train.runs import run_directory
from .args import checkpoint_paths, policy_from, policy_options
from .codes import EXIT_FINDINGS, EXIT_OK
from .output import Output
from .storage_opt import storage_option


@click.command("inspect")
@checkpoint_paths("file")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of tables.")
@click.option("--max-tensors", default=60, show_default=True, type=click.IntRange(min=0), help="Tensors listed in the table (all in --json).")
@click.option("--against", metavar="MODULE:FACTORY",
              help="Import your model factory (e.g. mypkg.models:build) and show the load plan for it.")
@policy_options
@storage_option
def command(file: str, as_json: bool, max_tensors: int, against: str | None, trust: bool,
            allow: tuple[str, ...], storage_options: dict[str, Any] | None) -> int:
    """Show what a checkpoint holds: format with evidence, values, tensors, totals, classes.

    Tensor data is never read, so this takes the same time for a 1 KiB or a 100 GiB file. A
    Checkpointer run directory shows its newest committed checkpoint, as torchckpt.load reads it.
    Exit codes: 0 shown (and, with --against, the checkpoint fits), 1 it does not fit the model
    exactly, 2 usage, 3 unreadable, 4 unsafe.
    """
    out = Output(json_mode=as_json)
    policy = policy_from(trust, allow)
    note = None
    if os.path.isdir(file) or is_url(file):
        file, note = run_directory(file, storage_options)  # a Checkpointer run directory: its newest checkpoint
    report = inspect(file, policy=policy, storage_options=storage_options)
    if note is not None:
        report.notes.append(note)
    plan = None
    if against:
        from .plan import plan_against  # lazy for start-up cost: load_into's planner only for --against

        plan = plan_against(file, against, policy=policy, storage_options=storage_options)
    if as_json:
        doc = report.to_dict()
        if plan is not None:
            doc["plan"] = plan.to_dict()
        out.json(doc)
    else:
        out.print(report.render(max_tensors), markup=False)
        if plan is not None:
            out.print()
            out.print(plan.render(), markup=False)
    return EXIT_OK if plan is None or plan.ok else EXIT_FINDINGS
