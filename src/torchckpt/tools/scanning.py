"""``torchckpt.scan``: what ``load`` would do with a file, without doing it.

Scanners have been bypassed because they parsed files differently from the loader. ``scan`` has no
parser of its own: it opens each file through the same opener as ``load``, in *record* mode: the same
container readers, VM, constructors and budget, over exactly the pickle streams and byte ranges the
loader reads, except that a blocklisted global is recorded instead of refused. The readers' container
checks (zip tricks, polyglots, hidden pickles) and anything load refuses or cannot finish are findings.

Classes that would merely be stubbed are listed; they are findings only with ``strict=True``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from ..errors import CheckpointError, NotACheckpointError, UnsafeCheckpointError
from ..read import GlobalRef, Mode, Policy, Trace, Verdict, deepspeed_kind, folder_kind, is_dcp_dir
from ..read.opener import open_checkpoint
from ..read.trust import resolve_policy
from ..storage.remote import is_url, remote_listing
from ..storage.source import confined_path

__all__ = ["scan", "scan_file", "ScanReport", "FileScan", "Finding"]

# Names that say "this is a checkpoint": met in a walk, such a file that is not one is a broken download.
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".pkl", ".pickle", ".t7", ".npz", ".npy",
                        ".tar", ".ptl", ".distcp", ".model", ".weights")


@dataclass
class Finding:
    kind: str  # "dangerous-global" | "unsafe" | "unparsable-pickle" | "container" | "stubbed-class" (strict)
    message: str
    member: str | None = None
    offset: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "member": self.member, "offset": self.offset}


@dataclass
class FileScan:
    path: str
    format: str = "unknown"
    status: str = "clean"  # "clean" | "findings" | "unreadable" | "skipped" (not a checkpoint, met in a walk)
    streams: list[dict[str, Any]] = field(default_factory=list)  # member, offset, globals, complete
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None
    hint: str | None = None  # what to do about the error
    ranges: list[tuple[str, int, int]] = field(default_factory=list)  # (file, offset, length) load would read

    @property
    def globals(self) -> list[GlobalRef]:
        return [g for s in self.streams for g in s["globals"]]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "status": self.status, "error": self.error, "hint": self.hint,
                "findings": [f.to_dict() for f in self.findings],
                "streams": [{"member": s["member"], "offset": s["offset"], "complete": s["complete"],
                             "globals": [{"name": g.fullname, "verdict": g.verdict.value, "offset": g.offset}
                                         for g in s["globals"]]} for s in self.streams]}


@dataclass
class ScanReport:
    files: list[FileScan]

    @property
    def status(self) -> str:
        """The whole scan: "findings" when any file has findings, else "unreadable" when any file is,
        else "clean" (skipped files, which are not checkpoints, are fine)."""
        statuses = {f.status for f in self.files}
        return "findings" if "findings" in statuses else "unreadable" if "unreadable" in statuses else "clean"

    @property
    def clean(self) -> bool:
        return self.status == "clean"

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "files": [f.to_dict() for f in self.files]}

    def render(self, *, strict: bool = False, verbose: bool = False) -> str:
        """The human report: one line per file with its findings (and, unless ``strict`` made them
        findings, the classes that would be stubbed); ``verbose`` lists every global of every stream."""
        labels = {"clean": "clean", "findings": "FINDINGS", "unreadable": "unreadable", "skipped": "skipped"}
        lines = []
        for f in self.files:
            lines.append(f"{f.path}: {labels[f.status]} ({f.format}, {len(f.streams)} pickle streams, "
                         f"{len(f.globals)} globals)")
            if f.error:
                lines.append(f"  {f.error}")
                if f.hint and f.status == "unreadable":
                    lines.append(f"  {f.hint}")
            for finding in f.findings:
                where = "".join([f" [{finding.member}]" if finding.member else "",
                                 f" @{finding.offset}" if finding.offset is not None else ""])
                lines.append(f"  {finding.kind}: {finding.message}{where}")
            stubbed = sorted({g.fullname for g in f.globals if g.verdict.value == "unknown"})
            if stubbed and not strict:
                lines.append(f"  would be stubbed (not imported): {', '.join(stubbed[:8])}"
                             + (f" and {len(stubbed) - 8} more" if len(stubbed) > 8 else ""))
            if verbose:
                lines += [f"    {s['member'] or '<file>'} @{g.offset}: {g.fullname} ({g.verdict.value})"
                          for s in f.streams for g in s["globals"]]
        counts = {k: sum(f.status == k for f in self.files) for k in labels}
        lines.append(f"{len(self.files)} files: {counts['clean']} clean, {counts['findings']} with findings, "
                     f"{counts['unreadable']} unreadable, {counts['skipped']} skipped (not checkpoints)")
        return "\n".join(lines)

    __str__ = render


def scan(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *, recursive: bool = False,
         strict: bool = False, progress: Callable[[int, int], None] | None = None,
         storage_options: Mapping[str, Any] | None = None, policy: Policy | None = None, trust: bool = False,
         allow: Iterable[str] | str | None = None) -> ScanReport:
    """Scan files (directories with ``recursive=True``; symlinked folders are followed once) without
    executing anything from them. A directory that ``load`` reads as one checkpoint (torch.distributed.checkpoint,
    Hugging Face or accelerate folder) is scanned as one, then every file in it that the read did not touch.

    Paths may be URLs (``storage_options`` for their filesystem); a URL prefix is walked like a directory.
    ``progress(done, total)`` is called after each file. ``policy``/``trust``/``allow`` as in
    :func:`torchckpt.load`: the same budget and allowlist (what is merely stubbed), so a file scans as it
    would load with them; nothing is ever imported or run by a scan, and blocklisted globals are findings
    whatever the policy.
    """
    policy = resolve_policy(policy, trust, allow)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    todo: list[tuple[str, bool]] = []  # (path, named explicitly)
    files: list[FileScan] = []
    for p in (os.fspath(x) for x in paths):
        if is_url(p):  # a URL prefix is a directory (walked with recursive=True)
            try:
                listed = remote_listing(p, storage_options) if recursive else []
            except CheckpointError as exc:
                files.append(FileScan(p, status="unreadable", error=exc.reason, hint=exc.hint))
                continue
            if listed:
                todo.extend((url, False) for url in listed)
            else:
                todo.append((p, True))
        elif os.path.isdir(p) and not _checkpoint_dir(p):
            if not recursive:
                files.append(FileScan(p, status="unreadable", error="is a directory: pass -r/--recursive to scan "
                                                                    "the files in it"))
                continue
            todo.extend(_walk(p))
        else:
            todo.append((p, True))
    for i, (path, explicit) in enumerate(todo, 1):
        if is_url(path) or not os.path.isdir(path):
            files.append(scan_file(path, strict=strict, explicit=explicit, storage_options=storage_options,
                                   policy=policy))
        else:
            files.extend(_scan_dir(path, strict, policy))
        if progress is not None:
            progress(i, len(todo))
    return ScanReport(files)


def _walk(top: str) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    seen: set[str] = set()
    for root, dirs, names in os.walk(top, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symlink loop, or a folder linked twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        if _checkpoint_dir(root):
            out.append((root, False))
            dirs[:] = []
            continue
        out.extend((os.path.join(root, name), False) for name in sorted(names))
    return out


def _checkpoint_dir(path: str) -> bool:
    """A directory the opener reads as one checkpoint."""
    return os.path.isdir(path) and (is_dcp_dir(path) or folder_kind(path) is not None
                                    or deepspeed_kind(path) is not None)


def _scan_dir(directory: str, strict: bool, policy: Policy) -> list[FileScan]:
    """The directory as one checkpoint, then its files on their own: for a Hugging Face or accelerate
    folder every file (``model.safetensors`` is a checkpoint by itself too), for a DCP directory those the
    read did not touch (its ``.distcp`` shards are not). A file that resolves outside the directory is not
    part of it: if the read named it, that is already an unsafe finding, and it is not read here either."""
    result = scan_file(directory, strict=strict, policy=policy)
    named = {os.path.join(directory, ".metadata")}
    if is_dcp_dir(directory):
        named |= {src for src, _, _ in result.ranges if "\x00" not in src}
    read = {os.path.realpath(src) for src in named}  # item names (file[key]) match no file: harmless
    rest = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not os.path.isfile(path) or os.path.realpath(path) in read:
            continue
        try:
            confined_path(directory, name)
        except CheckpointError:
            continue
        rest.append(path)
    return [result, *(scan_file(p, strict=strict, explicit=False, policy=policy) for p in rest)]


def scan_file(path: str, *, strict: bool = False, explicit: bool = True,
              storage_options: Mapping[str, Any] | None = None, policy: Policy | None = None) -> FileScan:
    """Scan one file (or checkpoint directory) by opening it as ``load`` would, in record mode. With
    ``strict``, classes that would be stubs are findings (those ``policy`` lets load import are not).

    Met while walking a directory, a file that is not a checkpoint at all (JSON, text, unknown binary)
    is ``skipped``; a git-lfs pointer, or an HTML page or other non-checkpoint under a checkpoint's name,
    is a broken download: ``unreadable``, as is anything named explicitly that load refuses."""
    result = FileScan(os.fspath(path))
    trace = Trace()
    try:
        with open_checkpoint(path, Mode.RECORD, policy, trace=trace, storage_options=storage_options) as ckpt:
            result.format = ckpt.format
    except UnsafeCheckpointError as exc:  # refused for more than a global: a path that leaves the checkpoint
        result.findings.append(Finding("unsafe", exc.reason, getattr(exc, "member", None),
                                       getattr(exc, "offset", None)))
    except CheckpointError as exc:
        result.error = exc.reason
        result.hint = exc.hint
        if not explicit and _not_a_checkpoint(exc, path):
            result.status = "skipped"
            return result
    result.ranges = trace.ranges
    result.format = result.format if result.format != "unknown" else trace.format or "unknown"
    for stream in trace.streams:
        result.streams.append({"member": _where(stream.source, stream.member, path), "offset": stream.offset,
                               "globals": stream.globals, "complete": stream.complete, "loaded": stream.loaded})
        if not stream.complete and result.error is not None:
            result.findings.append(Finding("unparsable-pickle", f"the pickle cannot be parsed to its end: "
                                           f"{result.error}", stream.member, stream.offset))
    for check in trace.checks:
        result.findings.append(Finding("container", check.message, check.member, check.offset))
    for g in result.globals:
        if g.verdict is Verdict.DANGEROUS:
            result.findings.append(Finding("dangerous-global", f"imports {g.fullname}, which can run code",
                                           g.member, g.offset))
        elif strict and g.verdict is Verdict.UNKNOWN and not (policy and policy.imports_real(g.module, g.name)):
            result.findings.append(Finding("stubbed-class", f"imports {g.fullname} (not on the allowlist)",
                                           g.member, g.offset))
    # a stream that breaks is a finding beside what it imported; alone, the file is unreadable (load refuses it)
    flagged = any(f.kind != "unparsable-pickle" for f in result.findings)
    result.status = "findings" if flagged else "unreadable" if result.error is not None else "clean"
    return result


def _not_a_checkpoint(exc: CheckpointError, path: str) -> bool:
    """Met in a walk: content that is not a checkpoint and was not meant to be one (a README, a config)."""
    if not isinstance(exc, NotACheckpointError) and "unrecognised content" not in exc.reason:
        return False
    if "git-lfs" in exc.reason:
        return False
    return not os.fspath(path).lower().endswith(_CHECKPOINT_SUFFIXES)


def _where(source: str, member: str | None, path: str) -> str | None:
    """A stream's place: its member, prefixed by the item or shard it is in when that is not the file."""
    if source == os.fspath(path) or source.endswith("/.metadata") and member == ".metadata":
        return member
    return f"{source}: {member}" if member else source
