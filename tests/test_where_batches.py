"""llm_where through the Message Batches API: same verdicts at half the price, leftovers
judged online, and a run killed while its batches process is resumed without paying twice.

Everything goes through the real SDK against FakeAnthropic's batch endpoints on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from rlm_dagster import ConfigError, Limits, Warehouse
from rlm_dagster.cache import Cache
from rlm_dagster.engine.budget import Budget
from rlm_dagster.engine.events import Event, WhereBatchProgress
from rlm_dagster.models.client import LM
from rlm_dagster.semantic import Semantic, WhereConfig
from rlm_dagster.testing import FakeAnthropic

SUB_MODEL = "claude-haiku-4-5"
PREDICATE = "The ticket asks for a refund"


def frame(n: int = 300) -> pd.DataFrame:
    # 100 distinct bodies, each three times; every fourth asks for a refund.
    bodies = [
        f"ticket {i % 100}: " + ("please refund my order" if i % 100 % 4 == 0 else "app is slow")
        for i in range(n)
    ]
    return pd.DataFrame({"id": range(n), "body": bodies})


def judge(predicate: str, row: dict[str, Any]) -> tuple[bool, str]:
    hit = "refund" in row["body"]
    return hit, "asks for a refund" if hit else "no refund"


def make_lm(fake: FakeAnthropic, cache: Cache | None) -> LM:
    return LM(
        api_key="test-key",
        base_url=fake.base_url,
        root_model=fake.root_model,
        sub_model=SUB_MODEL,
        max_retries=2,
        cache=cache,
    )


def where(
    fake: FakeAnthropic, cache: Cache | None, *, batches: bool | None, **kwargs: Any
) -> tuple[Any, Any, Any, Semantic, list[Event], Warehouse]:
    lm = make_lm(fake, cache)
    wh = Warehouse.from_frames({"t": frame()})
    events: list[Event] = []
    sem = Semantic(
        lm,
        wh,
        Budget(Limits(), lm.accounting, ledger=cache, tags={"run_id": "r"}),
        cache=cache,
        config=WhereConfig(batch_rows=10, batch_poll_s=0.05),
        on_event=events.append,
    )
    info, prov, stats = sem.where("t", PREDICATE, columns=["body"], batches=batches, **kwargs)
    return info, prov, stats, sem, events, wh


def test_batches_give_the_online_verdicts_at_half_the_price(tmp_path: Path) -> None:
    with FakeAnthropic(where=judge) as fake:
        online = where(fake, Cache(tmp_path / "online.sqlite3"), batches=False)
        assert not fake.batches
        cache = Cache(tmp_path / "batch.sqlite3")
        batch = where(fake, cache, batches=True)
        online_requests = len([r for r in fake.requests if not r.batch_id])
    _, prov, stats, _, events, wh = batch
    # Same answer: 25 distinct refund bodies, 75 rows.
    assert stats.matches == online[2].matches == 75
    assert (
        wh.query(f"SELECT count(*) AS n FROM {prov.name} WHERE _verdict IS NULL")["n"][0].as_py()
        == 0
    )
    assert set(
        wh.query(f"SELECT DISTINCT _decided_by FROM {prov.name}")["_decided_by"].to_pylist()
    ) == {"model"}
    # One batch of 10 requests, nothing online, at half the price of the online run.
    [made] = fake.batches
    assert len(made.custom_ids) == 10 and online_requests == 10  # only the online run's
    assert stats.requests == online[2].requests == 10
    assert stats.cost_usd == pytest.approx(online[2].cost_usd / 2, rel=1e-6)
    # The ledger names the batch; progress went to the run log.
    rows = [r for r in cache.ledger("r") if r["role"] == "where"]
    assert len(rows) == 10 and {r["batch_id"] for r in rows} == {made.id}
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(stats.cost_usd)
    assert any(isinstance(e, WhereBatchProgress) for e in events)
    assert "message batches" in events[-1].describe() or any(
        "message batches" in e.describe() for e in events
    )
    # Verdicts were cached: the same call again sends nothing.
    with FakeAnthropic(where=judge) as fake2:
        again = where(fake2, cache, batches=True)
        assert again[2].cached == 100 and not fake2.batches and not fake2.requests


def test_the_plan_shows_both_prices_and_the_chosen_mode(tmp_path: Path) -> None:
    with FakeAnthropic(where=judge) as fake:
        lm = make_lm(fake, None)
        wh = Warehouse.from_frames({"t": frame()})
        sem = Semantic(lm, wh, Budget(Limits(), lm.accounting), config=WhereConfig(batches=True))
        plan = sem.plan("t", PREDICATE, columns=["body"])
        assert plan.batches and plan.est_cost_usd and plan.est_batch_cost_usd
        assert plan.est_batch_cost_usd == pytest.approx(plan.est_cost_usd / 2)
        text = plan.describe()
        assert "online" in text and "as message batches" in text and "24 h" in text
        assert not sem.plan("t", PREDICATE, columns=["body"], batches=False).batches
        assert not fake.requests and not fake.batches


def test_what_the_batches_leave_undecided_is_judged_online(tmp_path: Path) -> None:
    """Errored and expired batch requests are not billed; their rows go online."""
    outcome = {"b1": "api_error", "b4": "expired"}
    with FakeAnthropic(where=judge, batch_outcome=lambda r: outcome.get(r.custom_id or "")) as fake:
        _, prov, stats, _, _, wh = where(fake, Cache(tmp_path / "c.sqlite3"), batches=True)
        online = [r for r in fake.requests if not r.batch_id]
    assert stats.matches == 75
    assert len(online) == 2  # the two requests' 20 values, re-packed, online
    decided = wh.query(
        f"SELECT _batch, count(*) AS n FROM {prov.name} GROUP BY ALL ORDER BY _batch"
    ).to_pydict()
    assert all(b is not None for b in decided["_batch"])
    assert (
        wh.query(f"SELECT count(*) AS n FROM {prov.name} WHERE _verdict IS NULL")["n"][0].as_py()
        == 0
    )


def test_limit_goes_online_and_batches_need_the_cache() -> None:
    with FakeAnthropic(where=judge) as fake:
        _, _, stats, *_ = where(fake, None, batches=False, limit=3)
        assert stats.matches == 3 and not fake.batches
        with pytest.raises(ConfigError, match="cache"):
            where(fake, None, batches=True)
        assert not fake.batches


CHILD = textwrap.dedent(
    """
    import json, sys
    import pandas as pd
    sys.path.insert(0, {tests!r})
    from test_where_batches import where, judge
    from rlm_dagster.cache import Cache
    import rlm_dagster.semantic
    # A killed run's lease expires after its TTL (60 s); shorter here, so the retry
    # does not wait a minute for it.
    rlm_dagster.semantic._LEASE_TTL_S = 2.0

    class Fake:  # the parent's server, reached by URL
        base_url = sys.argv[1]
        root_model = "fake-root"

    info, prov, stats, sem, events, wh = where(Fake, Cache(sys.argv[2]), batches=True)
    print(json.dumps({{"matches": stats.matches, "requests": stats.requests,
                       "cost": stats.cost_usd, "cached": stats.cached}}))
    """
)


def test_a_run_killed_while_its_batches_process_is_resumed_without_paying_twice(
    tmp_path: Path,
) -> None:
    cache_path = tmp_path / "cache.sqlite3"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with FakeAnthropic(where=judge, batch_delay_s=300.0) as fake:
        first = subprocess.Popen(
            [sys.executable, str(script), fake.base_url, str(cache_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 120
            while not fake.batches and time.monotonic() < deadline and first.poll() is None:
                time.sleep(0.05)
            assert fake.batches, first.communicate(timeout=10)
            time.sleep(0.3)  # it is polling now
            os.kill(first.pid, signal.SIGKILL)
        finally:
            first.kill()
            first.communicate(timeout=30)
        assert first.returncode == -signal.SIGKILL
        [batch] = fake.batches
        assert batch.processing_status == "in_progress"

        fake.batch_delay_s = 0.3  # it ends while the retry waits for it
        second = subprocess.run(
            [sys.executable, str(script), fake.base_url, str(cache_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert second.returncode == 0, second.stderr
        out = json.loads(second.stdout.strip().splitlines()[-1])
        assert out["matches"] == 75
        # The retry resumed the killed run's batch: one batch ever made, each request
        # answered once, nothing sent online.
        assert [c.operation for c in fake.batch_calls].count("create") == 1
        assert len([r for r in fake.requests if r.batch_id]) == 10
        assert not [r for r in fake.requests if not r.batch_id]
        assert out["requests"] == 10 and out["cost"] > 0
    with Cache(cache_path) as cache:
        rows = [r for r in cache.ledger() if r["role"] == "where"]
        assert len(rows) == 10 and {r["batch_id"] for r in rows} == {batch.id}


def test_an_asset_opts_in_and_its_run_log_shows_the_batches(
    tmp_path: Path, warehouse_file: str, churn_by_body: dict[str, bool]
) -> None:
    """rlm_asset(where_batches=True): the run's llm_where goes out as a message batch, the
    run log says how far it is, and the ledger rows name the batch."""
    import dagster as dg
    from dagster_duckdb import DuckDBResource

    from rlm_dagster import RLMResource, rlm_asset

    script = [
        "```repl\nthreats = llm_where(tickets, 'The customer threatens to cancel', "
        "columns=['body'])\nFINAL(f'{len(threats)} threats')\n```"
    ]
    asset = rlm_asset(
        name="threats",
        question="How many threaten to cancel?",
        tables=["tickets"],
        where_batches=True,
    )
    cache_path = tmp_path / "cache.sqlite3"
    judge_body = lambda predicate, row: (churn_by_body[row["body"]], "judged")  # noqa: E731
    with (
        FakeAnthropic(root=script, where=judge_body, batch_delay_s=0.2) as fake,
        dg.DagsterInstance.ephemeral() as instance,
    ):
        rlm = RLMResource(
            api_key="k",
            base_url=fake.base_url,
            root_model="fake-root",
            sub_model=SUB_MODEL,
            cache_path=str(cache_path),
            sandbox="process",
            where_batch_poll_s=0.05,
        )
        result = dg.materialize(
            [asset],
            instance=instance,
            resources={"rlm": rlm, "duckdb": DuckDBResource(database=warehouse_file)},
        )
        logs = [e.user_message for e in instance.all_logs(result.run_id)]
        batches = fake.batches
        online_where = [r for r in fake.requests if r.kind == "where" and not r.batch_id]
    assert result.success
    assert len(batches) == 1 and not online_where
    assert any("llm_where (message batches)" in line for line in logs)
    with Cache(cache_path) as cache:
        rows = [r for r in cache.ledger(result.run_id) if r["role"] == "where"]
    assert rows and {r["batch_id"] for r in rows} == {batches[0].id}
