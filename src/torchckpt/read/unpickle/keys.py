"""Bounded hashing and nesting: hash-flood resistant dict/set keys, and the depth of what was built.

Python's dicts and sets degrade to quadratic time when many distinct keys share one hash. ``str`` and
``bytes`` hashes are randomised and distinct small ints hash to distinct values, so only other keys
(tuples, frozensets, floats, complex numbers, Fractions, Decimals, ...) can be solved to collide. Every
dict and set the VM fills checks such keys against a per-container count of keys per hash value, in
linear time, and refuses more than :data:`MAX_PER_HASH` distinct keys on one hash. A key is walked
(bounded by the budget's depth) before it is hashed at all, so a deeply nested tuple can neither
overflow the C stack inside ``hash()`` nor make hashing cost more than the steps it is charged.
"""

from __future__ import annotations

import collections
from typing import Any

from ...errors import CorruptCheckpointError
from .budget import Meter

__all__ = ["check_key", "KeyGuard", "graph_depth", "MAX_PER_HASH"]

MAX_PER_HASH = 8
_HASH_MODULUS = (1 << 61) - 1
_PLAIN_KEYS = (str, bytes, bool, type(None))


def check_key(meter: Meter, key: Any, depth: int = 0) -> bool:
    """Validate one key before it is hashed. Returns True when its hash could be chosen by the file
    (so it must be counted), False for keys whose hashes cannot collide on purpose."""
    t = type(key)
    if t in _PLAIN_KEYS:
        return False
    if t is int:
        if not -_HASH_MODULUS < key < _HASH_MODULUS:  # Python's numeric hash wraps at 2**61 - 1
            raise CorruptCheckpointError(f"dict key {key!r:.40} is out of range (hash-collision attack?)")
        return False
    if t is float:
        if not -_HASH_MODULUS < key < _HASH_MODULUS:
            raise CorruptCheckpointError(f"dict key {key!r:.40} is out of range (hash-collision attack?)")
        return True
    if t is tuple or t is frozenset:
        meter.depth(depth + 1, "a dict key")
        meter.step(len(key))
        for part in key:
            check_key(meter, part, depth + 1)
        return True
    return True


class KeyGuard:
    """Counts distinct keys per hash for the dicts and sets one VM run fills (by container identity)."""

    __slots__ = ("meter", "_buckets", "_walked")

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self._buckets: dict[int, tuple[Any, dict[int, list[Any]]]] = {}
        self._walked: dict[int, Any] = {}  # tuple/frozenset keys already walked, by id (held, so ids stay valid)

    def _crafted(self, key: Any) -> bool:
        t = type(key)
        if t is tuple or t is frozenset:
            walked: Any = self._walked.get(id(key))  # (comparing `is key` would narrow key's type to None)
            if walked is key:
                self.meter.step(len(walked))  # hashing it again still costs its length
                return True
            check_key(self.meter, key)
            self._walked[id(key)] = key
            return True
        return check_key(self.meter, key)

    def admit(self, target: Any, keys: Any) -> None:
        """Check ``keys`` (an iterable) before they go into ``target`` (a dict, set or stub)."""
        crafted = [k for k in keys if self._crafted(k)]
        if not crafted:
            return
        entry = self._buckets.get(id(target))
        if entry is None or entry[0] is not target:
            entry = self._buckets[id(target)] = (target, {})
        _fill(entry[1], crafted)

    def check_all(self, keys: Any) -> None:
        """Check a whole key collection for a container that does not exist yet (``set(list)``)."""
        _fill({}, [k for k in keys if self._crafted(k)])


def _fill(buckets: dict[int, list[Any]], keys: list[Any]) -> None:
    for key in keys:
        h = hash(key)
        bucket = buckets.get(h)
        if bucket is None:
            buckets[h] = [key]
            continue
        if any(k is key or k == key for k in bucket):
            continue
        bucket.append(key)
        if len(bucket) > MAX_PER_HASH:
            raise CorruptCheckpointError(
                f"more than {MAX_PER_HASH} distinct dict/set keys share the hash {h} (key {key!r:.60}): "
                "a hash-collision attack, which would make loading take quadratic time")


def graph_depth(meter: Meter, root: Any, leaf_types: tuple[Any, ...]) -> None:
    """Refuse an object graph whose longest path (cycles cut) is deeper than the budget allows.

    Iterative post-order walk, each container visited once: O(objects + references), charged as steps.
    """
    first = _children(root, leaf_types)
    if first is None:
        return
    limit = meter.budget.depth
    height: dict[int, int] = {}
    on_path = {id(root)}
    keep: list[Any] = [root]  # ids stay valid while we hold the objects
    scalars = _SCALAR_SET
    # a step per reference: every child of every container walked (scalars counted, not visited)
    steps = len(first)
    stack: list[list[Any]] = [[root, [c for c in first if type(c) not in scalars], 0]]
    while stack:
        frame = stack[-1]
        children, i = frame[1], frame[2]
        if i < len(children):
            frame[2] = i + 1
            child = children[i]
            cid = id(child)
            if cid in height or cid in on_path:
                continue
            grand = _children(child, leaf_types)
            if grand is None:
                continue
            steps += len(grand)
            keep.append(child)
            if len(stack) >= limit:
                meter.depth(len(stack) + 1)
            inner = [c for c in grand if type(c) not in scalars]
            if not inner:  # a container of scalars (most of them): height 1, no frame of its own
                height[cid] = 1
                continue
            on_path.add(cid)
            stack.append([child, inner, 0])
            continue
        stack.pop()
        oid = id(frame[0])
        on_path.discard(oid)
        best = 0
        for c in children:
            h = height.get(id(c), 0)
            if h > best:
                best = h
        height[oid] = best + 1
        if best + 1 > limit:
            meter.depth(best + 1)
    meter.step(steps * 2)


_SCALARS = (str, bytes, int, float, bool, complex, type(None))
_SCALAR_SET = frozenset(_SCALARS)


def _children(obj: Any, leaf_types: tuple[Any, ...]) -> Any:
    """The objects ``obj`` refers to, as an indexable sequence, or None for a leaf. A container of leaves
    only (a tuple of 100k strings, a state dict of tensors) has no children to walk: ``()``, found by a
    pass over the element types at C speed."""
    t = type(obj)
    if t in _SCALAR_SET:
        return None
    if t is list or t is tuple:
        seq: Any = obj
    elif t is dict:  # no __dict__ to add (the walk of a stub meets one per stub: its empty kwargs)
        if not obj:
            return ()
        seq = [*obj.keys(), *obj.values()]
    elif isinstance(obj, dict):
        d = getattr(obj, "__dict__", None)
        seq = [*obj.keys(), *obj.values()]
        if d:
            seq += list(d.values())
    elif isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
        seq = list(obj)
    elif isinstance(obj, type) or isinstance(obj, leaf_types):
        return None
    else:
        d = getattr(obj, "__dict__", None)
        if not isinstance(d, dict) or not d:
            return None
        seq = list(d.values())
    if len(seq) > 8 and all(k in _SCALAR_SET or issubclass(k, leaf_types) for k in set(map(type, seq))):
        return ()
    return seq
