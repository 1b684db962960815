"""Arguments every subcommand shares: checkpoint paths (one rule for a missing path: exit 3) and
the pickle policy (``--trust``, ``--allow``)."""

from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import click

from ..errors import CheckpointNotFoundError
from ..read.trust import Policy
from ..storage.remote import is_url

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["checkpoint_paths", "policy_options", "policy_from"]


def _must_exist(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    for path in (value if isinstance(value, tuple) else (value,)):
        if path is not None and not is_url(path) and not os.path.exists(path):  # URLs: checked when opened
            raise CheckpointNotFoundError("no such file or directory", path=path,
                                          hint="Check the path (and the current directory).")
    return value


def checkpoint_paths(*names: str, nargs: int = 1, dir_okay: bool = True) -> Callable[[F], F]:
    """Positional checkpoint arguments; a path that does not exist is a CheckpointNotFoundError (exit 3)."""
    def decorate(fn: F) -> F:
        for name in reversed(names):
            fn = click.argument(name, nargs=nargs, required=True, callback=_must_exist,
                                type=click.Path(dir_okay=dir_okay, allow_dash=False))(fn)
        return fn
    return decorate


def policy_options(fn: F) -> F:
    """``--trust`` and ``--allow PATTERN`` (repeatable), the CLI spelling of ``trust=``/``allow=``."""
    fn = click.option("--allow", "allow", multiple=True, metavar="PATTERN",
                      help="Import these classes for real ('mypkg.Net' or 'mypkg.*'); repeatable.")(fn)
    return click.option("--trust", is_flag=True,
                        help="Import the real classes the file names (runs their code).")(fn)


def policy_from(trust: bool, allow: tuple[str, ...]) -> Policy:
    return Policy.make(trust, list(allow))
