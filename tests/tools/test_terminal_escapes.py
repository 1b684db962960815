"""No control sequence from a file reaches a terminal: every command, through a real pty.

The files (tests/helpers/hostile.py) carry OSC 0 (window title), OSC 52 (clipboard write), CSI clear screen,
a C1 CSI and a bidi override in state-dict keys, plain values, class and module names, safetensors
metadata, ``config.json`` values and a shard name. The command runs with its stdout and stderr on a
pty (so rich believes it draws on a terminal); the raw bytes must not appear there. ``--json`` stays
exact: the JSON document decodes back to the very strings of the file.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest

import hostile
from torchckpt.text import escape_terminal, summary

SRC = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "src")


def run_on_pty(args: list[str], timeout: float = 120.0) -> tuple[int, bytes]:
    """``python3 -m torchckpt ARGS`` with stdout and stderr on a pty; (exit code, every byte it wrote)."""
    primary, secondary = pty.openpty()
    env = {**os.environ, "PYTHONPATH": os.path.abspath(SRC), "COLUMNS": "200", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "torchckpt", *args], stdin=subprocess.DEVNULL, stdout=secondary,
                            stderr=secondary, env=env, close_fds=True)
    os.close(secondary)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.2)
            if ready:
                try:
                    data = os.read(primary, 65536)
                except OSError:  # EIO: the child closed its side
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            raise AssertionError(f"torchckpt {' '.join(args)} ran past {timeout} s")
    finally:
        os.close(primary)
    return proc.wait(timeout=30), b"".join(chunks)


def assert_no_raw_escape(output: bytes, what: str) -> None:
    for marker in hostile.RAW_MARKERS:
        assert marker not in output, f"{what}: {marker!r} reached the terminal:\n{output[-2000:]!r}"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    return {name: hostile.CATALOGUE[name](str(d / name)) for name in
            ("escape_keys.pt", "escape_keys_legacy.pt", "escape_class.pt", "escape.safetensors", "escape_folder",
             "escape_folder_text", "odd_optimizer.pt")}


def test_escape_terminal_covers_c0_c1_esc_del_and_bidi():
    for ch in [chr(c) for c in range(0x20) if c not in (9, 10)] + ["\x7f"] + [chr(c) for c in range(0x80, 0xa0)] + \
            [chr(c) for c in range(0x202a, 0x202f)] + [chr(c) for c in range(0x2066, 0x206a)]:
        out = escape_terminal(f"a{ch}b")
        assert ch not in out and out.startswith("a\\") and out.endswith("b"), repr(ch)
    assert escape_terminal("line\n\tnext") == "line\n\tnext"
    assert escape_terminal("ünïcödé ✓") == "ünïcödé ✓"


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ["inspect", "{f}"], ["scan", "{f}"], ["scan", "--verbose", "{f}"], ["diff", "{f}", "{f}"],
    ["diff", "--values", "{f}", "{f}"], ["convert", "{f}", "{out}/c.pt"], ["convert", "{f}", "{out}/c.safetensors"],
    ["report", "{f}", "-o", "{out}/r.html"]], ids=lambda c: "-".join(a for a in c if "{" not in a))
def test_terminal_control_sequences_from_a_file_never_reach_a_pty(files, command, tmp_path):
    for name, path in files.items():
        if command[0] == "scan" and name.startswith("escape_folder"):
            path = os.path.join(path, os.listdir(path)[0])  # scan reads files; the shard's name is hostile
        args = [a.format(f=path, out=tmp_path) for a in command]
        code, output = run_on_pty(args)
        assert_no_raw_escape(output, f"{name}: torchckpt {' '.join(command)}")
        assert code != 70, output[-3000:]  # an internal error is a bug even when its text is escaped


@pytest.mark.slow
def test_json_output_stays_exact(files):
    code, output = run_on_pty(["inspect", "--json", files["escape_keys.pt"]])
    assert code == 0
    assert_no_raw_escape(output, "inspect --json")  # JSON escapes them as \\u001b
    doc = json.loads(output.decode().replace("\r\n", "\n"))
    keys = {t["key"] for t in doc["tensors"]}
    assert {f"state_dict.layer{i}.{esc}weight" for i, esc in enumerate(hostile.ESCAPES)} <= keys


def test_summaries_are_bounded_and_escaped():
    assert len(summary(hostile.dag_tuple(48), 120)) <= 120
    assert len(summary(10 ** 5000, 80)) <= 80 and "digits" in summary(10 ** 5000, 80)
    text = summary({hostile.EVIL: [hostile.EVIL] * 10}, 500)
    assert "\x1b" not in text and "\u202e" not in text and "\x9b" not in text
