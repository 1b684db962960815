"""One output sink for every subcommand: rich tables on a terminal, plain text in a pipe, or JSON.

Colour only when stdout is a terminal (and NO_COLOR is unset); ``--json`` prints exactly one JSON
document on stdout. Errors go to stderr through :func:`error`. Every human-readable string passes
:func:`torchckpt.text.escape_terminal` on its way out (stdout and stderr, terminal or pipe): text from a
file never reaches a terminal with its control characters; ``--json`` stays exact (``json.dumps``
escapes them as ``\\u001b``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from ..text import escape_terminal

__all__ = ["Output", "to_jsonable"]


def to_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "to_dict"):
        return to_jsonable(value.to_dict())
    return repr(value)


class Output:
    def __init__(self, json_mode: bool = False) -> None:
        self.json_mode = json_mode
        colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        self.console = Console(no_color=not colour, highlight=False, soft_wrap=not sys.stdout.isatty(),
                               force_terminal=None if colour else False, width=None if colour else 120)
        self.err = Console(stderr=True, no_color=not sys.stderr.isatty() or "NO_COLOR" in os.environ,
                           highlight=False, soft_wrap=True)

    def json(self, document: Any) -> None:
        sys.stdout.write(json.dumps(to_jsonable(document), indent=2) + "\n")

    def print(self, *objects: Any, **kwargs: Any) -> None:
        """Print text (escaped: see the module docstring) or rich renderables built from escaped text."""
        self.console.print(*(escape_terminal(o) if isinstance(o, str) else o for o in objects), **kwargs)

    def error(self, message: str) -> None:
        """``error: message`` on stderr; the message is escaped and never read as rich markup."""
        text = Text("error: ", style="bold red" if self.err.is_terminal else "")
        text.append(escape_terminal(message))
        self.err.print(text, markup=False)

    def progress(self, *, bytes_: bool = False) -> Any:
        """A rich Progress drawn on stderr when it is a terminal; disabled elsewhere and in --json mode."""
        enabled = self.err.is_terminal and not self.json_mode
        counter = DownloadColumn() if bytes_ else MofNCompleteColumn()
        return Progress("[progress.description]{task.description}", BarColumn(), counter, TimeRemainingColumn(),
                        console=self.err, disable=not enabled, transient=True)

    def show(self, record: Any, text: str | None = None) -> None:
        """A tool's record: its ``to_dict()`` in ``--json`` mode, else ``text`` (default: what it renders)."""
        if self.json_mode:
            self.json(record.to_dict())
        else:
            self.print(str(record) if text is None else text, markup=False)

    @contextlib.contextmanager
    def task(self, description: str, *, bytes_: bool = False) -> Iterator[Callable[[int, int], None]]:
        """``with out.task("scanning") as progress``: a ``progress(done, total)`` callback for a tool."""
        with self.progress(bytes_=bytes_) as bar:
            task = bar.add_task(description, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)
