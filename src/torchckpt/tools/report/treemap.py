"""A squarified treemap of dotted keys (area = bytes), drawn as inline SVG.

The keys ``layer1.0.conv.weight`` ... form a tree by their dots; each module gets a rectangle whose
area is the sum of its tensors' bytes, laid out with the squarified algorithm (Bruls, Huizing and
van Wijk, 2000) so that boxes stay close to square and comparable by eye. Hovering a box shows its
path and size (SVG ``<title>``); boxes large enough carry a label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape
from typing import Callable, Iterable

__all__ = ["Node", "Box", "build_tree", "layout", "to_svg"]

HEADER = 14  # pixels reserved for a module's label
PAD = 2
MAX_LEVELS = 32  # module levels drawn; deeper keys end in one leaf


@dataclass
class Node:
    name: str
    path: str
    value: float = 0.0
    children: dict[str, "Node"] = field(default_factory=dict)

    @property
    def leaf(self) -> bool:
        return not self.children


@dataclass
class Box:
    node: Node
    x: float
    y: float
    w: float
    h: float
    depth: int


def build_tree(items: Iterable[tuple[str, float]]) -> Node:
    """The module tree of ``(dotted key, value)`` pairs; every node's value is the sum of its leaves.

    A key with more than :data:`MAX_LEVELS` dots keeps the rest as one leaf name, so building the
    tree stays linear in the keys' length (a key of 150,000 dots is not 150,000 levels of paths)."""
    root = Node("", "")
    for key, value in items:
        node, parts = root, key.split(".", MAX_LEVELS)
        node.value += value
        path = ""
        for part in parts:
            path = f"{path}.{part}" if path else part
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = Node(part, path)
            child.value += value
            node = child
    return root


def _worst(row: list[float], side: float) -> float:
    total = sum(row)
    if total <= 0 or side <= 0:
        return float("inf")
    return max(max(side * side * r / (total * total), total * total / (side * side * r)) for r in row if r > 0)


def _squarify(values: list[float], x: float, y: float, w: float, h: float) -> list[tuple[float, float, float, float]]:
    """Rectangles for ``values`` (sorted descending, scaled so they sum to ``w*h``), in the same order."""
    rects: list[tuple[float, float, float, float]] = []
    i = 0
    while i < len(values):
        side = min(w, h)
        row = [values[i]]
        i += 1
        while i < len(values) and _worst(row + [values[i]], side) <= _worst(row, side):
            row.append(values[i])
            i += 1
        if w >= h:  # a column on the left
            cw, spans = _strip(row, h, y)
            rects += [(x, sy, cw, sh) for sy, sh in spans]
            x, w = x + cw, w - cw
        else:  # a row on top
            rh, spans = _strip(row, w, x)
            rects += [(sx, y, sw, rh) for sx, sw in spans]
            y, h = y + rh, h - rh
    return rects


def _strip(row: list[float], length: float, start: float) -> tuple[float, list[tuple[float, float]]]:
    """``row`` laid along a side of ``length`` from ``start``: the strip's thickness, and each value's
    (position, extent) along the side."""
    thickness = sum(row) / length if length else 0
    spans: list[tuple[float, float]] = []
    for r in row:
        extent = r / thickness if thickness else 0
        spans.append((start, extent))
        start += extent
    return thickness, spans


def layout(root: Node, width: float, height: float, *, min_side: float = 3.0) -> list[Box]:
    """Boxes for every node large enough to see, parents before children."""
    boxes: list[Box] = []
    stack: list[tuple[Node, float, float, float, float, int]] = [(root, 0.0, 0.0, width, height, 0)]
    while stack:
        node, x, y, w, h, depth = stack.pop()
        if node is not root:
            boxes.append(Box(node, x, y, w, h, depth))
        if node.leaf or w < min_side or h < min_side:
            continue
        top = HEADER if node is not root and h > 3 * HEADER else 0
        ix, iy, iw, ih = x + PAD, y + PAD + top, w - 2 * PAD, h - 2 * PAD - top
        kids = sorted((c for c in node.children.values() if c.value > 0), key=lambda c: -c.value)
        if iw < min_side or ih < min_side or not kids:
            continue
        scale = iw * ih / sum(c.value for c in kids)
        rects = _squarify([c.value * scale for c in kids], ix, iy, iw, ih)
        for child, (cx, cy, cw, ch) in reversed(list(zip(kids, rects))):
            if cw >= 1 and ch >= 1:
                stack.append((child, cx, cy, cw, ch, depth + 1))
    return boxes


def to_svg(boxes: list[Box], width: int, height: int, *, fill: Callable[[Node], str],
           title: Callable[[Node], str]) -> str:
    """The boxes as one ``<svg>`` element: modules outlined and labelled, leaves filled by ``fill``."""
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
           f'height="{height}" class="treemap" role="img">']
    for b in boxes:
        n = b.node
        colour = fill(n) if n.leaf else "none"
        stroke = "#fff" if n.leaf else "#555"
        out.append(f'<g><title>{escape(title(n))}</title><rect x="{b.x:.1f}" y="{b.y:.1f}" width="{b.w:.1f}" '
                   f'height="{b.h:.1f}" fill="{colour}" stroke="{stroke}" stroke-width="{0.5 if n.leaf else 1}"/>')
        if b.w > 7 * min(len(n.name), 24) and b.h > HEADER:
            label = n.name if len(n.name) <= 24 else n.name[:23] + "…"
            out.append(f'<text x="{b.x + 3:.1f}" y="{b.y + 11:.1f}" font-size="10" '
                       f'fill="{"#111" if n.leaf else "#333"}">{escape(label)}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)
