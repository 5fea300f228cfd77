"""Loopback endpoints that fail the way real model endpoints fail, for failure-injection tests.

Each helper is a context manager yielding a :class:`Endpoint` (``.base_url`` on 127.0.0.1,
``.requests`` counted as they arrive, ``.connections`` accepted):

* :func:`closed_port` — nothing listens there (connection refused);
* :func:`reset_server` — accepts TCP connections and resets them at once (RST, no answer);
* :func:`trickle_server` — answers a valid ``200`` Messages reply with a ``Content-Length``,
  then writes the body a byte at a time, so it never finishes within a test's timeout;
* :func:`status_server` — every ``POST /v1/messages`` gets one HTTP status with an Anthropic
  error body ``{"type": "error", "error": {"type": ..., "message": ...}}``.

They never touch anything but the loopback interface. ``FakeAnthropic`` (rlm_dagster.testing)
is the tool for failing only some kinds of request (a handler returning ``Fault``); these are
for whole endpoints that are down, slow or refusing.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "Endpoint",
    "closed_port",
    "messages_reply",
    "reset_server",
    "status_server",
    "trickle_server",
]

HOST = "127.0.0.1"


class Endpoint:
    """A failing endpoint: where it is and what reached it."""

    def __init__(self, port: int, kind: str) -> None:
        self.port = port
        self.kind = kind
        self._lock = threading.Lock()
        self._requests = 0
        self._connections = 0
        self.paths: list[str] = []

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def requests(self) -> int:
        """HTTP requests received (for reset_server: connections, which never get that far)."""
        with self._lock:
            return self._requests

    @property
    def connections(self) -> int:
        """TCP connections accepted."""
        with self._lock:
            return self._connections

    def _count(self, *, request: bool = False, connection: bool = False, path: str = "") -> None:
        with self._lock:
            self._requests += int(request)
            self._connections += int(connection)
            if path:
                self.paths.append(path)

    def __repr__(self) -> str:
        return f"<{self.kind} {self.base_url} requests={self.requests}>"


def messages_reply(text: str = "FINAL('slow')", model: str = "fake-root") -> dict[str, Any]:
    """A valid Messages API reply body (what the SDK can parse)."""
    return {
        "id": "msg_failing_server",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }


# -- nothing listening -----------------------------------------------------------------------


@contextlib.contextmanager
def closed_port() -> Iterator[Endpoint]:
    """A port on 127.0.0.1 where nothing listens (bound once, then closed)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    sock.close()
    yield Endpoint(port, "closed_port")


# -- raw socket servers ----------------------------------------------------------------------


class _RawServer:
    """A listening socket whose connections are served by ``serve(conn)`` in threads."""

    def __init__(self, endpoint_kind: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, 0))
        self.sock.listen(64)
        self.sock.settimeout(0.05)
        self.endpoint = Endpoint(self.sock.getsockname()[1], endpoint_kind)
        self.stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._conns_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"{endpoint_kind}-accept", daemon=True
        )

    def serve(self, conn: socket.socket) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _accept_loop(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.endpoint._count(connection=True)
            with self._conns_lock:
                self._conns.append(conn)
            thread = threading.Thread(target=self._serve_one, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            self.serve(conn)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def __enter__(self) -> Endpoint:
        self._acceptor.start()
        return self.endpoint

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            self.sock.close()
        self._acceptor.join(timeout=5)
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:  # unblock clients still reading
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()
        for thread in self._threads:
            thread.join(timeout=5)


def _read_request(conn: socket.socket, deadline_s: float = 10.0) -> tuple[str, bytes] | None:
    """Read one HTTP request (head and Content-Length body); None if the peer went away."""
    conn.settimeout(deadline_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        body += chunk
    return lines[0], body


class _ResetServer(_RawServer):
    def serve(self, conn: socket.socket) -> None:
        # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.endpoint._count(request=True)


@contextlib.contextmanager
def reset_server() -> Iterator[Endpoint]:
    """Accepts every TCP connection and resets it at once, without reading or answering.
    ``.requests`` counts the connections (each is one attempt of the client)."""
    with _ResetServer("reset_server") as endpoint:
        yield endpoint


class _TrickleServer(_RawServer):
    def __init__(self, bytes_per_s: float, max_s: float, model: str) -> None:
        super().__init__("trickle_server")
        self.interval = 1.0 / bytes_per_s
        self.max_s = max_s
        self.model = model

    def serve(self, conn: socket.socket) -> None:
        while not self.stop.is_set():
            request = _read_request(conn)
            if request is None:
                return
            line, _ = request
            self.endpoint._count(request=True, path=line)
            # Long enough that it never completes: 4 KB at a few bytes a second.
            reply = messages_reply("FINAL('slow')" + " " * 4096, self.model)
            body = json.dumps(reply).encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(body)}\r\nrequest-id: req_trickle\r\n\r\n".encode()
            )
            started = time.monotonic()
            for i in range(len(body)):
                if self.stop.is_set() or time.monotonic() - started > self.max_s:
                    # Safety net: give up (reset) rather than hold a test forever.
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                conn.sendall(body[i : i + 1])
                self.stop.wait(self.interval)


@contextlib.contextmanager
def trickle_server(
    bytes_per_s: float = 2.0, *, max_s: float = 60.0, model: str = "fake-root"
) -> Iterator[Endpoint]:
    """Answers ``HTTP/1.1 200`` with a Content-Length and a valid JSON Messages reply, then
    writes the body one byte at a time, ``bytes_per_s`` bytes a second (about 4 KB: minutes).
    Each connection is reset after ``max_s`` seconds, so a client with no deadline of its own
    does not hang a test forever."""
    with _TrickleServer(bytes_per_s, max_s, model) as endpoint:
        yield endpoint


# -- an HTTP server answering one status ----------------------------------------------------


class _StatusServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(
        self, status: int, error_type: str, retry_after_s: float | None, message: str
    ) -> None:
        super().__init__((HOST, 0), _StatusHandler)
        self.status = status
        self.error_type = error_type
        self.retry_after_s = retry_after_s
        self.message = message
        self.endpoint = Endpoint(self.server_address[1], "status_server")


class _StatusHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _StatusServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        server = self.server
        server.endpoint._count(request=True, path=f"{self.command} {self.path}")
        message = server.message or (
            f"failing status_server: HTTP {server.status} {server.error_type}"
        )
        body = json.dumps(
            {"type": "error", "error": {"type": server.error_type, "message": message}}
        ).encode()
        self.send_response(server.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.send_header("request-id", "req_status_server")
        if server.retry_after_s is not None:
            self.send_header("retry-after", repr(float(server.retry_after_s)))
            self.send_header("retry-after-ms", repr(float(server.retry_after_s) * 1000))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self._answer()

    def do_GET(self) -> None:
        self._answer()


@contextlib.contextmanager
def status_server(
    status: int,
    error_type: str,
    *,
    retry_after_s: float | None = None,
    message: str = "",
) -> Iterator[Endpoint]:
    """Every request is answered HTTP ``status`` with an Anthropic error body of
    ``error_type`` (and ``retry-after`` / ``retry-after-ms`` headers when given)."""
    server = _StatusServer(status, error_type, retry_after_s, message)
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        name=f"status_server-{status}",
        daemon=True,
    )
    thread.start()
    try:
        yield server.endpoint
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
