"""The JSON outline of a checkpoint's tree (tensors as markers) that safetensors output keeps in its
metadata (``torchckpt.tree``), and the parts of it that hold no tensor."""

from __future__ import annotations

from typing import Any

from ...fit.tree import expanded_size, is_tensor_like
from ...read import TreeMeter
from ...text import key_text, summary

__all__ = ["outline", "plain_paths"]


def outline(tree: Any, meter: TreeMeter, expanded: bool = True) -> Any:
    """The JSON outline of the tree (tensors as markers) kept in safetensors metadata. JSON cannot
    share a value, so a value shared under many paths is written under each: its expanded size is
    counted first (each shared value once) and charged to ``meter`` before anything is built."""
    if not expanded:
        meter.visit(n=expanded_size(tree, _children))
    if is_tensor_like(tree):
        return {"__tensor__": True}
    if isinstance(tree, dict):
        return {key_text(k): outline(v, meter) for k, v in tree.items()}
    if isinstance(tree, (list, tuple, set)):
        return [outline(v, meter) for v in tree]
    if isinstance(tree, str) or tree is None or isinstance(tree, (bool, float)):
        return tree
    if isinstance(tree, int):
        return tree if tree.bit_length() < 1000 else key_text(tree)
    return summary(tree, 4096)


def plain_paths(skeleton: Any) -> list[str]:
    """Dotted paths of the largest parts of a :func:`outline` that hold no tensor (iterative: a skeleton
    may be deeper than Python's recursion)."""

    def is_tensor(node: Any) -> bool:
        return isinstance(node, dict) and node.get("__tensor__") is True

    def children(node: Any) -> list[tuple[Any, Any]]:
        if is_tensor(node):
            return []
        return list(node.items()) if isinstance(node, dict) else list(enumerate(node)) if isinstance(node, list) else []

    order: list[tuple[Any, Any]] = []  # (node, parent), parents before children
    stack: list[tuple[Any, Any]] = [(skeleton, None)]
    while stack:
        node, parent = stack.pop()
        order.append((node, parent))
        stack.extend((child, node) for _, child in reversed(children(node)))  # pre-order: the file's order
    holds_tensor: set[int] = set()
    for node, parent in reversed(order):
        if (is_tensor(node) or id(node) in holds_tensor) and parent is not None:
            holds_tensor.add(id(parent))
    if not (is_tensor(skeleton) or id(skeleton) in holds_tensor):
        return [] if skeleton in ({}, [], None) else ["(the whole object)"]
    found: list[str] = []
    walk: list[tuple[str, Any]] = [("", skeleton)]
    while walk:
        where, node = walk.pop()
        below = []
        for key, child in children(node):
            path = f"{where}.{key}" if where else str(key)
            if id(child) in holds_tensor:
                below.append((path, child))
            elif not is_tensor(child):
                found.append(path)
        walk.extend(reversed(below))
    return found


def _children(tree: Any) -> Any:
    if is_tensor_like(tree) or not isinstance(tree, (dict, list, tuple, set)):
        return ()
    return tree.values() if isinstance(tree, dict) else tree
