"""The host's handle on a REPL worker process.

    >>> worker = Worker({"sql": lambda args: ...}, tables=lambda: [])  # doctest: +SKIP
    >>> worker.execute("x = 2\\nx * 21").output  # doctest: +SKIP
    '42\\n'

``execute`` sends a cell and then serves the worker's RPC calls (``sql``, ``llm_query`` ...)
with the host's handlers until the cell is done. The cell timeout counts only the worker's
own time, not the time the host spends answering its calls (a long ``llm_where`` is not a
runaway cell). A cell that times out or kills its worker ends in a fresh worker, and the
result says that the variables were lost.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlm_dagster.errors import RLMError, WorkerError
from rlm_dagster.repl.protocol import ChannelClosed, ChannelTimeout, FrameReader, write_frame

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Any]

_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


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


class Worker:
    """A REPL worker process with a persistent namespace, started lazily."""

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        tables: Callable[[], list[dict[str, Any]]],
        cell_timeout_s: float = 300.0,
        max_capture_chars: int = 1_000_000,
        context: Any = None,
        sandbox: str = "auto",
    ) -> None:
        self.handlers = dict(handlers)
        self.sandbox = sandbox
        self.tables = tables
        self.cell_timeout_s = cell_timeout_s
        self.max_capture_chars = max_capture_chars
        self.context = context
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: FrameReader | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=50)
        self._scratch = tempfile.TemporaryDirectory(prefix="rlm-worker-")

    # -- lifecycle ------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        """The worker's whole environment: nothing inherited from the host."""
        return {
            "PATH": os.defpath,
            "HOME": self._scratch.name,
            "TMPDIR": self._scratch.name,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "PYTHONPATH": _PACKAGE_PARENT,
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
        }

    def start(self) -> None:
        if self._proc is not None:
            return
        self._proc = subprocess.Popen(
            [sys.executable, "-s", "-B", "-m", "rlm_dagster.repl.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self._scratch.name,
            env=self._env(),
            start_new_session=True,
            close_fds=True,
        )
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._reader = FrameReader(self._proc.stdout.fileno())
        threading.Thread(target=self._drain_stderr, args=(self._proc,), daemon=True).start()
        self._send(
            {
                "op": "init",
                "tables": self.tables(),
                "max_capture": self.max_capture_chars,
                "context": self.context,
            }
        )
        reply = self._read(timeout=60.0)
        if reply.get("op") != "ready":
            raise WorkerError(f"REPL worker did not start: {reply}. {self._stderr_tail()}")

    def _drain_stderr(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for line in iter(proc.stderr.readline, b""):
            self._stderr.append(line.decode("utf-8", "replace").rstrip())

    def _stderr_tail(self) -> str:
        tail = "\n".join(list(self._stderr)[-10:])
        return f"Worker stderr:\n{tail}" if tail else ""

    def _send(self, message: dict[str, Any]) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        write_frame(self._proc.stdin.fileno(), message)

    def _read(self, timeout: float | None) -> dict[str, Any]:
        assert self._reader is not None
        return self._reader.read(timeout)

    def kill(self) -> None:
        proc, self._proc = self._proc, None
        self._reader = None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._send({"op": "shutdown"})
                self._proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
        self._scratch.cleanup()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running code ---------------------------------------------------------------------

    def execute(self, code: str) -> CellResult:
        """Run one cell, serving its RPC calls, within the cell timeout."""
        self.start()
        started = time.monotonic()
        host_time = 0.0
        self._send({"op": "exec", "code": code})
        while True:
            budget = self.cell_timeout_s - (time.monotonic() - started - host_time)
            try:
                message = self._read(timeout=max(budget, 0.0))
            except ChannelTimeout:
                return self._restart_after(
                    code,
                    started,
                    f"TimeoutError: the cell ran longer than {self.cell_timeout_s:g} s "
                    "and was stopped.",
                )
            except (ChannelClosed, ValueError) as exc:
                returncode = None
                if self._proc is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        returncode = self._proc.wait(timeout=2)
                return self._restart_after(
                    code,
                    started,
                    f"WorkerDied: the REPL process ended (exit code {returncode}, "
                    f"{type(exc).__name__}) — likely a memory, CPU or crash limit.",
                )
            op = message.get("op")
            if op == "call":
                t0 = time.monotonic()
                self._send(self._serve(message))
                host_time += time.monotonic() - t0
            elif op == "done":
                return CellResult(
                    code=code,
                    output=str(message.get("stdout", "")),
                    error=message.get("error"),
                    seconds=time.monotonic() - started,
                    dropped_chars=int(message.get("dropped_chars", 0)),
                    answer=message.get("answer"),
                )
            else:
                raise WorkerError(f"unexpected message from the REPL worker: {op!r}")

    def _restart_after(self, code: str, started: float, reason: str) -> CellResult:
        self.kill()
        self.restarts += 1
        self.start()
        return CellResult(
            code=code,
            output="",
            error=reason + " A fresh REPL was started: variables you defined are lost "
            "(tables and functions are bound again).",
            seconds=time.monotonic() - started,
            restarted=True,
        )

    def _serve(self, message: dict[str, Any]) -> dict[str, Any]:
        call_id = message.get("id")
        fn = str(message.get("fn"))
        handler = self.handlers.get(fn)
        if handler is None:
            return _error_reply(call_id, "HostError", f"unknown function {fn!r}")
        try:
            return {
                "op": "reply",
                "id": call_id,
                "ok": True,
                "value": handler(message.get("args") or {}),
            }
        except RLMError as exc:
            reply = _error_reply(call_id, type(exc).__name__, str(exc))
            if rule := getattr(exc, "rule", None):
                reply["error"]["rule"] = rule
            return reply
        except (TypeError, ValueError) as exc:
            return _error_reply(call_id, type(exc).__name__, str(exc))
        except Exception as exc:
            log.exception("host handler %s failed", fn)
            return _error_reply(call_id, "HostError", f"{fn}() failed in the host: {exc}")

    def get_var(self, name: str) -> dict[str, Any]:
        """The value of a namespace variable in wire form (for text-level FINAL_VAR)."""
        self.start()
        self._send({"op": "get_var", "name": name})
        reply = self._read(timeout=60.0)
        if "error" in reply:
            raise NameError(reply["error"])
        return dict(reply["value"])


def _error_reply(call_id: Any, kind: str, message: str) -> dict[str, Any]:
    return {"op": "reply", "id": call_id, "ok": False, "error": {"type": kind, "message": message}}
