"""Fresh sandboxed REPL workers in milliseconds: a fork server for child runs.

    >>> server = ForkServer(sandbox="auto")                      # doctest: +SKIP
    >>> repl = server(handlers, tables=..., cell_timeout_s=300,  # doctest: +SKIP
    ...               max_capture_chars=100_000, context=None, sandbox="auto", limits=None)
    >>> repl.execute("1 + 1").output                             # doctest: +SKIP

A :class:`~rlm_dagster.repl.host.Worker` starts two interpreters and imports pandas: about
0.4 s of CPU before the first cell, which is what a child RLM (``rlm_query``,
``rlm_query_batched``) cost on top of its model calls. A :class:`ForkServer` starts one
confined process (:mod:`rlm_dagster.repl.zygote`) the same way, once per run, and each child's
REPL is a fork of it (:class:`ForkedWorker`): the same sandbox level, OS limits and audit
hooks as a worker started from scratch, a fresh namespace, a copy of an interpreter that
never ran model code, and its own directory under the server's scratch.

What differs from separate workers, and is stated in the README's "Security model": the
children of one run share the fork server's namespaces (at level ``namespace``) and its
scratch directory, as they are the same run's code; seccomp keeps each from signalling,
tracing or starting any other process.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from rlm_dagster.errors import WorkerError
from rlm_dagster.repl.host import (
    _SCRATCH_PREFIX,
    _STARTUP_TIMEOUT_S,
    FramedREPL,
    Handler,
    Worker,
    _remove_stale_scratch,
    death_reason,
    drain_stderr,
    popen_from_keeper,
    worker_env,
)
from rlm_dagster.repl.protocol import MAX_WORKER_FRAME_BYTES, FrameReader, write_frame
from rlm_dagster.repl.sandbox import (
    WorkerLimits,
    build_policy,
    check_choice,
    resolve_level,
    worker_command,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Child:
    id: int
    write_fd: int  # the host's end of the pipe the child reads
    read_fd: int  # the host's end of the pipe the child writes
    directory: str


class ForkServer:
    """A :class:`~rlm_dagster.repl.seam.REPLFactory` whose REPLs are forks of one confined
    process, started on first use; thread-safe. ``sandbox`` and ``limits`` are those of
    every REPL it makes (the arguments of the same name in each call are the run's, and
    equal). If the fork server cannot start, it says why in the log and makes plain
    :class:`~rlm_dagster.repl.host.Worker` processes instead."""

    def __init__(self, *, sandbox: str = "auto", limits: WorkerLimits | None = None) -> None:
        self.sandbox = check_choice(sandbox)
        self.level = resolve_level(sandbox)
        self.limits = limits or WorkerLimits()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._ids = itertools.count(1)
        self._stderr: collections.deque[str] = collections.deque(maxlen=50)
        self._failed: str | None = None
        self._closed = False
        _remove_stale_scratch()
        self._scratch = tempfile.TemporaryDirectory(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-")

    def __call__(
        self,
        handlers: Mapping[str, Handler],
        *,
        tables: Callable[[], list[dict[str, Any]]],
        cell_timeout_s: float,
        max_capture_chars: int,
        context: Any,
        sandbox: str = "auto",
        limits: WorkerLimits | None = None,
    ) -> FramedREPL:
        common: dict[str, Any] = {
            "tables": tables,
            "cell_timeout_s": cell_timeout_s,
            "max_capture_chars": max_capture_chars,
            "context": context,
        }
        if self._failed is not None:
            return Worker(handlers, sandbox=self.sandbox, limits=self.limits, **common)
        return ForkedWorker(self, handlers, **common)

    # -- the fork server process ----------------------------------------------------------

    def _start(self) -> socket.socket:
        """The control socket of a running fork server (started now if needed); lock held."""
        if self._closed:
            raise WorkerError("The fork server was closed with its run; start a new run.")
        if self._proc is not None and self._control is not None:
            return self._control
        host_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        policy = replace(build_policy(self.level, self._scratch.name, self.limits), zygote=True)
        self._stderr.clear()
        try:
            args = ["-m", "rlm_dagster.repl.zygote", str(server_end.fileno())]
            self._proc = popen_from_keeper(
                worker_command(policy, *args),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                cwd=self._scratch.name,
                env=worker_env(self._scratch.name),
                start_new_session=True,
                close_fds=True,
                pass_fds=(server_end.fileno(),),
            )
        finally:
            server_end.close()
        drain = threading.Thread(target=drain_stderr, args=(self._proc, self._stderr), daemon=True)
        drain.start()
        self._control = host_end
        host_end.settimeout(_STARTUP_TIMEOUT_S)
        try:
            reply = self._receive()
        except (OSError, ValueError) as exc:
            reply = {"op": "failed", "error": f"{type(exc).__name__}: {exc}"}
        if reply.get("op") != "ready":
            self._stop()
            tail = "\n".join(list(self._stderr)[-10:])
            self._failed = (
                f"The REPL fork server did not start at sandbox level {self.level!r} "
                f"({reply}). Worker stderr:\n{tail}"
            )
            log.warning("%s\nChild runs start their own worker processes instead.", self._failed)
            raise WorkerError(self._failed)
        log.debug("REPL fork server started: sandbox %s", self.level)
        return host_end

    def warm(self) -> None:
        """Start the fork server now (a run that may have children calls this in the
        background as it starts, so the first child does not wait for it)."""
        with self._lock, contextlib.suppress(WorkerError):
            self._start()

    def _receive(self) -> dict[str, Any]:
        assert self._control is not None
        data = self._control.recv(65536)
        if not data:
            raise ConnectionError("the fork server closed its socket")
        message = json.loads(data)
        if not isinstance(message, dict):
            raise ValueError("not a JSON object")
        return message

    def _request(self, message: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any]:
        """One request and its reply; a fork server that fails is stopped (with every child
        it forked) and the error raised as a :class:`WorkerError`."""
        with self._lock:
            control = self._start()
            try:
                socket.send_fds(control, [json.dumps(message).encode()], fds or [])
                reply = self._receive()
            except (OSError, ValueError) as exc:
                self._stop()
                tail = "\n".join(list(self._stderr)[-10:])
                raise WorkerError(
                    f"The REPL fork server failed ({type(exc).__name__}: {exc}); the next "
                    f"child starts a new one. Fork server stderr:\n{tail}"
                ) from None
        if reply.get("op") == "error":
            raise WorkerError(f"The REPL fork server refused a request: {reply.get('message')}")
        return reply

    def spawn(self) -> _Child:
        """Fork a fresh worker; the caller owns the returned pipe ends."""
        child_id = next(self._ids)
        directory = os.path.join(self._scratch.name, f"child-{child_id}")
        os.mkdir(directory, 0o700)
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            self._request(
                {"op": "spawn", "id": child_id, "dir": directory}, [to_child_r, from_child_w]
            )
        except BaseException:
            for fd in (to_child_w, from_child_r):
                os.close(fd)
            shutil.rmtree(directory, ignore_errors=True)
            raise
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        return _Child(child_id, to_child_w, from_child_r, directory)

    def reap(self, child: _Child) -> int | None:
        """Kill the child if it runs and wait for it: its return code (``-signal`` when a
        signal ended it), ``None`` when the fork server no longer knows it."""
        try:
            reply = self._request({"op": "reap", "id": child.id})
        except WorkerError:
            return None
        code = reply.get("returncode")
        return code if type(code) is int else None

    def _stop(self) -> None:
        """Kill the fork server and every child it forked; lock held."""
        proc, self._proc = self._proc, None
        control, self._control = self._control, None
        if control is not None:
            control.close()
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            if proc.stderr is not None:
                with contextlib.suppress(OSError):
                    proc.stderr.close()

    def close(self) -> None:
        """Stop the fork server and its children, and delete its scratch."""
        with self._lock:
            self._closed = True
            self._stop()
        self._scratch.cleanup()

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ForkedWorker(FramedREPL):
    """A REPL in a process forked by a :class:`ForkServer`; it behaves as a
    :class:`~rlm_dagster.repl.host.Worker` does (a cell that times out or kills it ends in a
    fresh fork)."""

    def __init__(
        self,
        server: ForkServer,
        handlers: Mapping[str, Handler],
        *,
        tables: Callable[[], list[dict[str, Any]]],
        cell_timeout_s: float,
        max_capture_chars: int,
        context: Any,
    ) -> None:
        super().__init__(
            handlers,
            tables=tables,
            cell_timeout_s=cell_timeout_s,
            max_capture_chars=max_capture_chars,
            context=context,
        )
        self.server = server
        self.level = server.level
        self.limits = server.limits
        self._child: _Child | None = None
        self._returncode: int | None = None
        self._reaped = False

    def _start(self) -> None:
        if self._child is not None:
            return
        self._child = self.server.spawn()
        self._reaped = False
        os.set_blocking(self._child.write_fd, False)
        self._reader = FrameReader(self._child.read_fd, MAX_WORKER_FRAME_BYTES)
        self._ready_or_fail("A forked REPL worker", self._death_reason)

    def _send(self, message: dict[str, Any], timeout: float | None) -> None:
        assert self._child is not None
        write_frame(self._child.write_fd, message, timeout=timeout)

    def _reap(self) -> int | None:
        if self._child is not None and not self._reaped:
            self._returncode = self.server.reap(self._child)
            self._reaped = True
        return self._returncode

    def _kill(self) -> None:
        child = self._child
        if child is None:
            return
        self._reap()
        self._child, self._reader = None, None
        for fd in (child.write_fd, child.read_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(child.directory, ignore_errors=True)

    def close(self) -> None:
        self.kill()

    def _has_pending_frame(self) -> bool:
        assert self._child is not None
        if self._reader is not None and self._reader.buffered:
            return True
        with contextlib.suppress(OSError, ValueError):
            ready, _, _ = select.select([self._child.read_fd], [], [], 0)
            if ready:
                # Readable between cells: a frame model code wrote, or the end of a process
                # that died (then the next send fails and says how it died).
                os.set_blocking(self._child.read_fd, False)
                try:
                    return bool(os.read(self._child.read_fd, 1))
                except BlockingIOError:
                    return False
                finally:
                    os.set_blocking(self._child.read_fd, True)
        return False

    def _death_reason(self) -> str:
        return death_reason(self._reap(), self.limits)
