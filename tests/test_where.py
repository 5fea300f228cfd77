"""llm_where at scale: correctness against ground truth, cache, budget, faults, provenance."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from rlm_dagster import BudgetExceeded, Limits, ProviderServerError, SQLPolicyError, Warehouse
from rlm_dagster.cache import Cache
from rlm_dagster.engine.budget import Budget
from rlm_dagster.engine.events import Event, WhereCalibrated, WhereProgress
from rlm_dagster.models.client import LM
from rlm_dagster.semantic import Semantic, WhereConfig
from rlm_dagster.testing import FakeAnthropic, FakeRequest, Fault, shape_verdicts

MakeLM = Callable[..., LM]


def ticket_warehouse(warehouse_file: str) -> Warehouse:
    return Warehouse.snapshot(warehouse_file, ["tickets", "customers"])


def semantic(
    lm: LM, wh: Warehouse, cache: Cache | None = None, limits: Limits | None = None, **config: Any
) -> Semantic:
    events: list[Event] = []
    sem = Semantic(
        lm,
        wh,
        Budget(limits or Limits(), lm.accounting),
        cache=cache,
        config=WhereConfig(**config),
        on_event=events.append,
    )
    sem.events = events  # type: ignore[attr-defined]
    return sem


def ids(wh: Warehouse, table: str) -> set[int]:
    return set(wh.query(f"SELECT ticket_id FROM {table}").to_pydict()["ticket_id"])


@pytest.fixture
def judge(churn_by_body: dict[str, bool]) -> Callable[[str, dict[str, Any]], tuple[bool, str]]:
    def by_truth(predicate: str, row: dict[str, Any]) -> tuple[bool, str]:
        hit = churn_by_body[row["body"]]
        return hit, "threat" if hit else "none"

    return by_truth


@pytest.fixture
def truth(churn_labels: dict[int, bool]) -> set[int]:
    return {t for t, hit in churn_labels.items() if hit}


def test_same_result_with_and_without_packing_and_cache(
    make_lm: MakeLM, warehouse_file: str, tmp_path: Path, judge: Any, truth: set[int]
) -> None:
    wh = ticket_warehouse(warehouse_file)
    cache = Cache(tmp_path / "c.sqlite3")
    with FakeAnthropic(where=judge) as fake:
        packed, _, s1 = semantic(make_lm(fake), wh, cache).where(
            "tickets", "threatens to cancel", columns=["body"]
        )
        packed_requests = fake.count("where")
        fake.reset()
        single, _, _ = semantic(make_lm(fake), wh, None, batch_rows=1).where(
            "tickets", "threatens to cancel", columns=["body"]
        )
        single_requests = fake.count("where")
        fake.reset()
        again, _, s3 = semantic(make_lm(fake), wh, cache).where(
            "tickets", "threatens to cancel", columns=["body"]
        )
        cached_requests = fake.count("where")
    assert ids(wh, packed.name) == ids(wh, single.name) == ids(wh, again.name) == truth
    # duplicated bodies are judged once but every row carrying them is in the result
    assert s1.distinct < s1.rows_in == 600
    assert single_requests == s1.distinct  # one request per distinct value without packing
    assert packed_requests <= s1.distinct / 20  # the target at default settings
    assert cached_requests == 0 and s3.cached == s3.distinct


def test_verdict_cache_survives_a_new_process(
    make_lm: MakeLM, warehouse_file: str, tmp_path: Path, judge: Any
) -> None:
    cache_path = tmp_path / "shared.sqlite3"
    with FakeAnthropic(where=judge) as fake:
        script = textwrap.dedent(
            f"""
            from rlm_dagster import Limits, Warehouse
            from rlm_dagster.engine.budget import Budget
            from rlm_dagster.cache import Cache
            from rlm_dagster.models.client import LM
            from rlm_dagster.semantic import Semantic
            lm = LM(api_key="k", base_url={fake.base_url!r}, root_model="fake-root", sub_model="claude-haiku-4-5")
            wh = Warehouse.snapshot({warehouse_file!r}, ["tickets"])
            sem = Semantic(lm, wh, Budget(Limits(), lm.accounting), cache=Cache({str(cache_path)!r}))
            info, _, stats = sem.where("tickets", "threatens to cancel", columns=["body"], where="priority = 'urgent'")
            print(stats.requests, info.rows)
            lm.close()
            """
        )
        proc = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        first_requests, first_rows = map(int, proc.stdout.split())
        assert first_requests > 0 and fake.count("where") == first_requests
        fake.reset()
        wh = Warehouse.snapshot(warehouse_file, ["tickets"])
        info, _, stats = semantic(make_lm(fake), wh, Cache(cache_path)).where(
            "tickets", "threatens to cancel", columns=["body"], where="priority = 'urgent'"
        )
    assert fake.count("where") == 0 and stats.requests == 0
    assert info.rows == first_rows


def test_failed_rows_are_null_counted_and_never_cached(
    make_lm: MakeLM, warehouse_file: str, tmp_path: Path
) -> None:
    bad = "export"

    def reply(req: FakeRequest) -> str:
        verdicts = [
            {"id": k, "match": "competitor" in row["body"].lower(), "reason": "r"}
            for k, row in req.rows or []
            if bad not in row["body"].lower()
        ]
        return json.dumps(shape_verdicts(req, verdicts))

    wh = ticket_warehouse(warehouse_file)
    cache = Cache(tmp_path / "c.sqlite3")
    with FakeAnthropic(where_reply=reply) as fake:
        info, prov, stats = semantic(make_lm(fake), wh, cache).where(
            "tickets", "mentions a competitor", columns=["body"]
        )
        n_bad = wh.query(
            "SELECT count(*) AS n FROM tickets WHERE lower(body) LIKE '%export%'"
        ).to_pydict()["n"][0]
        failed = wh.query(
            f"SELECT count(*) AS n FROM {prov.name} WHERE _verdict IS NULL AND _decided_by = 'failed' "
            "AND _error LIKE '%missing%'"
        ).to_pydict()["n"][0]
        fake.reset()
        _, _, again = semantic(make_lm(fake), wh, cache).where(
            "tickets", "mentions a competitor", columns=["body"]
        )
    assert n_bad > 0 and stats.failed == failed == n_bad
    assert ids(wh, info.name).isdisjoint(
        set(
            wh.query("SELECT ticket_id FROM tickets WHERE lower(body) LIKE '%export%'").to_pydict()[
                "ticket_id"
            ]
        )
    )
    # only the failures are asked again: each alone, since nothing else is left to pack
    assert again.cached == again.distinct - again.judged and again.judged > 0
    assert all(len(r.rows or []) >= 1 for r in fake.requests)
    assert again.failed == n_bad


def test_limit_stops_early_and_cancels_the_rest(make_lm: MakeLM) -> None:
    frame = pd.DataFrame({"n": range(2_000), "text": [f"row {i}" for i in range(2_000)]})
    wh = Warehouse.from_frames({"t": frame})
    with FakeAnthropic(where=lambda p, r: True, latency_s=0.05) as fake:
        info, prov, stats = semantic(make_lm(fake, max_concurrency=4), wh, batch_rows=10).where(
            "t", "anything", limit=25
        )
        sent = fake.count("where", include_faulted=True)
    assert info.rows == 25 and stats.stopped_early
    assert sent <= 4 + 4  # the wave that reached the limit, plus what was in flight; not 200
    skipped = wh.query(
        f"SELECT count(*) AS n FROM {prov.name} WHERE _decided_by = 'not evaluated'"
    ).to_pydict()
    assert skipped["n"][0] >= 2_000 - sent * 10


def test_rows_the_cache_already_matched_count_toward_the_limit(
    make_lm: MakeLM, tmp_path: Path
) -> None:
    """The count of cached matching rows is taken with the plan's counts: a limit that the
    cache nearly satisfies stops after the first request instead of judging for the limit
    from zero."""
    frame = pd.DataFrame({"n": range(2_000), "text": [f"row {i}" for i in range(2_000)]})
    wh = Warehouse.from_frames({"t": frame})
    cache = Cache(tmp_path / "c.sqlite3")
    with FakeAnthropic(where=lambda p, r: True) as fake:
        lm = make_lm(fake, max_concurrency=1)
        semantic(lm, wh, cache, batch_rows=10).where("t", "anything", where="n < 30")
        fake.reset()
        info, _, stats = semantic(lm, wh, cache, batch_rows=10).where("t", "anything", limit=25)
        sent = fake.count("where")
    assert stats.cached == 30 and stats.stopped_early
    assert sent == 1  # 30 cached matches >= 25: the first request's verdicts end the call
    assert info.rows == 25
    assert _working_tables(wh) == []


def test_budget_refusal_happens_before_any_request(
    make_lm: MakeLM, warehouse_file: str, judge: Any
) -> None:
    wh = ticket_warehouse(warehouse_file)
    with FakeAnthropic(where=judge) as fake:
        lm = make_lm(fake)
        with pytest.raises(
            BudgetExceeded, match=r"sub-calls requested but only 3 of max_sub_calls=3"
        ):
            semantic(lm, wh, limits=Limits(max_sub_calls=3)).where("tickets", "threatens to cancel")
        priced = make_lm(fake, sub_model="claude-opus-4-1")
        with pytest.raises(
            BudgetExceeded, match=r"would cost about \$[0-9.]+ \(\d+ requests\) but only \$0\.0100"
        ):
            semantic(priced, wh, limits=Limits(max_cost_usd=0.01)).where(
                "tickets", "threatens to cancel"
            )
        assert fake.count(include_faulted=True) == 0


def test_dry_run_plan_matches_the_real_run(
    make_lm: MakeLM, warehouse_file: str, judge: Any
) -> None:
    wh = ticket_warehouse(warehouse_file)
    with FakeAnthropic(where=judge) as fake:
        sem = semantic(make_lm(fake, sub_model="claude-haiku-5-5"), wh)
        plan = sem.plan(
            "tickets", "threatens to cancel", columns=["body"], where="priority <> 'low'"
        )
        assert fake.count(include_faulted=True) == 0
        _, _, stats = sem.where(
            "tickets", "threatens to cancel", columns=["body"], where="priority <> 'low'"
        )
        usage = sem.lm.accounting.usage
    assert plan.rows_in == 600 and plan.rows_after_where == stats.rows_after_where < 600
    assert plan.distinct == stats.distinct and plan.to_evaluate == plan.distinct - plan.cached
    assert plan.requests == stats.requests
    assert plan.est_cost_usd is not None and plan.est_cost_usd > 0
    # the fake bills its own token estimate; the plan must be the right order of magnitude
    assert 0.5 < plan.est_input_tokens / usage.input_tokens < 2.0
    assert "to judge in" in plan.describe()


def test_adaptive_concurrency_under_a_rate_limit(
    make_lm: MakeLM, warehouse_file: str, judge: Any, truth: set[int]
) -> None:
    wh = ticket_warehouse(warehouse_file)
    with FakeAnthropic(
        where=judge, max_concurrency=3, latency_s=0.05, rate_limit_retry_after_s=0.01
    ) as fake:
        lm = make_lm(fake, max_concurrency=12)
        info, _, _ = semantic(lm, wh, batch_rows=10).where(
            "tickets", "threatens to cancel", columns=["body"]
        )
        rejected = fake.count("where", include_faulted=True) - fake.count("where")
    assert ids(wh, info.name) == truth
    assert rejected > 0 and lm.limiter.overloads == rejected
    assert lm.limiter.limit < 6  # it came down from 12 towards the server's 3


def test_faults_do_not_change_the_result(
    make_lm: MakeLM, warehouse_file: str, judge: Any, truth: set[int]
) -> None:
    wh = ticket_warehouse(warehouse_file)
    with FakeAnthropic(where=judge, fault_rate=0.10, rate_limit_retry_after_s=0.01, seed=7) as fake:
        lm = make_lm(fake, max_retries=8)
        info, _, stats = semantic(lm, wh, batch_rows=10).where(
            "tickets", "threatens to cancel", columns=["body"]
        )
        faulted = fake.count("where", include_faulted=True) - fake.count("where")
    assert faulted > 0 and stats.failed == 0
    assert ids(wh, info.name) == truth


def test_provenance_accounts_for_every_row_and_the_whole_cost(
    make_lm: MakeLM, warehouse_file: str, judge: Any
) -> None:
    wh = ticket_warehouse(warehouse_file)
    with FakeAnthropic(where=judge) as fake:
        sem = semantic(make_lm(fake), wh, progress_interval_s=0.0)
        info, prov, stats = sem.where("tickets", "threatens to cancel", columns=["body"])
    rows = wh.query(
        f"SELECT count(*) AS n, sum(_cost_usd) AS cost, count(DISTINCT _batch) AS batches, "
        f"count(*) FILTER (WHERE _verdict) AS matches FROM {prov.name}"
    ).to_pydict()
    assert rows["n"] == [600] and rows["matches"] == [info.rows]
    assert rows["batches"] == [stats.requests]
    assert rows["cost"][0] == pytest.approx(stats.cost_usd) and stats.cost_usd > 0
    assert set(
        wh.query(f"SELECT DISTINCT _decided_by FROM {prov.name}").to_pydict()["_decided_by"]
    ) == {"model"}
    progress = [e for e in sem.events if isinstance(e, WhereProgress)]  # type: ignore[attr-defined]
    assert progress and progress[-1].requests_done == stats.requests
    assert "ETA" in progress[0].describe() and "match so far" in progress[0].describe()


def test_where_from_the_repl_reports_plan_summary_and_provenance(
    make_lm: MakeLM, judge: Any, warehouse_file: str
) -> None:
    from rlm_dagster import run_rlm

    script = [
        "```repl\nplan = llm_where(tickets, 'threatens to cancel', columns=['body'], dry_run=True)\n"
        "print(plan['requests'], plan['summary'])\n```",
        "```repl\nt = llm_where(tickets, 'threatens to cancel', columns=['body'])\n"
        "print(sql(f'SELECT count(*) AS n FROM {t.provenance} WHERE _verdict IS NOT NULL'))\n```",
        "FINAL(done)",
    ]
    with FakeAnthropic(root=script, where=judge) as fake:
        run_rlm("q", warehouse=Warehouse.snapshot(warehouse_file, ["tickets"]), lm=make_lm(fake))
        roots = [r for r in fake.requests if r.kind == "root"]
    assert "to judge in" in roots[1].last_user_text
    assert "[llm_where: 600 rows -> 600 after where ->" in roots[2].last_user_text
    assert "600" in roots[2].last_user_text.split("]")[-1]


def test_concurrent_runs_do_not_judge_the_same_values_twice(
    make_lm: MakeLM, tmp_path: Path
) -> None:
    """Two runs (separate LMs and cache handles on one cache file, as two Dagster processes
    would have) filter the same rows at once: the lease in the shared cache makes the second
    wait for the first's verdicts instead of paying for them again."""
    import threading

    rows = pd.DataFrame({"text": [f"ticket {i}: we may cancel" for i in range(120)]})
    path = tmp_path / "shared.sqlite3"
    outcomes: list[int] = []
    with FakeAnthropic(where=lambda p, r: "cancel" in r["text"], latency_s=0.3) as fake:

        def one_run() -> None:
            with Cache(path) as cache:
                lm = make_lm(fake, max_concurrency=2)
                sem = Semantic(
                    lm,
                    Warehouse.from_frames({"t": rows}),
                    Budget(Limits(), lm.accounting),
                    cache=cache,
                    config=WhereConfig(batch_rows=10),
                )
                info, _, _ = sem.where("t", "threatens to cancel")
                outcomes.append(info.rows)

        runs = [threading.Thread(target=one_run) for _ in range(2)]
        for run in runs:
            run.start()
        for run in runs:
            run.join(60)
    assert outcomes == [120, 120]
    judged = sum(len(r.rows or []) for r in fake.requests if r.kind == "where")
    assert judged == 120  # each value judged once, not once per run


class _HeldBy(Cache):
    """A cache in which another run already holds the lease of the first llm_where call."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(path)
        self.holder = holder
        self.planted: str | None = None

    def try_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        if self.planted is None:
            self.planted = name
            assert super().try_lease(name, self.holder, 60.0)
        return super().try_lease(name, owner, ttl_s)


def test_a_lease_held_by_a_run_that_died_on_this_host_is_taken_over_at_once(
    make_lm: MakeLM, tmp_path: Path
) -> None:
    """A run killed mid-call leaves its lease for up to a minute; its retry on the same host
    sees that the holder's process is gone and takes over at once, saying so. A holder that
    is alive is waited for (here until the run's wall limit), never taken over."""
    from rlm_dagster.engine.events import RunWarning
    from rlm_dagster.semantic import _PROCESS_PLACE

    rows = pd.DataFrame({"text": [f"ticket {i}: we may cancel" for i in range(30)]})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with FakeAnthropic(where=lambda p, r: True) as fake:
        cache = _HeldBy(tmp_path / "c.sqlite3", f"{_PROCESS_PLACE}|{dead.pid}|killed")
        sem = semantic(make_lm(fake), Warehouse.from_frames({"t": rows}), cache, batch_rows=10)
        info, _, stats = sem.where("t", "threatens to cancel")
        assert info.rows == 30 and stats.seconds < 30
        assert cache.planted is not None and cache.lease_holder(cache.planted) is None
        events = sem.events  # type: ignore[attr-defined]
        assert not any(isinstance(e, WhereProgress) and e.waiting for e in events)
        (warning,) = [e for e in events if isinstance(e, RunWarning)]
        assert f"process {dead.pid} on this host) is gone" in warning.describe()

        alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            cache = _HeldBy(tmp_path / "d.sqlite3", f"{_PROCESS_PLACE}|{alive.pid}|running")
            sem = semantic(
                make_lm(fake),
                Warehouse.from_frames({"t": rows}),
                cache,
                Limits(max_wall_time_s=1.5),
                batch_rows=10,
            )
            with pytest.raises(BudgetExceeded, match="waiting for another run"):
                sem.where("t", "threatens to cancel, again")
            assert cache.planted is not None
            assert cache.lease_holder(cache.planted) == cache.holder
        finally:
            alive.kill()
            alive.wait()


def _working_tables(wh: Warehouse) -> list[str]:
    return [
        r[0]
        for r in wh.trusted_arrow(
            "SELECT table_name FROM duckdb_tables() WHERE table_name LIKE '__rlm_where%'"
        ).to_pylist()
        for r in [tuple(r.values())]
    ]


def test_working_tables_are_unreachable_and_dropped_after_success_and_failure(
    make_lm: MakeLM,
) -> None:
    """llm_where stages its rows, values, cached verdicts and results in engine tables: model
    SQL cannot name them while they exist, and none is left behind, even when the provider
    fails mid-way."""
    seen: list[str] = []
    frame = pd.DataFrame({"id": range(200), "body": [f"ticket {i % 50}" for i in range(200)]})

    def judge(predicate: str, row: dict[str, Any]) -> tuple[bool, str]:
        if not seen:
            seen.extend(_working_tables(wh))
            with pytest.raises(SQLPolicyError, match=r"unbound-table"):
                wh.query(f"SELECT * FROM {seen[0]}")
        return row["body"].endswith("7"), "ends in 7"

    wh = Warehouse.from_frames({"t": frame})
    with FakeAnthropic(where=judge) as fake:
        _, prov, stats = semantic(make_lm(fake), wh, batch_rows=10).where(
            "t", "ends in 7", columns=["body"]
        )
    assert {n.rsplit("_", 1)[-1] for n in seen} >= {"rows", "values", "cached", "todo", "judged"}
    assert stats.matches == 20 and stats.distinct == 50
    assert _working_tables(wh) == []
    assert prov.rows == 200

    # The provider fails after the first requests: the error propagates, tables are dropped.
    with FakeAnthropic(where=judge) as fake:
        sem = semantic(make_lm(fake, max_retries=0), wh, batch_rows=5)
        fake.inject(Fault(status=500), times=100)
        with pytest.raises(ProviderServerError):
            sem.where("t", "ends in 7 (second predicate)")
    assert _working_tables(wh) == []
    wh.close()


def test_a_large_call_joins_its_verdicts_within_a_small_memory_limit(make_lm: MakeLM) -> None:
    """The verdicts reach the rows through one table of distinct values: 400,000 rows with
    100,000 distinct values are judged and joined back inside a 64 MB engine memory limit.
    (Joining the rows to the values, the cached and the judged verdicts in one pipeline held
    three hash tables at once and ran out of memory here, as at 10M rows and 512 MB.)"""
    n, distinct = 400_000, 100_000
    rng = random.Random(3)
    values = [rng.randrange(distinct) for _ in range(n)]
    frame = pd.DataFrame(
        {"id": range(n), "text": [f"ticket {v} lorem ipsum dolor lorem ipsum" for v in values]}
    )
    wh = Warehouse.from_frames({"t": frame}, memory_limit_mb=64)
    hit = lambda text: int(text.split()[1]) % 10 == 7  # noqa: E731
    with FakeAnthropic(where=lambda p, r: (hit(r["text"]), "ends in 7")) as fake:
        limits = Limits(max_cost_usd=None)
        sem = semantic(make_lm(fake), wh, None, limits, batch_rows=500, batch_tokens=60_000)
        info, prov, stats = sem.where("t", "ends in 7", columns=["text"])
    assert stats.distinct == len(set(values)) and stats.failed == 0
    assert prov.rows == n
    assert info.rows == stats.matches == sum(1 for v in values if v % 10 == 7)
    wh.close()


def test_matches_and_provenance_keep_the_input_order(make_lm: MakeLM) -> None:
    """The results follow the input's row order, not the order values were judged in (key
    order) or answered in, nor the order of the engine's parallel join (the input spans
    several of its row groups); duplicated values get their verdict on every row; the
    provenance is a scratch table named after the matches, with the input's columns then the
    verdict's."""
    rng = random.Random(5)
    keys = [rng.randrange(10**9) for _ in range(300_000)]
    frame = pd.DataFrame({"k": keys, "body": [f"ticket {k % 40}" for k in keys]})
    wh = Warehouse.from_frames({"t": frame})
    hit = lambda body: int(body.split()[1]) % 3 == 0  # noqa: E731
    with FakeAnthropic(where=lambda p, r: (hit(r["body"]), "div 3"), max_concurrency=3) as fake:
        sem = semantic(make_lm(fake, max_concurrency=6), wh, batch_rows=7)
        info, prov, stats = sem.where("t", "divisible by 3", columns=["body"])
        first, _, _ = sem.where("t", "divisible by 3", columns=["body"], limit=5)
    expected = [k for k, b in zip(keys, frame["body"], strict=True) if hit(b)]
    rows = 10**6
    assert wh.query(f"SELECT k FROM {info.name}", max_rows=rows).to_pydict()["k"] == expected
    assert wh.query(f"SELECT k FROM {first.name}").to_pydict()["k"] == expected[:5]
    got = wh.query(f"SELECT k, _verdict FROM {prov.name}", max_rows=rows).to_pydict()
    assert got["k"] == keys and got["_verdict"] == [hit(b) for b in frame["body"]]
    assert prov.name == f"{info.name}_provenance" and prov.scratch and prov.rows == 300_000
    assert list(info.columns) == ["k", "body", "_verdict_reason"]
    assert list(prov.columns[:3]) == ["k", "body", "_verdict"]
    assert stats.matches == len(expected) and _working_tables(wh) == []


def test_values_are_judged_in_key_order_unless_a_limit_asks_for_first_seen(
    make_lm: MakeLM,
) -> None:
    """Without a limit, values go out in verdict-key order (the cache then receives ascending
    key ranges); with limit=, in first-seen order, so the first matching rows are found
    first."""
    from rlm_dagster.cache import value_hash

    bodies = [f"ticket {i:03d}" for i in range(60)]
    frame = pd.DataFrame({"id": range(60), "body": bodies})
    sent: list[str] = []

    def judge(predicate: str, row: dict[str, Any]) -> tuple[bool, str]:
        sent.append(row["body"])
        return True, "yes"

    with FakeAnthropic(where=judge, max_concurrency=1) as fake:
        wh = Warehouse.from_frames({"t": frame})
        semantic(make_lm(fake, max_concurrency=1), wh, batch_rows=10).where(
            "t", "any", columns=["body"]
        )
        value = lambda body: json.dumps({"body": body}, separators=(",", ":"))  # noqa: E731
        assert sent == sorted(bodies, key=lambda b: value_hash(value(b)))
        sent.clear()
        semantic(make_lm(fake, max_concurrency=1), wh, batch_rows=10).where(
            "t", "any, again", columns=["body"], limit=3
        )
        assert sent == bodies[:10]
        wh.close()


@pytest.mark.parametrize("reasons", ["all", "matches", "none"])
def test_every_verdict_format_gives_the_same_rows_and_reasons_where_asked(
    make_lm: MakeLM, reasons: str
) -> None:
    """The three verdict formats judge alike; reasons are kept for every row, for matches
    only, or for none; and the output tokens billed follow."""
    frame = pd.DataFrame(
        {
            "id": range(120),
            "body": [f"ticket {i}: " + ("refund" if i % 4 == 0 else "slow") for i in range(120)],
        }
    )

    def judge(predicate: str, row: dict[str, Any]) -> tuple[bool, str]:
        hit = "refund" in row["body"]
        return hit, "asks for money back" if hit else "only a complaint"

    with FakeAnthropic(where=judge) as fake:
        lm = make_lm(fake)
        wh = Warehouse.from_frames({"t": frame})
        sem = Semantic(lm, wh, Budget(Limits(), lm.accounting), config=WhereConfig(reasons=reasons))
        _, prov, stats = sem.where("t", "asks for a refund", columns=["body"])
        [schema] = {json.dumps(r.output_format, sort_keys=True) for r in fake.requests}
    assert stats.matches == 30 and stats.failed == 0
    reasons_of = wh.query(
        f"SELECT _verdict, count(_verdict_reason) AS n FROM {prov.name} GROUP BY ALL"
    ).to_pydict()
    with_reason = dict(zip(reasons_of["_verdict"], reasons_of["n"], strict=True))
    expected = {
        "all": {True: 30, False: 90},
        "matches": {True: 30, False: 0},
        "none": {True: 0, False: 0},
    }
    assert with_reason == expected[reasons]
    assert ("verdicts" in schema) == (reasons == "all")


def test_verdict_formats_cost_what_they_must(make_lm: MakeLM) -> None:
    """Same rows: ids only < reasons for matches < reasons for all, in billed output tokens."""
    frame = pd.DataFrame(
        {"body": [f"ticket {i}: " + ("refund" if i % 10 == 0 else "slow") for i in range(200)]}
    )
    judge = lambda p, row: ("refund" in row["body"], "a reason of several words here")  # noqa: E731
    spent = {}
    with FakeAnthropic(where=judge) as fake:
        for reasons in ("none", "matches", "all"):
            lm = make_lm(fake)
            wh = Warehouse.from_frames({"t": frame})
            Semantic(
                lm, wh, Budget(Limits(), lm.accounting), config=WhereConfig(reasons=reasons)
            ).where("t", "asks for a refund")
            spent[reasons] = sum(r.usage.output_tokens for r in lm.accounting.records)
    assert spent["none"] < spent["matches"] < spent["all"]


def test_a_partition_reply_must_account_for_every_id_once() -> None:
    from rlm_dagster.semantic import parse_partition

    ok, problem = parse_partition(
        {"matches": [{"id": 0, "reason": "yes"}], "non_matches": [1, 2]}, 3, reasons=True
    )
    assert {k: (v.match, v.reason) for k, v in ok.items()} == {
        0: (True, "yes"),
        1: (False, ""),
        2: (False, ""),
    }
    assert problem == ""
    # An id in both lists, listed twice, unknown, or missing: not a verdict.
    bad, problem = parse_partition({"matches": [0, 3, 1], "non_matches": [0, 1]}, 4, reasons=False)
    assert set(bad) == {3} and "id 0 listed 2 times" in problem and "id 1 listed 2 times" in problem
    bad, problem = parse_partition({"matches": [7], "non_matches": [0]}, 2, reasons=False)
    assert set(bad) == {0} and "unknown id 7" in problem
    missing, problem = parse_partition({"matches": [], "non_matches": [0]}, 2, reasons=False)
    assert set(missing) == {0} and problem == "ids missing from the reply"
    assert parse_partition({"verdicts": []}, 1, reasons=False) == (
        {},
        "reply held no matches and non_matches lists",
    )


def test_batch_size_is_chosen_by_agreement_with_single_row_verdicts(make_lm: MakeLM) -> None:
    """A judge that gets careless past the 20th row of a request: calibration measures it on
    a sample (one row per request, then packed by 10, 20, 40), keeps 20, and packs the
    rest by 20; every verdict is then right."""
    frame = pd.DataFrame(
        {"body": [f"ticket {i}: " + ("refund" if i % 3 == 0 else "slow") for i in range(400)]}
    )

    def careless(req: FakeRequest) -> str:
        verdicts = [
            {"id": k, "match": ("refund" in row["body"]) != (k >= 20), "reason": "r"}
            for k, row in req.rows or []
        ]
        return json.dumps(shape_verdicts(req, verdicts))

    events: list[Event] = []
    with FakeAnthropic(where_reply=careless) as fake:
        lm = make_lm(fake)
        wh = Warehouse.from_frames({"t": frame})
        config = WhereConfig(calibrate=True, batch_rows=80, batch_tokens=100_000)
        sem = Semantic(
            lm, wh, Budget(Limits(), lm.accounting), config=config, on_event=events.append
        )
        _, _, stats = sem.where("t", "asks for a refund")
        sizes = [len(r.rows or []) for r in fake.requests]
    assert stats.calibration == {
        "values": 40,
        # 80 cannot be measured on 40 values: not a candidate
        "agreement": {"10": 1.0, "20": 1.0, "40": 0.5},
        "batch_rows": 20,
    }
    calibrating = 40 + 4 + 2 + 1
    assert sizes[:40] == [1] * 40 and max(sizes[calibrating:]) == 20
    assert stats.matches == 134 and stats.failed == 0
    assert any(isinstance(e, WhereCalibrated) and e.batch_rows == 20 for e in events)
