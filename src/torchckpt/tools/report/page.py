"""The HTML page of :class:`~torchckpt.tools.report.CheckpointReport`: jinja2 for the page,
matplotlib for the diff chart and its colour scale, our own small SVG for the treemaps and histograms.

Everything is inline (styles, SVG), so the page needs no network. Values that come from the
checkpoint (keys, class names, repr of values) are escaped by jinja2's autoescaping.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from html import escape
from typing import Any

from ...fit.report import group_keys
from .treemap import Node, build_tree, layout, to_svg

__all__ = ["render_page", "plan_statuses", "STATUS_COLOURS"]

WIDTH, HEIGHT = 960, 480
STATUS_COLOURS = {"matched": "#59a14f", "renamed": "#4e79a7", "cast": "#76b7b2", "resized": "#f28e2b",
                  "missing": "#e15759", "unexpected": "#b07aa1"}
DTYPE_COLOURS = {"float32": "#4e79a7", "float16": "#f28e2b", "bfloat16": "#e15759", "float64": "#76b7b2",
                 "int64": "#59a14f", "int32": "#edc948", "uint8": "#b07aa1", "int8": "#ff9da7", "bool": "#9c755f"}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return f"{x:.4g}"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    return str(x)


def plan_statuses(plan: Any) -> tuple[dict[str, str], list[str]]:
    """Model key -> matched / renamed / cast / resized / missing, and the checkpoint keys left unused."""
    statuses: dict[str, str] = {}
    renamed_targets = {model_key for model_key, _ in plan.renamed.values()}
    cast = {k for k, _, _ in plan.cast}
    for k in plan.loaded:
        statuses[k] = "cast" if k in cast else "renamed" if k in renamed_targets else "matched"
    for m in plan.mismatched:
        statuses[m.key] = "resized"
    for k in plan.missing:
        statuses.setdefault(k, "missing")
    return statuses, list(plan.unexpected)


def _status_tree_html(statuses: dict[str, str]) -> str:
    """A collapsible module tree; each module shows how many of its keys have each status."""
    root = build_tree((k, 1.0) for k in statuses)
    counts: dict[int, Counter[str]] = {}
    order: list[Node] = []
    stack = [root]
    while stack:  # iterative: key depth comes from the file and is not bounded by the interpreter
        node = stack.pop()
        order.append(node)
        stack.extend(node.children.values())
    for node in reversed(order):
        c: Counter[str] = Counter()
        if node.leaf and node.path in statuses:
            c[statuses[node.path]] += 1
        for child in node.children.values():
            c.update(counts[id(child)])
        counts[id(node)] = c
    out: list[str] = []
    work: list[tuple[Node, bool]] = [(root, False)]
    while work:
        node, closing = work.pop()
        if closing:
            out.append("</ul></details></li>" if node is not root else "</ul>")
            continue
        badges = "".join(f'<span class="badge" style="background:{STATUS_COLOURS[s]}">{n} {s}</span>'
                         for s, n in sorted(counts[id(node)].items()))
        if node.leaf:
            status = statuses.get(node.path, "")
            out.append(f'<li><span class="dot" style="background:{STATUS_COLOURS.get(status, "#999")}"></span>'
                       f'<code>{escape(node.name)}</code> <span class="muted">{escape(status)}</span></li>')
            continue
        if node is root:
            out.append('<ul class="tree">')
        else:
            problem = any(s in counts[id(node)] for s in ("missing", "resized"))
            out.append(f'<li><details{" open" if problem else ""}><summary><code>{escape(node.name)}</code> '
                       f'{badges}</summary><ul>')
        work.append((node, True))
        for child in sorted(node.children.values(), key=lambda n: n.name, reverse=True):
            work.append((child, False))
    return "".join(out)


def _colour_scale(value: float) -> str:
    """Relative change on a log scale, 1e-6 (pale) to >= 1 (dark red); grey when unchanged."""
    import matplotlib

    if value == 0:
        return "#d9d9d9"
    if math.isnan(value):
        return "#7f7f7f"
    if math.isinf(value):
        return "#3b0f70"
    level = min(1.0, max(0.0, (math.log10(value) + 6) / 6))
    return str(matplotlib.colors.to_hex(matplotlib.colormaps["YlOrRd"](0.1 + 0.9 * level)))


def _treemap(items: list[tuple[str, float]], fill: Any, title: Any) -> str:
    root = build_tree((k, v) for k, v in items if v > 0)
    return to_svg(layout(root, WIDTH, HEIGHT), WIDTH, HEIGHT, fill=fill, title=title)


def _figure_svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _histogram_svg(key: str, edges: list[float], counts: list[int]) -> str:
    """One layer's value histogram as a small inline SVG bar chart (hover a bar for its range and count).

    Drawn directly rather than with matplotlib: a report shows up to a few dozen of these, and a
    matplotlib figure costs ~0.1 s each plus its import, several times the statistics themselves.
    """
    width, height, left, bottom, top = 320, 170, 44, 28, 20
    plot_w, plot_h = width - left - 8, height - bottom - top
    peak = max(counts) or 1
    bar_w = plot_w / max(1, len(counts))
    title = key if len(key) < 48 else "…" + key[-47:]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
           f'height="{height}" class="histogram" role="img" font-family="system-ui,sans-serif">',
           f'<title>{escape(key)}</title><text x="{width / 2:.0f}" y="13" font-size="11" '
           f'text-anchor="middle">{escape(title)}</text>']
    for i, n in enumerate(counts):
        h = plot_h * n / peak
        out.append(f'<rect x="{left + i * bar_w:.1f}" y="{top + plot_h - h:.1f}" width="{max(bar_w - 0.5, 0.5):.1f}" '
                   f'height="{h:.1f}" fill="#4e79a7"><title>[{fmt(edges[i])}, {fmt(edges[i + 1])}'
                   f'{"]" if i == len(counts) - 1 else ")"}: {n:,}</title></rect>')
    base_y = top + plot_h
    out.append(f'<line x1="{left}" y1="{base_y}" x2="{left + plot_w}" y2="{base_y}" stroke="#555"/>'
               f'<line x1="{left}" y1="{top}" x2="{left}" y2="{base_y}" stroke="#555"/>')
    for x, label, anchor in ((left, fmt(edges[0]), "start"), (left + plot_w, fmt(edges[-1]), "end")):
        out.append(f'<text x="{x}" y="{base_y + 14}" font-size="10" text-anchor="{anchor}">{escape(label)}</text>')
    out.append(f'<text x="{left - 4}" y="{top + 8}" font-size="10" text-anchor="end">{peak:,}</text>'
               f'<text x="{left - 4}" y="{base_y}" font-size="10" text-anchor="end">0</text></svg>')
    return "".join(out)


def _histograms(stats: list[Any]) -> list[tuple[str, str]]:
    return [(s.key, _histogram_svg(s.key, *s.histogram)) for s in stats if s.histogram is not None]


def _change_chart(changes: list[Any]) -> str:
    from matplotlib.figure import Figure

    top = sorted((c for c in changes if math.isfinite(c.change) and c.change > 0), key=lambda c: -c.change)[:20]
    if not top:
        return ""
    fig = Figure(figsize=(7, 0.25 * len(top) + 0.8))
    ax = fig.subplots()
    ax.barh([c.key[-50:] for c in reversed(top)], [c.change for c in reversed(top)], color="#e15759")
    ax.set_xlabel("relative change ‖this−base‖ / max(‖base‖, √n·typical RMS)", fontsize=8)
    ax.tick_params(labelsize=7)
    return _figure_svg(fig)


def render_page(r: Any) -> str:
    import jinja2

    stats = r.stats
    by_key = {s.key: s for s in stats}
    treemap = _treemap([(s.key, float(s.nbytes)) for s in stats],
                       fill=lambda n: DTYPE_COLOURS.get(by_key[n.path].dtype if n.path in by_key else "", "#bab0ac"),
                       title=lambda n: (f"{n.path}\n{human_bytes(n.value)}" + (
                           f"\n{by_key[n.path].dtype} {list(by_key[n.path].shape)}" if n.path in by_key else "")))
    plan_html = ""
    plan_counts: Counter[str] = Counter()
    unused: list[str] = []
    if r.plan is not None:
        statuses, unused = plan_statuses(r.plan)
        plan_html = _status_tree_html(statuses)
        plan_counts = Counter(statuses.values())
        plan_counts["unexpected"] = len(unused)
    diff_map, diff_chart, top_changes = "", "", []
    if r.other is not None:
        change_of = {c.key: c.change for c in r.changes}
        diff_map = _treemap([(c.key, float(c.nbytes)) for c in r.changes] + [(k, float(by_key[k].nbytes))
                                                                            for k in r.only_here if k in by_key],
                            fill=lambda n: _colour_scale(change_of[n.path]) if n.path in change_of else "#7b4fa0",
                            title=lambda n: f"{n.path}\n" + (f"relative change {fmt(change_of[n.path])}"
                                                            if n.path in change_of else "only in this checkpoint"))
        diff_chart = _change_chart(r.changes)
        top_changes = [c for c in r.changes if c.nonfinite in ("here", "both")] + \
            sorted((c for c in r.changes if not math.isnan(c.change)), key=lambda c: -c.change)[:20]
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["bytes"] = human_bytes
    env.filters["fmt"] = fmt
    page = env.from_string(TEMPLATE)
    return page.render(r=r, info=r.info, stats=stats, treemap=_markup(treemap), histograms=[(k, _markup(svg)) for k, svg in _histograms(stats)],
                       plan_tree=_markup(plan_html), plan_counts=plan_counts, unused=unused,
                       status_colours=STATUS_COLOURS, dtype_colours=DTYPE_COLOURS, diff_map=_markup(diff_map),
                       diff_chart=_markup(diff_chart), top_changes=top_changes,
                       unused_groups=group_keys(unused, unused + list(r.plan.renamed) + r.plan.loaded) if unused else [], summary=r.model_summary(),
                       total_bytes=sum(s.nbytes for s in stats), total_params=sum(s.numel for s in stats))


def _markup(html: str) -> Any:
    import markupsafe

    return markupsafe.Markup(html)


TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<title>torchckpt report: {{ info.path }}</title>
<style>
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:16px 28px} header h1{margin:0;font-size:20px;word-break:break-all}
header .sub{opacity:.8} main{padding:8px 28px 40px;max-width:1100px}
section{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:12px 18px;margin:16px 0}
h2{font-size:16px;margin:4px 0 10px} table{border-collapse:collapse;font-size:13px}
td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left;vertical-align:top} th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums} code{font-size:12px}
.verdict{display:inline-block;padding:2px 10px;border-radius:10px;color:#fff;font-weight:600}
.clean{background:#59a14f}.findings{background:#e15759}.unreadable{background:#f28e2b}
.warn{background:#fff4e5;border-color:#f28e2b} .warn li{margin:2px 0}
.badge{display:inline-block;color:#fff;border-radius:8px;padding:0 6px;margin-left:4px;font-size:11px}
.dot{display:inline-block;width:9px;height:9px;border-radius:50%;margin-right:5px}
.muted{color:#777;font-size:12px} ul.tree,ul.tree ul{list-style:none;padding-left:18px;margin:0}
.legend span{margin-right:14px} .grid{display:flex;flex-wrap:wrap;gap:8px} .grid svg{max-width:320px;height:auto}
svg.treemap{max-width:100%;height:auto;font-family:system-ui,sans-serif}
</style></head><body>
<header><h1>{{ info.path }}</h1>
<div class="sub">{{ info.description }} · {{ info.file_size|bytes }} on disk · {{ stats|length }} tensors ·
{{ total_params|fmt }} values · {{ total_bytes|bytes }}</div></header>
<main>
<section id="summary"><h2>Summary</h2>
<p>Safety: <span class="verdict {{ r.safety }}" id="safety">{{ r.safety }}</span>
{% if r.findings %}<ul>{% for f in r.findings %}<li>{{ f }}</li>{% endfor %}</ul>{% endif %}</p>
<table><tr><th>format</th><td>{{ info.format }} ({{ info.description }})</td></tr>
<tr><th>evidence</th><td>{{ info.evidence|join("; ") }}</td></tr>
{% if info.notes %}<tr><th>notes</th><td>{{ info.notes|join("; ") }}</td></tr>{% endif %}
{% if info.locations %}<tr><th>devices</th><td>{% for d, n in info.locations.items() %}{{ d }}: {{ n|bytes }}{% if not loop.last %}, {% endif %}{% endfor %}</td></tr>{% endif %}
{% if info.stubbed_classes %}<tr><th>classes read as stubs</th><td>{{ info.stubbed_classes|join(", ") }}</td></tr>{% endif %}
</table>
{% if summary[0] %}<h2>Model</h2><table id="model-summary"><tr><th>top-level module{% if r.weights_path %} (in <code>{{ r.weights_path }}</code>){% endif %}</th><th>values</th><th>bytes</th></tr>
{% for m, n, b in summary[0] %}<tr><td><code>{{ m }}</code></td><td class="num">{{ n|fmt }}</td><td class="num">{{ b|bytes }}</td></tr>{% endfor %}
<tr><th>total</th><th class="num">{{ summary[0]|sum(attribute=1)|fmt }}</th><th class="num">{{ summary[0]|sum(attribute=2)|bytes }}</th></tr></table>{% endif %}
{% if summary[1] %}<h2>Not model weights</h2><table id="other-state"><tr><th>entry</th><th>values</th><th>bytes</th></tr>
{% for m, n, b in summary[1] %}<tr><td><code>{{ m }}</code></td><td class="num">{{ n|fmt }}</td><td class="num">{{ b|bytes }}</td></tr>{% endfor %}</table>{% endif %}
<h2>By dtype</h2><table id="by-dtype"><tr><th>dtype</th><th>tensors</th><th>bytes</th></tr>
{% for d, (n, b) in r.by_dtype.items() %}<tr><td><span class="dot" style="background:{{ dtype_colours.get(d, '#bab0ac') }}"></span>{{ d }}</td><td class="num">{{ n|fmt }}</td><td class="num">{{ b|bytes }}</td></tr>{% endfor %}
</table>
{% if r.training %}<h2>Training metadata</h2><table id="training">{% for k, v in r.training %}<tr><th>{{ k }}</th><td><code>{{ v }}</code></td></tr>{% endfor %}</table>{% endif %}
</section>
{% if r.warnings %}<section class="warn" id="warnings"><h2>Health warnings ({{ r.warnings|length }})</h2><ul>
{% for w in r.warnings %}<li><b>{{ w.kind }}</b> <code>{{ w.key }}</code>: {{ w.message }}</li>{% endfor %}</ul></section>
{% endif %}
<section id="treemap"><h2>Where the bytes are</h2><p class="muted">Area is bytes; hover a box for its path, shape and size.</p>
<div class="legend">{% for d in r.by_dtype %}<span><span class="dot" style="background:{{ dtype_colours.get(d, '#bab0ac') }}"></span>{{ d }}</span>{% endfor %}</div>
{{ treemap }}</section>
{% if r.plan is not none or r.plan_error %}<section id="plan"><h2>Load plan</h2>
{% if r.plan_error %}<p class="verdict findings">{{ r.plan_error }}</p>{% else %}
<div class="legend">{% for s, c in status_colours.items() %}<span><span class="dot" style="background:{{ c }}"></span>{{ s }}: {{ plan_counts.get(s, 0)|fmt }}</span>{% endfor %}</div>
{{ plan_tree }}
{% if unused %}<h3>Checkpoint keys the model does not use ({{ unused|length|fmt }})</h3><ul id="unused">{% for k in unused_groups[:200] %}<li><span class="dot" style="background:{{ status_colours.unexpected }}"></span><code>{{ k }}</code></li>{% endfor %}</ul>{% endif %}
{% endif %}</section>{% endif %}
{% if r.other is not none %}<section id="diff"><h2>Change against {{ r.other }}</h2>
<p class="muted">Colour is the relative change per layer, ‖this − base‖ / max(‖base‖, √n · median layer RMS of the base), on a log scale (grey: unchanged, purple: only here, dark: NaN/Inf). Layers that became NaN/Inf are listed first. {{ r.changes|length }} layers compared,
{{ r.only_here|length }} only here, {{ r.only_other|length }} only in the other.</p>
{{ diff_map }}{{ diff_chart }}
<table id="most-changed"><tr><th>layer</th><th>relative change</th><th>‖this−base‖</th><th>‖base‖</th></tr>
{% for c in top_changes %}<tr><td><code>{{ c.key }}</code></td><td class="num">{% if c.nonfinite in ("here", "both") %}became NaN/Inf{% else %}{{ c.change|fmt }}{% endif %}</td><td class="num">{{ c.diff_norm|fmt }}</td><td class="num">{{ c.norm|fmt }}</td></tr>{% endfor %}</table>
</section>{% endif %}
{% if histograms %}<section id="histograms"><h2>Value distributions of the largest layers</h2><div class="grid">
{% for k, svg in histograms %}<div>{{ svg }}</div>{% endfor %}</div></section>{% endif %}
<section id="tensors"><h2>Every tensor</h2><table id="stats"><tr><th>key</th><th>shape</th><th>dtype</th><th>bytes</th>
<th>mean</th><th>std</th><th>min</th><th>max</th><th>zeros</th><th>NaN</th><th>Inf</th></tr>
{% for s in stats %}<tr data-key="{{ s.key }}"><td><code>{{ s.key }}</code></td><td>{{ s.shape|list }}</td><td>{{ s.dtype }}</td>
<td class="num">{{ s.nbytes|bytes }}</td><td class="num">{{ s.mean|fmt }}</td><td class="num">{{ s.std|fmt }}</td>
<td class="num">{{ s.min|fmt }}</td><td class="num">{{ s.max|fmt }}</td><td class="num">{{ '%.1f%%'|format(100 * s.zeros_fraction) }}</td>
<td class="num">{{ s.nan|fmt }}</td><td class="num">{{ s.inf|fmt }}</td></tr>{% endfor %}</table></section>
<p class="muted">Made by torchckpt; no code from the checkpoint was run to make this page.</p>
</main></body></html>
"""
