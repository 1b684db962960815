"""``torchckpt.load_into`` as the facade exports it: :func:`torchckpt.fit.load_into.load_into`, plus a
Checkpointer run directory, which it reads as its newest committed checkpoint (named in the report's notes).

A module of its own, apart from :mod:`torchckpt.train.runs`, so that a plain ``torchckpt.load(file)``
does not import the matching machinery (about 0.3-0.5 s of its first call).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from ..fit.load_into import load_into as _load_into
from .runs import run_directory

__all__ = ["load_into"]

if TYPE_CHECKING:  # type checkers see the real signature; the wrapper only adds a directory
    from ..fit.load_into import load_into as load_into
else:
    @functools.wraps(_load_into)
    def load_into(model: Any, source: Any, *args: Any, **kwargs: Any) -> Any:
        source, note = run_directory(source, kwargs.get("storage_options"))
        report = _load_into(model, source, *args, **kwargs)
        if note is not None:
            report.notes.append(note)
        return report
