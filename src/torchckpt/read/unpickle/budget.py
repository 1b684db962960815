"""One budget for all the work a checkpoint may cause, and the meter that charges against it.

A :class:`Budget` is a frozen value carried by :class:`~.policy.Policy`; a :class:`Meter` counts what
one file has used so far. The pickle VM charges steps (opcodes and every element an allowlisted
constructor copies, hashes or walks), bytes it materialises beyond its input, nesting depth and the
digits of numeric literals; the container readers charge the bytes members inflate to. Going over any
limit raises :class:`~torchckpt.errors.LimitExceededError` naming the limit, the value and how to raise
it. Work is allowed to grow with the input (``amplification`` per input byte) above a fixed floor, so a
large honest file never trips it while a small hostile one cannot make the process hang or swell.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import LimitExceededError

__all__ = ["Budget", "Meter", "TreeMeter"]

# A limit that scales with the input has a fixed floor for small inputs: the hint names both.
_FLOORS = {"amplification": "min_bytes", "inflation": "inflate_floor"}


@dataclass(frozen=True)
class Budget:
    """Limits on the work one checkpoint may cause. Raise one with ``Policy(budget=Budget(depth=500))``.

    Attributes:
        steps: work units (opcodes, elements copied/hashed/walked) allowed whatever the input size.
        amplification: further steps, and bytes materialised, allowed per byte of pickle input.
        min_bytes: bytes that may always be materialised (the floor for tiny inputs).
        depth: nesting of the object graph (and of pickle MARKs).
        digits: decimal digits (or exponent size) of one numeric literal: LONG opcodes, ``int('...')``,
            ``Decimal``, ``Fraction``.
        inflation: bytes the compressed members of one file (zip/npz entries) may inflate to together,
            per byte of the file ...
        inflate_floor: ... or this many, whichever is more (decompression bombs).
        memo_gap: unused memo slots one PUT may skip (the memo is a dense list).
        visits: nodes the tools above the reader (tree walks, ``state_dict_of``, summaries, convert,
            diff, report, load planning) may visit in one loaded tree, or one per 8 bytes of the file
            if that is more. A value shared under many paths counts at every path it is reached by,
            and every 64 characters of a dotted key path built count once more (a 400-byte pickle of
            a tuple DAG has 2^48 paths; deep nesting times long names makes long paths).
    """

    steps: int = 20_000_000
    amplification: int = 64
    min_bytes: int = 64 << 20
    depth: int = 256
    digits: int = 4_300
    inflation: int = 8
    inflate_floor: int = 256 << 20
    memo_gap: int = 1 << 16
    visits: int = 2_000_000

    def exceeded(self, limit: str, value: int, allowed: int, what: str) -> LimitExceededError:
        """The error for ``limit`` (a field name) at ``value`` > ``allowed``: names the limit and how to raise it."""
        floor = _FLOORS.get(limit)
        if floor is not None:  # a ratio to the input: a larger ratio, and a floor above what this file needs
            raise_it = {limit: getattr(self, limit) * 4, floor: max(getattr(self, floor), value) * 2}
        else:
            raise_it = {limit: max(getattr(self, limit) * 4, value * 2)}
        args = ", ".join(f"{k}={v}" for k, v in raise_it.items())
        now = ", ".join(f"{k}={getattr(self, k)}" for k in raise_it)
        hint = (f"If you trust this file, raise the limit: torchckpt.load(..., policy=Policy(budget=Budget({args}))) "
                f"(now {now}; Policy and Budget are in torchckpt).")
        return LimitExceededError(f"{what}: {value} exceeds the {limit} limit of {allowed}", hint=hint)


class Meter:
    """What one file has used of its :class:`Budget`. Shared by every pickle stream and member of it.

    ``input_size`` is the number of bytes the work may scale with (the pickle stream, or the file).
    """

    __slots__ = ("budget", "input_size", "steps", "materialised", "inflated", "_max_steps", "_max_bytes")

    def __init__(self, budget: Budget, input_size: int = 0) -> None:
        self.budget = budget
        self.input_size = 0
        self.steps = 0
        self.materialised = 0
        self.inflated: dict[str, int] = {}  # per source file
        self._max_steps = budget.steps
        self._max_bytes = budget.min_bytes
        self.add_input(input_size)

    def add_input(self, nbytes: int) -> None:
        """Another ``nbytes`` of input (a further stream of the same file) widen the allowance."""
        self.input_size += max(int(nbytes), 0)
        b = self.budget
        self._max_steps = max(b.steps, b.amplification * self.input_size)
        self._max_bytes = max(b.min_bytes, b.amplification * self.input_size)

    def absorb(self, other: "Meter") -> None:
        """Charge here what ``other`` counted (a part of the same read, read on its own thread): its input
        widens the allowance, its work is added, and the total is checked against this meter's limits."""
        self.add_input(other.input_size)
        self.materialised += other.materialised
        for source, nbytes in other.inflated.items():
            self.inflated[source] = self.inflated.get(source, 0) + nbytes
        self.step(other.steps)
        self.materialise(0)

    def step(self, n: int) -> None:
        """Charge ``n`` units of work."""
        self.steps += n
        if self.steps > self._max_steps:
            raise self.budget.exceeded("steps", self.steps, self._max_steps,
                                       f"the pickle makes the reader do too much work for its {self.input_size} bytes")

    def materialise(self, nbytes: int, what: str = "objects") -> None:
        """Charge ``nbytes`` of memory built from the input (amplification)."""
        self.materialised += nbytes
        self.steps += nbytes >> 6
        if self.materialised > self._max_bytes:
            raise self.budget.exceeded(
                "amplification", self.materialised, self._max_bytes,
                f"{what} built from {self.input_size} bytes of pickle would take {self.materialised} bytes")

    def digits(self, n: int, what: str = "numeric literal") -> None:
        """Refuse a numeric literal (or exponent) of ``n`` decimal digits above the limit."""
        if n > self.budget.digits:
            raise self.budget.exceeded("digits", n, self.budget.digits, f"{what} with {n} digits")

    def depth(self, n: int, what: str = "object graph") -> None:
        if n > self.budget.depth:
            raise self.budget.exceeded("depth", n, self.budget.depth, f"{what} nests too deep")

    def inflate_room(self, file_size: int, source: str = "") -> int:
        """How many more bytes the compressed members of ``source`` (``file_size`` bytes) may inflate to."""
        b = self.budget
        return max(b.inflate_floor, b.inflation * file_size) - self.inflated.get(source, 0)

    def inflate(self, nbytes: int, member: str, file_size: int, source: str = "") -> None:
        """Charge a compressed member of ``source`` that inflates (or declares it inflates) to ``nbytes``."""
        if nbytes > self.inflate_room(file_size, source):
            b = self.budget
            limit = max(b.inflate_floor, b.inflation * file_size)
            raise b.exceeded("inflation", self.inflated.get(source, 0) + nbytes, limit,
                             f"compressed member {member} inflates past the {limit} bytes that the compressed "
                             f"members of this {file_size}-byte file may take together (decompression bomb?)")
        self.inflated[source] = self.inflated.get(source, 0) + nbytes


class TreeMeter:
    """Visits of one loaded tree by the tools above the reader, charged against ``Budget.visits``.

    Every walker of file-derived data (:func:`torchckpt.fit.tree.walk` and the walkers built on it,
    ``state_dict_of`` on module stubs, convert's tree skeleton) charges each node it reaches, and
    the length of each key path it builds, here: sharing cannot make the work exponential, and a
    deep tree of long names cannot make it quadratic without raising
    :class:`~torchckpt.errors.LimitExceededError` naming the limit and the ``Policy`` that allows it.
    """

    __slots__ = ("budget", "used", "limit", "name")

    def __init__(self, budget: Budget | None = None, input_size: int = 0, name: str | None = None) -> None:
        self.budget = budget if budget is not None else Budget()
        self.used = 0
        self.limit = max(self.budget.visits, int(input_size) // 8)
        self.name = name  # the file, for the error

    def visit(self, path_length: int = 0, n: int = 1) -> None:
        """Charge ``n`` nodes reached under a key path of ``path_length`` characters."""
        self.used += n + (path_length >> 6)
        if self.used > self.limit:
            error = self.budget.exceeded(
                "visits", self.used, self.limit,
                "walking the checkpoint's tree reaches too many values (shared values count at every path "
                "they are reached by, long key paths count per 64 characters)")
            raise error.with_path(self.name) if self.name else error
