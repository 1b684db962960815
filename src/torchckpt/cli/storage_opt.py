"""``--storage-option KEY=VALUE`` (every subcommand that reads checkpoints)."""

from __future__ import annotations

import json
from typing import Any, Callable

import click

__all__ = ["storage_option", "parse_storage_options"]


def parse_storage_options(pairs: tuple[str, ...] | list[str]) -> dict[str, Any] | None:
    """``["endpoint_url=http://h:9000", "config_kwargs.retries.max_attempts=2", "anon=true"]`` -> a dict.

    Dotted keys nest; values are JSON when they parse as JSON (numbers, true/false, null, objects),
    text otherwise.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--storage-option")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise click.BadParameter(f"{key!r} nests under {part!r}, which already has a value",
                                         param_hint="--storage-option")
            node = child
        node[parts[-1]] = value
    return out or None


def storage_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """Adds ``--storage-option KEY=VALUE`` (repeatable) as the ``storage_options`` parameter (a dict or None)."""
    return click.option(
        "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
        callback=lambda ctx, param, value: parse_storage_options(value),
        help="Option for the fsspec filesystem of URL arguments (repeatable), e.g. "
             "endpoint_url=http://127.0.0.1:9000, key=..., anon=true; dotted keys nest.")(f)
