"""Real servers on 127.0.0.1 for the remote-storage tests: moto's S3 server, an HTTP file server that
honours Range requests, and a TCP proxy that counts the bytes moved through it. Every loop is
bounded and every server stops when its context exits. Nothing here contacts another address.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import socket
import threading
import time
from typing import Any, Iterator

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {LOOPBACK}:{port} after {timeout}s")


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A real S3-compatible server (moto) on a free loopback port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=port, verbose=False)
    server.start()
    try:
        wait_listening(port)
        yield f"http://{LOOPBACK}:{port}"
    finally:
        server.stop()


def s3_options(endpoint: str, **extra: Any) -> dict[str, Any]:
    """storage_options for s3fs against a local endpoint: fixed test credentials, short timeouts, no retries."""
    return {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
            "config_kwargs": {"connect_timeout": 2, "read_timeout": 5, "retries": {"max_attempts": 1}}, **extra}


@contextlib.contextmanager
def s3_bucket(bucket: str, *, count: bool = True) -> Iterator[tuple[Any, dict[str, Any], "CountingProxy | None"]]:
    """A fresh moto S3 server with an empty ``bucket``: yields (fsspec filesystem, storage_options, proxy).
    With ``count`` the options point at a :class:`CountingProxy` in front of moto, so the bytes moved are
    measured outside the code under test; without it they point at moto itself and the proxy is None."""
    import fsspec

    with moto_server() as endpoint, contextlib.ExitStack() as stack:
        proxy = stack.enter_context(CountingProxy(int(endpoint.rsplit(":", 1)[1]))) if count else None
        opts = s3_options(proxy.endpoint if proxy is not None else endpoint)
        fs = fsspec.filesystem("s3", **opts)
        fs.mkdir(bucket)
        yield fs, opts, proxy


class CountingProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target_port``; counts bytes in each direction."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = 0  # client -> server
        self.down = 0  # server -> client
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.socket()
        self._sock.bind((LOOPBACK, 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)

    def reset(self) -> None:
        with self._lock:
            self.up = self.down = 0

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection((LOOPBACK, self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            for a, b, direction in ((client, upstream, "up"), (upstream, client, "down")):
                t = threading.Thread(target=self._pump, args=(a, b, direction), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        src.settimeout(0.5)
        try:
            while not self._stop.is_set():
                try:
                    data = src.recv(1 << 16)
                except socket.timeout:
                    continue
                if not data:
                    break
                with self._lock:
                    setattr(self, direction, getattr(self, direction) + len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def __enter__(self) -> "CountingProxy":
        self._accept.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._sock.close()
        self._accept.join(timeout=5)
        for t in self._threads:
            t.join(timeout=2)


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single-range ``Range: bytes=a-b`` support; counts body bytes sent.
    Anything under ``/private/`` is refused with 403."""

    counter: dict[str, int]

    def log_message(self, *args: Any) -> None:
        pass

    def send_head(self) -> Any:  # noqa: C901 - one linear protocol path
        if self.command == "GET":
            self.server.gets += 1  # type: ignore[attr-defined]
        if self.path.startswith("/private/"):
            self.send_error(403, "forbidden")
            return None
        path = self.translate_path(self.path)
        if os.path.isdir(path) or not os.path.isfile(path):
            self.send_error(404, "not found")
            return None
        size = os.path.getsize(path)
        fh = open(path, "rb")
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if match and self.server.ranges:  # type: ignore[attr-defined]
            start = int(match.group(1)) if match.group(1) else max(0, size - int(match.group(2)))
            end = min(size - 1, int(match.group(2))) if match.group(1) and match.group(2) else size - 1
            fh.seek(start)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self._length = end - start + 1
        else:
            self.send_response(200)
            self._length = size
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(self._length))
        if self.server.ranges:  # type: ignore[attr-defined]
            self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return fh

    def copyfile(self, source: Any, outputfile: Any) -> None:
        left = self._length
        while left > 0:
            chunk = source.read(min(left, 1 << 16))
            if not chunk:
                break
            outputfile.write(chunk)
            left -= len(chunk)
            self.server.sent += len(chunk)  # type: ignore[attr-defined]


@contextlib.contextmanager
def http_server(root: str, *, ranges: bool = True) -> Iterator[Any]:
    """Serve ``root`` on 127.0.0.1; ``server.sent`` counts body bytes, ``server.gets`` GET requests,
    ``server.url`` is the base URL."""
    handler = lambda *a, **k: _RangeHandler(*a, directory=root, **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), handler)
    server.ranges = ranges  # type: ignore[attr-defined]
    server.sent = 0  # type: ignore[attr-defined]
    server.gets = 0  # type: ignore[attr-defined]
    server.url = f"http://{LOOPBACK}:{server.server_address[1]}"  # type: ignore[attr-defined]
    with _serving(server):
        yield server


@contextlib.contextmanager
def _serving(server: Any) -> Iterator[None]:
    """Run ``server`` (an http.server) on a thread for the block; stop and close it afterwards."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A loopback port that accepts TCP connections into a full backlog and never answers (a timeout)."""
    sock = socket.socket()
    sock.bind((LOOPBACK, 0))
    sock.listen(0)
    fillers = []
    try:
        for _ in range(4):  # fill the backlog so further connects hang
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError, OSError):
                s.connect((LOOPBACK, sock.getsockname()[1]))
            fillers.append(s)
        yield sock.getsockname()[1]
    finally:
        for s in fillers:
            s.close()
        sock.close()


class _FaultHandler(http.server.BaseHTTPRequestHandler):
    """Forwards each request to the upstream S3 server, unless ``server.fails(method, path)`` says to answer
    it with a 500 InternalError instead (a real HTTP failure the client sees exactly as from AWS)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        import http.client

        body = self._body()
        server: Any = self.server
        if server.fails(self.command, self.path):
            server.failed.append((self.command, self.path))
            payload = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code>"
                       b"<Message>injected fault</Message></Error>")
            self.send_response(500)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(LOOPBACK, server.target_port, timeout=30)
        try:
            conn.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST") else None,
                         headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            # a HEAD answer says the object's length, not that of its (empty) body
            self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                             else str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


@contextlib.contextmanager
def fault_proxy(target_port: int) -> Iterator[Any]:
    """An HTTP proxy on 127.0.0.1 in front of ``target_port`` (moto). Set ``proxy.fails = fn(method, path)``
    to choose the requests that get a 500; ``proxy.failed`` lists those answered so; ``proxy.endpoint``."""
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), _FaultHandler)
    server.daemon_threads = True
    server.target_port = target_port  # type: ignore[attr-defined]
    server.fails = lambda method, path: False  # type: ignore[attr-defined]
    server.failed = []  # type: ignore[attr-defined]
    server.endpoint = f"http://{LOOPBACK}:{server.server_address[1]}"  # type: ignore[attr-defined]
    with _serving(server):
        yield server
