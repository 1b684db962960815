"""One output sink for every subcommand: rich tables on a terminal, plain text in a pipe, or JSON.

Colour only when stdout is a terminal (and NO_COLOR is unset); ``--json`` prints exactly one JSON
document on stdout. Errors go to stderr through :func:`error`. Every human-readable string passes
:func:`torchckpt.text.escape_terminal` on its way out (stdout and stderr, terminal or pipe): text from a
file never reaches a terminal with its control characters; ``--json`` stays exact (``json.dumps``
escapes them as ``\\u001b``).

rich is imported only when a terminal is drawn on (it costs about as much as the rest of a small
``inspect``): text for a pipe or a file, JSON and errors in a pipe are written directly.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    from rich.console import Console

from ..text import escape_terminal

__all__ = ["Output", "to_jsonable"]


def to_jsonable(value: Any) -> Any:
    """``value`` as strict JSON data: containers as lists/objects, records through ``to_dict()``, a
    non-finite float as the string ``"nan"``, ``"inf"`` or ``"-inf"``, anything else as its repr."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if value != value else ("inf" if value > 0 else "-inf")
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

    @functools.cached_property
    def console(self) -> Console:
        from rich.console import Console  # lazy: only a terminal needs rich

        colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        return Console(no_color=not colour, highlight=False, soft_wrap=not sys.stdout.isatty(),
                       force_terminal=None if colour else False, width=None if colour else 120)

    @functools.cached_property
    def err(self) -> Console:
        from rich.console import Console  # lazy: only a terminal needs rich

        return Console(stderr=True, no_color=not sys.stderr.isatty() or "NO_COLOR" in os.environ,
                       highlight=False, soft_wrap=True)

    def json(self, document: Any) -> None:
        sys.stdout.write(json.dumps(to_jsonable(document), indent=2, allow_nan=False) + "\n")

    def print(self, *objects: Any, **kwargs: Any) -> None:
        """Print text (escaped: see the module docstring) or rich renderables built from escaped text."""
        objects = tuple(escape_terminal(o) if isinstance(o, str) else o for o in objects)
        if not sys.stdout.isatty() and kwargs.get("markup") is False and all(isinstance(o, str) for o in objects):
            sys.stdout.write(" ".join(objects) + "\n")  # a pipe or a file: the text as it is, no wrapping
        elif not objects and not sys.stdout.isatty():
            sys.stdout.write("\n")
        else:
            self.console.print(*objects, **kwargs)

    def error(self, message: str) -> None:
        """``error: message`` on stderr; the message is escaped, and never read as rich markup."""
        message = escape_terminal(message)
        if not sys.stderr.isatty():
            sys.stderr.write(f"error: {message}\n")
        else:
            from rich.markup import escape  # lazy with rich: a message naming `x[0]` is text, not markup

            self.err.print(f"[bold red]error:[/] {escape(message)}", markup=True)

    def progress(self, *, bytes_: bool = False) -> Any:
        """A rich Progress drawn on stderr when it is a terminal; disabled elsewhere and in --json mode."""
        from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

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
        if self.json_mode or not sys.stderr.isatty():  # nothing is drawn: no need for rich
            yield lambda done, total: None
            return
        with self.progress(bytes_=bytes_) as bar:
            task = bar.add_task(description, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)
