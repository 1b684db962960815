"""Generated pickle programs for the VM (issue 9): random opcode programs over every allowlisted global,
some blocklisted and unknown ones, adversarial arguments (huge numbers, long texts, ranges, deep and
memo-shared containers, BUILD on anything) and memo traffic, in a bare pickle, a torch zip or a legacy
stream. Byte mutation of real files (agreement.py) rarely reaches the constructors with hostile arguments;
these programs do. Every program goes through ``agreement.check``: load (path and bytes), inspect and scan
agree, nothing but a value or a CheckpointError comes out, within the time bound.

Long run (nice'd; RLIMIT_AS 6 GiB; prints counts and every failure)::

    nice -n 10 python tests/vm_programs.py 50000 [seed]
"""

from __future__ import annotations

import os
import random
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from agreement import Case, check, run_fuzz  # noqa: E402
from pickle_asm import legacy, torch_zip  # noqa: E402

_EXTRA_GLOBALS = [("os", "system"), ("builtins", "getattr"), ("builtins", "eval"), ("subprocess", "Popen"),
                  ("functools", "partial"), ("mypkg.models", "Net"), ("torch.nn.modules.linear", "Linear"),
                  ("uuid", "_get_command_stdout"), ("pydoc", "pipepager"), ("numpy", "load"),
                  ("torch.utils.collect_env", "run"), ("pathlib", "Path.write_text"), ("copyreg", "_reconstructor"),
                  ("__builtin__", "object"), ("copy_reg", "_reconstructor"), ("numpy.core.multiarray", "scalar")]
_NUMBER_TEXT = ["1", "-3", "1e999999999", "1e5", "0.5", "1/3", "nan", "inf", "9" * 5000, "1_000", "x", "", "1e-99999"]
_DTYPES = ["f8", "<f4", "i8", "u1", "O", "V8", "U4", "S3", "M8[s]", "b1", "c16", "|V0", "f2"]


def _globals() -> list[tuple[str, str]]:
    from torchckpt.read.unpickle.policy import ALLOWLIST

    return sorted(ALLOWLIST) + _EXTRA_GLOBALS


class Program:
    """Emits a random, mostly well-formed opcode program with a tracked stack depth."""

    def __init__(self, rng: random.Random, names: list[tuple[str, str]]) -> None:
        self.rng = rng
        self.names = names
        self.out = bytearray(b"\x80" + bytes([rng.choice((2, 2, 4))]))
        self.memo = 0

    def emit(self, raw: bytes) -> None:
        self.out += raw

    # values ---------------------------------------------------------------------------------------
    def scalar(self) -> None:
        r = self.rng
        k = r.randrange(12)
        if k == 0:
            self.emit(b"N")
        elif k == 1:
            self.emit(b"J" + struct.pack("<i", r.choice((0, 1, -1, 2**31 - 1, -(2**31), r.randrange(-99, 99)))))
        elif k == 2:
            n = r.choice((1, 8, 9, 200, 2000))
            raw = r.randbytes(n)
            self.emit(b"\x8a" + bytes([n]) + raw if n < 256 else b"\x8b" + struct.pack("<i", n) + raw)
        elif k == 3:
            self.emit(b"G" + struct.pack(">d", r.choice((0.0, 1.5, -2.0, 1e308, float("nan")))))
        elif k == 4:
            self.text(r.choice(_NUMBER_TEXT))
        elif k == 5:
            self.text(r.choice(_DTYPES))
        elif k == 6:
            self.text(r.choice(("a", "/tmp/x", "os", "system", "cpu", "cuda:1", "torch.strided", "x" * r.choice((1, 70_000)))))
        elif k == 7:
            raw = r.randbytes(r.choice((0, 1, 4, 8, 32, 4096)))
            self.emit(b"B" + struct.pack("<I", len(raw)) + raw)
        elif k == 8:
            self.emit(b"\x88" if r.random() < 0.5 else b"\x89")
        elif k == 9 and self.memo:
            self.get()
        elif k == 10:
            self.emit(b"I" + str(r.choice((0, 1, 10**30, -(10**400)))).encode() + b"\n")
        else:
            self.emit(b"K" + bytes([r.randrange(256)]))

    def text(self, value: str) -> None:
        raw = value.encode()
        self.emit(b"X" + struct.pack("<I", len(raw)) + raw)

    def get(self) -> None:
        r = self.rng
        idx = r.randrange(self.memo) if r.random() < 0.9 else r.choice((self.memo + 3, 2**31, 1 + 2**61))
        self.emit(b"h" + bytes([idx]) if idx < 256 else b"j" + struct.pack("<I", idx & 0xFFFFFFFF))

    def put(self) -> None:
        r = self.rng
        if r.random() < 0.7:
            self.emit(b"\x94" if self.out[1] >= 4 else b"q" + bytes([self.memo % 256]))
        else:
            self.emit(b"r" + struct.pack("<I", r.choice((self.memo, self.memo + 1000, 2**31 - 1))))
        self.memo += 1

    def value(self, depth: int = 0) -> None:
        """Push exactly one value."""
        r = self.rng
        k = r.randrange(10) if depth < 6 else 0
        if k <= 3:
            self.scalar()
        elif k <= 5:
            self.call(depth + 1)
        elif k == 6:
            self.emit(b"(")
            for _ in range(r.randrange(4)):
                self.value(depth + 1)
            self.emit(r.choice((b"t", b"l", b"\x91" if self.out[1] >= 4 else b"t")))
        elif k == 7:
            self.emit(b"}(")
            for _ in range(r.randrange(4)):
                self.value(depth + 1)
                self.value(depth + 1)
            self.emit(b"u")
        elif k == 8:
            self.value(depth + 1)
            self.emit(r.choice((b"\x85", b"]", b")")) if r.random() < 0.3 else b"\x85")
        else:
            n = r.choice((2, 50, 3000))  # nesting through one opcode, many times
            self.emit(b"N" + r.choice((b"\x85", b"\x85")) * n)
        if r.random() < 0.3:
            self.put()
        if r.random() < 0.15:
            self.value(depth + 1)
            self.emit(b"b")  # BUILD with whatever is on top

    def call(self, depth: int) -> None:
        r = self.rng
        module, name = r.choice(self.names)
        if r.random() < 0.2 and self.out[1] >= 4:
            self.text(module)
            self.text(name)
            self.emit(b"\x93")
        else:
            self.emit(b"c" + module.encode() + b"\n" + name.encode() + b"\n")
        if r.random() < 0.3:
            self.put()
        how = r.randrange(6)
        self.emit(b"(")
        for _ in range(r.randrange(4)):
            self.value(depth)
        self.emit(b"t")
        if how == 0:
            self.emit(b"\x81")  # NEWOBJ
        else:
            self.emit(b"R")
        if r.random() < 0.3:
            self.value(depth)
            self.emit(b"b")


def _i(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def _t(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _numpy_values(rng: random.Random) -> bytes:
    """numpy dtypes and arrays with BUILD states near the valid ones (item 1's surface): structured fields,
    byte orders, item sizes, shapes against buffer lengths, a dtype re-BUILT after an array used it."""
    dtype = b"cnumpy\ndtype\n(" + _t(rng.choice(_DTYPES)) + b"\x89\x88tR"
    names, fields = b"N", b"N"
    if rng.random() < 0.3:
        sub = b"cnumpy\ndtype\n(" + _t(rng.choice(_DTYPES)) + b"\x89\x88tR"
        names = b"(" + _t("a") + _t("b") + b"t"
        fields = b"}(" + _t("a") + b"(" + sub + _i(rng.choice((0, 4, -1))) + b"t" + _t("b") + b"(" + sub \
            + _i(rng.choice((0, 8, 1 << 30))) + b"t" + b"u"
    state = b"(" + _i(3) + _t(rng.choice(("<", ">", "|", "=", "?"))) + b"N" + names + fields \
        + _i(rng.choice((-1, 0, 1, 8, 16, 4096))) + _i(-1) + _i(rng.choice((0, 16, 0x80))) + b"t"
    out = dtype + (state + b"b" if rng.random() < 0.7 else b"") + b"q\x00"
    shape = tuple(rng.choice((0, 1, 2, 3, 512)) for _ in range(rng.choice((0, 1, 2))))
    count = 1
    for n in shape:
        count *= n
    raw = bytes(max(0, count * rng.choice((1, 2, 4, 8, 16)) + rng.choice((0, 0, 0, -1, 1, -8))))
    array = (b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n" + _i(0) + b"\x85" + b"C\x01b" + b"tR"
             + b"(" + _i(1) + b"(" + b"".join(_i(n) for n in shape) + b"t" + b"h\x00" + rng.choice((b"\x89", b"\x88"))
             + b"B" + struct.pack("<I", len(raw)) + raw + b"tb")
    out += b"(" + array
    if rng.random() < 0.3:  # the dtype the array used, BUILT again
        out += b"h\x00" + state + b"b"
    if rng.random() < 0.3:
        out += b"cnumpy.core.multiarray\nscalar\n(h\x00" + b"C" + bytes([rng.choice((1, 4, 8))]) \
            + bytes(rng.choice((1, 4, 8))) + b"tR"
    return out + b"l"


def program(rng: random.Random, names: list[tuple[str, str]]) -> Case:
    p = Program(rng, names)
    if rng.random() < 0.15:
        p.emit(_numpy_values(rng))
    else:
        p.value()
    if rng.random() < 0.2 and p.memo:  # repeat a memo entry many times through a constructor
        module, name = rng.choice((("builtins", "tuple"), ("builtins", "set"), ("collections", "deque")))
        p.emit(b"0(" + (b"c" + module.encode() + b"\n" + name.encode() + b"\n(h\x00tR") * rng.choice((10, 500)) + b"l")
    p.emit(b".")
    data = bytes(p.out)
    box = rng.randrange(6)
    if box == 0:
        return Case("zip", {"f": torch_zip(data)})
    if box == 1:
        return Case("legacy", {"f": legacy(data)})
    return Case("pickle", {"f": data})


def main(total: int, seed: int) -> int:
    import resource

    import numpy  # noqa: F401 - imported before the clock runs: the bound is for the input, not imports
    import torch  # noqa: F401

    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
    names = _globals()
    rng = random.Random(seed)
    counts, failures = run_fuzz(total, lambda n: program(rng, names), check,
                                failures_dir="/tmp/torchckpt-vm-fuzz-failures",
                                blob_name=lambda n, case: f"{seed}-{n}.pickle")
    outcomes: dict[str, int] = {}
    for per_kind in counts.values():
        for outcome, count in per_kind.items():
            outcomes[outcome] = outcomes.get(outcome, 0) + count
    print(f"  outcomes {outcomes}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000, int(sys.argv[2]) if len(sys.argv) > 2 else 0))
