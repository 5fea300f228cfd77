"""RLM assets in Dagster: the CLI end to end, metadata, and clear failures."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest
from cli import cli_env, materialize_cli
from dagster_duckdb import DuckDBResource

from rlm_dagster import RLMResource, rlm_asset
from rlm_dagster.errors import ConfigError, MissingAPIKey, OutputSchemaError
from rlm_dagster.testing import FakeAnthropic, FakeRequest, shape_verdicts

REPO = Path(__file__).resolve().parents[1]

ROOT_SCRIPT = [
    "Let me look.\n```repl\nprint(len(tickets), len(customers))\n"
    'print(sql("SELECT plan, count(*) AS n FROM customers GROUP BY plan ORDER BY plan"))\n```',
    "```repl\n"
    'window = "SELECT t.ticket_id, t.customer_id, t.body FROM tickets t JOIN customers c USING (customer_id) '
    "WHERE c.plan = 'enterprise'\"\n"
    "threats = llm_where(window, 'The customer threatens to cancel', columns=['body'])\n"
    "top = threats.df().sort_values('ticket_id').head(3)\n"
    "why = llm_query('Why are these customers unhappy? ' + ' | '.join(top['body']))\n"
    "print(len(threats), why)\n```",
    "```repl\n"
    "df = sql(f'SELECT customer_id, ticket_id, _verdict_reason AS reason FROM {threats} ORDER BY ticket_id')\n"
    "FINAL(df)\n```",
]


def judge_from(churn_by_body: dict[str, bool]) -> Any:
    def judge(predicate: str, row: dict[str, Any]) -> tuple[bool, str]:
        hit = churn_by_body[row["body"]]
        return hit, "threatens to leave" if hit else "no threat"

    return judge


def usage_rows(meta: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """The rlm/usage table by (role, model)."""
    return {(r.data["role"], r.data["model"]): r.data for r in meta["rlm/usage"].records}


def materialization_metadata(dagster_home: Path, key: str) -> dict[str, Any]:
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey(key))
        assert event is not None and event.asset_materialization is not None
        return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def test_cli_materialize_end_to_end(
    tmp_path: Path,
    warehouse_file: str,
    churn_labels: dict[int, bool],
    churn_by_body: dict[str, bool],
) -> None:
    """`dagster asset materialize` in a subprocess, real DuckDB file, real SDK, fake server."""
    dagster_home = tmp_path / "dagster_home"
    with FakeAnthropic(
        root=ROOT_SCRIPT, sub=lambda r: "pricing and outages", where=judge_from(churn_by_body)
    ) as fake:
        defs_file = tmp_path / "defs.py"
        defs_file.write_text(
            textwrap.dedent(
                f"""
                import dagster as dg
                from dagster_duckdb import DuckDBResource
                from rlm_dagster import RLMResource, rlm_asset

                churn = rlm_asset(
                    name="churn",
                    question="Which enterprise customers threatened to cancel, and why?",
                    tables=["tickets", "customers"],
                    output={{"customer_id": "BIGINT", "ticket_id": "BIGINT", "reason": "VARCHAR"}},
                    max_iterations=6,
                )
                defs = dg.Definitions(
                    assets=[churn],
                    resources={{
                        "duckdb": DuckDBResource(database={warehouse_file!r}),
                        "rlm": RLMResource(api_key="test-key", base_url={fake.base_url!r},
                                           root_model="fake-root", sub_model="claude-haiku-4-5"),
                    }},
                )
                """
            )
        )
        proc = materialize_cli(defs_file, "churn", cwd=tmp_path, env=cli_env(dagster_home))
        counts = {k: fake.count(k) for k in ("root", "sub", "where")}
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    assert "iteration 1/6: ran 1 cell(s)" in log and "llm_where:" in log
    # what the step waits for is said before the wait
    assert "iteration 1/6: waiting for the root model (fake-root)" in log
    assert "llm_where: starting: " in log and " to judge in " in log
    assert "'fake-root' is unknown, so its cost is reported as unknown" in log
    # the end of the run says what it answered, where it went, what it cost, who answered
    assert "RLM answer (FINAL): " in log and "written to: main.churn (" in log
    assert "paid now" in log and "model calls, 0 replayed from the cache" in log
    assert "answered by: anthropic fake-root (root) + claude-haiku-4-5 (sub)" in log
    assert "see more: the asset's page in the Dagster UI" in log

    con = duckdb.connect(warehouse_file, read_only=True)
    rows = con.sql("SELECT customer_id, ticket_id, reason FROM churn ORDER BY ticket_id").fetchall()
    enterprise = {
        r[0]
        for r in con.sql("SELECT customer_id FROM customers WHERE plan = 'enterprise'").fetchall()
    }
    expected = {
        t
        for t, c in con.sql("SELECT ticket_id, customer_id FROM tickets").fetchall()
        if c in enterprise and churn_labels[t]
    }
    con.close()
    assert {r[1] for r in rows} == expected and expected
    assert all(r[2] == "threatens to leave" for r in rows)

    meta = materialization_metadata(dagster_home, "churn")
    assert meta["rlm/provider"] == "anthropic"
    assert meta["rlm/iterations"] == 3 and counts["root"] == 3
    assert meta["rlm/root_calls"] == 3
    assert meta["rlm/sub_calls"] == counts["sub"] + counts["where"] == 1 + counts["where"]
    assert meta["dagster/row_count"] == len(rows)
    assert meta["dagster/table_name"] == "main.churn"
    # the declared types, as DuckDB stored them; the answer as a table; each call
    types = {c.name: c.type for c in meta["dagster/column_schema"].columns}
    assert types == {"customer_id": "BIGINT", "ticket_id": "BIGINT", "reason": "VARCHAR"}
    answer_rows = meta["rlm/answer_table"].records
    assert len(answer_rows) == len(rows) and set(answer_rows[0].data) == set(types)
    # every row llm_where judged is a table beside the answer, with verdict and cost share
    con = duckdb.connect(warehouse_file, read_only=True)
    verdicts = con.sql(
        "SELECT predicate, row, _verdict, _verdict_reason, _decided_by, _cost_usd "
        "FROM main.churn_llm_where_verdicts"
    ).fetchall()
    window = con.sql(
        "SELECT count(*) FROM tickets JOIN customers USING (customer_id) WHERE plan = 'enterprise'"
    ).fetchall()[0][0]
    con.close()
    assert meta["rlm/verdicts_table"].startswith("main.churn_llm_where_verdicts (")
    shown = [r.data for r in meta["rlm/verdicts"].records]  # the first rows, on the page
    assert shown and {"_verdict", "_verdict_reason", "_decided_by", "_cost_usd"} <= set(shown[0])
    assert len(verdicts) == window  # one row per ticket the filter judged
    assert {v[0] for v in verdicts} == {"The customer threatens to cancel"}
    assert sum(v[2] is True for v in verdicts) >= len(rows)
    assert all(v[4] == "model" and v[5] is not None and '"body"' in v[1] for v in verdicts)
    assert not any('"_batch"' in v[1] or '"_verdict' in v[1] for v in verdicts)  # input only
    # the whole trajectory, unclipped, beside the answer
    con = duckdb.connect(warehouse_file, read_only=True)
    steps = con.sql("SELECT turn, cell, kind, text FROM main.churn_trajectory").fetchall()
    con.close()
    assert meta["rlm/trajectory_table"].startswith("main.churn_trajectory (")
    assert {s[2] for s in steps} >= {"reply", "code", "output", "answer"}
    code = [s[3] for s in steps if s[2] == "code"]
    assert any("llm_where(window" in c for c in code)
    calls = [r.data for r in meta["rlm/calls"].records]
    assert len(calls) == sum(counts.values()) and {c["role"] for c in calls} >= {"root", "where"}
    usage = usage_rows(meta)
    assert (
        usage[("sub", "claude-haiku-4-5")]["calls"] + usage[("where", "claude-haiku-4-5")]["calls"]
        == meta["rlm/sub_calls"]
    )
    assert usage[("where", "claude-haiku-4-5")]["paid_usd"] > 0
    assert usage[("root", "fake-root")]["input_tokens"] > 0
    assert usage[("root", "fake-root")]["paid_usd"] is None  # unknown price: no made-up number
    assert meta["rlm/cost_unknown_models"] == "fake-root"
    assert "llm_where" in meta["rlm/trajectory"] and "### Turn 3" in meta["rlm/trajectory"]
    assert str(rows[0][1]) in meta["rlm/answer"]


# -- in-process: failures are clear and keep what was paid for ------------------------------------


def run_asset(
    asset: dg.AssetsDefinition, rlm: RLMResource, database: str
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [asset],
        resources={"rlm": rlm, "duckdb": DuckDBResource(database=database)},
        raise_on_error=False,
    )


def step_failure(result: dg.ExecuteInProcessResult) -> tuple[str, dict[str, Any]]:
    failures = [e for e in result.all_events if e.is_step_failure]
    assert failures, "expected the step to fail"
    data = failures[0].step_failure_data
    user_failure = data.user_failure_data
    meta = {k: v.value for k, v in (user_failure.metadata if user_failure else {}).items()}
    if user_failure is not None:
        return str(user_failure.description), meta
    error = data.error
    messages = []
    while error is not None:  # the user's exception is the cause of Dagster's wrapper
        messages.append(error.message)
        error = error.cause
    return "\n".join(messages), meta


def test_no_final_answer_fails_with_trajectory_in_metadata(warehouse_file: str) -> None:
    asset = rlm_asset(name="stuck", question="q?", tables=["tickets"], max_iterations=2)
    with (
        FakeAnthropic(root=lambda r: "```repl\nprint('thinking')\n```") as fake,
        dg.DagsterInstance.ephemeral() as instance,
    ):
        result = dg.materialize(
            [asset],
            instance=instance,
            resources={
                "rlm": RLMResource(api_key="k", base_url=fake.base_url, root_model="fake-root"),
                "duckdb": DuckDBResource(database=warehouse_file),
            },
            raise_on_error=False,
        )
        observations = instance.fetch_observations(dg.AssetKey("stuck"), limit=5).records
    message, meta = step_failure(result)
    assert "No final answer after 2 iterations" in message
    assert meta["rlm/iterations"] == 3 and "thinking" in meta["rlm/trajectory"]
    assert usage_rows(meta)[("root", "fake-root")]["calls"] == 3
    # the failed run's story is on the asset's page too, not only in the run log
    (record,) = observations
    observation = record.asset_observation
    assert observation is not None and "failed run: NoFinalAnswer" in str(observation.description)
    observed = {k: v.value for k, v in observation.metadata.items()}
    assert observed["rlm/error"] == "NoFinalAnswer" and "thinking" in observed["rlm/trajectory"]


def test_unknown_table_lists_the_tables_that_exist(warehouse_file: str) -> None:
    asset = rlm_asset(name="typo", question="q?", tables=["tikets"])
    with FakeAnthropic(root=["FINAL(x)"]) as fake:
        result = run_asset(
            asset,
            RLMResource(api_key="k", base_url=fake.base_url, root_model="fake-root"),
            warehouse_file,
        )
        assert fake.count() == 0  # nothing paid before the error
    message, _ = step_failure(result)
    assert "Table 'tikets' does not exist" in message
    assert "Tables that exist: customers, orders, tickets" in message


def test_missing_api_key_names_the_variable(warehouse_file: str) -> None:
    asset = rlm_asset(name="nokey", question="q?", tables=["tickets"])
    result = run_asset(asset, RLMResource(), warehouse_file)
    message, _ = step_failure(result)
    assert "ANTHROPIC_API_KEY" in message and "provider='demo'" in message
    with pytest.raises(MissingAPIKey), RLMResource().open_lm():
        pass


@pytest.mark.parametrize(
    ("output", "needle"),
    [
        ({"customer_id": "BIGINT", "reason": "TEXTT"}, "column 'reason' has type 'TEXTT'"),
        ({"customer id": "BIGINT"}, "column name 'customer id' is not a plain identifier"),
        ({"n": 5}, "column 'n' needs a DuckDB type as a string"),
        ({}, "non-empty dict"),
    ],
)
def test_malformed_output_schema_is_refused_at_definition(
    output: dict[str, Any], needle: str
) -> None:
    with pytest.raises(OutputSchemaError, match=None) as err:
        rlm_asset(name="bad", question="q?", tables=["tickets"], output=output)
    assert needle in str(err.value)


def test_definition_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="tables= must be a non-empty list"):
        rlm_asset(name="x", question="q?", tables="tickets")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="question="):
        rlm_asset(name="x", question=" ", tables=["tickets"])


def test_asset_spec_deps_kinds_and_key_prefix(warehouse_file: str) -> None:
    asset = rlm_asset(
        name="themes",
        question="q?",
        tables=["tickets", "customers"],
        key_prefix="insights",
        output={"theme": "VARCHAR", "n": "BIGINT"},
    )
    spec = next(iter(asset.specs))
    assert spec.key == dg.AssetKey(["insights", "themes"])
    assert {d.asset_key for d in spec.deps} == {dg.AssetKey("tickets"), dg.AssetKey("customers")}
    # no provider kind: the resource (Claude, a local server or the demo) is not known yet
    assert spec.kinds == {"rlm", "duckdb"}
    named = rlm_asset(name="x", question="q?", tables=["t"], root_model="claude-sonnet-5-5")
    assert next(iter(named.specs)).kinds == {"rlm", "anthropic", "duckdb"}
    script = [
        "```repl\nFINAL(sql('SELECT subject AS theme, count(*) AS n FROM tickets GROUP BY 1 ORDER BY 2 DESC LIMIT 3'))\n```"
    ]
    with FakeAnthropic(root=script) as fake:
        result = run_asset(
            asset,
            RLMResource(api_key="k", base_url=fake.base_url, root_model="fake-root"),
            warehouse_file,
        )
    assert result.success
    con = duckdb.connect(warehouse_file, read_only=True)
    assert con.sql("SELECT count(*) FROM insights.themes").fetchall() == [(3,)]
    con.close()


def test_demo_provider_is_labelled(warehouse_file: str) -> None:
    asset = rlm_asset(
        name="themes",
        question="What are the main themes of urgent support tickets, with counts?",
        tables=["tickets"],
    )
    result = run_asset(asset, RLMResource(provider="demo"), warehouse_file)
    assert result.success
    meta = {
        k: v.value
        for k, v in result.get_asset_materialization_events()[0].materialization.metadata.items()
    }
    assert meta["rlm/provider"] == "demo" and "DEMO" in meta["rlm/note"]
    assert meta["rlm/root_model"] == "demo-root"


def test_retryable_model_error_is_retried_by_the_retry_policy(warehouse_file: str) -> None:
    from rlm_dagster.testing import Fault

    asset = rlm_asset(
        name="flaky", question="q?", tables=["tickets"], retry_policy=dg.RetryPolicy(max_retries=2)
    )

    def always_overloaded(req: FakeRequest) -> Fault:
        return Fault(status=529, retry_after_s=0.01)

    with FakeAnthropic(root=always_overloaded) as fake:
        rlm = RLMResource(
            api_key="k", base_url=fake.base_url, root_model="fake-root", max_retries=1
        )
        result = run_asset(asset, rlm, warehouse_file)
        attempts = fake.count("root", include_faulted=True)
    message, _ = step_failure(result)
    assert "529" in message and "can be retried" in message
    assert attempts == 3 * 2  # 3 step attempts (1 + 2 retries), each sending 1 + max_retries
    assert sum(1 for e in result.all_events if e.event_type_value == "STEP_RESTARTED") == 2


def test_errors_a_retry_cannot_fix_are_not_retried(warehouse_file: str) -> None:
    from rlm_dagster.testing import Fault

    asset = rlm_asset(name="badkey", question="q?", tables=["tickets"])  # default retry policy
    with FakeAnthropic(root=lambda req: Fault(status=401)) as fake:
        result = run_asset(
            asset,
            RLMResource(api_key="k", base_url=fake.base_url, root_model="fake-root"),
            warehouse_file,
        )
        attempts = fake.count("root", include_faulted=True)
    message, meta = step_failure(result)
    assert "rejected the API key (401)" in message and meta["rlm/retryable"] is False
    assert attempts == 1


def test_worker_limits_and_sandbox_level_come_from_the_resource(warehouse_file: str) -> None:
    asset = rlm_asset(name="limits", question="q?", tables=["tickets"])
    script = [
        "```repl\nimport resource\nFINAL(str(resource.getrlimit(resource.RLIMIT_AS)[0]))\n```"
    ]
    with FakeAnthropic(root=script) as fake:
        rlm = RLMResource(
            api_key="k",
            base_url=fake.base_url,
            root_model="fake-root",
            worker_memory_mb=768,
            sandbox="process",
        )
        result = run_asset(asset, rlm, warehouse_file)
    assert result.success
    meta = {
        k: v.value
        for k, v in result.get_asset_materialization_events()[0].materialization.metadata.items()
    }
    assert meta["rlm/answer_preview"] == str(768 * 1024**2)
    assert meta["rlm/sandbox"].startswith("process")


def test_an_unfixable_sub_model_error_fails_the_asset_even_if_the_code_catches_it(
    warehouse_file: str,
) -> None:
    from rlm_dagster.testing import Fault

    script = [
        "```repl\ntry:\n    llm_where(tickets, 'threatens to cancel', columns=['body'])\n"
        "except Exception as e:\n    print('worked around', type(e).__name__)\n```",
        "```repl\nFINAL('a fallback answer')\n```",
    ]
    asset = rlm_asset(name="forbidden", question="q?", tables=["tickets"])
    with FakeAnthropic(root=script, where_reply=lambda req: Fault(status=403)) as fake:
        result = run_asset(
            asset,
            RLMResource(api_key="k", base_url=fake.base_url, root_model="fake-root"),
            warehouse_file,
        )
        root_turns = fake.count("root")
    message, meta = step_failure(result)
    assert not result.success and "ProviderAuthError" in message and "403" in message
    assert meta["rlm/retryable"] is False and root_turns == 1  # no turn to work around it
    assert "worked around" in meta["rlm/trajectory"]  # the failed run's story is on the asset
    assert not [e for e in result.all_events if e.event_type_value == "STEP_RESTARTED"]


def test_an_outage_mid_filter_is_retried_and_the_retry_pays_only_for_the_rest(
    warehouse_file: str, churn_by_body: dict[str, bool]
) -> None:
    """The first attempt's llm_where meets a 529 outage: the asset does not succeed with NULL
    rows; the retry policy re-runs it, root turns and finished verdicts replay from the cache,
    and the answer is complete."""
    from rlm_dagster.testing import Fault

    asset = rlm_asset(
        name="outage",
        question="Which tickets threaten to cancel?",
        tables=["tickets", "customers"],
        output={"customer_id": "BIGINT", "ticket_id": "BIGINT", "reason": "VARCHAR"},
        retry_policy=dg.RetryPolicy(max_retries=1),
    )
    judge = judge_from(churn_by_body)
    seen = [0]

    def where_reply(req: FakeRequest) -> Any:
        seen[0] += 1
        if 3 <= seen[0] <= 5:  # the 3rd batch and both its retries meet the outage
            return Fault(status=529, retry_after_s=0.01)
        verdicts = [
            {"id": k, "match": m, "reason": why}
            for k, row in req.rows or []
            for m, why in [judge(req.predicate or "", row)]
        ]
        return json.dumps(shape_verdicts(req, verdicts))

    with FakeAnthropic(root=ROOT_SCRIPT * 2, sub=lambda r: "pricing", where_reply=where_reply) as f:
        rlm = RLMResource(
            api_key="k",
            base_url=f.base_url,
            root_model="fake-root",
            max_retries=2,
            max_concurrency=1,
            where_batch_rows=5,
        )
        result = run_asset(asset, rlm, warehouse_file)
        judged = sum(len(r.rows or []) for r in f.requests if r.kind == "where" and r.status == 200)
    assert result.success
    restarts = [e for e in result.all_events if e.event_type_value == "STEP_RESTARTED"]
    assert len(restarts) == 1
    (event,) = result.get_asset_materialization_events()
    meta = {k: v.value for k, v in event.materialization.metadata.items()}
    assert meta["rlm/where_undecided_rows"] == 0
    assert judged == 211  # every distinct value judged once over both attempts (221 rows)
    assert meta["rlm/cache_hits"] >= 1  # the retry replayed the first root turn


def test_a_warehouse_locked_by_another_writer_is_retryable(warehouse_file: str) -> None:
    import subprocess
    import sys

    from rlm_dagster import Warehouse
    from rlm_dagster.errors import WarehouseBusy

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; con = duckdb.connect(sys.argv[1]); print('locked', "
            "flush=True); time.sleep(30)",
            warehouse_file,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(WarehouseBusy, match="locked by another writer") as err:
            Warehouse.snapshot(warehouse_file, ["tickets"], lock_timeout_s=0.5)
        assert err.value.retryable
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize(
    ("question", "output"),
    [
        ("How many customers are there?", None),  # no script for the question
        ("Which customers threaten to cancel?", {"customer_id": "BIGINT"}),  # nor the shape
    ],
)
def test_the_demo_refuses_questions_it_has_no_script_for(
    warehouse_file: str, question: str, output: dict[str, str] | None
) -> None:
    """A placeholder never goes green: the demo fails fast, says it is the demo, and what to set."""
    asset = rlm_asset(name="anything", question=question, tables=["customers"], output=output)
    result = run_asset(asset, RLMResource(provider="demo"), warehouse_file)
    assert not result.success
    description, meta = step_failure(result)
    assert "DemoCannotAnswer" in description and "DEMO" in description
    assert "ANTHROPIC_API_KEY" in description
    assert meta["rlm/error"] == "DemoCannotAnswer" and meta["rlm/retryable"] is False
    assert not result.get_asset_materialization_events()


def test_run_summary_labels_replays_and_the_demo() -> None:
    from rlm_dagster.dagster.metadata import run_summary
    from rlm_dagster.engine.budget import Limits
    from rlm_dagster.engine.loop import Answer, RLMResult
    from rlm_dagster.models.client import Accounting, CallRecord, Usage

    acc = Accounting()
    for role in ("root", "sub"):
        acc.add(CallRecord(role, "demo-root", Usage(10, 5), 0.002, 0.0, cache_hit=True))
    result = RLMResult(
        question="q",
        answer=Answer(text="two customers\nthreaten to leave", form="FINAL"),
        turns=[],
        accounting=acc,
        duration_s=1.0,
        limits=Limits(),
        provider="demo",
        root_model="demo-root",
        sub_model="demo-sub",
        sandbox="process",
    )
    text = run_summary(result, written=("main.churn", 2), cache_path="/p/cache.sqlite3")
    assert "RLM answer (FINAL): two customers threaten to leave" in text
    assert "written to: main.churn (2 rows)" in text
    assert "$0.0000 paid now, $0.0040 replayed" in text
    assert "all 2 model calls replayed from the cache: nothing was paid" in text
    assert "[the offline DEMO model: scripted, not an LLM]" in text
    assert "ledger at /p/cache.sqlite3" in text


def test_the_cache_lives_with_the_project_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rlm_dagster.cache import default_cache_path

    monkeypatch.delenv("RLM_CACHE_PATH", raising=False)
    for project in ("one", "two"):
        (tmp_path / project).mkdir()
        monkeypatch.chdir(tmp_path / project)
        assert default_cache_path() == str(tmp_path / project / ".rlm_dagster" / "cache.sqlite3")


def test_a_fresh_answer_is_asked_for_with_a_run_tag_or_rlm_fresh(
    warehouse_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asset = rlm_asset(name="plans", question="How many customers per plan?", tables=["customers"])
    final = "```repl\nFINAL(sql('SELECT plan, count(*) AS n FROM customers GROUP BY 1'))\n```"
    with FakeAnthropic(root=lambda r: final) as fake:
        rlm = RLMResource(
            api_key="k",
            base_url=fake.base_url,
            root_model="fake-root",
            cache_path=str(tmp_path / "cache.sqlite3"),
        )
        resources = {"rlm": rlm, "duckdb": DuckDBResource(database=warehouse_file)}
        paid = []
        for tags, env in (({}, ""), ({}, ""), ({"rlm/fresh": "true"}, ""), ({}, "1")):
            monkeypatch.setenv("RLM_FRESH", env)
            fake.reset()
            result = dg.materialize([asset], resources=resources, tags=tags)
            assert result.success
            paid.append(fake.count("root"))
    # first run pays, the second replays, a fresh one (tag, then RLM_FRESH=1) pays again
    assert paid == [1, 0, 1, 1]


def test_checks_run_from_the_stored_answer_without_calling_a_model(
    warehouse_file: str, tmp_path: Path
) -> None:
    asset = rlm_asset(
        name="plans",
        question="How many customers per plan?",
        tables=["customers"],
        output={"plan": "VARCHAR", "n": "BIGINT"},
    )
    final = "```repl\nFINAL(sql('SELECT plan, count(*) AS n FROM customers GROUP BY 1'))\n```"
    with FakeAnthropic(root=lambda r: final) as fake, dg.DagsterInstance.ephemeral() as instance:
        resources = {
            "rlm": RLMResource(
                api_key="k",
                base_url=fake.base_url,
                root_model="fake-root",
                cache_path=str(tmp_path / "cache.sqlite3"),
            ),
            "duckdb": DuckDBResource(database=warehouse_file),
        }
        assert dg.materialize([asset], instance=instance, resources=resources).success
        paid = fake.count()
        fake.reset()
        checks_only = dg.AssetSelection.checks_for_assets(asset)
        first = dg.materialize(
            [asset], instance=instance, resources=resources, selection=checks_only
        )
        # break the stored answer: the schema check fails, still without a model call
        con = duckdb.connect(warehouse_file)
        con.execute("ALTER TABLE plans DROP COLUMN n")
        con.close()
        second = dg.materialize(
            [asset],
            instance=instance,
            resources=resources,
            selection=checks_only,
            raise_on_error=False,
        )
        calls = fake.count(include_faulted=True)
    assert paid > 0 and calls == 0
    assert not first.get_asset_materialization_events()
    passed = {e.check_name: e.passed for e in first.get_asset_check_evaluations()}
    assert passed == {
        "answer_not_empty": True,
        "spend_within_budget": True,
        "llm_where_rows_decided": True,
        "output_schema": True,
    }
    again = {e.check_name: e.passed for e in second.get_asset_check_evaluations()}
    assert again["output_schema"] is False and again["answer_not_empty"] is True
