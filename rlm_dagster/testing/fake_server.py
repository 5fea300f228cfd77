"""A fake Anthropic Messages API on 127.0.0.1, for testing RLM pipelines without a real model.

:class:`FakeAnthropic` is a real HTTP server (stdlib only) that speaks enough of
``POST /v1/messages`` for the official ``anthropic`` SDK to parse its replies, retry its
faults and honour its ``retry-after`` headers. Point a client at :attr:`FakeAnthropic.base_url`
and script what the "model" says::

    >>> import anthropic
    >>> from rlm_dagster.testing import FakeAnthropic, Fault
    >>> with FakeAnthropic(root=["FINAL('done')"], sub=lambda req: "yes") as fake:
    ...     client = anthropic.Anthropic(api_key="test-key", base_url=fake.base_url)
    ...     fake.inject(Fault(status=429, retry_after_s=0.01))  # first request is rate limited
    ...     msg = client.messages.create(
    ...         model="fake-root", max_tokens=100,
    ...         messages=[{"role": "user", "content": "How many tickets?"}],
    ...     )
    ...     sub = client.messages.create(
    ...         model="claude-haiku", max_tokens=10,
    ...         messages=[{"role": "user", "content": "Is it urgent?"}],
    ...     )
    ...     client.close()
    >>> msg.content[0].text, sub.content[0].text
    ("FINAL('done')", 'yes')
    >>> fake.count("root"), fake.count("root", include_faulted=True)
    (1, 2)
    >>> fake.requests[-1].prompt
    'Is it urgent?'

Requests are routed by *kind*:

* ``"where"`` — the request offers a tool named ``record_verdicts`` (semantic filter). The
  predicate is read from ``<predicate>...</predicate>`` in the system prompt, the rows from
  ``<row id="K">{json}</row>`` lines of the last user message; the ``where=`` judge is
  called per row and the fake answers with a ``record_verdicts`` tool call.
* ``"root"`` — ``body["model"] == root_model``; answered from the ``root=`` script.
* ``"sub"`` — anything else; answered by ``sub=``.

Only this module's stdlib imports are needed to run the server; it never touches the network
beyond the loopback interface.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal, TypeAlias, cast
from urllib.parse import urlsplit

__all__ = [
    "FakeAnthropic",
    "FakeReply",
    "FakeRequest",
    "Fault",
    "HandlerResult",
    "Kind",
    "Reply",
    "RootEntry",
    "ToolUse",
    "WhereJudge",
]

Kind: TypeAlias = Literal["root", "sub", "where"]
_KINDS: tuple[str, ...] = ("root", "sub", "where")

#: Name of the tool whose presence marks a semantic-filter ("where") request.
WHERE_TOOL_NAME = "record_verdicts"

_REDACTED_HEADERS = frozenset({"authorization", "x-api-key", "proxy-authorization"})
_PREDICATE_RE = re.compile(r"<predicate>(.*?)</predicate>", re.DOTALL)
_ROW_RE = re.compile(r'^\s*<row id="(-?\d+)">(.*)</row>\s*$', re.MULTILINE)

_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


# --------------------------------------------------------------------------- value types


@dataclass(frozen=True)
class ToolUse:
    """A ``tool_use`` content block the fake model emits (``stop_reason="tool_use"``).

    ``id`` defaults to a generated ``"toolu_fake_<n>"``.
    """

    name: str
    input: dict[str, Any]
    id: str | None = None


@dataclass(frozen=True)
class FakeReply:
    """A full assistant reply.

    ``stop_reason=None`` (the default) means ``"tool_use"`` when ``tool_use`` is set and
    ``"end_turn"`` otherwise; any explicit value (e.g. ``"max_tokens"``) is passed through.
    ``usage`` entries override the fake's token estimates (e.g. ``{"output_tokens": 4096}``).
    The text block is omitted when ``text`` is empty and ``tool_use`` is set.
    """

    text: str = ""
    stop_reason: str | None = None
    tool_use: ToolUse | None = None
    usage: dict[str, int] | None = None


@dataclass(frozen=True)
class Fault:
    """An error (or a slow reply) the fake applies to one request.

    * ``status`` — HTTP status of the error reply (``None``: no error, just ``delay_s``).
      429 is sent as ``rate_limit_error``, 529 ``overloaded_error``, 500 ``api_error``,
      401 ``authentication_error``, 400 ``invalid_request_error``; others ``api_error``.
    * ``retry_after_s`` — sent as ``retry-after`` (seconds) and ``retry-after-ms``; the SDK
      then sleeps exactly that long before retrying. Without it (or with 0) the SDK uses its
      own exponential backoff, which starts at roughly 0.4-0.5 s.
    * ``delay_s`` — sleep this long before answering (with ``status=None`` the request is
      then answered normally).
    * ``message`` — the error message (a default naming the fault is used when empty).
    """

    status: int | None = None
    retry_after_s: float | None = None
    delay_s: float = 0.0
    message: str = ""

    def __post_init__(self) -> None:
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError(
                f"Fault.status must be an HTTP error status 400-599, got {self.status}"
            )
        if self.retry_after_s is not None and self.retry_after_s < 0:
            raise ValueError(f"Fault.retry_after_s must be >= 0, got {self.retry_after_s}")
        if self.delay_s < 0:
            raise ValueError(f"Fault.delay_s must be >= 0, got {self.delay_s}")
        if self.status is None and self.delay_s == 0:
            raise ValueError("a Fault needs a status (error reply) or a delay_s (slow reply)")

    @property
    def error_type(self) -> str:
        """The Anthropic error ``type`` sent for :attr:`status`."""
        if self.status is None:
            return ""
        return _ERROR_TYPES.get(self.status, "api_error")


@dataclass(frozen=True)
class FakeRequest:
    """One request the fake received, as parsed from the wire.

    ``headers`` have lower-case names, with credentials replaced by ``"[redacted]"``.
    ``system`` is the system prompt with text blocks joined by newlines; ``last_user_text``
    the text of the last user message (text blocks, and the text of tool results).
    For ``"where"`` requests ``predicate`` and ``rows`` hold the parsed filter input (a row
    whose JSON does not parse is kept as ``(K, {"_raw": text})``); otherwise both are None.
    ``fault`` is the fault applied to the request, if any, and ``status`` the HTTP status the
    fake answered with (None while the request is still in flight).
    """

    index: int
    kind: Kind
    model: str
    body: dict[str, Any]
    headers: dict[str, str]
    system: str
    last_user_text: str
    predicate: str | None = None
    rows: list[tuple[int, dict[str, Any]]] | None = None
    fault: Fault | None = None
    status: int | None = None

    @property
    def prompt(self) -> str:
        """Alias of :attr:`last_user_text`."""
        return self.last_user_text

    @property
    def faulted(self) -> bool:
        """Whether the fake answered (or will answer) this request with an HTTP error."""
        return self.status is not None and self.status != 200


Reply: TypeAlias = str | FakeReply | ToolUse | dict[str, Any]
"""What a script entry or callable may answer: text, a full reply, a tool call, or a raw body."""
HandlerResult: TypeAlias = Reply | Fault
RootEntry: TypeAlias = HandlerResult | Callable[[FakeRequest], HandlerResult]
WhereJudge: TypeAlias = Callable[[str, dict[str, Any]], bool | tuple[bool, str]]


def _default_sub(request: FakeRequest) -> str:
    return "fake sub-model answer"


# --------------------------------------------------------------------------- internals


@dataclass
class _Out:
    """An HTTP response about to be written."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


class _UserCodeError(Exception):
    """A user-supplied callable raised or returned something unusable."""


def _json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


def _error_out(status: int, message: str, error_type: str | None = None) -> _Out:
    etype = error_type or _ERROR_TYPES.get(status, "api_error")
    return _Out(
        status, _json_bytes({"type": "error", "error": {"type": etype, "message": message}})
    )


def _fmt_seconds(value: float) -> str:
    return repr(float(value))


def _block_text(block: Any) -> str:
    """Text of one content block (text blocks, and tool results' text)."""
    if isinstance(block, str):
        return block
    if not isinstance(block, dict):
        return ""
    if block.get("type") == "text" and isinstance(block.get("text"), str):
        return cast(str, block["text"])
    if block.get("type") == "tool_result":
        return _content_text(block.get("content", ""))
    return ""


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(t for t in (_block_text(b) for b in content) if t)
    return ""


def _last_user_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _content_text(message.get("content", ""))
    return ""


def _tool_names(tools: Any) -> list[str]:
    if not isinstance(tools, list):
        return []
    return [str(t.get("name")) for t in tools if isinstance(t, dict)]


def _parse_rows(text: str) -> list[tuple[int, dict[str, Any]]]:
    rows: list[tuple[int, dict[str, Any]]] = []
    for match in _ROW_RE.finditer(text):
        raw = match.group(2)
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        rows.append((int(match.group(1)), value if isinstance(value, dict) else {"_raw": raw}))
    return rows


def _cache_segments(body: dict[str, Any]) -> list[tuple[str, bool]]:
    """The request in cache-prefix order (tools, system, messages) as (text, has a cache
    breakpoint) pieces; the ``cache_control`` marks themselves are not part of the text."""

    def piece(block: Any, prefix: str = "") -> tuple[str, bool]:
        if isinstance(block, str):  # a plain string is one text block, as the API reads it
            block = {"type": "text", "text": block}
        if isinstance(block, dict):
            marked = "cache_control" in block
            block = {k: v for k, v in block.items() if k != "cache_control"}
            return prefix + json.dumps(block, sort_keys=True, ensure_ascii=False), marked
        return prefix + str(block), False

    segments = [piece(tool) for tool in body.get("tools") or []]
    system = body.get("system")
    if isinstance(system, list):
        segments += [piece(block) for block in system]
    elif system:
        segments.append(piece(system))
    for message in body.get("messages") or []:
        content = message.get("content")
        role = f"{message.get('role')}:"
        if isinstance(content, list):
            segments += [piece(block, role) for block in content]
        else:
            segments.append(piece(content, role))
    return segments


def _estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def _validate_body(body: dict[str, Any]) -> str | None:
    """The first reason the real API would reject ``body``, or None."""
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: field required (a non-empty string)"
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return "max_tokens: field required (an integer >= 1)"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: field required (a non-empty list)"
    if body.get("stream"):
        return (
            "FakeAnthropic does not support streaming; call messages.create() without stream=True"
        )
    return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for idle keep-alive connections
    # socketserver's default backlog of 5 drops a burst of new connections, which the client's
    # TCP then retries a whole second later: concurrent clients open dozens at once.
    request_queue_size = 1024
    fake: FakeAnthropic

    def __init__(self, address: tuple[str, int], fake: FakeAnthropic) -> None:
        self.fake = fake
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
            self._conns.clear()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up (or stop() closing their connections) is normal here.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeAnthropic/1.0"
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid 40 ms stalls

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self, method: str) -> None:
        body = self._read_body()
        fake = cast(_Server, self.server).fake
        out = fake._dispatch(method, self.path, dict(self.headers.items()), body)
        self.send_response(out.status)
        self.send_header("Content-Type", out.content_type)
        self.send_header("Content-Length", str(len(out.body)))
        for name, value in out.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(out.body)
        self.wfile.flush()

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")


# --------------------------------------------------------------------------- the server


class FakeAnthropic:
    """A fake Anthropic Messages API server on ``127.0.0.1`` (see the module docstring).

    Args:
        root: the root model's script — a list of replies consumed in order (each a ``str``,
            :class:`FakeReply`, :class:`ToolUse`, raw ``dict`` body, :class:`Fault`, or a
            callable ``(FakeRequest) -> one of those``), or a single callable answering every
            root turn. When a list runs out the fake answers HTTP 400
            ``"fake root script exhausted after N replies"`` (not retried by the SDK).
        sub: answers plain sub-calls (``kind == "sub"``): a callable ``(FakeRequest) ->
            reply`` or a constant string.
        where: the semantic-filter judge, ``(predicate, row) -> bool | (bool, reason)``.
        where_reply: overrides ``where`` for where-requests with a whole reply (e.g. a
            :class:`ToolUse` with malformed verdicts).
        handler: when given, answers every ``/v1/messages`` request (full override).
        root_model: requests whose ``model`` equals this are root turns.
        latency_s, latency_per_output_token_s: simulated latency of every answered request.
        max_concurrency: more requests in flight than this are answered 429 with
            ``retry-after = rate_limit_retry_after_s``.
        fault_rate, fault_statuses, seed: random fault injection; each request faults with
            probability ``fault_rate`` (status drawn from ``fault_statuses``, retry-after
            ``rate_limit_retry_after_s``). Deterministic for a given seed and arrival order.
        prompt_caching, cache_min_tokens: simulate Anthropic's prompt caching. The prefix up to
            each ``cache_control`` breakpoint (tools, then system, then messages) that a
            previous request already had is billed as ``cache_read_input_tokens``; newly marked
            content as ``cache_creation_input_tokens``; prefixes shorter than
            ``cache_min_tokens`` are not cached, as with the real API.
        port: TCP port to listen on (0 picks a free one).

    Faults queued with :meth:`inject` take precedence over random faults. A faulted request
    does not consume a root-script entry. User callables that raise get the request answered
    with a 400 naming the exception (kept in :attr:`errors`), so tests fail fast.
    """

    def __init__(
        self,
        root: Sequence[RootEntry] | Callable[[FakeRequest], HandlerResult] | None = None,
        sub: Callable[[FakeRequest], HandlerResult] | str = _default_sub,
        where: WhereJudge | None = None,
        *,
        where_reply: Callable[[FakeRequest], HandlerResult] | None = None,
        handler: Callable[[FakeRequest], HandlerResult] | None = None,
        root_model: str = "fake-root",
        latency_s: float = 0.0,
        latency_per_output_token_s: float = 0.0,
        max_concurrency: int | None = None,
        rate_limit_retry_after_s: float = 0.05,
        fault_rate: float = 0.0,
        fault_statuses: Iterable[int] = (429, 529, 500),
        seed: int = 0,
        prompt_caching: bool = True,
        cache_min_tokens: int = 1024,
        port: int = 0,
    ) -> None:
        if isinstance(root, str | bytes):
            raise TypeError(
                "root= must be a list of replies or a callable, not a string; wrap it: root=[...]"
            )
        self._root_fn: Callable[[FakeRequest], HandlerResult] | None = None
        self._script: list[RootEntry] | None = None
        if root is None:
            pass
        elif callable(root):
            self._root_fn = root
        elif isinstance(root, Sequence):
            self._script = list(root)
        else:
            raise TypeError(
                f"root= must be a list of replies or a callable, got {type(root).__name__}"
            )
        if not (callable(sub) or isinstance(sub, str)):
            raise TypeError(f"sub= must be a callable or a string, got {type(sub).__name__}")
        for name, fn in (("where", where), ("where_reply", where_reply), ("handler", handler)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name}= must be a callable, got {type(fn).__name__}")
        for name, value in (
            ("latency_s", latency_s),
            ("latency_per_output_token_s", latency_per_output_token_s),
            ("rate_limit_retry_after_s", rate_limit_retry_after_s),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1 or None, got {max_concurrency}")
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be within [0, 1], got {fault_rate}")
        statuses = tuple(fault_statuses)
        if fault_rate > 0 and not statuses:
            raise ValueError("fault_statuses must not be empty when fault_rate > 0")
        for status in statuses:
            Fault(status=status)  # validates the status range

        self._sub = sub
        self._where = where
        self._where_reply = where_reply
        self._handler = handler
        self.root_model = root_model
        self.latency_s = latency_s
        self.latency_per_output_token_s = latency_per_output_token_s
        self.max_concurrency = max_concurrency
        self.rate_limit_retry_after_s = rate_limit_retry_after_s
        self.fault_rate = fault_rate
        self.fault_statuses = statuses
        self._rng = random.Random(seed)
        self._port = port
        self.prompt_caching = prompt_caching
        self.cache_min_tokens = cache_min_tokens
        self._prefixes: set[str] = set()

        self._lock = threading.Lock()
        self._requests: list[FakeRequest] = []
        self._faults: list[list[Any]] = []  # [fault, remaining, kind]
        self._errors: list[BaseException] = []
        self._script_pos = 0
        self._inflight = 0
        self._peak_inflight = 0
        self._serial = 0

        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lifecycle = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeAnthropic:
        """Start serving in a daemon thread (idempotent); returns ``self``."""
        with self._lifecycle:
            if self._server is not None:
                return self
            server = _Server(("127.0.0.1", self._port), self)
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"FakeAnthropic-{server.server_address[1]}",
                daemon=True,
            )
            thread.start()
            self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        """Shut the server down, close open connections and join its thread (idempotent)."""
        with self._lifecycle:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> FakeAnthropic:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the server is currently serving."""
        return self._server is not None

    @property
    def port(self) -> int:
        """The TCP port the server listens on."""
        server = self._server
        if server is None:
            raise RuntimeError(
                "FakeAnthropic is not running; call start() or use it as a context manager"
            )
        return int(server.server_address[1])

    @property
    def base_url(self) -> str:
        """``"http://127.0.0.1:PORT"`` — pass it to ``anthropic.Anthropic(base_url=...)``."""
        return f"http://127.0.0.1:{self.port}"

    def __repr__(self) -> str:
        where = self.base_url if self.running else "stopped"
        return f"<FakeAnthropic {where} requests={len(self._requests)}>"

    # ------------------------------------------------------------------ test API

    def inject(self, fault: Fault, times: int = 1, kind: Kind | None = None) -> None:
        """Apply ``fault`` to the next ``times`` requests of ``kind`` (None: of any kind).

        Queued faults are used in the order they were injected.
        """
        if not isinstance(fault, Fault):
            raise TypeError(f"inject() takes a Fault, got {type(fault).__name__}")
        if times < 1:
            raise ValueError(f"times must be >= 1, got {times}")
        self._check_kind(kind)
        with self._lock:
            self._faults.append([fault, times, kind])

    @property
    def requests(self) -> list[FakeRequest]:
        """The requests received so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def errors(self) -> list[BaseException]:
        """Exceptions raised by user callables (each answered with HTTP 400), a copy."""
        with self._lock:
            return list(self._errors)

    @property
    def pending_faults(self) -> int:
        """How many injected fault applications are still queued."""
        with self._lock:
            return sum(entry[1] for entry in self._faults)

    @property
    def in_flight(self) -> int:
        """Requests being answered right now (not counting ones rejected by max_concurrency)."""
        with self._lock:
            return self._inflight

    @property
    def peak_in_flight(self) -> int:
        """The most requests that were being answered at once since start (or reset())."""
        with self._lock:
            return self._peak_inflight

    @property
    def script_position(self) -> int:
        """How many root-script entries have been consumed."""
        with self._lock:
            return self._script_pos

    def count(self, kind: Kind | None = None, *, include_faulted: bool = False) -> int:
        """Number of requests of ``kind`` (None: all); faulted ones only if ``include_faulted``."""
        self._check_kind(kind)
        with self._lock:
            return sum(
                1
                for r in self._requests
                if (kind is None or r.kind == kind) and (include_faulted or not r.faulted)
            )

    def reset(self) -> None:
        """Forget recorded requests, errors, queued faults and the in-flight peak.

        The root script keeps its place.
        """
        with self._lock:
            self._peak_inflight = self._inflight
            self._requests.clear()
            self._faults.clear()
            self._errors.clear()

    @staticmethod
    def _check_kind(kind: str | None) -> None:
        if kind is not None and kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS} or None, got {kind!r}")

    # ------------------------------------------------------------------ request handling

    def _dispatch(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> _Out:
        path = urlsplit(raw_path).path.rstrip("/") or "/"
        if path == "/health":
            if method != "GET":
                return _error_out(
                    405, f"{method} {path} is not allowed; use GET", "invalid_request_error"
                )
            return _Out(200, b"ok", "text/plain; charset=utf-8")
        if path in ("/v1/messages", "/v1/messages/count_tokens"):
            if method != "POST":
                return _error_out(
                    405, f"{method} {path} is not allowed; use POST", "invalid_request_error"
                )
            if path.endswith("count_tokens"):
                return self._count_tokens(body)
            return self._messages(headers, body)
        return _error_out(404, f"FakeAnthropic does not serve {method} {path}", "not_found_error")

    def _count_tokens(self, raw: bytes) -> _Out:
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            return _error_out(400, f"request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return _error_out(400, "request body must be a JSON object")
        return _Out(200, _json_bytes({"input_tokens": self._input_tokens(body)}))

    @staticmethod
    def _input_tokens(body: dict[str, Any]) -> int:
        parts = [body[key] for key in ("system", "messages", "tools") if key in body]
        return max(
            1, _estimate_tokens(json.dumps(parts, ensure_ascii=False, separators=(",", ":")))
        )

    def _cache_usage(self, body: dict[str, Any]) -> tuple[int, int, int]:
        """(uncached input, cache-write, cache-read) tokens of a request."""
        total = self._input_tokens(body)
        if not self.prompt_caching:
            return total, 0, 0
        digest = hashlib.sha256()
        tokens = 0
        # Every block boundary can hit (the API looks back from each breakpoint); only the
        # prefixes at breakpoints are written.
        boundaries: list[tuple[str, int, bool]] = []
        for segment, marked in _cache_segments(body):
            digest.update(segment.encode("utf-8"))
            tokens += _estimate_tokens(segment)
            boundaries.append((digest.copy().hexdigest(), min(tokens, total), marked))
        marks = [(h, n) for h, n, marked in boundaries if marked and n >= self.cache_min_tokens]
        if not marks:
            return total, 0, 0
        with self._lock:
            read = next((n for h, n, _ in reversed(boundaries) if h in self._prefixes), 0)
            self._prefixes.update(h for h, _ in marks)
        written = max(0, marks[-1][1] - read)
        return max(0, total - read - written), written, read

    def _next_serial(self) -> int:
        with self._lock:
            self._serial += 1
            return self._serial

    def _messages(self, raw_headers: dict[str, str], raw: bytes) -> _Out:
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            return _error_out(400, f"request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return _error_out(400, "request body must be a JSON object")

        headers = {
            k.lower(): ("[redacted]" if k.lower() in _REDACTED_HEADERS else v)
            for k, v in raw_headers.items()
        }
        model = body["model"] if isinstance(body.get("model"), str) else ""
        system = _content_text(body.get("system", ""))
        last_user = _last_user_text(body.get("messages"))
        kind: Kind
        predicate: str | None = None
        rows: list[tuple[int, dict[str, Any]]] | None = None
        if WHERE_TOOL_NAME in _tool_names(body.get("tools")):
            kind = "where"
            found = _PREDICATE_RE.search(system)
            predicate = found.group(1).strip() if found else None
            rows = _parse_rows(last_user)
        elif model == self.root_model:
            kind = "root"
        else:
            kind = "sub"
        problem = _validate_body(body)

        with self._lock:
            fault: Fault | None = None
            rejected = (
                not problem
                and self.max_concurrency is not None
                and self._inflight >= self.max_concurrency
            )
            if rejected:
                fault = Fault(
                    status=429,
                    retry_after_s=self.rate_limit_retry_after_s,
                    message=(
                        f"fake rate limit: {self._inflight} requests in flight, "
                        f"max_concurrency={self.max_concurrency}"
                    ),
                )
            elif not problem:
                fault = self._pick_fault(kind)
            if not rejected:
                self._inflight += 1
                self._peak_inflight = max(self._peak_inflight, self._inflight)
            status = 400 if problem else (fault.status if fault else None)
            request = FakeRequest(
                index=len(self._requests),
                kind=kind,
                model=model,
                body=body,
                headers=headers,
                system=system,
                last_user_text=last_user,
                predicate=predicate,
                rows=rows,
                fault=fault,
                status=status,
            )
            self._requests.append(request)

        if rejected:
            assert fault is not None
            return self._fault_out(fault)
        try:
            if problem:
                return _error_out(400, problem)
            if fault is not None:
                if fault.delay_s:
                    time.sleep(fault.delay_s)
                if fault.status is not None:
                    return self._fault_out(fault)
            try:
                result = self._answer(request)
                if isinstance(result, Fault):
                    if result.status is None:
                        raise _UserCodeError(
                            "a Fault returned by a handler or script needs a status; for a slow "
                            "normal reply use fake.inject(Fault(delay_s=...)) instead"
                        )
                    self._finish(request, result.status, result)
                    if result.delay_s:
                        time.sleep(result.delay_s)
                    return self._fault_out(result)
                payload, output_tokens = self._render(request, result)
            except _UserCodeError as exc:
                self._finish(request, 400)
                return _error_out(400, str(exc))
            delay = self.latency_s + self.latency_per_output_token_s * output_tokens
            if delay > 0:
                time.sleep(delay)
            self._finish(request, 200)
            return _Out(
                200,
                _json_bytes(payload),
                headers=[("request-id", f"req_fake_{self._next_serial()}")],
            )
        finally:
            with self._lock:
                self._inflight -= 1

    def _pick_fault(self, kind: Kind) -> Fault | None:
        """Called with the lock held: the queued fault for this request, else a random one."""
        for entry in self._faults:
            fault, remaining, fault_kind = entry
            if fault_kind is None or fault_kind == kind:
                if remaining <= 1:
                    self._faults.remove(entry)
                else:
                    entry[1] = remaining - 1
                return cast(Fault, fault)
        if self.fault_rate > 0 and self._rng.random() < self.fault_rate:
            status = self._rng.choice(self.fault_statuses)
            return Fault(
                status=status,
                retry_after_s=self.rate_limit_retry_after_s,
                message=f"fake random fault ({status})",
            )
        return None

    def _finish(self, request: FakeRequest, status: int, fault: Fault | None = None) -> None:
        """Record the final HTTP status (and a handler-returned fault) of ``request``."""
        with self._lock:
            pos = request.index
            if pos < len(self._requests) and self._requests[pos] is request:
                self._requests[pos] = dataclasses.replace(
                    request, status=status, fault=fault or request.fault
                )

    def _fault_out(self, fault: Fault) -> _Out:
        assert fault.status is not None
        message = fault.message or f"fake {fault.error_type} (injected HTTP {fault.status})"
        out = _error_out(fault.status, message, fault.error_type)
        out.headers.append(("request-id", f"req_fake_{self._next_serial()}"))
        if fault.retry_after_s is not None:
            # The SDK reads retry-after-ms first (precise), then retry-after as float seconds.
            out.headers.append(("retry-after", _fmt_seconds(fault.retry_after_s)))
            out.headers.append(("retry-after-ms", _fmt_seconds(fault.retry_after_s * 1000)))
        return out

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            with self._lock:
                self._errors.append(exc)
            raise _UserCodeError(f"fake {what} raised {type(exc).__name__}: {exc}") from exc

    def _answer(self, request: FakeRequest) -> Any:
        if self._handler is not None:
            return self._call("handler", self._handler, request)
        if request.kind == "where":
            return self._answer_where(request)
        if request.kind == "root":
            return self._answer_root(request)
        if isinstance(self._sub, str):
            return self._sub
        return self._call("sub", self._sub, request)

    def _answer_root(self, request: FakeRequest) -> Any:
        if self._root_fn is not None:
            return self._call("root", self._root_fn, request)
        if self._script is None:
            raise _UserCodeError(
                f"fake got a root request (model={request.model!r}) but no root= script was given"
            )
        with self._lock:
            pos = self._script_pos
            exhausted = pos >= len(self._script)
            if not exhausted:
                self._script_pos += 1
        if exhausted:
            raise _UserCodeError(
                f"fake root script exhausted after {len(self._script)} replies; "
                "add entries to root=[...] or pass a callable"
            )
        entry = self._script[pos]
        if callable(entry):
            return self._call(f"root script entry #{pos}", entry, request)
        return entry

    def _answer_where(self, request: FakeRequest) -> Any:
        if self._where_reply is not None:
            return self._call("where_reply", self._where_reply, request)
        if self._where is None:
            raise _UserCodeError(
                "fake got a semantic-filter request (tool 'record_verdicts') but no judge; "
                "pass where=lambda predicate, row: ... to FakeAnthropic"
            )
        if request.predicate is None:
            raise _UserCodeError(
                "semantic-filter request has no <predicate>...</predicate> in its system prompt"
            )
        verdicts = []
        for row_id, row in request.rows or []:
            verdict = self._call("where judge", self._where, request.predicate, row)
            match, reason = verdict if isinstance(verdict, tuple) else (verdict, "")
            if not isinstance(match, bool) or not isinstance(reason, str):
                raise _UserCodeError(
                    f"fake where judge must return bool or (bool, str), got {verdict!r} for row {row_id}"
                )
            verdicts.append({"id": row_id, "match": match, "reason": reason})
        return ToolUse(name=WHERE_TOOL_NAME, input={"verdicts": verdicts})

    def _render(self, request: FakeRequest, result: Any) -> tuple[dict[str, Any], int]:
        """The response body for ``result`` and its estimated output tokens."""
        if isinstance(result, dict):
            return result, max(1, _estimate_tokens(json.dumps(result)))
        if isinstance(result, str):
            result = FakeReply(text=result)
        elif isinstance(result, ToolUse):
            result = FakeReply(tool_use=result)
        if not isinstance(result, FakeReply):
            raise _UserCodeError(
                f"fake {request.kind} reply must be str, FakeReply, ToolUse, dict or Fault, "
                f"got {type(result).__name__}: {result!r}"
            )
        serial = self._next_serial()
        content: list[dict[str, Any]] = []
        out_text = result.text
        if result.text or result.tool_use is None:
            content.append({"type": "text", "text": result.text})
        if result.tool_use is not None:
            tool = result.tool_use
            content.append(
                {
                    "type": "tool_use",
                    "id": tool.id or f"toolu_fake_{serial}",
                    "name": tool.name,
                    "input": tool.input,
                }
            )
            out_text += json.dumps(tool.input, ensure_ascii=False)
        stop_reason = result.stop_reason or ("tool_use" if result.tool_use else "end_turn")
        uncached, written, read = self._cache_usage(request.body)
        usage: dict[str, int] = {
            "input_tokens": uncached,
            "output_tokens": max(1, _estimate_tokens(out_text)),
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": read,
        }
        usage.update(result.usage or {})
        payload = {
            "id": f"msg_fake_{serial}",
            "type": "message",
            "role": "assistant",
            "model": request.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage,
        }
        return payload, usage["output_tokens"]
