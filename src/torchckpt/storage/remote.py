"""Remote storage through fsspec: open a URL's filesystem, read byte ranges, and turn every failure
into a typed :class:`~torchckpt.errors.RemoteStorageError` that names the URL.

fsspec and the protocol's own package (s3fs, gcsfs, huggingface_hub, aiohttp) are imported only
when a URL is used, so ``import torchckpt`` never imports them. A missing package is reported with
the extra to install (``pip install 'torchckpt[s3]'``), never as a raw ImportError.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
from typing import Any, Callable, Iterator, Mapping

from ..errors import (CheckpointError, RemoteAuthError, RemoteConnectionRefusedError, RemoteNotFoundError,
                      RemoteStorageError, RemoteUnreachableError, TruncatedCheckpointError)

__all__ = ["is_url", "strip_file_scheme", "filesystem", "remote_errors", "RemoteFile", "join", "StorageOptions",
           "remote_listing", "ranged_reader"]

StorageOptions = Mapping[str, Any]

# protocol -> (package that implements it, torchckpt extra that installs it)
_EXTRAS = {
    "s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
    "hf": ("huggingface_hub", "hf"), "http": ("aiohttp", "remote"), "https": ("aiohttp", "remote"),
}


def is_url(path: Any) -> bool:
    """True for ``proto://...`` strings other than ``file://`` (which is a local path)."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def strip_file_scheme(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URL (URLs always use ``/``)."""
    if is_url(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def _protocol(url: str) -> str:
    return url.split("://", 1)[0].lower()


def _extra_hint(protocol: str) -> str:
    package, extra = _EXTRAS.get(protocol, (None, "remote"))
    if package:
        return f"{protocol}:// URLs need {package}: pip install 'torchckpt[{extra}]'"
    return "pip install 'torchckpt[remote]' (and the fsspec implementation of this protocol)"


def filesystem(url: str, storage_options: StorageOptions | None = None) -> tuple[Any, str]:
    """The fsspec filesystem for ``url`` and the path inside it."""
    try:
        import fsspec
    except ImportError:
        raise RemoteStorageError("reading or writing URLs needs fsspec, which is not installed", path=url,
                                 hint=_extra_hint(_protocol(url))) from None
    protocol = _protocol(url)
    try:
        fs_and_path: tuple[Any, str] = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        return fs_and_path
    except ImportError:
        package, extra = _EXTRAS.get(protocol, (protocol, "remote"))
        raise RemoteStorageError(f"the {protocol}:// protocol needs the {package} package, which is not installed",
                                 path=url, hint=_extra_hint(protocol)) from None
    except ValueError as exc:
        if "not known" in str(exc) or "known implementation" in str(exc):
            raise RemoteStorageError(f"fsspec has no filesystem for {protocol}://", path=url,
                                     hint="Check the URL's scheme (s3://, gs://, hf://, https:// ...).") from None
        raise RemoteStorageError(f"invalid storage options or URL ({exc})", path=url,
                                 hint="Check storage_options / --storage-option KEY=VALUE.") from None
    except TypeError as exc:
        raise RemoteStorageError(f"storage options rejected by the {protocol}:// filesystem ({exc})", path=url,
                                 hint="Check storage_options / --storage-option KEY=VALUE.") from None


# --------------------------------------------------------------------------- errors
def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out and len(out) < 20:
        out.append(exc)
        nested = getattr(exc, "os_error", None)  # aiohttp ClientConnectorError keeps the socket error here
        if isinstance(nested, BaseException) and nested not in out:
            out.append(nested)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return out


def _status(exc: BaseException) -> int | None:
    for attr in ("status", "status_code", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        value = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return value if isinstance(value, int) else None
    value = getattr(response, "status_code", None)
    return value if isinstance(value, int) else None


_AUTH_WORDS = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
               "NoCredentials", "Unable to locate credentials", "PartialCredentials")
_UNREACHABLE_NAMES = ("Timeout", "EndpointConnectionError", "ClientConnectorError", "NameResolution",
                      "ServerDisconnected", "ConnectionError", "ClientOSError")


def translate(exc: BaseException, url: str, action: str = "read", endpoint: str | None = None) -> CheckpointError:
    """The typed error for a failure of ``action`` on ``url``."""
    if isinstance(exc, CheckpointError):
        return exc
    chain = _chain(exc)
    text = " | ".join(f"{type(e).__name__}: {e}" for e in chain)
    names = " ".join(t.__name__ for e in chain for t in type(e).__mro__)
    where = f" (endpoint {endpoint})" if endpoint else ""
    first = f"{type(exc).__name__}: {exc}"[:300]
    if any(isinstance(e, ConnectionRefusedError) for e in chain) or "Connection refused" in text:
        return RemoteConnectionRefusedError(
            f"could not {action}: the connection was refused{where}", path=url,
            hint="Nothing listens at that host and port: check the URL or endpoint_url, and that the server runs.")
    statuses = [s for s in (_status(e) for e in chain) if s is not None]
    if any(s in (401, 403) for s in statuses) or any(isinstance(e, PermissionError) for e in chain) \
            or any(w in text for w in _AUTH_WORDS):
        return RemoteAuthError(
            f"could not {action}: access denied ({first}){where}", path=url,
            hint="Check the credentials (storage_options key/secret/token, AWS_PROFILE, `huggingface-cli login` "
                 "for hf://) and that they grant access to this object.")
    if any(isinstance(e, (socket.gaierror, TimeoutError)) for e in chain) or \
            any(n in names for n in _UNREACHABLE_NAMES):
        return RemoteUnreachableError(
            f"could not {action}: the endpoint did not answer ({first}){where}", path=url,
            hint="Check the host name or endpoint_url, the network and any proxy, then retry.")
    if any(s == 404 for s in statuses) or any(isinstance(e, FileNotFoundError) for e in chain):
        return RemoteNotFoundError(
            "no such remote object", path=url,
            hint="Check the URL (bucket, key, endpoint) and that the object exists.")
    return RemoteStorageError(f"could not {action}: {first}{where}", path=url)


@contextlib.contextmanager
def remote_errors(url: str, action: str = "read", storage_options: StorageOptions | None = None) -> Iterator[None]:
    """Translate anything a filesystem raises inside the block into a typed error naming ``url``."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as exc:
        endpoint = _endpoint(storage_options)
        raise translate(exc, url, action, endpoint) from None


def _endpoint(storage_options: StorageOptions | None) -> str | None:
    if not storage_options:
        return None
    value = storage_options.get("endpoint_url") or (storage_options.get("client_kwargs") or {}).get("endpoint_url")
    return str(value) if value else None


def remote_listing(url: str, storage_options: StorageOptions | None = None) -> list[str]:
    """URLs of every object under the prefix ``url`` (sorted); empty when ``url`` is one object."""
    fs, inner = filesystem(url, storage_options)
    with remote_errors(url, "list", storage_options):
        if not fs.isdir(inner):
            return []
        found = sorted(fs.find(inner))
    base = url.rstrip("/")
    prefix = inner.rstrip("/")
    return [base + name[len(prefix):] for name in found if name.startswith(prefix)]


# --------------------------------------------------------------------------- ranged reads
READ_AHEAD = 16 << 20  # bytes fetched at once for runs of small tensors (memory held: one block)

class RemoteFile:
    """One remote object read by byte ranges. Servers that ignore ``Range`` are read once, whole."""

    def __init__(self, url: str, storage_options: StorageOptions | None = None) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.fs, self.path = filesystem(url, storage_options)
        self.bytes_read = 0
        self._whole: bytes | None = None
        self._block: tuple[int, bytes] = (0, b"")  # read-ahead for runs of small tensor reads
        with self.errors():
            info = self.fs.info(self.path)
        self.is_dir = info.get("type") == "directory"
        size = info.get("size")
        if not self.is_dir and not isinstance(size, int):
            self._whole = self._cat(None, None)  # no Content-Length: the size is what arrives
            size = len(self._whole)
        self.size = int(size or 0)

    def errors(self, action: str = "read") -> Any:
        return remote_errors(self.url, action, self.storage_options)

    def _cat(self, start: int | None, end: int | None) -> bytes:
        with self.errors():
            data = self.fs.cat_file(self.path, start=start, end=end)
        self.bytes_read += len(data)
        return bytes(data)

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``, clipped to the object's size."""
        start, end = max(0, start), min(end, self.size)
        if end <= start:
            return b""
        if self._whole is not None:
            return self._whole[start:end]
        base, block = self._block
        if base <= start and end <= base + len(block):  # inside the read-ahead block (a zip's next local header)
            return block[start - base:end - base]
        data = self._cat(start, end)
        if len(data) == end - start:
            return data
        if len(data) == self.size:  # the server ignored Range and sent everything: keep it
            self._whole = data
            return data[start:end]
        raise TruncatedCheckpointError(f"asked the server for bytes {start}..{end} and got {len(data)} bytes",
                                       path=self.url, expected_size=self.size)

    def read_ahead(self, start: int, end: int, block: int = READ_AHEAD) -> bytes:
        """:meth:`read_range` for tensor data: small reads are served from one cached ``block``, so
        a run of small tensors stored one after the other (and, in a zip, the local headers between
        them) costs one request, not one each. Only tensor reads fill the block: reading structure
        (``inspect``) never fetches more than it asks for."""
        if end - start >= block:
            return self.read_range(start, end)
        base, data = self._block
        if not (base <= start and end <= base + len(data)):
            base, data = start, self.read_range(start, start + block)
            self._block = (base, data)
        return data[start - base:min(end, self.size) - base]

    def reader(self, buffer_size: int = 64 << 10) -> io.BufferedReader:
        """A seekable binary file over ranged reads (each refill moves at most ``buffer_size`` bytes)."""
        return ranged_reader(self.read_range, self.size, buffer_size)


def ranged_reader(read_range: Callable[[int, int], bytes], size: int, buffer_size: int = 64 << 10) -> io.BufferedReader:
    """A seekable binary file of ``size`` bytes over ``read_range(start, end)`` (a remote object, or a byte
    range of a local file): each refill reads at most ``buffer_size`` bytes."""
    return io.BufferedReader(_RangeRaw(read_range, size), buffer_size=buffer_size)


class _RangeRaw(io.RawIOBase):
    def __init__(self, read_range: Callable[[int, int], bytes], size: int) -> None:
        self.read_range, self.size = read_range, size
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        data = self.read_range(self.pos, self.pos + len(view))
        view[:len(data)] = data
        self.pos += len(data)
        return len(data)
