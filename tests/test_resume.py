"""A retried run replays what it completed and pays only for what it never completed."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pytest
from cli import cli_env, materialize_cli, materialize_command

from rlm_dagster import Warehouse, run_rlm
from rlm_dagster.cache import Cache
from rlm_dagster.models.client import LM
from rlm_dagster.testing import FakeAnthropic, FakeRequest

MakeLM = Callable[..., LM]

TURNS = [
    "```repl\nanswers = llm_query_batched([f'Summarise ticket {i}' for i in range(5)])\n"
    "print(sql('SELECT count(*) AS n FROM tickets'))\n```",
    "```repl\nverdict = llm_query('Which answer matters most? ' + ' | '.join(answers))\nprint(verdict)\n```",
    "```repl\nFINAL(verdict + ' / ' + str(len(answers)))\n```",
]


def turn_of(request: FakeRequest) -> int:
    return sum(1 for m in request.body["messages"] if m["role"] == "assistant")


def frames() -> Warehouse:
    return Warehouse.from_frames({"tickets": pd.DataFrame({"id": [1, 2, 3]})})


def test_rerun_replays_every_call_from_the_cache(make_lm: MakeLM, tmp_path: Path) -> None:
    cache_path = tmp_path / "cache.sqlite3"
    with FakeAnthropic(
        root=lambda r: TURNS[turn_of(r)], sub=lambda r: f"sub:{r.prompt[-9:]}"
    ) as fake:
        first = run_rlm("q", warehouse=frames(), lm=make_lm(fake, cache=Cache(cache_path)))
        paid = fake.count()
        fake.reset()
        lm = make_lm(fake, cache=Cache(cache_path))
        second = run_rlm("q", warehouse=frames(), lm=lm)
        assert fake.count(include_faulted=True) == 0
    assert paid == 3 + 5 + 1
    assert second.answer_text == first.answer_text
    assert second.accounting.paid_usd == 0.0
    assert second.accounting.cost_usd == first.accounting.cost_usd
    records = second.accounting.records
    assert all(r.cache_hit for r in records) and len(records) == paid


def test_failed_calls_are_not_cached(make_lm: MakeLM, tmp_path: Path) -> None:
    from rlm_dagster.errors import ProviderUnavailable
    from rlm_dagster.testing import Fault

    cache_path = tmp_path / "cache.sqlite3"
    script = ["```repl\nprint(llm_query_batched(['a', 'b']))\n```", "FINAL(done)"]
    # 'b' keeps failing: the run ends (retryably) after the cell, 'a' is kept
    with (
        FakeAnthropic(
            root=script, sub=lambda r: Fault(status=529) if r.prompt == "b" else "ok"
        ) as fake,
        pytest.raises(ProviderUnavailable),
    ):
        run_rlm("q", warehouse=frames(), lm=make_lm(fake, cache=Cache(cache_path), max_retries=0))
    cache = Cache(cache_path)
    rows = cache.ledger()
    assert [r["role"] for r in rows] == ["root", "sub"]  # only the successes are in the ledger
    assert len(cache._con.execute("SELECT key FROM calls").fetchall()) == 2  # 1 root + 1 sub


def test_sigkilled_materialization_pays_only_for_calls_it_never_completed(
    tmp_path: Path, warehouse_file: str
) -> None:
    """Kill `dagster asset materialize` (SIGKILL, whole process group) while the third root
    turn is in flight; the re-run must replay turns 1-2 and their six sub-calls for free."""
    in_turn_3 = threading.Event()
    release = threading.Event()
    killed = [False]

    def root(request: FakeRequest) -> str:
        turn = turn_of(request)
        if turn == 2 and not killed[0]:
            in_turn_3.set()
            release.wait(30)  # never answered: the process is killed meanwhile
        return TURNS[turn]

    cache_path = tmp_path / "resume-cache.sqlite3"
    with FakeAnthropic(root=root, sub=lambda r: f"sub:{r.prompt[-9:]}") as fake:
        defs = tmp_path / "defs.py"
        defs.write_text(
            textwrap.dedent(
                f"""
                import dagster as dg
                from dagster_duckdb import DuckDBResource
                from rlm_dagster import RLMResource, rlm_asset

                answer = rlm_asset(name="answer", question="What matters most?", tables=["tickets"])
                defs = dg.Definitions(
                    assets=[answer],
                    resources={{
                        "duckdb": DuckDBResource(database={warehouse_file!r}),
                        "rlm": RLMResource(api_key="k", base_url={fake.base_url!r}, root_model="fake-root",
                                           sub_model="claude-haiku-4-5", cache_path={str(cache_path)!r}),
                    }},
                )
                """
            )
        )
        env = cli_env(tmp_path / "home")
        command = materialize_command(defs, "answer")

        proc = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert in_turn_3.wait(180), "the first run never reached its third turn"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        killed[0] = True
        release.set()
        first: dict[str, Any] = {k: fake.count(k) for k in ("root", "sub")}
        fake.reset()

        rerun = materialize_cli(defs, "answer", cwd=tmp_path, env=env)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        second = {k: fake.count(k) for k in ("root", "sub")}

    assert first == {"root": 3, "sub": 6}  # turns 1-3 sent (3 unanswered), 5 + 1 sub-calls
    assert second == {"root": 1, "sub": 0}  # only the turn that never completed is paid again
    con = duckdb.connect(warehouse_file, read_only=True)
    assert con.sql("SELECT answer FROM answer").fetchall()[0][0].endswith(" / 5")
    con.close()
    ledger = Cache(cache_path).ledger()
    rerun_rows = [r for r in ledger if r["run_id"] != ledger[0]["run_id"]]
    assert [(r["role"], r["cache_hit"]) for r in rerun_rows] == [
        ("root", 1),
        ("sub", 1),
        ("sub", 1),
        ("sub", 1),
        ("sub", 1),
        ("sub", 1),
        ("root", 1),
        ("sub", 1),
        ("root", 0),
    ]
    assert {r["asset"] for r in ledger} == {"answer"} and all(r["depth"] == 0 for r in ledger)
    assert sum(r["cost_usd"] or 0 for r in rerun_rows if r["cache_hit"]) == 0
