"""``torchckpt.report``: a self-contained HTML page that shows what a checkpoint holds.

One streaming pass over the tensors (each tensor is read, measured in bounded chunks and released
before the next one) gives per-tensor statistics and health warnings; the page adds the format and
its evidence, the scan's safety verdict, totals by dtype and device, training metadata, a treemap
of the bytes by module, and optionally the load plan against a model and a per-layer diff against
another checkpoint. The page is made with jinja2, the diff's chart and colours with matplotlib (the
``report`` extra); treemaps and histograms are small SVG drawn here. Everything is inlined, so the
file opens offline.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from ...errors import CheckpointError
from ...fit.align import align_keys
from ...fit.load_into import load_into
from ...fit.tree import tensors
from ...read.opener import open_checkpoint
from ...read.tensors import TensorMeta, dtype_name, release, to_torch
from ...read import Mode
from ...read.trust import Policy, resolve_policy
from ...storage.atomic import atomic_write
from ...storage.files import makedirs
from ...storage.remote import is_url
from ...storage.source import SourceLike
from ..inspection import InspectReport, inspect
from .page import render_page
from ..scanning import scan
from .tensor_stats import TensorStats, relative_change, tensor_stats, workspace

__all__ = ["report", "CheckpointReport", "HealthWarning", "LayerChange", "MissingExtraError"]

HISTOGRAMS = 8  # largest layers that get a histogram
BINS = 40
EXPLODING_RMS = 100.0  # a layer this many times the median RMS of its checkpoint (and above 10) is suspicious
FLOAT_DTYPES = ("float", "bfloat", "complex")  # dtype names with a value distribution worth drawing
TRAINING_KEYS = ("epoch", "step", "global_step", "iteration", "iter", "best", "lr", "loss", "acc", "metric",
                 "arch", "version")


class MissingExtraError(CheckpointError, ImportError):
    """The HTML report needs the optional ``report`` extra (jinja2, and matplotlib for a diff)."""


@dataclass
class HealthWarning:
    key: str
    kind: str  # "nan/inf" | "all zero" | "exploding"
    message: str


@dataclass
class LayerChange:
    """How much one layer moved from the other checkpoint (the base) to this one.

    ``change`` = ‖this − base‖ / max(‖base‖, √n · m), where n is the layer's size and m the median RMS of
    the base checkpoint's floating-point layers: the change relative to the layer's own size, but never
    relative to less than a typical layer of that size, so a zero-initialised bias that moved a little
    does not outrank a real change (0 when equal; nan when either side is not finite, see ``nonfinite``).
    """

    key: str
    other_key: str
    change: float
    diff_norm: float  # ‖this − base‖
    norm: float  # ‖base‖
    nbytes: int
    nonfinite: str = ""  # "here": became NaN/Inf in this checkpoint; "other": only the base has them; "both"


@dataclass
class CheckpointReport:
    """Everything the page shows; ``render()`` is the HTML, ``to_dict()`` the same as data."""

    info: InspectReport
    safety: str = "clean"  # "clean" | "findings" | "unreadable"
    findings: list[str] = field(default_factory=list)
    stats: list[TensorStats] = field(default_factory=list)
    warnings: list[HealthWarning] = field(default_factory=list)
    training: list[tuple[str, Any]] = field(default_factory=list)  # numbers keep their type
    plan: Any = None  # a LoadReport (dry run) when ``against`` was given
    plan_error: str | None = None
    other: str | None = None
    changes: list[LayerChange] = field(default_factory=list)
    only_here: list[str] = field(default_factory=list)
    only_other: list[str] = field(default_factory=list)
    output: str | None = None

    @property
    def by_dtype(self) -> dict[str, tuple[int, int]]:
        out: dict[str, list[int]] = {}
        for s in self.stats:
            entry = out.setdefault(s.dtype, [0, 0])
            entry[0] += 1
            entry[1] += s.nbytes
        return {k: (v[0], v[1]) for k, v in sorted(out.items(), key=lambda kv: -kv[1][1])}

    @property
    def weights_path(self) -> str:
        """Where the model weights are in the checkpoint (``"state_dict"``; ``""`` for the root)."""
        path = self.info.weights[0][0] if self.info.weights else "<root>"
        return "" if path == "<root>" else path

    def model_summary(self) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]:
        """``(modules, other)``: values and bytes per top-level module of the model weights (a wrapper
        prefix such as ``module.`` looked through), and per top-level entry of everything else (optimizer
        state, EMA copies ...), largest first."""
        prefix = self.weights_path + "." if self.weights_path else ""
        mine = [(s.key[len(prefix):], s) for s in self.stats if s.key.startswith(prefix)]
        for _ in range(3):  # DataParallel / compile / Lightning wrappers: look through one shared first name
            firsts = {k.split(".", 1)[0] for k, _ in mine if "." in k}
            if len(firsts) != 1 or any("." not in k for k, _ in mine):
                break
            mine = [(k.split(".", 1)[1], st) for k, st in mine]
        modules: dict[str, list[int]] = {}
        for k, st in mine:
            entry = modules.setdefault(k.split(".", 1)[0], [0, 0])
            entry[0] += st.numel
            entry[1] += st.nbytes
        other: dict[str, list[int]] = {}
        for st in self.stats:
            if not st.key.startswith(prefix):
                entry = other.setdefault(st.key.split(".", 1)[0], [0, 0])
                entry[0] += st.numel
                entry[1] += st.nbytes

        def ranked(groups: dict[str, list[int]]) -> list[tuple[str, int, int]]:
            return sorted(((k, v[0], v[1]) for k, v in groups.items()), key=lambda row: -row[1])
        return ranked(modules), ranked(other)

    def to_dict(self) -> dict[str, Any]:
        modules, other = self.model_summary()
        return {
            "model_summary": {"weights": self.weights_path or "<root>",
                              "modules": [{"module": m, "values": n, "bytes": b} for m, n, b in modules],
                              "other": [{"entry": m, "values": n, "bytes": b} for m, n, b in other]},
            "path": self.info.path, "format": self.info.format, "description": self.info.description,
            "evidence": self.info.evidence, "file_size": self.info.file_size, "notes": self.info.notes,
            "safety": self.safety, "findings": self.findings,
            "by_dtype": {k: {"tensors": n, "bytes": b} for k, (n, b) in self.by_dtype.items()},
            "locations": self.info.locations, "training": dict(self.training),
            "tensors": [s.to_dict() for s in self.stats],
            "warnings": [w.__dict__ for w in self.warnings],
            "plan": self.plan.to_dict() if self.plan is not None else None, "plan_error": self.plan_error,
            "diff": None if self.other is None else {
                "other": self.other, "only_here": self.only_here, "only_other": self.only_other,
                "changes": [c.__dict__ for c in self.changes]},
            "output": self.output,
        }

    def render(self) -> str:
        """The whole page as one HTML string (styles and figures inline, no network needed)."""
        return render_page(self)

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the page atomically to ``path`` (missing parent directories are created); returns the path."""
        page = self.render().encode("utf-8")
        makedirs(os.path.dirname(os.path.abspath(os.fspath(path))))
        with atomic_write(os.fspath(path)) as fh:
            fh.write(page)
        self.output = os.fspath(path)
        return self.output

    def __str__(self) -> str:
        lines = [f"{self.info.path}: {self.info.description}, {len(self.stats)} tensors, "
                 f"{sum(s.nbytes for s in self.stats):,} bytes; safety: {self.safety}"]
        modules, other = self.model_summary()
        if modules:
            listed = ", ".join(f"{m} {n:,}" for m, n, _ in modules[:6]) + (", ..." if len(modules) > 6 else "")
            lines.append(f"  model: {sum(n for _, n, _ in modules):,} values in {len(modules)} top-level modules "
                         f"({listed})")
        if other:
            lines.append("  not model weights: " + ", ".join(f"{m} {n:,} values" for m, n, _ in other[:6]))
        lines += [f"  warning: {w.key}: {w.message}" for w in self.warnings[:20]]
        if len(self.warnings) > 20:
            lines.append(f"  ... and {len(self.warnings) - 20} more warnings")
        if self.plan is not None:
            lines.append(f"  plan: {self.plan.summary() if hasattr(self.plan, 'summary') else self.plan}")
        if self.plan_error:
            lines.append(f"  plan: {self.plan_error}")
        if self.other is not None:
            broken = [c.key for c in self.changes if c.nonfinite in ("here", "both")]
            if broken:
                lines.append(f"  NaN/Inf against {self.other}: {len(broken)} layers: {', '.join(broken[:10])}"
                             + (f", ... {len(broken) - 10} more" if len(broken) > 10 else ""))
            top = sorted((c for c in self.changes if not math.isnan(c.change) and c.change), key=lambda c: -c.change)[:5]
            lines.append(f"  diff against {self.other}: {len(self.changes)} layers compared; most changed: "
                         + (", ".join(f"{c.key} ({c.change:.3g})" for c in top) or "no layer changed"))
        if self.output:
            lines.append(f"  written to {self.output}")
        return "\n".join(lines)


def require_extra(diff: bool = False) -> None:
    """Raise :class:`MissingExtraError` with the install command when jinja2 (the page) or, for a page
    with a diff, matplotlib (its chart and colour scale) is missing."""
    missing = []
    for module in ("jinja2", "matplotlib") if diff else ("jinja2",):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingExtraError(f"the HTML report needs {' and '.join(missing)}",
                                hint='Install the extra: pip install "torchckpt[report]"')


def report(source: SourceLike, *, against: Any = None, diff: SourceLike | None = None,
           output: str | os.PathLike[str] | None = None, policy: Policy | None = None, trust: bool = False,
           allow: Iterable[str] | str | None = None, bins: int = BINS, histograms: int = HISTOGRAMS,
           progress: Callable[[int, int], None] | None = None,
           storage_options: Mapping[str, Any] | None = None) -> CheckpointReport:
    """Build the visual report of ``source``; with ``output`` also write the HTML page there.

    Args:
        against: a model (``torch.nn.Module``) or a zero-argument callable that builds one: the page
            then shows the load plan (what :func:`torchckpt.load_into` would do, nothing applied).
        diff: another checkpoint (the base): the page shows how much every common layer moved
            (:class:`LayerChange`: ‖this − base‖ relative to the base layer's size), layers that became
            NaN/Inf first.
        bins: histogram bins for the ``histograms`` largest floating-point layers.
        progress: ``progress(done, total)`` after each tensor read.
        policy, trust, allow: what the file's pickles may import, as in :func:`torchckpt.load`.
        storage_options: for URL sources (``s3://`` ...), as in :func:`torchckpt.load`.

    Tensors are read one at a time and released, so memory stays near the largest tensor.
    """
    if output is not None:
        require_extra(diff=diff is not None)
    policy = resolve_policy(policy, trust, allow)
    so = storage_options
    info = inspect(source, policy=policy, storage_options=so)
    result = CheckpointReport(info=info)
    if isinstance(source, (str, os.PathLike)) and (is_url(os.fspath(source)) or os.path.exists(source)):
        file_scan = scan(source, storage_options=so).files[0]
        result.safety = file_scan.status
        result.findings = [f.message for f in file_scan.findings] + ([file_scan.error] if file_scan.error else [])
    result.training = _training_values(info)
    stream = _tensor_stream(source, policy, so)
    with stream as items:
        total = len(items)
        floats = ((k, _nbytes(t)) for k, t, _ in items if dtype_name(t).startswith(FLOAT_DTYPES))
        largest = {k for k, _ in sorted(floats, key=lambda kv: -kv[1])[:histograms]}  # which get a histogram
        scratch = workspace()  # one float64 chunk for every tensor: memory stays one tensor + one chunk
        for n, (key, t, materialize) in enumerate(items, 1):
            value = materialize()
            result.stats.append(tensor_stats(key, value, bins=bins if key in largest else 0,
                                             scratch=scratch, chunk_done=stream.drop_pages))
            del value
            if progress is not None:
                progress(n, total)
    result.warnings = health_warnings(result.stats)
    if against is not None:
        _plan(result, source, against, policy, so)
    if diff is not None:
        _diff(result, source, diff, policy, progress, so)
    if output is not None:
        result.save(output)
    return result


def health_warnings(stats: list[TensorStats]) -> list[HealthWarning]:
    """NaN/Inf values, all-zero floating-point layers, and layers whose RMS stands far above the rest."""
    out: list[HealthWarning] = []
    floats = [s for s in stats if s.dtype.startswith(FLOAT_DTYPES) and s.numel > 1]
    rms = [s.rms for s in floats if s.finite]
    median = statistics.median(rms) if rms else 0.0
    for s in stats:
        if s.nan or s.inf:
            out.append(HealthWarning(s.key, "nan/inf", f"{s.nan:,} NaN and {s.inf:,} Inf of {s.numel:,} values"))
    for s in floats:
        if s.zeros == s.numel and (len(s.shape) >= 2 or s.key.endswith("weight")):  # zero biases/buffers are normal
            out.append(HealthWarning(s.key, "all zero", f"all {s.numel:,} values are zero"))
        elif s.finite and s.rms > max(10.0, EXPLODING_RMS * median):
            out.append(HealthWarning(s.key, "exploding",
                                     f"RMS {s.rms:.3g} is {s.rms / median if median else math.inf:.0f}x the "
                                     f"median layer's ({median:.3g}); max |x| {max(abs(s.min or 0), abs(s.max or 0)):.3g}"))
    return out


def _numel(t: Any) -> int:
    return int(math.prod(int(s) for s in t.shape))


def _nbytes(t: Any) -> int:
    return int(math.prod(int(s) for s in t.shape)) * (t.dtype.itemsize if isinstance(t, TensorMeta)
                                                       else t.element_size())


class _tensor_stream:
    """``with _tensor_stream(src) as items``: ``(key, tensor or TensorMeta, materialize)`` for every tensor.

    ``materialize()`` returns a CPU tensor; reading a zip or legacy file this way touches one tensor
    at a time, and the mapped pages of the previous tensor are released before the next one.
    """

    def __init__(self, source: SourceLike, policy: Policy, storage_options: Mapping[str, Any] | None = None) -> None:
        self._open = open_checkpoint(source, Mode.BUILD, policy, lazy=True, storage_options=storage_options)
        self.reader: Any = None
        self._last: Any = None

    def __enter__(self) -> list[tuple[str, Any, Callable[[], Any]]]:
        ckpt = self._open.__enter__()
        self.reader = ckpt.reader
        try:
            return [(k, t, self._materializer(t)) for k, t in tensors(ckpt.tree, meter=ckpt.tree_meter)]
        except BaseException as exc:
            self._open.__exit__(type(exc), exc, exc.__traceback__)
            raise

    def _materializer(self, t: Any) -> Callable[[], Any]:
        def get() -> Any:
            self._release()
            self._last = to_torch(t, self.reader)
            return self._last
        return get

    def _release(self) -> None:
        last, self._last = self._last, None
        release(self.reader, last)

    def drop_pages(self, part: Any) -> None:
        """Drop the file pages under ``part`` of the current tensor once it has been read."""
        release(self.reader, part, view_only=True)

    def __exit__(self, *exc: Any) -> None:
        self._release()
        self._open.__exit__(*exc)


def _training_values(info: InspectReport) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for path, type_name, value in info.values:
        leaf = path.rsplit(".", 1)[-1].lower()
        if path.count(".") <= 1 and (type_name == "optimizer state" or any(k in leaf for k in TRAINING_KEYS)):
            out.append((path, info.scalars.get(path, value)))
    return out[:40]


def _plan(result: CheckpointReport, source: SourceLike, against: Any, policy: Policy,
          storage_options: Mapping[str, Any] | None = None) -> None:
    model = against() if callable(against) and not hasattr(against, "state_dict") else against
    try:
        result.plan = load_into(model, source, strict=False, on_mismatch="skip", dry_run=True, policy=policy,
                                storage_options=storage_options)
    except CheckpointError as exc:
        result.plan_error = str(exc)


def _diff(result: CheckpointReport, source: SourceLike, other: SourceLike, policy: Policy,
          progress: Callable[[int, int], None] | None, storage_options: Mapping[str, Any] | None = None) -> None:
    result.other = other if isinstance(other, str) else os.fspath(other) if isinstance(other, os.PathLike) else "<other>"
    with _tensor_stream(source, policy, storage_options) as mine, \
            _tensor_stream(other, policy, storage_options) as theirs:
        a = {k: (t, m) for k, t, m in mine}
        b = {k: (t, m) for k, t, m in theirs}
        shapes_a = {k: tuple(t.shape) for k, (t, _) in a.items()}
        shapes_b = {k: tuple(t.shape) for k, (t, _) in b.items()}
        mapping = {k: k for k in shapes_a if k in shapes_b}
        if len(mapping) < min(len(a), len(b)):
            aligned = align_keys(shapes_a, shapes_b).mapping
            if len(aligned) > len(mapping):
                mapping = aligned
        result.only_here = [k for k in a if k not in mapping]
        matched_b = set(mapping.values())
        result.only_other = [k for k in b if k not in matched_b]
        nonfinite_here = {st.key for st in result.stats if st.nan or st.inf}
        # key, other key, ‖a−b‖, ‖b‖, n, bytes, nonfinite, n if a floating-point layer (else 0)
        measured: list[tuple[str, str, float, float, int, int, str, int]] = []
        for n, (ka, kb) in enumerate(mapping.items(), 1):
            if shapes_a[ka] != shapes_b[kb]:
                result.changes.append(LayerChange(ka, kb, math.inf, math.nan, math.nan, _nbytes(a[ka][0])))
                continue
            x = a[ka][1]()
            y = b[kb][1]()
            diff_norm, base_norm = relative_change(y, x)  # (‖base − this‖, ‖base‖) in one pass
            bad = ""
            if math.isnan(diff_norm):  # this side's NaN/Inf are counted in its stats; look at the base's
                other_bad = not math.isfinite(relative_change(y, y)[1])
                bad = "both" if other_bad and ka in nonfinite_here else "other" if other_bad else "here"
            n_typical = _numel(a[ka][0]) if dtype_name(b[kb][0]).startswith(FLOAT_DTYPES) else 0
            measured.append((ka, kb, diff_norm, base_norm, _numel(a[ka][0]), _nbytes(a[ka][0]), bad, n_typical))
            del x, y
            if progress is not None:
                progress(n, len(mapping))
    rms = [norm / math.sqrt(n) for _, _, _, norm, _, _, bad, n in measured if n > 1 and not bad and norm > 0]
    typical = statistics.median(rms) if rms else 0.0  # the base's typical floating-point layer RMS
    for ka, kb, diff_norm, base_norm, n, nbytes, bad, _ in measured:
        scale = max(base_norm, math.sqrt(n) * typical)
        change = math.nan if bad else diff_norm / scale if scale else (0.0 if diff_norm == 0 else math.inf)
        result.changes.append(LayerChange(ka, kb, change, diff_norm, base_norm, nbytes, bad))
    order = {"here": 0, "both": 1}  # layers that became NaN/Inf first, then by change
    result.changes.sort(key=lambda c: (order.get(c.nonfinite, 2), -c.change if not math.isnan(c.change) else 0))
