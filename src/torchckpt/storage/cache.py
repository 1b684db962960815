"""A download cache with integrity: ``download(url, sha256=...)`` returns a local file whose sha256
was checked before it is handed out.

Files live in ``$TORCHCKPT_CACHE`` (default ``~/.cache/torchckpt``) under a folder per URL. The
expected hash is ``sha256=`` (the full hex digest, or a prefix of at least 8 digits), or, with
``check_hash=True``, the hex prefix in the file name as torch.hub names files
(``resnet18-f37072fd.pth``). A cached file is re-hashed before each use: a damaged or replaced cache
entry is downloaded again, never used. A download whose hash does not match is discarded and raises
:class:`~torchckpt.errors.IntegrityError`.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Callable

from ..errors import IntegrityError
from .atomic import atomic_write, file_sha256
from .remote import StorageOptions, filesystem, is_url, remote_errors, strip_file_scheme

__all__ = ["download", "cache_dir", "expected_hash"]

HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.")  # torch.hub's convention: name-<sha256 prefix>.ext
CHUNK = 8 << 20


def cache_dir() -> str:
    return os.environ.get("TORCHCKPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "torchckpt")


def expected_hash(url: str, sha256: str | None, check_hash: bool) -> str | None:
    """The (prefix of the) sha256 the file must have, lower-case, or None."""
    if sha256 is not None:
        digest = sha256.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{8,64}", digest):
            raise ValueError(f"sha256 must be 8 to 64 hex digits, not {sha256!r}")
        return digest
    if check_hash:
        match = HASH_IN_NAME.search(url.rstrip("/").rsplit("/", 1)[-1])
        if match is None:
            raise ValueError(f"check_hash=True needs a file name like 'name-<hex sha256 prefix>.pt': {url}")
        return match.group(1)
    return None


def _check(url: str, expected: str | None, actual: str, where: str) -> None:
    if expected is not None and not actual.startswith(expected):
        raise IntegrityError(f"sha256 mismatch: expected {expected}, {where} has {actual}", path=url,
                             expected=expected, actual=actual,
                             hint="The file is not the one that was published (damaged, truncated or replaced). "
                                  "Check the URL and the expected hash; the bad copy was not kept.")


def download(url: str, *, sha256: str | None = None, check_hash: bool = False, cache: str | None = None,
             storage_options: StorageOptions | None = None,
             progress: Callable[[int, int], None] | None = None) -> str:
    """A local, verified copy of ``url`` (any fsspec URL: ``https://``, ``s3://``, ``hf://`` ...).

    A cached copy is reused when its hash still matches (or, with no expected hash, when it exists).
    Local paths are only verified. Returns the local path.
    """
    expected = expected_hash(url, sha256, check_hash)
    if not is_url(url):
        path = strip_file_scheme(os.fspath(url))
        if expected is not None:
            _check(path, expected, file_sha256(path)[0], "the file")
        return path
    folder = os.path.join(cache or cache_dir(), hashlib.sha256(url.encode()).hexdigest()[:16])
    local = os.path.join(folder, url.rstrip("/").rsplit("/", 1)[-1] or "download")
    if os.path.isfile(local):
        if expected is None or file_sha256(local)[0].startswith(expected):
            return local  # hit
        os.remove(local)  # a damaged or replaced cache entry is never used
    os.makedirs(folder, exist_ok=True)
    fs, inner = filesystem(url, storage_options)
    digest = hashlib.sha256()
    with remote_errors(url, "download", storage_options):
        streamed = {"block_size": 0} if url.startswith(("http://", "https://")) else {"block_size": CHUNK}
        with fs.open(inner, "rb", **streamed) as src, atomic_write(local) as dst:
            total = getattr(src, "size", None) or 0
            done = 0
            while True:
                chunk = src.read(CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
                dst.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            _check(url, expected, digest.hexdigest(), "the download")  # raising here discards the temp file
    return local
