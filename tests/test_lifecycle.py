"""RLM assets as Dagster sees them: versions and staleness, partitions, checks, concurrency."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest
from cli import cli_env, materialize_cli
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver
from dagster_duckdb import DuckDBResource

from rlm_dagster import RLMResource, rlm_asset
from rlm_dagster.errors import ConfigError
from rlm_dagster.testing import FakeAnthropic, FakeReply

COUNT = "```repl\nFINAL(sql('SELECT count(*) AS n FROM tickets'))\n```"


def rlm(fake: FakeAnthropic, **kwargs: Any) -> RLMResource:
    return RLMResource(api_key="k", base_url=fake.base_url, root_model=fake.root_model, **kwargs)


def materialize(
    assets: list[Any],
    fake: FakeAnthropic,
    database: str,
    instance: dg.DagsterInstance | None = None,
    **kwargs: Any,
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        assets,
        resources={"rlm": rlm(fake), "duckdb": DuckDBResource(database=database)},
        instance=instance,
        **kwargs,
    )


def meta(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    event = result.get_asset_materialization_events()[0]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def data_version(instance: dg.DagsterInstance, key: str) -> str:
    record = instance.get_latest_materialization_event(dg.AssetKey(key))
    assert record is not None and record.asset_materialization is not None
    return record.asset_materialization.tags["dagster/data_version"]


# -- versions -------------------------------------------------------------------------------------


def test_code_version_follows_what_changes_the_answer() -> None:
    def version(**kwargs: Any) -> str | None:
        options: dict[str, Any] = {"name": "a", "question": "q?", "tables": ["tickets"], **kwargs}
        return next(iter(rlm_asset(**options).specs)).code_version

    base = version()
    assert base == version() and base is not None
    assert version(description="other words") == base  # not part of the answer
    for change in (
        {"question": "another question?"},
        {"output": {"n": "BIGINT"}},
        {"tables": ["tickets", "customers"]},
        {"max_iterations": 5},
        {"sub_model": "claude-haiku-5-5"},
    ):
        assert version(**change) != base, change


def test_changing_the_question_marks_the_asset_stale(warehouse_file: str) -> None:
    original = rlm_asset(name="answer", question="How many tickets?", tables=["tickets"])
    with dg.instance_for_test() as instance, FakeAnthropic(root=[COUNT]) as fake:
        assert materialize([original], fake, warehouse_file, instance).success
        fresh = get_stale_status_resolver(instance, [original]).get_status(dg.AssetKey("answer"))
        edited = rlm_asset(
            name="answer", question="How many tickets, by channel?", tables=["tickets"]
        )
        resolver = get_stale_status_resolver(instance, [edited])
        status = resolver.get_status(dg.AssetKey("answer"))
        causes = resolver.get_stale_root_causes(dg.AssetKey("answer"))
    assert fresh == StaleStatus.FRESH
    assert status == StaleStatus.STALE
    assert any("code version" in c.reason for c in causes)


def test_data_version_changes_only_with_the_inputs_or_the_answer(warehouse_file: str) -> None:
    asset = rlm_asset(name="answer", question="How many tickets?", tables=["tickets"])
    with dg.instance_for_test() as instance, FakeAnthropic(root=lambda r: COUNT) as fake:
        materialize([asset], fake, warehouse_file, instance)
        first = data_version(instance, "answer")
        materialize([asset], fake, warehouse_file, instance)
        same = data_version(instance, "answer")
        con = duckdb.connect(warehouse_file)
        con.execute("UPDATE tickets SET body = body || ' (edited)' WHERE ticket_id = 1")
        con.close()
        materialize([asset], fake, warehouse_file, instance)
        after_edit = data_version(instance, "answer")
    assert first == same  # unchanged inputs, same answer: downstream sees no change
    assert after_edit != first  # an input row changed (the answer, a count, did not)


# -- partitions -------------------------------------------------------------------------------------


def test_daily_partitions_filter_inputs_and_replace_only_their_rows(warehouse_file: str) -> None:
    daily = dg.DailyPartitionsDefinition(start_date="2026-11-01", end_date="2026-11-16")
    asset = rlm_asset(
        name="daily_count",
        question="How many tickets were opened that day?",
        tables=["tickets", "customers"],
        output={"n": "BIGINT"},
        partitions_def=daily,
        partition_column={"tickets": "created_at"},  # customers is bound whole
    )
    script = "```repl\nFINAL(sql('SELECT (SELECT count(*) FROM tickets) AS n, (SELECT count(*) FROM customers) AS c'))\n```"
    days = ["2026-11-03", "2026-11-04", "2026-11-05"]
    with dg.instance_for_test() as instance, FakeAnthropic(root=lambda r: script) as fake:
        for day in days:  # a backfill runs one partition per run
            assert materialize([asset], fake, warehouse_file, instance, partition_key=day).success
        assert materialize([asset], fake, warehouse_file, instance, partition_key=days[1]).success
    con = duckdb.connect(warehouse_file, read_only=True)
    got = dict(con.sql("SELECT _partition, n FROM daily_count ORDER BY 1").fetchall())
    want = dict(
        con.sql(
            "SELECT strftime(created_at, '%Y-%m-%d') AS d, count(*) FROM tickets "
            "WHERE created_at >= '2026-11-03' AND created_at < '2026-11-06' GROUP BY d"
        ).fetchall()
    )
    con.close()
    assert got == want and len(got) == 3  # re-materializing a day replaced its row only


def test_static_partitions(warehouse_file: str) -> None:
    channels = dg.StaticPartitionsDefinition(["email", "chat"])
    asset = rlm_asset(
        name="per_channel",
        question="q?",
        tables=["tickets"],
        partitions_def=channels,
        partition_column="channel",
    )
    with FakeAnthropic(root=lambda r: COUNT) as fake:
        result = materialize([asset], fake, warehouse_file, partition_key="chat")
    con = duckdb.connect(warehouse_file, read_only=True)
    expected = con.sql("SELECT count(*) FROM tickets WHERE channel = 'chat'").fetchall()[0][0]
    answer = con.sql("SELECT n, _partition FROM per_channel").fetchall()
    con.close()
    assert result.success and answer == [(expected, "chat")]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"partitions_def": dg.StaticPartitionsDefinition(["a"])}, "needs partition_column="),
        ({"partition_column": "created_at"}, "partition_column= needs partitions_def="),
        (
            {
                "partitions_def": dg.StaticPartitionsDefinition(["a"]),
                "partition_column": {"orders": "x"},
            },
            "names tables ['orders'] that are not in tables=",
        ),
    ],
)
def test_partition_configuration_errors(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        rlm_asset(name="x", question="q?", tables=["tickets"], **kwargs)
    assert needle in str(err.value)


# -- checks -------------------------------------------------------------------------------------------


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_checks_pass_on_a_good_run(warehouse_file: str) -> None:
    asset = rlm_asset(name="counts", question="q?", tables=["tickets"], output={"n": "BIGINT"})
    with FakeAnthropic(root=[COUNT]) as fake:
        checks = check_results(materialize([asset], fake, warehouse_file))
    assert set(checks) == {
        "answer_not_empty",
        "spend_within_budget",
        "output_schema",
        "llm_where_rows_decided",
    }
    assert all(c.passed for c in checks.values())
    assert checks["output_schema"].metadata["mismatches"].value == "none"


def test_empty_answer_and_spend_near_budget_are_flagged(warehouse_file: str) -> None:
    # one long root turn with a priced model (4,000 of its 4,096 output tokens): what it
    # costs is known from a first run; a budget just above it reserves the turn's upper bound
    # and ends up mostly spent
    probe = rlm_asset(name="probe", question="q?", tables=["tickets"], max_cost_usd=None)

    def turn(request: Any) -> FakeReply:
        return FakeReply(text="FINAL()", usage={"output_tokens": 4_000})

    with FakeAnthropic(root=turn, root_model="claude-opus-4-1") as fake:
        cost = meta(materialize([probe], fake, warehouse_file))["rlm/cost_usd"]
        near = rlm_asset(name="near", question="q?", tables=["tickets"], max_cost_usd=cost * 1.15)
        checks = check_results(materialize([near], fake, warehouse_file))
    assert cost > 0
    assert checks["answer_not_empty"].passed is False
    assert checks["spend_within_budget"].passed is False
    assert checks["spend_within_budget"].severity == dg.AssetCheckSeverity.WARN


# -- concurrency on one DuckDB file ---------------------------------------------------------------------


def test_rlm_assets_run_concurrently_on_one_duckdb_file(
    tmp_path: Path, warehouse_file: str
) -> None:
    """Three RLM assets and a loader writing the same file, multiprocess executor (the CLI's
    default), with every RLM run reaching its final write at about the same moment."""
    slow = (
        "```repl\nimport time\ntime.sleep(2)\nFINAL(sql('SELECT count(*) AS n FROM tickets'))\n```"
    )
    with FakeAnthropic(root=lambda r: slow) as fake:
        defs = tmp_path / "defs.py"
        defs.write_text(
            textwrap.dedent(
                f"""
                import dagster as dg
                from dagster_duckdb import DuckDBResource
                from rlm_dagster import RLMResource, rlm_asset

                @dg.asset
                def notes(duckdb: DuckDBResource) -> None:
                    with duckdb.get_connection() as con:
                        con.execute("CREATE OR REPLACE TABLE notes AS SELECT range AS n FROM range(100000)")

                rlms = [rlm_asset(name=f"q{{i}}", question=f"Question {{i}}?", tables=["tickets"]) for i in range(3)]
                defs = dg.Definitions(
                    assets=[notes, *rlms],
                    executor=dg.multiprocess_executor.configured({{"max_concurrent": 4}}),
                    resources={{
                        "duckdb": DuckDBResource(database={warehouse_file!r}),
                        "rlm": RLMResource(api_key="k", base_url={fake.base_url!r}, root_model="fake-root"),
                    }},
                )
                """
            )
        )
        env = cli_env(tmp_path / "home")
        proc = materialize_cli(defs, "*", cwd=tmp_path, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        run = instance.get_runs(limit=1)[0]
        events = list(instance.all_logs(run.run_id))
    steps = {
        e.step_key: e
        for e in events
        if e.dagster_event and e.dagster_event.event_type_value == "STEP_START"
    }
    ends = {
        e.step_key: e
        for e in events
        if e.dagster_event and e.dagster_event.event_type_value == "STEP_SUCCESS"
    }
    assert set(ends) == {"notes", "q0", "q1", "q2"}
    assert (
        len({steps[f"q{i}"].dagster_event.pid for i in range(3)}) == 3
    )  # each RLM asset in its own process
    # the RLM steps overlapped in time: each started before another one finished
    assert max(steps[f"q{i}"].timestamp for i in range(3)) < min(
        ends[f"q{i}"].timestamp for i in range(3)
    )
    con = duckdb.connect(warehouse_file, read_only=True)
    assert [con.sql(f"SELECT count(*) FROM q{i}").fetchall()[0][0] for i in range(3)] == [1, 1, 1]
    con.close()


def test_pool_is_set_on_the_asset() -> None:
    asset = rlm_asset(name="pooled", question="q?", tables=["tickets"], pool="warehouse_writers")
    assert asset.op.pool == "warehouse_writers"
