"""The in-process REPL double: the same results as the real worker, and no guard in pytest."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from rlm_dagster.repl import guard
from rlm_dagster.repl.host import CellResult, FramedREPL, Worker
from rlm_dagster.repl.inprocess import LEVEL, CellStuck, InProcessREPL, _PerThread
from rlm_dagster.repl.protocol import encode_arrow
from rlm_dagster.sql.warehouse import Warehouse

MAX_CAPTURE = 2_000

# Cells the engine's tests rely on: values, printing (capped), the namespace's functions and
# their errors, the ways a run ends, and tracebacks, including one into an earlier cell.
CELLS = [
    "x = 6 * 7\nx",
    "print(len(t), t.columns, t.types)\nt",
    "print(sql('SELECT a, b FROM t ORDER BY a'))",
    "t.head(2)",
    "pd.DataFrame({'n': range(100), 's': ['w' * 100] * 100})",
    "sql('DROP TABLE t')",
    "sql('SELECT * FROM nowhere')",
    "try:\n    sql('DELETE FROM t')\nexcept SQLPolicyError as e:\n    print('caught', e.rule)",
    "llm_query('hello')",
    "llm_query_batched(['a', 'b'])",
    "llm_query_batched('a')",
    "rlm_query('child', context=pd.DataFrame({'a': [1, 2]}))",
    "context",
    "def f(n):\n    return 1 / n\n\nprint('defined')",
    "f(0)",
    "import sys\nprint('to stderr', file=sys.stderr)\nprint('to stdout')",
    "print('y' * 5_000)",
    "raise ValueError('v' * 5_000)",
    "sys.stdout.write(3)",
    "undefined_name",
    "def broken(:\n    pass",
    "raise SystemExit(2)",
    "FINAL_VAR('nope')",
    "FINAL(pd.DataFrame({'n': [1, 2]}))",
    "FINAL(t)",
    "SHOW_VARS()",
    "answer['content'] = 'done'\nanswer['ready'] = True",
    "answer['content'] = pd.DataFrame({'k': ['v']})\nanswer['ready'] = True",
]


def warehouse() -> Warehouse:
    return Warehouse.from_frames({"t": pd.DataFrame({"a": [3, 1, 2], "b": ["z", "x", "y"]})})


def handlers(wh: Warehouse, finals: list[dict[str, Any]]) -> dict[str, Callable[..., Any]]:
    def final(args: dict[str, Any]) -> None:
        finals.append(args["value"])

    def rlm_query(args: dict[str, Any]) -> str:
        return f"child saw {args['prompt']} with {str(args['context'])[:60]}"

    return {
        "sql": lambda a: {"arrow": encode_arrow(wh.query(str(a["query"])))},
        "llm_query": lambda a: str(a["prompt"]).upper(),
        "llm_query_batched": lambda a: [str(p).upper() for p in a["prompts"]],
        "rlm_query": rlm_query,
        "final": final,
    }


def tables(wh: Warehouse) -> Callable[[], list[dict[str, Any]]]:
    return lambda: [
        {"name": i.name, "columns": list(i.columns), "types": list(i.types), "rows": i.rows}
        for i in wh.tables.values()
    ]


def make(
    factory: Callable[..., FramedREPL], finals: list[dict[str, Any]], **kwargs: Any
) -> FramedREPL:
    wh = warehouse()
    options: dict[str, Any] = {
        "tables": tables(wh),
        "cell_timeout_s": 60.0,
        "max_capture_chars": MAX_CAPTURE,
        "context": {"docs": ["one", "two"]},
        "sandbox": "process",
        "limits": None,
        **kwargs,
    }
    return factory(handlers(wh, finals), **options)


def comparable(cell: CellResult) -> tuple[Any, ...]:
    return (cell.code, cell.output, cell.error, cell.dropped_chars, cell.answer, cell.restarted)


@pytest.fixture
def no_guard(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Records any attempt to arm the worker's guard in this process (it must never happen)."""
    calls: list[str] = []
    monkeypatch.setattr(guard, "install", lambda *a, **k: calls.append("install"))
    monkeypatch.setattr(guard, "prepare_imports", lambda: calls.append("prepare_imports"))
    monkeypatch.setattr(sys, "addaudithook", lambda hook: calls.append("addaudithook"))
    yield calls


def test_cells_give_the_same_results_as_the_real_worker(no_guard: list[str]) -> None:
    results: dict[str, list[tuple[Any, ...]]] = {}
    finals: dict[str, list[dict[str, Any]]] = {}
    variables: dict[str, Any] = {}
    for name, factory in (("inprocess", InProcessREPL), ("worker", Worker)):
        finals[name] = []
        with make(factory, finals[name]) as repl:
            results[name] = [comparable(repl.execute(code)) for code in CELLS]
            with pytest.raises(NameError) as missing:
                repl.get_var("missing")
            variables[name] = (repl.get_var("x"), str(missing.value))
    for code, got, want in zip(CELLS, results["inprocess"], results["worker"], strict=True):
        assert got == want, code
    assert finals["inprocess"] == finals["worker"]
    assert variables["inprocess"] == variables["worker"]
    # the cells exercised what they were meant to
    by_code = dict(zip(CELLS, results["worker"], strict=True))
    assert by_code["x = 6 * 7\nx"][1] == "42\n"
    assert "SQLPolicyError: [read-only]" in by_code["sql('DROP TABLE t')"][2]
    assert 'File "<cell 14>", line 2, in f' in by_code["f(0)"][2]
    assert by_code["print('y' * 5_000)"][3] == 5_001 - MAX_CAPTURE
    assert "[error text cut:" in by_code["raise ValueError('v' * 5_000)"][2]
    assert [f["kind"] for f in finals["worker"]] == ["frame", "table"]
    assert no_guard == []


def test_the_double_says_what_it_is() -> None:
    with make(InProcessREPL, []) as repl:
        repl.start()
        assert repl.level == LEVEL == "in-process (tests only, not a sandbox)"
        assert repl.layers == []


def test_no_guard_is_installed_in_the_test_process(no_guard: list[str]) -> None:
    meta_path = list(sys.meta_path)
    with make(InProcessREPL, []) as repl:
        # not a sandbox: what the worker's guard refuses works here
        cell = repl.execute("import ctypes\nprint(ctypes.sizeof(ctypes.c_int) > 0)")
        assert (cell.output, cell.error) == ("True\n", None)
        cell = repl.execute(f"print(open({__file__!r}).readline().strip())")
        assert cell.output.startswith('"""The in-process REPL double'), cell.error
    assert no_guard == []
    assert sys.meta_path == meta_path  # no import blocker
    assert hasattr(ctypes, "CDLL") and ctypes.sizeof(ctypes.c_int) > 0
    assert Path(__file__).read_text().startswith('"""')
    done = subprocess.run([sys.executable, "-c", "print('child')"], capture_output=True, text=True)
    assert done.stdout == "child\n"


def test_concurrent_cells_capture_only_their_own_output(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Child runs execute cells at the same time, in other threads; what each prints is its
    own, and output of other threads (the host, pytest) is not captured."""
    stdout = sys.stdout
    repls = [make(InProcessREPL, []) for _ in range(3)]
    program = "import time\nfor i in range(40):\n    print('{}', i)\n    time.sleep(0.002)"
    results: dict[int, CellResult] = {}
    try:
        for r in repls:
            r.start()

        def run(k: int) -> None:
            results[k] = repls[k].execute(program.format(f"repl{k}"))

        threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
        for th in threads:
            th.start()
        for i in range(20):
            print("host", i)
            time.sleep(0.002)
        for th in threads:
            th.join()
    finally:
        for r in repls:
            r.close()
    for k in range(3):
        lines = results[k].output.splitlines()
        assert lines == [f"repl{k} {i}" for i in range(40)], results[k].error
    captured = capsys.readouterr().out
    assert captured.splitlines() == [f"host {i}" for i in range(20)]
    assert sys.stdout is stdout
    assert pd.get_option("display.max_rows") == 60  # the worker's options only during cells


def test_tracebacks_quote_the_cells_of_their_own_repl() -> None:
    """Every REPL numbers its cells from 1, and linecache is process-wide."""
    with make(InProcessREPL, []) as a, make(InProcessREPL, []) as b:
        a.execute("def f():\n    return 1 / 0")
        b.execute("y = 1\nz = 2")
        error = a.execute("f()").error or ""
    assert "return 1 / 0" in error and "z = 2" not in error


def test_the_double_waits_for_a_cell_past_its_timeout() -> None:
    with make(InProcessREPL, [], cell_timeout_s=0.05) as repl:
        cell = repl.execute("import time\ntime.sleep(0.3)\nprint('finished')")
        assert (cell.output, cell.error, cell.restarted) == ("finished\n", None, False)
        assert repl.cell_time_left() == 0.0  # sql() would be told the time is up


def test_a_stuck_cell_fails_the_test_instead_of_hanging() -> None:
    repl = make(InProcessREPL, [], stuck_after_s=0.3)
    repl.start()
    thread = repl._thread
    assert thread is not None
    with pytest.raises(CellStuck, match="cannot stop a cell"):
        repl.execute("import time\ntime.sleep(1.5)")
    repl.close()
    thread.join(timeout=10)  # the abandoned cell ends on its own; then its thread does
    assert not thread.is_alive()
    assert not isinstance(sys.stdout, _PerThread)  # the last cell to end restored stdout
