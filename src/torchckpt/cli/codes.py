"""Every exit code of the command line, in one place (fickling's convention).

0 ok, 1 findings or differences, 2 usage error, 3 unreadable or unsupported input (a missing path
included), 4 unsafe checkpoint, 70 internal error (a bug, never a verdict on the file),
130 interrupted. The tools return records; only the CLI turns them into exit codes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UnsafeCheckpointError

if TYPE_CHECKING:  # the type only: `inspect` does not import the scanner
    from ..tools.scanning import ScanReport

__all__ = ["EXIT_OK", "EXIT_FINDINGS", "EXIT_USAGE", "EXIT_UNREADABLE", "EXIT_UNSAFE", "EXIT_INTERRUPTED",
           "EXIT_INTERNAL", "exit_code_for", "scan_exit_code"]

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE, EXIT_UNREADABLE, EXIT_UNSAFE = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 70  # sysexits EX_SOFTWARE


def exit_code_for(exc: BaseException) -> int:
    """A failed command: 4 for an unsafe checkpoint, 3 for any other checkpoint error."""
    return EXIT_UNSAFE if isinstance(exc, UnsafeCheckpointError) else EXIT_UNREADABLE


_SCAN_EXIT = {"clean": EXIT_OK, "findings": EXIT_FINDINGS, "unreadable": EXIT_UNREADABLE}


def scan_exit_code(report: ScanReport) -> int:
    """1 when any file has findings, else 3 when any is unreadable, else 0 (skipped files are fine)."""
    return _SCAN_EXIT[report.status]
