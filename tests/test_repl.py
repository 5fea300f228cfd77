"""Tests for the REPL worker process and its RPC channel, through the host's ``Worker``.

The handlers are the host side of ``sql()``, ``llm_query()``, ``FINAL()`` ...: here a real
in-memory ``Warehouse`` answers ``sql`` and plain functions stand in for the model calls.
Starting a worker costs about a second (pandas import), so most tests share one worker
(``shared``) and use variable names of their own; tests that kill or time out a worker use
``fragile``.
"""

from __future__ import annotations

import os
import resource
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from rlm_dagster.errors import (
    BudgetExceeded,
    ModelError,
    ModelRefused,
    QueryError,
    SQLPolicyError,
    UnknownTableError,
)
from rlm_dagster.repl.forkserver import ForkServer
from rlm_dagster.repl.host import CellResult, FramedREPL, Worker
from rlm_dagster.repl.protocol import (
    ProtocolError,
    arrow_to_frame,
    decode_arrow,
    decode_frame,
    encode_arrow,
    encode_frame,
    frame_to_arrow,
)
from rlm_dagster.sql.warehouse import Warehouse

MAX_CAPTURE = 2_000


class Host:
    """Host-side handlers over a small warehouse; records what the worker asked for."""

    def __init__(self) -> None:
        self.wh = Warehouse.from_frames(
            {
                "tickets": pd.DataFrame(
                    {
                        "ticket_id": [1, 2, 3],
                        "body": ["refund please", "app crashes", "love it"],
                    }
                )
            }
        )
        self.finals: list[dict[str, Any]] = []
        self.prompts: list[str] = []
        self.host_sleep_s = 0.0

    def tables(self) -> list[dict[str, Any]]:
        return [
            {"name": t.name, "columns": list(t.columns), "types": list(t.types), "rows": t.rows}
            for t in self.wh.bound_tables()
        ]

    def sql(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"arrow": encode_arrow(self.wh.query(args["query"], max_rows=10))}

    def llm_query(self, args: dict[str, Any]) -> str:
        prompt = args["prompt"]
        if not prompt:
            raise ValueError("llm_query() needs a non-empty prompt")
        if self.host_sleep_s:
            time.sleep(self.host_sleep_s)
        self.prompts.append(prompt)
        return f"answer to {prompt}"

    def llm_query_batched(self, args: dict[str, Any]) -> list[str]:
        raise RuntimeError("connection pool exploded")

    def final(self, args: dict[str, Any]) -> None:
        self.finals.append(args["value"])

    def handlers(self) -> dict[str, Any]:
        # No "llm_where" handler on purpose: calling it is an unknown RPC function.
        return {
            "sql": self.sql,
            "llm_query": self.llm_query,
            "llm_query_batched": self.llm_query_batched,
            "final": self.final,
        }


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    h = Host()
    yield h
    h.wh.close()


@pytest.fixture(scope="module", params=["worker", "forked"])
def make_repl(request: pytest.FixtureRequest) -> Iterator[Callable[..., FramedREPL]]:
    """Every test of ``shared`` and ``fragile`` runs against a worker process of its own and
    against a fork of a fork server (what child runs use): they must behave alike."""
    if request.param == "worker":
        yield Worker
        return
    with ForkServer() as server:

        def forked(handlers: Any, **kwargs: Any) -> FramedREPL:
            kwargs.setdefault("cell_timeout_s", 300.0)
            kwargs.setdefault("max_capture_chars", 1_000_000)
            return server(handlers, context=None, **kwargs)

        yield forked


@pytest.fixture(scope="module")
def shared(host: Host, make_repl: Callable[..., FramedREPL]) -> Iterator[FramedREPL]:
    with make_repl(host.handlers(), tables=host.tables, max_capture_chars=MAX_CAPTURE) as worker:
        yield worker


@pytest.fixture(scope="module")
def fragile(host: Host, make_repl: Callable[..., FramedREPL]) -> Iterator[FramedREPL]:
    with make_repl(host.handlers(), tables=host.tables, cell_timeout_s=1.0) as worker:
        yield worker


def ok(worker: FramedREPL, code: str) -> CellResult:
    result = worker.execute(code)
    assert result.error is None, result.error
    assert not result.restarted
    return result


# -- namespace, echo, capture --------------------------------------------------------------


def test_namespace_persists_across_cells(shared: FramedREPL) -> None:
    ok(shared, "import math\npersist_a = 20\ndef persist_inc(v):\n    return v + 1")
    ok(shared, "persist_b = persist_inc(persist_a)")
    assert ok(shared, "persist_b * 2").output == "42\n"
    assert ok(shared, "math.floor(persist_b / 2)").output == "10\n"


def test_last_expression_is_echoed_with_repr(shared: FramedREPL) -> None:
    assert ok(shared, "echo_x = 5\necho_x").output == "5\n"
    assert ok(shared, "'hi'").output == "'hi'\n"
    assert ok(shared, "print('first')\n[1, 2]").output == "first\n[1, 2]\n"
    assert ok(shared, "None").output == ""
    assert ok(shared, "echo_y = 7").output == ""  # an assignment is not echoed
    assert ok(shared, "for i in range(2):\n    i").output == ""  # nor a loop's body


def test_stdout_and_stderr_are_captured(shared: FramedREPL) -> None:
    result = ok(
        shared,
        "import sys\nfor i in range(3):\n    print('line', i)\nprint('warn', file=sys.stderr)",
    )
    assert result.output == "line 0\nline 1\nline 2\nwarn\n"
    assert result.dropped_chars == 0


def test_output_beyond_max_capture_is_cut_and_counted(shared: FramedREPL) -> None:
    result = ok(shared, "print('x' * 5000)\nprint('tail')")
    assert result.output == "x" * MAX_CAPTURE
    assert result.dropped_chars == 5000 + 1 + len("tail\n") - MAX_CAPTURE
    small = ok(shared, "print('small')")  # the limit is per cell
    assert (small.output, small.dropped_chars) == ("small\n", 0)


def test_show_vars_lists_only_user_variables(shared: FramedREPL) -> None:
    ok(shared, "showvars_frame = pd.DataFrame({'a': [1]})\n_private = 1")
    out = ok(shared, "SHOW_VARS()").output
    assert "'showvars_frame': 'DataFrame'" in out
    assert "_private" not in out
    assert "'sql'" not in out
    assert "'tickets'" not in out


# -- errors --------------------------------------------------------------------------------


def test_error_shows_cell_source_and_exception_without_worker_frames(shared: FramedREPL) -> None:
    ok(shared, "def err_div(x):\n    return 1 / x")
    result = shared.execute("err_total = 1\nerr_div(0)")
    assert not result.restarted
    error = result.error
    assert error is not None
    assert 'File "<cell' in error
    assert "err_div(0)" in error  # the failing line of this cell
    assert "return 1 / x" in error  # and of the cell that defined the function
    assert error.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "worker.py" not in error
    assert "rlm_dagster" not in error
    assert ok(shared, "err_total").output == "1\n"  # statements before the error ran


def test_long_traceback_keeps_the_tail(shared: FramedREPL) -> None:
    result = shared.execute("def deep(n):\n    return deep(n - 1) if n else 1 / 0\ndeep(50)")
    assert result.error is not None
    lines = result.error.splitlines()
    assert lines[-1] == "ZeroDivisionError: division by zero"
    assert "..." in lines
    assert len(lines) <= 14


def test_syntax_error_shows_no_internal_frames(shared: FramedREPL) -> None:
    result = shared.execute("syntax_x = 1 +")
    assert result.error is not None
    assert "SyntaxError" in result.error
    assert "syntax_x = 1 +" in result.error
    assert ".py" not in result.error


def test_sys_exit_is_an_error_not_a_dead_worker(shared: FramedREPL) -> None:
    ok(shared, "exit_kept = 'still here'")
    result = shared.execute("import sys\nsys.exit(3)")
    assert not result.restarted
    assert result.error is not None
    assert "SystemExit: 3" in result.error
    assert ok(shared, "exit_kept").output == "'still here'\n"


def test_writes_to_fd_1_do_not_corrupt_the_channel(shared: FramedREPL) -> None:
    result = ok(
        shared,
        "import os, sys\n"
        "os.write(1, b'garbage\\x00\\x00\\x00\\x10{not json')\n"
        "os.write(1, b'x' * 100_000)\n"
        "os.write(2, b'stderr garbage')\n"
        "sys.__stdout__.write('more garbage'); sys.__stdout__.flush()\n"
        "print('after')",
    )
    assert result.output == "after\n"
    assert ok(shared, "6 * 7").output == "42\n"


def test_printing_a_lone_surrogate_does_not_kill_the_worker(fragile: FramedREPL) -> None:
    fragile.execute("surrogate_kept = 1")
    result = fragile.execute("print('bad \\udcff byte')")
    assert not result.restarted, result.error
    assert fragile.execute("surrogate_kept").output == "1\n"


# -- RPC -----------------------------------------------------------------------------------


def test_sql_round_trips_a_dataframe(shared: FramedREPL) -> None:
    out = ok(
        shared,
        "rpc_df = sql('SELECT ticket_id FROM tickets ORDER BY 1')\nrpc_df['ticket_id'].tolist()",
    )
    assert out.output == "[1, 2, 3]\n"
    assert ok(shared, "type(rpc_df).__name__").output == "'DataFrame'\n"


def test_host_policy_error_is_catchable_by_its_class_name(shared: FramedREPL) -> None:
    code = (
        "try:\n"
        "    sql('DROP TABLE tickets')\n"
        "except SQLPolicyError as exc:\n"
        "    caught = (type(exc).__name__, str(exc))\n"
        "caught"
    )
    out = ok(shared, code).output
    assert out.startswith("('SQLPolicyError', '[read-only]")
    uncaught = shared.execute("sql('DROP TABLE tickets')")
    assert uncaught.error is not None
    assert "SQLPolicyError: [read-only]" in uncaught.error
    assert "sql('DROP TABLE tickets')" in uncaught.error
    assert "worker.py" not in uncaught.error


def test_host_query_error_is_catchable_and_distinct(shared: FramedREPL) -> None:
    code = (
        "try:\n"
        "    sql('SELECT * FROM range(100)')\n"
        "except SQLPolicyError:\n"
        "    which = 'policy'\n"
        "except QueryError as exc:\n"
        "    which = 'query: ' + str(exc)\n"
        "which"
    )
    out = ok(shared, code).output
    assert out.startswith("'query: sql() result has more than 10 rows")


def test_any_rlm_error_from_a_handler_keeps_its_class_name() -> None:
    # The namespace binds the common error classes; a raising handler must map onto them.
    errors: dict[str, Exception] = {
        "policy": SQLPolicyError("read-only", "no writes"),
        "query": QueryError("bad column"),
        "table": UnknownTableError("no table named 'x'"),
        "budget": BudgetExceeded("max_sub_calls=3 reached", limit="max_sub_calls"),
        "model": ModelError("overloaded"),
        "refused": ModelRefused("declined"),
    }

    def raise_it(args: dict[str, Any]) -> None:
        raise errors[args["query"]]

    with Worker({"sql": raise_it}, tables=lambda: []) as worker:
        for key, error in errors.items():
            if key == "refused":
                continue  # a leaf the namespace does not bind: below
            name = type(error).__name__
            code = (
                f"try:\n    sql({key!r})\nexcept {name} as exc:\n"
                "    got = (type(exc).__name__, str(exc))\ngot"
            )
            assert ok(worker, code).output == repr((name, str(error))) + "\n"
        # a leaf is caught as the family the namespace binds, keeping its own name
        code = (
            "try:\n    sql('refused')\nexcept ModelError as exc:\n    got = type(exc).__name__\ngot"
        )
        assert ok(worker, code).output == repr("ModelRefused") + "\n"


def test_host_value_error_is_catchable_as_value_error(shared: FramedREPL) -> None:
    code = "try:\n    llm_query('')\nexcept ValueError as exc:\n    got = str(exc)\ngot"
    result = shared.execute(code)
    assert result.error is None, result.error
    assert result.output == "'llm_query() needs a non-empty prompt'\n"


def test_unknown_rpc_function_is_a_host_error(shared: FramedREPL) -> None:
    result = shared.execute("llm_where(tickets, 'the customer is angry')")
    assert not result.restarted
    assert result.error is not None
    assert "HostError: unknown function 'llm_where'" in result.error
    assert ok(shared, "'alive'").output == "'alive'\n"


def test_unexpected_handler_failure_is_a_host_error(shared: FramedREPL) -> None:
    result = shared.execute("llm_query_batched(['a', 'b'])")
    assert result.error is not None
    assert (
        "HostError: llm_query_batched() failed in the host: connection pool exploded"
        in result.error
    )


def test_llm_query_reaches_the_host(shared: FramedREPL, host: Host) -> None:
    assert ok(shared, "llm_query('is 7 urgent?')").output == "'answer to is 7 urgent?'\n"
    assert host.prompts[-1] == "is 7 urgent?"


def test_final_sends_text_frames_and_table_handles(shared: FramedREPL, host: Host) -> None:
    ok(shared, "FINAL('done')")
    ok(shared, "FINAL(pd.DataFrame({'customer_id': [7], 'reason': ['price']}))")
    ok(shared, "FINAL(tickets)")
    text, frame, table = host.finals[-3:]
    assert text == {"kind": "text", "text": "done"}
    assert frame["kind"] == "frame"
    assert decode_arrow(frame["arrow"]).to_pydict() == {"customer_id": [7], "reason": ["price"]}
    assert table == {"kind": "table", "name": "tickets"}


def test_answer_ready_is_reported_once(shared: FramedREPL) -> None:
    result = ok(shared, "answer['content'] = '42 customers'\nanswer['ready'] = True")
    assert result.answer == {"kind": "text", "text": "42 customers"}
    assert ok(shared, "answer_after = 1").answer is None  # ready was reset
    frame = ok(shared, "answer['content'] = pd.DataFrame({'n': [1, 2]}); answer['ready'] = True")
    assert frame.answer is not None and frame.answer["kind"] == "frame"
    assert decode_arrow(frame.answer["arrow"]).to_pydict() == {"n": [1, 2]}


def test_get_var(shared: FramedREPL) -> None:
    ok(shared, "gv_text = 'hello'\ngv_frame = pd.DataFrame({'a': [1, 2]})\ngv_list = [1, 2]")
    assert shared.get_var("gv_text") == {"kind": "text", "text": "hello"}
    assert shared.get_var("gv_list") == {"kind": "text", "text": "[1, 2]"}
    frame = shared.get_var("gv_frame")
    assert frame["kind"] == "frame"
    assert decode_arrow(frame["arrow"]).to_pydict() == {"a": [1, 2]}
    assert shared.get_var("tickets") == {"kind": "table", "name": "tickets"}
    with pytest.raises(NameError, match="gv_missing"):
        shared.get_var("gv_missing")
    assert ok(shared, "gv_text").output == "'hello'\n"  # the channel is still in step


def test_table_handle(shared: FramedREPL) -> None:
    out = ok(shared, "str(tickets), len(tickets), tickets.name, tickets.columns").output
    assert out == "('tickets', 3, 'tickets', ['ticket_id', 'body'])\n"
    assert (
        ok(shared, "tickets").output == "<table tickets: 3 rows; ticket_id BIGINT, body VARCHAR>\n"
    )
    assert ok(shared, "int(sql(f'SELECT count(*) AS n FROM {tickets}')['n'][0])").output == "3\n"
    assert ok(shared, "len(tickets.head(2)), len(tickets.df())").output == "(2, 3)\n"


# -- isolation -----------------------------------------------------------------------------


def test_worker_environment_holds_no_host_secrets(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-test-secret")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATEST")
    monkeypatch.setenv("RLM_TEST_MARKER", "host-only")
    with Worker(host.handlers(), tables=host.tables) as worker:
        env = ok(worker, "import os\nsorted(os.environ)").output
        values = ok(worker, "'\\n'.join(os.environ.values())").output
        cwd = ok(worker, "os.getcwd()").output.strip().strip("'")
        temp = ok(worker, "import tempfile\ntempfile.gettempdir()").output.strip().strip("'")
        home = ok(worker, "os.path.expanduser('~')").output.strip().strip("'")
        assert ok(worker, "len(tickets)").output == "3\n"
    assert "ANTHROPIC" not in env
    assert "AWS_" not in env
    assert "RLM_TEST_MARKER" not in env
    assert "secret" not in values
    assert "host-only" not in values
    # cwd, HOME and TMPDIR are one private scratch dir, removed when the worker closes
    assert Path(cwd).name.startswith("rlm-worker-")
    assert cwd != os.getcwd()
    assert temp == cwd
    assert home == cwd
    assert not Path(cwd).exists()


def test_worker_cwd_is_private(shared: FramedREPL) -> None:
    cwd = ok(shared, "import os\nos.getcwd()").output.strip().strip("'")
    mode = stat.S_IMODE(os.stat(cwd).st_mode)
    assert mode == 0o700
    assert ok(shared, "open('scratch.txt', 'w').write('ok')").output == "2\n"
    assert (Path(cwd) / "scratch.txt").read_text() == "ok"


def test_worker_has_no_network(shared: FramedREPL) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        result = shared.execute(
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()"
        )
    assert result.error is not None


def test_worker_has_resource_limits_of_its_own(shared: FramedREPL) -> None:
    names = ("RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_CPU")
    host_limits = repr([resource.getrlimit(getattr(resource, n)) for n in names])
    code = f"import resource\n[resource.getrlimit(getattr(resource, n)) for n in {names!r}]"
    worker_limits = ok(shared, code).output.strip()
    assert worker_limits != host_limits


# -- timeouts and crashes ------------------------------------------------------------------


def test_infinite_loop_is_stopped_and_the_worker_restarted(fragile: FramedREPL) -> None:
    ok(fragile, "loop_kept = 41")
    restarts = fragile.restarts
    result = fragile.execute("while True:\n    pass")
    assert result.restarted
    assert result.error is not None
    assert result.error.startswith("TimeoutError: the cell ran longer than 1 s")
    assert "variables you defined are lost" in result.error
    assert fragile.restarts == restarts + 1
    lost = fragile.execute("loop_kept")
    assert lost.error is not None and "NameError" in lost.error
    assert (
        ok(fragile, "len(tickets), int(sql('SELECT count(*) AS n FROM tickets')['n'][0])").output
        == "(3, 3)\n"
    )


def test_time_spent_in_host_handlers_does_not_count(fragile: FramedREPL, host: Host) -> None:
    host.host_sleep_s = 0.6
    try:
        result = ok(fragile, "[llm_query(f'q{i}') for i in range(3)][-1]")  # 1.8 s in the host
    finally:
        host.host_sleep_s = 0.0
    assert result.output == "'answer to q2'\n"


@pytest.mark.parametrize("suicide", ["os._exit(1)", "os.kill(os.getpid(), 9)"])
def test_dead_worker_is_restarted_with_a_clear_error(fragile: FramedREPL, suicide: str) -> None:
    ok(fragile, "import os\ndead_kept = 1")
    restarts = fragile.restarts
    result = fragile.execute(f"import os\n{suicide}")
    assert result.restarted
    assert result.error is not None
    assert result.error.startswith("WorkerDied: the REPL process ended")
    assert "variables you defined are lost" in result.error
    assert fragile.restarts == restarts + 1
    assert "NameError" in (fragile.execute("dead_kept").error or "")
    assert ok(fragile, "len(tickets)").output == "3\n"


# -- the frame codec (the worker has pandas, not pyarrow) -------------------------------------


def plain(value: Any) -> Any:
    """A cell value comparable with ==: arrays as lists, missing values as None."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [plain(v) for v in value]
    return None if not isinstance(value, dict) and pd.isna(value) else value


def test_frames_keep_duckdb_types_through_the_worker(shared: FramedREPL, host: Host) -> None:
    query = (
        "SELECT 1::INT AS i, NULL::BIGINT AS missing, 9007199254740993::BIGINT AS big, "
        "1.5::DOUBLE AS d, 3.14::DECIMAL(10, 2) AS dec, 'héllo' AS s, TRUE AS b, "
        "DATE '2024-01-02' AS day, TIMESTAMP '2024-01-02 03:04:05.123456' AS ts, "
        "TIMESTAMPTZ '2024-01-02 03:04:05+00' AS tstz, [1, 2] AS xs, {'k': 'v'} AS st, "
        "'ab'::BLOB AS raw"
    )
    table = host.wh.trusted_arrow(query)
    frame = decode_frame(arrow_to_frame(table))
    expected = table.to_pandas()
    assert list(frame.columns) == list(expected.columns)
    for column in expected.columns:
        assert plain(frame[column][0]) == plain(expected[column][0]), column
    assert str(frame["ts"].dtype) == str(expected["ts"].dtype)
    assert str(frame["tstz"].dtype) == str(expected["tstz"].dtype)
    # and back: what FINAL sends is what the engine gets as Arrow
    back = frame_to_arrow(encode_frame(frame))
    assert back.to_pylist() == table.cast(back.schema).to_pylist()


@pytest.mark.parametrize(
    "payload",
    [
        [],
        {"rows": -1, "columns": []},
        {"rows": 1, "columns": [{"name": "a", "dtype": "int64", "values": [1, 2]}]},
        {"rows": 1, "columns": [{"name": "a", "dtype": "int64", "values": ["x"]}]},
        {"rows": 1, "columns": [{"name": "a", "dtype": "os.system", "values": [1]}]},
        {"rows": 1, "columns": [{"name": "a", "dtype": "object", "values": [{"$": "eval"}]}]},
        {"rows": 1, "columns": [{"name": "a", "dtype": "datetime", "unit": "h", "values": [1]}]},
    ],
    ids=["not-object", "negative-rows", "length", "type", "dtype", "tag", "unit"],
)
def test_malformed_frames_are_protocol_errors(payload: Any) -> None:
    with pytest.raises(ProtocolError):
        decode_frame(payload)


def test_namespace_calls_from_threads_are_serialised(shared: FramedREPL, host: Host) -> None:
    out = ok(
        shared,
        "from concurrent.futures import ThreadPoolExecutor\n"
        "with ThreadPoolExecutor(8) as pool:\n"
        "    got = list(pool.map(llm_query, [f'thread {i}' for i in range(40)]))\n"
        "got == [f'answer to thread {i}' for i in range(40)]",
    ).output
    assert out == "True\n"


def test_a_forged_frame_count_is_a_protocol_error_not_a_crash() -> None:
    from rlm_dagster.repl.protocol import ProtocolError, decode_frame

    for forged in (
        {"rows": 10**30, "columns": []},
        {"rows": 5, "columns": []},
        {"rows": 1, "columns": [{"name": "x", "values": [1]}] * 20_000},
    ):
        with pytest.raises(ProtocolError):
            decode_frame(forged)


def test_a_host_reply_too_large_to_send_is_the_calls_error() -> None:
    big = {"text": "x" * (600 * 1024 * 1024)}
    with Worker({"sql": lambda args: big}, tables=lambda: [], sandbox="process") as worker:
        cell = worker.execute(
            "try:\n    sql('SELECT 1')\nexcept Exception as e:\n    print(type(e).__name__, str(e)[:60])"
        )
        again = worker.execute("print('alive')")
    assert "too large to send" in cell.output
    assert again.output.strip() == "alive"
