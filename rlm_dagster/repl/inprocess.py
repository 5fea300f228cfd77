"""An in-process REPL for engine tests. NOT a sandbox: never use it for model-written code.

    >>> from rlm_dagster.repl.inprocess import InProcessREPL
    >>> run_rlm("q", warehouse=wh, lm=lm, repl=InProcessREPL)  # doctest: +SKIP

:class:`InProcessREPL` is a :class:`~rlm_dagster.repl.seam.REPLFactory` for tests whose cells
are the test's own, trusted code. It saves the cost of a worker process per run and keeps
everything else the engine can see: the worker's own namespace and cell loop
(:func:`rlm_dagster.repl.worker.serve`, so the same table handles, ``sql``, ``llm_query``,
``llm_where``, ``rlm_query``, ``FINAL``, ``SHOW_VARS``, ``answer`` and ``context``, the same
printed-output capture and cap, the same error text) and the host's side of the protocol
(:class:`rlm_dagster.repl.host.FramedREPL`, so the same frame checks and the same
:class:`~rlm_dagster.repl.host.CellResult`). The two talk in frames over a pair of pipes, the
worker's loop in a thread of the test process.

What it does not do, and where tests of those must use the real
:class:`~rlm_dagster.repl.host.Worker`:

- No sandbox at all: no audit-hook guard (:func:`rlm_dagster.repl.guard.install` is
  process-wide and cannot be undone, so it never runs here), no import blocking, no
  seccomp, Landlock or namespaces, no resource limits, no private scratch directory or
  environment. Cells run with the test process's rights, files, environment and working
  directory, and can change its global state.
- No cell timeout: a thread cannot be stopped, so the double waits for the cell (``sql()``
  is still interrupted when the cell's time runs out, since that is the host's DuckDB). A cell
  that sends nothing for ``stuck_after_s`` fails the test with :class:`CellStuck` and is left
  running in its daemon thread. Timeouts, the wall-time limit inside a cell, memory limits,
  crashes and worker restarts are the real worker's to test.
- Output printed by threads that a cell starts goes to the test's stdout, not to the cell's
  capture (the real worker captures every thread of its process).
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn

import pandas as pd

from rlm_dagster.repl.host import FramedREPL, Handler
from rlm_dagster.repl.protocol import (
    MAX_WORKER_FRAME_BYTES,
    ChannelTimeout,
    FrameReader,
    write_frame,
)
from rlm_dagster.repl.sandbox import WorkerLimits
from rlm_dagster.repl.worker import DISPLAY_OPTIONS, Channel, Repl, _Capture, serve

__all__ = ["LEVEL", "CellStuck", "InProcessREPL"]

LEVEL = "in-process (tests only, not a sandbox)"
_STUCK_AFTER_S = 120.0
_JOIN_S = 5.0


class CellStuck(RuntimeError):
    """An in-process cell sent nothing for too long; the double cannot stop it."""


class InProcessREPL(FramedREPL):
    """A REPL whose cells run in a thread of this process: for engine tests only.

    Never use it for model-written code: it is not a sandbox (see the module's docstring).
    Its arguments are :class:`~rlm_dagster.repl.host.Worker`'s; ``sandbox`` and ``limits``
    are accepted and ignored, and ``cell_timeout_s`` only bounds the time ``sql()`` gets.
    """

    level = LEVEL

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        tables: Callable[[], list[dict[str, Any]]],
        cell_timeout_s: float = 300.0,
        max_capture_chars: int = 1_000_000,
        context: Any = None,
        sandbox: str = "process",
        limits: WorkerLimits | None = None,
        stuck_after_s: float = _STUCK_AFTER_S,
    ) -> None:
        super().__init__(
            handlers,
            tables=tables,
            cell_timeout_s=cell_timeout_s,
            max_capture_chars=max_capture_chars,
            context=context,
        )
        self.sandbox = sandbox
        self.limits = limits
        self.stuck_after_s = stuck_after_s
        self._thread: threading.Thread | None = None
        self._write_fd: int | None = None
        self._failure: list[BaseException] = []

    # -- the transport --------------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is not None:
            return
        host_in, worker_out = os.pipe()
        worker_in, host_out = os.pipe()
        os.set_blocking(host_out, False)  # as for the process: sends time out, never hang
        self._reader = FrameReader(host_in, MAX_WORKER_FRAME_BYTES)
        self._write_fd = host_out
        self._failure = []
        self._thread = threading.Thread(
            target=_run_worker,
            args=(worker_in, worker_out, self._failure),
            name="rlm-inprocess-repl",
            daemon=True,
        )
        self._thread.start()
        try:
            reply = self._handshake(self.stuck_after_s)
        except BaseException:
            self.kill()
            raise
        if reply.get("op") != "ready":
            self.kill()
            raise RuntimeError(f"the in-process REPL did not start: {reply}")

    def _kill(self) -> None:
        """Close the host's ends of the pipes: an idle cell loop ends; a running cell is left
        to finish (it cannot be stopped) and its thread ends when it next uses the channel."""
        thread, self._thread = self._thread, None
        reader, self._reader = self._reader, None
        write_fd, self._write_fd = self._write_fd, None
        for fd in (write_fd, reader.fd if reader is not None else None):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if thread is not None:
            thread.join(timeout=_JOIN_S)

    def close(self) -> None:
        self.kill()

    def _send(self, message: dict[str, Any], timeout: float | None) -> None:
        assert self._write_fd is not None
        try:
            write_frame(self._write_fd, message, timeout=self.stuck_after_s)
        except ChannelTimeout:
            self._stuck()

    def _read(self, timeout: float | None) -> dict[str, Any]:
        # The cell's own timeout is not enforced: the thread could not be stopped at it.
        assert self._reader is not None
        try:
            return self._reader.read(self.stuck_after_s)
        except ChannelTimeout:
            self._stuck()

    def _stuck(self) -> NoReturn:
        self.kill()
        raise CellStuck(
            f"the in-process REPL's cell sent nothing for {self.stuck_after_s:g} s. The "
            "in-process double cannot stop a cell (it is left running in a daemon thread): "
            "test timeouts with the real Worker."
        )

    def _has_pending_frame(self) -> bool:
        if self._reader is None:
            return False
        if self._reader.buffered:
            return True
        with contextlib.suppress(OSError, ValueError):
            ready, _, _ = select.select([self._reader.fd], [], [], 0)
            return bool(ready) and self._thread is not None and self._thread.is_alive()
        return False

    def _death_reason(self) -> str:
        if self._thread is not None:
            self._thread.join(timeout=_JOIN_S)
        why = f"{type(self._failure[0]).__name__}: {self._failure[0]}" if self._failure else "?"
        return f"WorkerDied: the in-process REPL's thread ended ({why})."


def _run_worker(in_fd: int, out_fd: int, failure: list[BaseException]) -> None:
    """The worker's cell loop on this thread's ends of the pipes, until the host closes its
    ends (the loop returns) or a send finds them closed (``BrokenPipeError``)."""
    try:
        reader = FrameReader(in_fd)
        channel = Channel(reader, out_fd)
        serve(reader, channel, _ThreadRepl(channel), layers=[])
    except BaseException as exc:  # the host sees the channel close; _death_reason says why
        failure.append(exc)
    finally:
        for fd in (in_fd, out_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class _ThreadRepl(Repl):
    """The worker's namespace, capturing only what its own thread prints."""

    @contextlib.contextmanager
    def output_to(self, capture: _Capture) -> Iterator[None]:
        with _cell_output(capture):
            yield


# -- printed output, per thread -----------------------------------------------------------------

_lock = threading.Lock()
_captures: dict[int, _Capture] = {}  # thread id -> the capture of the cell it runs
_saved: dict[str, Any] = {}  # what the first running cell replaced, restored by the last


class _PerThread:
    """Stands in for ``sys.stdout`` or ``sys.stderr`` while in-process cells run: a cell's
    thread writes to its cell's capture, every other thread (pytest's, the engine's, other
    tests') to the stream that was there before. It has no methods of its own, so the
    capture's ``write`` is what a cell calls: its errors read as in the real worker."""

    def __init__(self, fallback: Any) -> None:
        self._fallback = fallback

    def __getattr__(self, name: str) -> Any:
        return getattr(_captures.get(threading.get_ident(), self._fallback), name)


@contextlib.contextmanager
def _cell_output(capture: _Capture) -> Iterator[None]:
    """While a cell runs: its thread's output to ``capture`` and the worker's pandas display
    options. The first cell to start installs both (process-wide), the last to end restores
    what was there, so concurrent cells (child runs) and pytest's own capture keep working."""
    me = threading.get_ident()
    with _lock:
        if not _captures:
            _saved.update(
                stdout=sys.stdout,
                stderr=sys.stderr,
                options={name: pd.get_option(name) for name in DISPLAY_OPTIONS},
            )
            sys.stdout = _PerThread(sys.stdout)
            sys.stderr = _PerThread(sys.stderr)
            for name, value in DISPLAY_OPTIONS.items():
                pd.set_option(name, value)
        _captures[me] = capture
    try:
        yield
    finally:
        with _lock:
            del _captures[me]
            if not _captures:
                # Leave a stream someone else installed meanwhile where it is.
                if isinstance(sys.stdout, _PerThread):
                    sys.stdout = _saved["stdout"]
                if isinstance(sys.stderr, _PerThread):
                    sys.stderr = _saved["stderr"]
                for name, value in _saved["options"].items():
                    pd.set_option(name, value)
                _saved.clear()
