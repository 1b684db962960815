"""``torchckpt.report``: one self-contained HTML page about a checkpoint.

``html_report`` gathers what the page shows (inspection, scan, per-tensor statistics, the plan of a
load into a model), ``tensor_stats`` computes the statistics, ``treemap`` lays out the size map and
``page`` renders it all.
"""

from __future__ import annotations

from .html_report import CheckpointReport, MissingExtraError, report, require_extra

__all__ = ["report", "CheckpointReport", "MissingExtraError", "require_extra"]
