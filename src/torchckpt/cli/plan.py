"""``inspect --against MODULE:FACTORY``: build the user's model and show the load plan (nothing is written)."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from ..fit.load_into import load_into
from ..read.trust import Policy


def build_model(spec: str) -> Any:
    """Import ``pkg.module:factory`` (the current directory is importable) and call the factory."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise click.UsageError(f"--against expects MODULE:FACTORY (e.g. mypkg.models:build), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise click.UsageError(f"cannot import {spec}: {exc}") from None
    return factory() if callable(factory) else factory


class Plan:
    def __init__(self, report: Any) -> None:
        self.report = report

    @property
    def ok(self) -> bool:
        return self.report.ok and not self.report.mismatched

    def to_dict(self) -> dict[str, Any]:
        return {**self.report.to_dict(), "fits": self.ok}

    def render(self) -> str:
        verdict = "fits the model exactly" if self.ok else "does not fit exactly (see above)"
        return f"plan: {self.report.render()}\nverdict: the checkpoint {verdict}"

    __str__ = render


def plan_against(file: str, spec: str, *, policy: Policy | None = None, storage_options: dict[str, Any] | None = None) -> Plan:
    model = build_model(spec)
    report = load_into(model, file, strict=False, on_mismatch="skip", dry_run=True, policy=policy,
                       storage_options=storage_options)
    return Plan(report)
