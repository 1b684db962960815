"""`torchckpt --help` lists every subcommand from the summaries kept in cli/main.py, without importing any
subcommand module: the listing must say what each command's own help says, and cost no more than click."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import click
import pytest

from torchckpt.cli import main as cli_main

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")


def _real_command(name: str) -> click.Command:
    module, _ = cli_main._COMMANDS[name]
    command: click.Command = importlib.import_module(f"torchckpt.cli.{module}").command
    return command


@pytest.mark.parametrize("name", list(cli_main._COMMANDS))
def test_each_summary_is_the_commands_own_first_sentence(name: str) -> None:
    command = _real_command(name)
    _, summary = cli_main._COMMANDS[name]
    assert command.name == name
    # click's own short help of the real command, unshortened: its short_help, or its docstring's first sentence
    assert command.get_short_help_str(limit=10_000) == summary


@pytest.mark.parametrize("width", [40, 80, 100, 200])
def test_the_listing_is_what_click_prints_from_the_real_commands(width: int) -> None:
    """Same rows, same shortening at every terminal width as click's listing built from the real commands."""
    ctx = click.Context(cli_main.cli, info_name="torchckpt", terminal_width=width, max_content_width=100)
    ours, theirs = ctx.make_formatter(), ctx.make_formatter()
    cli_main.cli.format_commands(ctx, ours)
    click.Group.format_commands(cli_main.cli, ctx, theirs)  # click's own: get_command imports every module
    assert ours.getvalue() == theirs.getvalue()
    assert all(name in ours.getvalue() for name in cli_main._COMMANDS)


# Runs the CLI in-process, then prints which subcommand modules and heavy libraries it imported.
CLI = """
import atexit, json, sys
def imported():
    return sorted(m for m in sys.modules if m.startswith("torchckpt.cli.") and m.endswith("_cmd")
                  or m.split(".")[0] in ("torch", "numpy", "rich", "safetensors", "fsspec")
                  or m.startswith(("torchckpt.read.", "torchckpt.tools.", "torchckpt.fit.", "torchckpt.train.")))
atexit.register(lambda: sys.__stderr__.write("MODULES " + json.dumps(imported()) + "\\n"))
from torchckpt.cli.main import run
sys.argv = ["torchckpt", *sys.argv[1:]]
run()
"""


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--help"], ["-h"], []])
def test_help_imports_no_subcommand_module_nor_torch_or_numpy(args: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, env=env, timeout=120)
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("MODULES "))
    assert json.loads(line[len("MODULES "):]) == []
    # no arguments: the help, as a usage error (click >= 8.2; older click exits 0)
    assert res.returncode in ((0,) if args else (0, 2)), res.stderr
    listing = res.stdout.split("Commands:", 1)[1]
    for name in cli_main._COMMANDS:  # every command listed, with the start of its summary
        assert f"  {name}  " in listing or f"  {name} " in listing, listing
    assert "Show what a checkpoint holds" in listing
