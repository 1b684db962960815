"""The ``torchckpt`` command line. Subcommands live in sibling modules; errors map to exit codes here.

Exit codes: 0 success, 1 findings/differences (scan, diff, a plan that does not fit),
2 usage, 3 unreadable or unsupported input, 4 unsafe checkpoint (code execution attempt).
"""

from __future__ import annotations

import sys
from typing import Any

import click

from ..errors import CheckpointError, UnsafeCheckpointError

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE, EXIT_UNREADABLE, EXIT_UNSAFE = 0, 1, 2, 3, 4


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, UnsafeCheckpointError):
        return EXIT_UNSAFE
    return EXIT_UNREADABLE


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="torchckpt", prog_name="torchckpt")
def cli() -> None:
    """Load any PyTorch checkpoint safely, inspect it, and move it between formats.

    Exit codes: 0 ok, 1 findings or differences, 2 usage error, 3 unreadable or unsupported
    input, 4 unsafe checkpoint.
    """


def _register() -> None:
    from . import inspect_cmd, tour_cmd

    cli.add_command(inspect_cmd.inspect_command)
    cli.add_command(tour_cmd.tour_command)
    for name in ("scan_cmd", "convert_cmd", "diff_cmd", "report_cmd"):
        try:
            module = __import__(f"{__package__}.{name}", fromlist=["command"])
        except ImportError:
            continue
        cli.add_command(module.command)


_register()


def main(argv: list[str] | None = None) -> Any:
    """Entry point of the console script; returns the exit code instead of raising."""
    from .output import Output

    try:
        return cli.main(args=argv, prog_name="torchckpt", standalone_mode=False) or 0
    except click.exceptions.NoArgsIsHelpError as exc:  # pragma: no cover - click >= 8.2
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        return EXIT_USAGE
    except click.UsageError as exc:
        exc.show()
        return EXIT_USAGE
    except click.exceptions.Abort:
        return 130
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except CheckpointError as exc:
        out = Output()
        out.error(str(exc))
        args = sys.argv[1:] if argv is None else argv
        if "--json" in args:  # machine output stays machine-readable on failure too
            out.json({**exc.to_dict(), "exit_code": exit_code_for(exc)})
        return exit_code_for(exc)
    except KeyboardInterrupt:
        return 130


def run() -> None:
    sys.exit(main())
