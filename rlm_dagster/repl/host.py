"""The host's handle on a REPL worker process.

    >>> worker = Worker({"sql": lambda args: ...}, tables=lambda: [])  # doctest: +SKIP
    >>> worker.execute("x = 2\\nx * 21").output  # doctest: +SKIP
    '42\\n'

``execute`` sends a cell and then serves the worker's RPC calls (``sql``, ``llm_query`` ...)
with the host's handlers until the cell is done. The cell timeout counts the worker's own
time and the time of its ``sql()`` and ``FINAL()`` calls, not the time the host spends on
model calls (a long ``llm_where`` is not a runaway cell; model calls are bounded by the run's
budget). A cell that times out, kills its worker or breaks the protocol ends in a fresh
worker, and the result says that the variables were lost.

The worker is untrusted: it runs model-written code under :mod:`rlm_dagster.repl.sandbox`, and
every frame it sends is checked here. A frame that is not what the protocol allows ends the
cell with an error and a fresh worker; it never reaches the handlers or the engine.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from rlm_dagster.errors import RLMError, WorkerError
from rlm_dagster.repl.protocol import (
    FAMILIES,
    MAX_WORKER_FRAME_BYTES,
    ChannelClosed,
    ChannelTimeout,
    FrameReader,
    ProtocolError,
    arrow_to_frame,
    decode_arrow,
    encode_arrow,
    frame_to_arrow,
    write_frame,
)
from rlm_dagster.repl.sandbox import (
    LEVELS,
    WorkerLimits,
    available_levels,
    build_policy,
    check_choice,
    resolve_level,
    worker_command,
)

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Any]

_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
# Calls whose host time does not count against the cell timeout: model calls, which the
# run's budget (sub-calls, tokens, USD, wall time) bounds instead.
_MODEL_CALLS = frozenset({"llm_query", "llm_query_batched", "llm_where", "rlm_query"})
_STARTUP_TIMEOUT_S = 60.0
_SCRATCH_PREFIX = "rlm-worker-"  # + the host's pid + "-" + random
_LOST = (
    " A fresh REPL was started: variables you defined are lost (tables and functions are "
    "bound again)."
)


@dataclass(frozen=True)
class CellResult:
    """What running one code block produced."""

    code: str
    output: str
    error: str | None
    seconds: float
    dropped_chars: int = 0
    answer: dict[str, Any] | None = None
    restarted: bool = False


class FramedREPL:
    """The host's side of the frame protocol: sends cells, serves the worker's RPC calls with
    the handlers and checks every frame it gets, whatever runs the worker's loop.

    A subclass is the transport: :meth:`_start` (which calls :meth:`_handshake`), :meth:`_kill`,
    :meth:`close`, :meth:`_send`, :meth:`_has_pending_frame` and :meth:`_death_reason`; it
    sets ``_reader`` when it starts the worker.
    """

    level: str
    """The sandbox level the worker runs at."""

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        tables: Callable[[], list[dict[str, Any]]],
        cell_timeout_s: float,
        max_capture_chars: int,
        context: Any,
    ) -> None:
        self.handlers = dict(handlers)
        self.tables = tables
        self.cell_timeout_s = cell_timeout_s
        self.max_capture_chars = max_capture_chars
        self.context = context
        self.restarts = 0
        self.layers: list[str] = []
        self._reader: FrameReader | None = None
        self._cells = 0
        # start and kill, from the caller's thread and from prestart's
        self._lifecycle = threading.RLock()

    def start(self) -> None:
        """Start the worker unless it runs, then :meth:`_handshake` with it."""
        with self._lifecycle:
            self._start()

    def kill(self) -> None:
        """Stop the worker now; :meth:`start` starts a fresh one."""
        with self._lifecycle:
            self._kill()

    # -- the transport (subclasses) -------------------------------------------------------

    def _start(self) -> None:
        raise NotImplementedError

    def _kill(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop the worker and remove what it left behind."""
        raise NotImplementedError

    def _send(self, message: dict[str, Any], timeout: float | None) -> None:
        raise NotImplementedError

    def prestart(self) -> None:
        """Start the REPL in a background thread (while the run's first model call is in
        flight), for a transport whose ``start`` and ``kill`` are thread-safe; the first cell
        waits for it. A failure here is raised again by that cell's own start."""

        def start() -> None:
            with contextlib.suppress(WorkerError):
                self.start()

        threading.Thread(target=start, name="rlm-repl-start", daemon=True).start()

    def _read(self, timeout: float | None) -> dict[str, Any]:
        assert self._reader is not None
        return self._reader.read(timeout)

    def _has_pending_frame(self) -> bool:
        """Whether the worker sent something between cells."""
        raise NotImplementedError

    def _death_reason(self) -> str:
        """Why the worker's end of the channel closed, in words for the model."""
        raise NotImplementedError

    def _handshake(self, timeout: float) -> dict[str, Any]:
        """Send ``init`` (tables, capture limit, context) and return the worker's reply; on
        ``ready``, ``layers`` become the confinement layers it reports."""
        self._send(
            {
                "op": "init",
                "tables": self.tables(),
                "max_capture": self.max_capture_chars,
                "context": _value_for_worker(self.context),
            },
            timeout=timeout,
        )
        reply = self._read(timeout=timeout)
        if reply.get("op") == "ready":
            layers = reply.get("sandbox")
            self.layers = [str(x) for x in layers] if isinstance(layers, list) else []
        return reply

    def _ready_or_fail(self, what: str, diagnostics: Callable[[], str]) -> None:
        """Handshake with a worker just started; if it does not answer ``ready``, stop it and
        raise :class:`WorkerError` with ``diagnostics()`` (its stderr, or how it ended)."""
        try:
            reply = self._handshake(_STARTUP_TIMEOUT_S)
        except (OSError, EOFError, TimeoutError, ValueError) as exc:
            detail = diagnostics()
            self.kill()
            raise WorkerError(
                f"{what} did not start at sandbox level {self.level!r} "
                f"({type(exc).__name__}). {detail} If the sandbox is the cause, try "
                "sandbox='process'."
            ) from None
        if reply.get("op") != "ready":
            detail = diagnostics()
            self.kill()
            raise WorkerError(f"{what} did not start: {str(reply)[:200]}. {detail}")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running code ---------------------------------------------------------------------

    def execute(self, code: str, deadline: float | None = None) -> CellResult:
        """Run one cell, serving its RPC calls, within the cell timeout and, when given, by
        ``deadline`` (a ``time.monotonic()`` value: the run's wall-time limit)."""
        self.start()
        started = time.monotonic()
        if self._has_pending_frame():
            return self._restart_after(
                code,
                started,
                "ProtocolError: the REPL sent messages between cells (model code wrote to "
                "its RPC channel), so this cell did not run.",
            )
        self._cells += 1
        cell_id = self._cells
        excluded = 0.0  # host time on model calls

        def remaining() -> float:
            now = time.monotonic()
            left = self.cell_timeout_s - (now - started - excluded)
            return left if deadline is None else min(left, deadline - now)

        self._time_left = remaining
        try:
            self._send({"op": "exec", "code": code, "cell": cell_id}, timeout=remaining())
            while True:
                message = self._read(timeout=max(remaining(), 0.0))
                op = message.get("op")
                if op == "call":
                    t0 = time.monotonic()
                    reply = self._serve(message)
                    if message.get("fn") in _MODEL_CALLS:
                        excluded += time.monotonic() - t0
                    try:
                        self._send(reply, timeout=max(remaining(), 1.0))
                    except ValueError as exc:  # a reply too large to send: the call's error
                        fn = str(message.get("fn"))[:40]
                        error = _error_reply(message.get("id"), "QueryError", f"{fn}(): {exc}")
                        self._send(error, timeout=max(remaining(), 1.0))
                elif op == "done" and message.get("cell") == cell_id:
                    return self._done(code, message, time.monotonic() - started)
                else:
                    raise ProtocolError(f"unexpected message {str(op)[:40]!r}")
        except ChannelTimeout:
            if deadline is not None and time.monotonic() >= deadline - 0.05:
                why = "the run's wall-time limit (max_wall_time_s) ran out during the cell"
            else:
                why = f"the cell ran longer than {self.cell_timeout_s:g} s"
            return self._restart_after(code, started, f"TimeoutError: {why} and it was stopped.")
        except (ChannelClosed, BrokenPipeError):
            return self._restart_after(code, started, self._death_reason())
        except ProtocolError as exc:
            return self._restart_after(
                code,
                started,
                f"ProtocolError: the REPL sent an invalid message ({exc}); model code must "
                "not write to the REPL's RPC channel.",
            )

    def _done(self, code: str, message: dict[str, Any], seconds: float) -> CellResult:
        stdout, dropped = message.get("stdout", ""), message.get("dropped_chars", 0)
        error, answer = message.get("error"), message.get("answer")
        if not isinstance(stdout, str) or type(dropped) is not int or dropped < 0:
            raise ProtocolError("malformed 'done' message")
        if error is not None and not isinstance(error, str):
            raise ProtocolError("malformed 'done' message")
        if answer is not None:
            try:
                answer = _value_from_worker(answer)
            except (TypeError, ProtocolError) as exc:
                answer = None
                error = (error + "\n" if error else "") + f"answer dict rejected: {exc}"
        # The worker's own capture limit is not trusted: the host keeps at most
        # max_capture_chars of a cell's output and of its error text, and counts the rest.
        if len(stdout) > self.max_capture_chars:
            dropped += len(stdout) - self.max_capture_chars
            stdout = stdout[: self.max_capture_chars]
        if error is not None and len(error) > self.max_capture_chars:
            hidden = len(error) - self.max_capture_chars
            error = (
                error[: self.max_capture_chars] + f"\n[error text cut: {hidden:,} more characters]"
            )
        return CellResult(
            code=code,
            output=stdout,
            error=error,
            seconds=seconds,
            dropped_chars=dropped,
            answer=answer,
        )

    def _restart_after(self, code: str, started: float, reason: str) -> CellResult:
        self.kill()
        self.restarts += 1
        self.start()
        return CellResult(
            code=code,
            output="",
            error=reason + _LOST,
            seconds=time.monotonic() - started,
            restarted=True,
        )

    def _serve(self, message: dict[str, Any]) -> dict[str, Any]:
        call_id, fn, args = message.get("id"), message.get("fn"), message.get("args")
        if type(call_id) is not int or not isinstance(fn, str) or not isinstance(args, dict):
            raise ProtocolError("malformed 'call' message")
        handler = self.handlers.get(fn)
        if handler is None:
            return _error_reply(call_id, "HostError", f"unknown function {fn[:60]!r}")
        try:
            if fn == "final" and "value" in args:
                args = {**args, "value": _value_from_worker(args["value"])}
            value = _value_for_worker(handler(args))
            return {"op": "reply", "id": call_id, "ok": True, "value": value}
        except RLMError as exc:
            reply = _error_reply(call_id, type(exc).__name__, str(exc))
            if rule := getattr(exc, "rule", None):
                reply["error"]["rule"] = rule
            # The error class model code may catch it as (ProviderOverloaded -> ModelError).
            family = next((c.__name__ for c in type(exc).__mro__ if c.__name__ in FAMILIES), None)
            if family is not None and family != type(exc).__name__:
                reply["error"]["family"] = family
            return reply
        except (TypeError, ValueError, KeyError) as exc:
            kind = "ValueError" if isinstance(exc, ProtocolError) else type(exc).__name__
            return _error_reply(call_id, kind, str(exc))
        except Exception as exc:
            log.exception("host handler %s failed", fn)
            return _error_reply(call_id, "HostError", f"{fn}() failed in the host: {exc}")

    def cell_time_left(self) -> float:
        """Seconds the running cell has left (host work it asks for, like ``sql()``, counts)."""
        remaining = getattr(self, "_time_left", None)
        return self.cell_timeout_s if remaining is None else max(remaining(), 0.0)

    def get_var(self, name: str) -> dict[str, Any]:
        """The value of a namespace variable in wire form (for text-level FINAL_VAR)."""
        self.start()
        try:
            self._send({"op": "get_var", "name": name}, timeout=_STARTUP_TIMEOUT_S)
            reply = self._read(timeout=_STARTUP_TIMEOUT_S)
            if reply.get("op") != "var":
                raise ProtocolError("unexpected reply to get_var")
            if "error" in reply:
                raise NameError(str(reply["error"]))
            return _value_from_worker(reply.get("value"))
        except (OSError, EOFError, TimeoutError, ProtocolError, TypeError) as exc:
            self.kill()
            self.restarts += 1
            raise NameError(
                f"the REPL could not return {name!r} ({type(exc).__name__}: {exc}); a fresh "
                "REPL was started. Call FINAL(value) in code instead."
            ) from None


class Worker(FramedREPL):
    """A REPL worker process with a persistent namespace, started lazily.

    ``sandbox`` is one of :data:`rlm_dagster.repl.sandbox.SANDBOX_CHOICES` (``"auto"`` picks the
    strongest level this machine has); ``limits`` are the worker's OS resource limits.
    """

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        tables: Callable[[], list[dict[str, Any]]],
        cell_timeout_s: float = 300.0,
        max_capture_chars: int = 1_000_000,
        context: Any = None,
        sandbox: str = "auto",
        limits: WorkerLimits | None = None,
    ) -> None:
        self.sandbox = check_choice(sandbox)
        self.level = resolve_level(sandbox)
        if sandbox == "auto":
            _note_auto_level(self.level)
        super().__init__(
            handlers,
            tables=tables,
            cell_timeout_s=cell_timeout_s,
            max_capture_chars=max_capture_chars,
            context=context,
        )
        self.limits = limits or WorkerLimits()
        self._proc: subprocess.Popen[bytes] | None = None
        self._drain: threading.Thread | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=50)
        _remove_stale_scratch()
        self._scratch = tempfile.TemporaryDirectory(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-")

    # -- lifecycle ------------------------------------------------------------------------

    def _start(self) -> None:
        if self._proc is not None:
            return
        policy = build_policy(self.level, self._scratch.name, self.limits)
        self._stderr.clear()
        self._proc = popen_from_keeper(
            worker_command(policy, "-m", "rlm_dagster.repl"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self._scratch.name,
            env=worker_env(self._scratch.name),
            start_new_session=True,
            close_fds=True,
        )
        assert self._proc.stdout is not None and self._proc.stderr is not None
        assert self._proc.stdin is not None
        # Non-blocking, so that a worker that stops reading cannot hang the host.
        os.set_blocking(self._proc.stdin.fileno(), False)
        self._reader = FrameReader(self._proc.stdout.fileno(), MAX_WORKER_FRAME_BYTES)
        drain = threading.Thread(target=drain_stderr, args=(self._proc, self._stderr), daemon=True)
        drain.start()
        self._drain = drain
        self._ready_or_fail("The REPL worker", self._stderr_tail)
        log.debug("REPL worker started: sandbox %s (%s)", self.level, ", ".join(self.layers))

    def _stderr_tail(self) -> str:
        tail = "\n".join(list(self._stderr)[-10:])
        return f"Worker stderr:\n{tail}" if tail else ""

    def _send(self, message: dict[str, Any], timeout: float | None) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        write_frame(self._proc.stdin.fileno(), message, timeout=timeout)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        self._reader = None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if self._drain is not None:
            self._drain.join(timeout=2)  # reads stderr to its end; then it can be closed
            self._drain = None
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def close(self) -> None:
        """Stop the worker (it keeps nothing worth a graceful exit) and delete its scratch."""
        self.kill()
        self._scratch.cleanup()

    def _has_pending_frame(self) -> bool:
        assert self._proc is not None and self._proc.stdout is not None
        if self._reader is not None and self._reader.buffered:
            return True
        with contextlib.suppress(OSError, ValueError):
            ready, _, _ = select.select([self._proc.stdout.fileno()], [], [], 0)
            return bool(ready) and self._proc.poll() is None
        return False

    def _death_reason(self) -> str:
        returncode = None
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                returncode = self._proc.wait(timeout=2)
        if self.level == "namespace" and returncode and returncode > 128:
            returncode = -(returncode - 128)  # bubblewrap reports its child's signal this way
        return death_reason(returncode, self.limits)


def popen_from_keeper(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """``Popen`` from a thread that lives as long as the process: the sandbox's "dies with
    its host" (``PR_SET_PDEATHSIG``, and bubblewrap's ``--die-with-parent``) fires when the
    *thread* that started it ends, and a worker may be started from a short-lived thread (a
    prestart, a pool thread of ``rlm_query_batched``)."""
    started: list[subprocess.Popen[bytes] | BaseException] = []
    ready = threading.Event()

    def keeper() -> None:
        try:
            proc = subprocess.Popen(argv, **kwargs)
        except BaseException as exc:
            started.append(exc)
            ready.set()
            return
        started.append(proc)
        ready.set()
        proc.wait()

    threading.Thread(target=keeper, name="rlm-worker-keeper", daemon=True).start()
    ready.wait()
    if isinstance(started[0], BaseException):
        raise started[0]
    return started[0]


def drain_stderr(proc: subprocess.Popen[bytes], lines: collections.deque[str]) -> None:
    """Keep the last lines of a worker's stderr in ``lines`` until it closes (a thread)."""
    stream = proc.stderr
    assert stream is not None
    # Bounded lines: the worker's stderr is model-controlled and may never send "\n".
    with contextlib.suppress(OSError, ValueError):
        for line in iter(lambda: stream.readline(8192), b""):
            lines.append(line.decode("utf-8", "replace").rstrip())


def worker_env(scratch: str) -> dict[str, str]:
    """A worker's whole environment: nothing inherited from the host; ``scratch`` is its
    home and temporary directory."""
    return {
        "PATH": os.defpath,
        "HOME": scratch,
        "TMPDIR": scratch,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONPATH": _PACKAGE_PARENT,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        # One BLAS/OpenMP thread: the worker's numpy needs no more, and per-thread
        # buffers would eat into the address-space limit.
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def death_reason(returncode: int | None, limits: WorkerLimits) -> str:
    """Why a worker process ended, in words for the model; ``returncode`` as ``Popen`` gives
    it (minus the signal number), ``None`` when unknown."""
    signum = -returncode if returncode is not None and returncode < 0 else None
    causes = {
        signal.SIGKILL: "killed by SIGKILL: out of memory, or killed from outside",
        signal.SIGXCPU: f"its CPU-time limit of {limits.cpu_seconds:,} s",
        signal.SIGSEGV: "a crash (SIGSEGV), e.g. recursion too deep for the C stack",
        signal.SIGXFSZ: "its file-size limit",
        signal.SIGSYS: "a system call the sandbox forbids",
    }
    if signum is not None:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        cause = causes.get(signum, f"signal {name}")  # type: ignore[call-overload]
    elif returncode is None:
        cause = "exit status unknown"
    else:
        cause = f"exit code {returncode}"
    return f"WorkerDied: the REPL process ended ({cause})."


def cut_middle(text: str, limit: int) -> str:
    """``text`` within ``limit`` characters, keeping its start and its end (an error's type
    and its last words), with a note of what was cut between them.

    >>> cut_middle("abcdefghij", 6)
    'abc\\n[... 4 characters cut ...]\\nhij'
    """
    if len(text) <= limit:
        return text
    half = max(limit // 2, 1)
    hidden = len(text) - 2 * half
    return f"{text[:half]}\n[... {hidden:,} characters cut ...]\n{text[-half:]}"


def _remove_stale_scratch() -> None:
    """Delete the scratch directories of hosts that died without cleaning up (a SIGKILLed
    Dagster step leaves its worker's scratch; the worker itself died with its host)."""
    pattern = re.compile(rf"^{_SCRATCH_PREFIX}(\d+)-")
    root = tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        match = pattern.match(name)
        if match is None or _alive(int(match.group(1))):
            continue
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


@functools.cache
def _note_auto_level(level: str) -> None:
    """Say once per process which level sandbox='auto' chose, and what a stronger one needs."""
    missing = available_levels()
    stronger = [f"{name}: {missing[name]}" for name in LEVELS[: LEVELS.index(level)]]
    log.info(
        "REPL sandbox level %r%s",
        level,
        f" (unavailable: {'; '.join(stronger)})" if stronger else "",
    )


def _value_from_worker(value: Any) -> dict[str, Any]:
    """A FINAL value from the worker in the engine's form; frames become Arrow."""
    if not isinstance(value, dict):
        raise ProtocolError("a FINAL value must be a JSON object")
    kind = value.get("kind")
    if kind == "text" and isinstance(value.get("text"), str):
        return {"kind": "text", "text": value["text"]}
    if kind == "table" and isinstance(value.get("name"), str):
        return {"kind": "table", "name": value["name"]}
    if kind == "frame":
        return {"kind": "frame", "arrow": encode_arrow(frame_to_arrow(value.get("frame")))}
    raise ProtocolError(f"unknown FINAL value kind {str(kind)[:40]!r}")


def _value_for_worker(value: Any) -> Any:
    """A handler's result in the worker's form: an Arrow table becomes a frame."""
    if isinstance(value, dict) and "arrow" in value:
        rest = {k: v for k, v in value.items() if k != "arrow"}
        return {**rest, "frame": arrow_to_frame(decode_arrow(value["arrow"]))}
    return value


def _error_reply(call_id: Any, kind: str, message: str) -> dict[str, Any]:
    return {"op": "reply", "id": call_id, "ok": False, "error": {"type": kind, "message": message}}
