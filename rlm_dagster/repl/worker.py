"""The REPL worker: runs model-written code in a persistent namespace, in its own process.

Started by :class:`rlm_dagster.repl.host.Worker` as ``python -m rlm_dagster.repl POLICY``
(after :mod:`rlm_dagster.repl.sandbox` has confined the process) with a scrubbed environment. It
holds no API key and no database handle: every namespace function (``sql``, ``llm_query``,
``llm_where`` ...) is a stub that sends an RPC to the host and waits for the reply. The
protocol runs on private duplicates of fds 0 and 1; the real fds 0 and 1 are pointed at
/dev/null so that printing cannot corrupt the channel. Model code that writes to the channel
on purpose can only send what the stubs send: the host checks every frame and enforces every
limit itself.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import io
import itertools
import linecache
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import pandas as pd

from rlm_dagster.repl import guard
from rlm_dagster.repl.protocol import (
    FAMILIES,
    MAX_WORKER_FRAME_BYTES,
    ChannelClosed,
    FrameReader,
    decode_frame,
    encode_frame,
    write_frame,
)
from rlm_dagster.repl.sandbox import Policy

_HERE = os.path.dirname(os.path.abspath(__file__))
# Frames of these files are the REPL's machinery, not the model's code: tracebacks omit them.
_WORKER_FILES = {os.path.join(_HERE, f) for f in ("worker.py", "guard.py", "protocol.py")}
_ERROR_TYPES: dict[str, type[Exception]] = {}
# CPython 3.11 keeps the AST validator's recursion depth per interpreter, not per thread:
# cells compiled at once in threads (the in-process double's child runs) fail with
# "SystemError: AST constructor recursion depth mismatch". One compile at a time.
_COMPILING = threading.Lock()
DISPLAY_OPTIONS: dict[str, Any] = {
    "display.max_rows": 40,
    "display.width": 200,
    "display.max_colwidth": 80,
}
"""pandas display options while model code runs: what a printed DataFrame looks like."""


class RemoteError(Exception):
    """Base of errors raised by the host in reply to a namespace call."""


def _error_type(name: str, family: str | None = None) -> type[Exception]:
    """The class model code sees for a host error called ``name``; a builtin name (ValueError,
    TypeError...) stays catchable as that builtin, and one of the namespace's error classes
    (:data:`FAMILIES`) as that class (``family``: ProviderOverloaded is a ModelError)."""
    key = f"{name}<{family}" if family in FAMILIES and family != name else name
    if key not in _ERROR_TYPES:
        builtin = getattr(builtins, name, None)
        bases: tuple[type, ...] = (RemoteError,)
        if key != name:
            bases = (_error_type(str(family)),)
        elif isinstance(builtin, type) and issubclass(builtin, Exception):
            bases = (RemoteError, builtin)
        _ERROR_TYPES[key] = type(name, bases, {})
    return _ERROR_TYPES[key]


class _Capture(io.TextIOBase):
    """A stdout stand-in that keeps at most ``limit`` characters and counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.kept = 0
        self.dropped = 0

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        room = self.limit - self.kept
        if room > 0:
            # Lone surrogates (e.g. from surrogateescape) cannot be encoded for the channel;
            # only the kept part is re-encoded, so a gigabyte print costs no second gigabyte.
            kept = s[:room].encode("utf-8", "backslashreplace").decode("utf-8")
            self.parts.append(kept)
            self.kept += min(len(s), room)
        self.dropped += max(0, len(s) - max(room, 0))
        return len(s)

    def getvalue(self) -> str:
        return "".join(self.parts)


class Channel:
    """The worker's end of the RPC channel; one call at a time, from any thread."""

    def __init__(self, reader: FrameReader, out_fd: int) -> None:
        self.reader = reader
        self.out_fd = out_fd
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        write_frame(self.out_fd, message, max_bytes=MAX_WORKER_FRAME_BYTES)

    def call(self, fn: str, **args: Any) -> Any:
        with self._lock:
            call_id = next(self._ids)
            self.send({"op": "call", "id": call_id, "fn": fn, "args": args})
            reply = self.reader.read()
        if reply.get("op") != "reply" or reply.get("id") != call_id:
            raise RuntimeError(
                f"RPC protocol error: expected reply {call_id}, got {reply.get('op')}"
            )
        if not reply.get("ok"):
            err = reply.get("error") or {}
            kind = _error_type(str(err.get("type", "HostError")), err.get("family"))
            exc = kind(str(err.get("message", "")))
            if err.get("rule"):
                exc.rule = err["rule"]  # type: ignore[attr-defined]
            raise exc
        return reply.get("value")


class Table:
    """A handle on a table of this run. ``str(handle)`` is its name, so it works in SQL:

    ``sql(f"SELECT count(*) FROM {tickets}")``.
    """

    def __init__(
        self, repl: Repl, name: str, columns: Sequence[str], types: Sequence[str], rows: int
    ) -> None:
        self._repl = repl
        self.name = name
        self.columns = list(columns)
        self.types = list(types)
        self._rows = rows
        self.provenance: Table | None = None

    def __len__(self) -> int:
        return self._rows

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        cols = ", ".join(f"{c} {t}" for c, t in zip(self.columns, self.types, strict=True))
        return f"<table {self.name}: {self._rows:,} rows; {cols}>"

    def head(self, n: int = 5) -> pd.DataFrame:
        return self._repl.sql(f'SELECT * FROM "{self.name}" LIMIT {int(n)}')

    def df(self) -> pd.DataFrame:
        return self._repl.sql(f'SELECT * FROM "{self.name}"')


class Repl:
    """The persistent namespace and the functions bound in it."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.max_capture = 1_000_000
        self.cells = itertools.count(1)
        self.namespace: dict[str, Any] = {"__name__": "__repl__", "__builtins__": __builtins__}
        self.reserved: set[str] = set()
        self.sources: dict[str, tuple[int, None, list[str], str]] = {}  # linecache entries

    # -- namespace ------------------------------------------------------------------------

    def init(self, tables: list[dict[str, Any]], max_capture: int, context: Any = None) -> None:
        self.max_capture = max_capture
        ns = self.namespace
        functions: dict[str, Callable[..., Any]] = {
            "sql": self.sql,
            "llm_query": self.llm_query,
            "llm_query_batched": self.llm_query_batched,
            "llm_where": self.llm_where,
            "rlm_query": self.rlm_query,
            "rlm_query_batched": self.rlm_query_batched,
            "FINAL": self.final,
            "FINAL_VAR": self.final_var,
            "SHOW_VARS": self.show_vars,
        }
        ns.update(functions)
        ns["answer"] = {"content": "", "ready": False}
        ns["pd"] = pd
        ns["SandboxViolation"] = guard.SandboxViolation
        for name in FAMILIES:
            ns[name] = _error_type(name)
        for t in tables:
            ns[t["name"]] = self._handle(t)
        if isinstance(context, dict) and context.get("kind") == "frame":
            context = decode_frame(context["frame"])
        if context is not None:
            ns["context"] = context
        self.reserved = set(ns)

    def _handle(self, info: dict[str, Any]) -> Table:
        return Table(self, info["name"], info["columns"], info["types"], info["rows"])

    def sql(self, query: str) -> pd.DataFrame:
        """Run read-only SQL over the bound tables and scratch results; returns a DataFrame."""
        value = self.channel.call("sql", query=str(query))
        return decode_frame(value["frame"])

    def llm_query(self, prompt: str, model: str | None = None) -> str:
        """One sub-model call; returns its text."""
        return str(self.channel.call("llm_query", prompt=str(prompt), model=model))

    def llm_query_batched(self, prompts: Sequence[str], model: str | None = None) -> list[str]:
        """Concurrent sub-calls, in order; a failed item is the string 'ERROR: <reason>'."""
        if isinstance(prompts, str):
            raise TypeError("llm_query_batched takes a list of prompts, not one string")
        return [
            str(r)
            for r in self.channel.call(
                "llm_query_batched", prompts=[str(p) for p in prompts], model=model
            )
        ]

    def llm_where(
        self,
        table: Any,
        predicate: str,
        *,
        columns: Sequence[str] | None = None,
        where: str | None = None,
        limit: int | None = None,
        dry_run: bool = False,
        batches: bool | None = None,
        recall: float | None = None,
        precision: float | None = None,
        on_miss: str | None = None,
    ) -> Table | dict[str, Any]:
        """Rows of ``table`` for which the natural-language ``predicate`` holds, as a table
        (``.provenance`` has every input row's verdict); ``dry_run=True`` returns the plan and
        its estimated cost instead, calling no model. ``batches=True`` sends the requests as
        message batches (half the price; results within 24 h, most within an hour).
        ``recall=0.95`` judges most rows with a local proxy and the model only a sample and
        the uncertain rest, keeping recall >= 0.95 with probability >= 0.95 (``precision=``
        likewise); when that cannot be certified it judges everything, or fails with
        ``on_miss="fail"``."""
        source = table.name if isinstance(table, Table) else str(table)
        info = self.channel.call(
            "llm_where",
            table=source,
            predicate=str(predicate),
            columns=list(columns) if columns is not None else None,
            where=where,
            limit=limit,
            dry_run=bool(dry_run),
            batches=batches,
            recall=recall,
            precision=precision,
            on_miss=on_miss,
        )
        if "plan" in info:
            return dict(info["plan"])
        print(info.pop("summary"))
        handle = self._handle(info)
        handle.provenance = self._handle(info["provenance"])
        return handle

    def rlm_query(self, prompt: str, context: Any = None) -> str:
        """A child RLM (its own REPL, the same tables, ``context`` as its ``context``) that
        works on ``prompt``; returns its answer. Past the depth limit, a plain llm_query."""
        return str(self.channel.call("rlm_query", prompt=str(prompt), context=_wire(context)))

    def rlm_query_batched(
        self, prompts: Sequence[str], contexts: Sequence[Any] | None = None
    ) -> list[str]:
        """Several child RLMs at once, answers in order."""
        if isinstance(prompts, str):
            raise TypeError("rlm_query_batched takes a list of prompts, not one string")
        wired = None if contexts is None else [_wire(c) for c in contexts]
        answers = self.channel.call(
            "rlm_query_batched", prompts=[str(p) for p in prompts], contexts=wired
        )
        return [str(a) for a in answers]

    def final(self, value: Any) -> None:
        """End the run with ``value``: text, a DataFrame or a table handle."""
        self.channel.call("final", value=encode_value(value))

    def final_var(self, name: str) -> None:
        """End the run with the variable called ``name``."""
        if name not in self.namespace:
            raise NameError(f"FINAL_VAR: no variable named {name!r}; SHOW_VARS() lists them")
        self.final(self.namespace[name])

    def show_vars(self) -> dict[str, str]:
        """The variables you defined, with their types."""
        return {
            k: type(v).__name__
            for k, v in self.namespace.items()
            if k not in self.reserved and not k.startswith("_")
        }

    # -- running cells --------------------------------------------------------------------

    def execute(self, code: str) -> dict[str, Any]:
        cell = next(self.cells)
        filename = f"<cell {cell}>"
        entry = (len(code), None, code.splitlines(True), filename)
        linecache.cache[filename] = self.sources[filename] = entry
        capture = _Capture(self.max_capture)
        error = None
        with self.output_to(capture):
            try:
                # compile() rather than ast.parse(): a SyntaxError then carries no stdlib frame
                with _COMPILING:
                    tree = cast(ast.Module, compile(code, filename, "exec", ast.PyCF_ONLY_AST))
                    last = (
                        tree.body.pop()
                        if tree.body and isinstance(tree.body[-1], ast.Expr)
                        else None
                    )
                    body = compile(tree, filename, "exec")
                exec(body, self.namespace)
                if isinstance(last, ast.Expr):
                    with _COMPILING:
                        expr = compile(ast.Expression(last.value), filename, "eval")
                    value = eval(expr, self.namespace)
                    if value is not None:
                        print(repr(value))
            except BaseException as exc:  # model code may raise anything, SystemExit included
                error = self.format_error(exc)
        result: dict[str, Any] = {
            "op": "done",
            "stdout": capture.getvalue(),
            "dropped_chars": capture.dropped,
            "error": error,
        }
        answer = self.namespace.get("answer")
        if isinstance(answer, dict) and answer.get("ready") is True:
            answer["ready"] = False
            try:
                result["answer"] = encode_value(answer.get("content", ""))
            except Exception as exc:
                result["error"] = (error or "") + self.format_error(exc)
        return result

    @contextlib.contextmanager
    def output_to(self, capture: _Capture) -> Iterator[None]:
        """Send what a cell prints (stdout and stderr) to ``capture`` while it runs. The
        worker process prints nothing else, so this swaps ``sys.stdout`` and ``sys.stderr``."""
        old_out, old_err = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = capture
        try:
            yield
        finally:
            sys.stdout, sys.stderr = old_out, old_err

    def format_error(self, exc: BaseException) -> str:
        """:func:`format_error`, quoting this namespace's cells (a process holding several
        namespaces, like the tests' in-process double, shares one ``linecache``)."""
        linecache.cache.update(self.sources)
        return format_error(exc)

    def get_var(self, name: str) -> dict[str, Any]:
        if name not in self.namespace:
            return {"op": "var", "error": f"no variable named {name!r}"}
        try:
            return {"op": "var", "value": encode_value(self.namespace[name])}
        except Exception as exc:
            return {"op": "var", "error": self.format_error(exc)}


def _wire(context: Any) -> Any:
    """A child's context as it can travel: JSON values, or a DataFrame as a frame."""
    if isinstance(context, pd.DataFrame):
        return {"kind": "frame", "frame": encode_frame(context)}
    return context


def encode_value(value: Any) -> dict[str, Any]:
    """A final answer in wire form: text, a frame (Arrow) or a table name."""
    if isinstance(value, Table):
        return {"kind": "table", "name": value.name}
    if isinstance(value, pd.Series):
        value = value.to_frame()
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        value = pd.DataFrame(value)
    if isinstance(value, pd.DataFrame):
        return {"kind": "frame", "frame": encode_frame(value)}
    return {"kind": "text", "text": value if isinstance(value, str) else str(value)}


def format_error(exc: BaseException, max_lines: int = 12) -> str:
    """The last lines of the traceback, without the worker's own frames."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if os.path.abspath(f.filename) not in _WORKER_FILES
    ]
    lines = traceback.format_list(frames)
    lines += traceback.format_exception_only(type(exc), exc)
    text = "".join(lines).rstrip().splitlines()
    if len(text) > max_lines:
        text = ["...", *text[-max_lines:]]
    return "Traceback (most recent call last):\n" + "\n".join(text) if frames else "\n".join(text)


def main(policy_json: str) -> None:
    """Serve the host until it closes the channel or kills the process; ``policy_json`` is
    the sandbox policy."""
    policy = Policy.from_json(policy_json)
    del sys.argv[1:]
    in_fd, out_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    sys.stdin = open(os.devnull)  # noqa: SIM115 - lives as long as the process
    reader = FrameReader(in_fd)
    channel = Channel(reader, out_fd)
    repl = Repl(channel)
    for option, value in DISPLAY_OPTIONS.items():
        pd.set_option(option, value)
    guard.install(policy, protected_fds=(in_fd, out_fd))
    serve(reader, channel, repl, layers=[*policy.applied, "audit hooks"])


def serve(reader: FrameReader, channel: Channel, repl: Repl, layers: list[str]) -> None:
    """Answer the host's frames until it closes the channel: ``init``, ``exec`` and
    ``get_var``. ``layers`` are the confinement layers the ``ready`` reply reports.

    The worker process runs this after its guard is installed; the tests' in-process double
    (:mod:`rlm_dagster.repl.inprocess`) runs it in a thread, with neither guard nor sandbox.
    """
    while True:
        try:
            message = reader.read()
        except ChannelClosed:
            return
        op = message.get("op")
        if op == "init":
            repl.init(message["tables"], int(message["max_capture"]), message.get("context"))
            channel.send({"op": "ready", "pid": os.getpid(), "sandbox": layers})
        elif op == "exec":
            result = repl.execute(str(message["code"]))
            result["cell"] = message.get("cell")
            try:
                channel.send(result)
            except ValueError as exc:  # an answer dict too large to send
                result.pop("answer", None)
                result["error"] = (result["error"] or "") + f"\nanswer dict not sent: {exc}"
                channel.send(result)
        elif op == "get_var":
            var = repl.get_var(str(message["name"]))
            try:
                channel.send(var)
            except ValueError as exc:
                channel.send({"op": "var", "error": str(exc)})
        elif op == "reply":
            continue  # a late reply to a call model code wrote to the channel itself
        else:
            channel.send({"op": "error", "message": f"unknown op {op!r}"})
