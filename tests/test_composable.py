"""The composable path and the translator: RLM work inside a user's own asset body, and a
definition mapped to Dagster objects by a subclass that changes one decision."""

from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource

from rlm_dagster import Limits, RLMResource, rlm_asset
from rlm_dagster.cache import Cache
from rlm_dagster.dagster.definition import RLMAssetArgs
from rlm_dagster.dagster.metadata import run_metadata
from rlm_dagster.dagster.resource import WhereResult
from rlm_dagster.dagster.translator import RLMTranslator
from rlm_dagster.testing import FakeAnthropic, Fault


def resource(fake: FakeAnthropic, tmp_path: Path, **kwargs: Any) -> RLMResource:
    return RLMResource(
        api_key="k",
        base_url=fake.base_url,
        root_model="fake-root",
        sub_model="claude-haiku-4-5",
        cache_path=str(tmp_path / "cache.sqlite3"),
        sandbox="process",
        **kwargs,
    )


def step_failure(result: dg.ExecuteInProcessResult) -> Any:
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    return failure.step_failure_data


def test_rlm_run_and_llm_where_inside_a_user_asset(
    tmp_path: Path, warehouse_file: str, churn_by_body: dict[str, bool]
) -> None:
    seen: dict[str, Any] = {}

    @dg.asset(deps=["tickets", "customers"])
    def churn_report(
        context: dg.AssetExecutionContext, rlm: RLMResource, duckdb: DuckDBResource
    ) -> dg.MaterializeResult:
        where = rlm.llm_where(
            context,
            "tickets",
            "The customer threatens to cancel",
            duckdb=duckdb,
            columns=["body"],
        )
        answer = rlm.run(
            context,
            "How many customers are on each plan?",
            tables=["customers"],
            duckdb=duckdb,
            limits=Limits(max_iterations=3),
        )
        seen.update(where=where, answer=answer)
        return dg.MaterializeResult(metadata=run_metadata(answer))

    script = ["```repl\nFINAL(sql('SELECT plan, count(*) AS n FROM customers GROUP BY 1'))\n```"]
    judge = lambda predicate, row: (churn_by_body[row["body"]], "judged")  # noqa: E731
    with (
        FakeAnthropic(root=script, where=judge) as fake,
        dg.DagsterInstance.ephemeral() as instance,
    ):
        result = dg.materialize(
            [churn_report],
            instance=instance,
            resources={
                "rlm": resource(fake, tmp_path),
                "duckdb": DuckDBResource(database=warehouse_file),
            },
        )
        logs = " ".join(e.user_message for e in instance.all_logs(result.run_id))
    assert result.success
    where: WhereResult = seen["where"]
    threats = {body for body, hit in churn_by_body.items() if hit}
    assert set(where.matches.column("body").to_pylist()) == threats
    assert where.provenance.num_rows == where.stats.rows_in == 600  # every ticket's verdict
    assert where.accounting.calls("where") == where.stats.requests > 0
    assert seen["answer"].answer.table.num_rows > 0
    rows = Cache(tmp_path / "cache.sqlite3").ledger(result.run_id)
    assert {r["asset"] for r in rows} == {"churn_report"}
    assert {r["role"] for r in rows} == {"where", "root"}
    assert "[llm_where: 600 rows" in logs and "iteration 1/3" in logs  # the run log
    # the warehouse was only read
    con = duckdb.connect(warehouse_file, read_only=True)
    tables = {t for (t,) in con.sql("SELECT table_name FROM information_schema.tables").fetchall()}
    con.close()
    assert "churn_report" not in tables


def test_a_failing_provider_in_a_user_asset_is_a_retryable_failure(
    tmp_path: Path, warehouse_file: str
) -> None:
    @dg.asset
    def ask(context: dg.AssetExecutionContext, rlm: RLMResource) -> None:
        rlm.run(context, "Anything?", tables={"t": __import__("pandas").DataFrame({"a": [1]})})

    with FakeAnthropic(root=lambda r: Fault(status=529)) as fake:
        result = dg.materialize(
            [ask],
            resources={"rlm": resource(fake, tmp_path, max_retries=0)},
            raise_on_error=False,
        )
    data = step_failure(result)
    assert data.user_failure_data is not None
    assert "ProviderOverloaded" in data.error.message
    meta = {k: v.value for k, v in data.user_failure_data.metadata.items()}
    assert meta["rlm/error"] == "ProviderOverloaded" and meta["rlm/retryable"] is True


class TeamTranslator(RLMTranslator):
    """Changes three decisions; keeps the rest."""

    def get_asset_key(self, args: RLMAssetArgs) -> dg.AssetKey:
        return dg.AssetKey(["team", args.name])

    def get_dep_key(self, args: RLMAssetArgs, table: str) -> dg.AssetKey:
        return dg.AssetKey(["raw", table])

    def get_group_name(self, args: RLMAssetArgs) -> str | None:
        return "team_insights"


def test_a_translator_subclass_changes_key_deps_and_group(
    tmp_path: Path, warehouse_file: str
) -> None:
    asset = rlm_asset(
        name="plans",
        question="How many customers per plan?",
        tables=["customers"],
        translator=TeamTranslator(),
    )
    spec = next(iter(asset.specs))
    assert spec.key == dg.AssetKey(["team", "plans"])
    assert {d.asset_key for d in spec.deps} == {dg.AssetKey(["raw", "customers"])}
    assert spec.group_name == "team_insights"
    assert spec.description == "How many customers per plan?"  # the default kept
    assert {c.name for c in asset.check_specs} >= {"answer_not_empty", "llm_where_rows_decided"}
    script = ["```repl\nFINAL(sql('SELECT plan, count(*) AS n FROM customers GROUP BY 1'))\n```"]
    with FakeAnthropic(root=script) as fake:
        result = dg.materialize(
            [asset],
            resources={
                "rlm": resource(fake, tmp_path),
                "duckdb": DuckDBResource(database=warehouse_file),
            },
        )
    assert result.success
    con = duckdb.connect(warehouse_file, read_only=True)
    assert con.sql("SELECT count(*) FROM team.plans").fetchall()[0][0] > 0
    con.close()


def test_llm_where_in_a_user_asset_returns_every_row_of_a_large_frame(tmp_path: Path) -> None:
    """150,000 rows (more than model SQL may fetch) with 30 distinct values: all of them come
    back, judged in one request."""
    import pandas as pd

    frame = pd.DataFrame({"id": range(150_000), "body": [f"note {i % 30}" for i in range(150_000)]})
    seen: dict[str, Any] = {}

    @dg.asset
    def notes(context: dg.AssetExecutionContext, rlm: RLMResource) -> None:
        seen["where"] = rlm.llm_where(
            context, "notes", "the note number is even", frame=frame, columns=["body"]
        )

    judge = lambda predicate, row: (int(row["body"].split()[1]) % 2 == 0, "even")  # noqa: E731
    with FakeAnthropic(where=judge) as fake:
        result = dg.materialize([notes], resources={"rlm": resource(fake, tmp_path)})
        assert fake.count("where") == 1
    assert result.success
    where: WhereResult = seen["where"]
    assert where.provenance.num_rows == 150_000
    assert where.matches.num_rows == 75_000
