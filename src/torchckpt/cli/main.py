"""The ``torchckpt`` command line. Subcommands live in sibling modules; every exit code is decided here.

Exit codes: 0 success, 1 findings/differences (scan, diff, a plan that does not fit),
2 usage, 3 unreadable or unsupported input (a missing path included), 4 unsafe checkpoint,
70 internal error (a bug: its traceback is printed, escaped),
130 interrupted (Ctrl-C: one line on stderr, no traceback).
"""

from __future__ import annotations

import importlib
import sys
import traceback
from typing import Any

import click

from ..errors import CheckpointError
from .codes import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, exit_code_for
from .output import Output

# Subcommand -> (its module, its summary). A command's module (``cli/<module>.py`` defines ``command``) is
# imported only when that command runs: `inspect` must not pay for `convert`'s numpy and torch.distributed
# imports, and --help (or no arguments) lists the summaries from here and imports none of them. Each summary
# is the first sentence of its command's docstring, which click would show (tests/package/test_cli_help.py
# keeps them equal). The order is the order of the --help listing.
_COMMANDS = {
    "inspect": ("inspect_cmd", "Show what a checkpoint holds: format with evidence, values, tensors, totals, classes."),
    "tour": ("tour_cmd", "Generate sample checkpoints of every kind, then load and inspect each one."),
    "scan": ("scan_cmd", "Scan checkpoints with the same parser and policy that `load` uses; nothing is executed."),
    "convert": ("convert_cmd", "Convert SRC (any era or format) to DST, reload it and check every tensor."),
    "diff": ("diff_cmd", "Compare two checkpoints: keys, shapes, dtypes, plain values (epoch, lr, config) and "
                         "tensor values."),
    "report": ("report_cmd", "Write one HTML file showing what CHECKPOINT holds: format, safety verdict, totals, "
                             "a treemap of the bytes, per-tensor statistics and health warnings, and optionally a "
                             "load plan and a diff."),
}


class _Failed(Exception):
    """A CheckpointError on its way out of click (which would take an EOFError subclass for Ctrl-D)."""

    def __init__(self, error: CheckpointError) -> None:
        super().__init__(str(error))
        self.error = error


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _COMMANDS:
            return None
        command: click.Command = importlib.import_module(f".{_COMMANDS[cmd_name][0]}", __package__).command
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The listing of --help from the summaries in ``_COMMANDS``, shortened as click shortens a command's
        own help (a stand-in ``click.Command`` per row): no subcommand module is imported."""
        limit = formatter.width - 6 - max(map(len, _COMMANDS))
        rows = [(name, click.Command(name, help=summary).get_short_help_str(limit))
                for name, (_, summary) in _COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CheckpointError as exc:  # TruncatedCheckpointError is an EOFError: click would call it an abort
            raise _Failed(exc) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="torchckpt", prog_name="torchckpt")
def cli() -> None:
    """Load any PyTorch checkpoint safely, inspect it, and move it between formats.

    Exit codes: 0 ok, 1 findings or differences, 2 usage error, 3 unreadable or unsupported
    input, 4 unsafe checkpoint, 70 internal error (a bug: please report it), 130 interrupted (Ctrl-C).
    """


def main(argv: list[str] | None = None) -> Any:
    """Entry point of the console script; returns the exit code instead of raising."""
    args = sys.argv[1:] if argv is None else argv
    try:
        return cli.main(args=argv, prog_name="torchckpt", standalone_mode=False) or EXIT_OK
    except click.exceptions.NoArgsIsHelpError as exc:  # pragma: no cover - click >= 8.2
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        return EXIT_USAGE
    except click.UsageError as exc:
        exc.show()
        return EXIT_USAGE
    except _Failed as failed:
        error = failed.error
        out = Output(json_mode="--json" in args)
        out.error(str(error))
        if "--json" in args:  # machine output stays machine-readable on failure too
            out.json({**error.to_dict(), "exit_code": exit_code_for(error)})
        return exit_code_for(error)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        return _interrupted()
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - a bug: show it escaped (its text may quote the file), exit 70
        Output().error("".join(traceback.format_exception(exc)) +
                       f"internal error: {type(exc).__name__} escaped torchckpt; please report it "
                       "(with the file, if you can share it).")
        return EXIT_INTERNAL


def _interrupted() -> int:
    Output().error("interrupted (Ctrl-C)")
    return EXIT_INTERRUPTED


def run() -> None:
    try:
        code = main()
    except KeyboardInterrupt:  # a second Ctrl-C while the first one is being reported
        code = EXIT_INTERRUPTED
    sys.exit(code)
