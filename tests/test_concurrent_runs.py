"""One client, many runs: each run's accounting, budget and ledger rows are its own.

A run's metering (its budget, accounting and ledger tags) belongs to the run, never to the
shared client, so two runs on one ``LM`` (or two assets on one ``RLMResource``) at the same
time each report what they used. A barrier in the fake server holds the first turn of each
run until both have reached it, so the runs really overlap.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest
from dagster_duckdb import DuckDBResource

from rlm_dagster import Limits, RLMResource, rlm_asset, run
from rlm_dagster.cache import Cache
from rlm_dagster.dagster import resource as resource_module
from rlm_dagster.models.client import LM
from rlm_dagster.testing import FakeAnthropic, FakeRequest

# The question names how many sub-calls its run makes: the two runs use different amounts.
SUBS = {"alpha": 2, "beta": 5}


def overlapping_root(barrier: threading.Barrier) -> Callable[[FakeRequest], str]:
    """Turn 1 of each run waits for the other run's turn 1; then each run makes its own
    number of sub-calls and answers with its name."""

    def root(request: FakeRequest) -> str:
        text = str(request.body["messages"][0]["content"])
        name = next(n for n in SUBS if n in text)
        turns = sum(1 for m in request.body["messages"] if m["role"] == "assistant")
        if turns == 0:
            barrier.wait(timeout=30)
            n = SUBS[name]
            return f"```repl\nprint(llm_query_batched([f'{name} {{i}}' for i in range({n})]))\n```"
        return f"FINAL({name} done)"

    return root


def test_two_runs_on_one_client_at_once_each_count_their_own(
    make_lm: Callable[..., LM], tmp_path: Path
) -> None:
    with FakeAnthropic(root=overlapping_root(threading.Barrier(2)), sub="ok") as fake:
        lm = make_lm(fake, cache=Cache(tmp_path / "cache.sqlite3"))

        def one(name: str) -> Any:
            return run(
                f"Question {name}?",
                lm=lm,
                limits=Limits(max_iterations=3),
                sandbox="process",
                tags={"run_id": name},
            )

        with ThreadPoolExecutor(2) as pool:
            results = dict(zip(SUBS, pool.map(one, SUBS), strict=True))
        # and one more run on the same client afterwards: only its own calls
        again = run("Question alpha?", lm=lm, limits=Limits(max_iterations=3), sandbox="process")
    for name, result in results.items():
        assert result.answer_text == f"{name} done"
        assert result.accounting.calls("root") == 2
        assert result.accounting.calls("sub") == SUBS[name]
        rows = Cache(tmp_path / "cache.sqlite3").ledger(name)
        assert sorted(r["role"] for r in rows) == ["root"] * 2 + ["sub"] * SUBS[name]
    assert again.accounting.calls() == 2 + SUBS["alpha"]  # replayed from the cache, its own
    assert all(r.cache_hit for r in again.accounting.records)


def _warehouse(path: Path) -> str:
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE notes AS SELECT * FROM (VALUES (1, 'a'), (2, 'b')) t(id, body)")
    con.close()
    return str(path)


def test_two_assets_at_once_on_one_resource_share_one_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[LM] = []
    real_init = LM.__init__

    def counting_init(self: LM, **kwargs: Any) -> None:
        made.append(self)
        real_init(self, **kwargs)

    monkeypatch.setattr(LM, "__init__", counting_init)
    assets = [
        rlm_asset(
            name=f"{name}_answer",
            question=f"Question {name}?",
            tables=["notes"],
            duckdb_resource_key=f"duckdb_{name}",
            max_iterations=3,
        )
        for name in SUBS
    ]
    with FakeAnthropic(root=overlapping_root(threading.Barrier(2)), sub="ok") as fake:
        rlm = RLMResource(
            api_key="test-key",
            base_url=fake.base_url,
            root_model=fake.root_model,
            sub_model="claude-haiku-4-5",
            cache_path=str(tmp_path / "cache.sqlite3"),
            sandbox="process",
        )
        resources: dict[str, Any] = {"rlm": rlm}
        for name in SUBS:
            resources[f"duckdb_{name}"] = DuckDBResource(
                database=_warehouse(tmp_path / f"{name}.duckdb")
            )

        def materialize(asset: Any) -> dg.ExecuteInProcessResult:
            return dg.materialize([asset], resources=resources, raise_on_error=True)

        with ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(materialize, assets))
        requests = list(fake.requests)
    assert len(made) == 1, "the two runs did not share one client"
    assert not resource_module._SHARED._entries, "the shared client was not closed"
    ledger = Cache(tmp_path / "cache.sqlite3")
    for name, outcome in zip(SUBS, outcomes, strict=True):
        meta = {
            k: v.value
            for event in outcome.get_asset_materialization_events()
            for k, v in event.materialization.metadata.items()
        }
        assert meta["rlm/root_calls"] == 2
        assert meta["rlm/sub_calls"] == SUBS[name]
        sent = [r for r in requests if r.kind == "sub" and r.prompt.startswith(name)]
        assert len(sent) == SUBS[name]
        rows = ledger.ledger(outcome.run_id)
        assert {r["asset"] for r in rows} == {f"{name}_answer"}
        assert sorted(r["role"] for r in rows) == ["root"] * 2 + ["sub"] * SUBS[name]
    ledger.close()
