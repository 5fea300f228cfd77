"""The sample pipeline: load the CSVs in data/source into DuckDB, ask two RLM questions, and
summarise one answer with a plain asset.

    dagster asset materialize -f definitions.py --select '*'

A schedule refreshes the RLM answers every morning, and a sensor refreshes them whenever the
tickets table is reloaded. RLM assets and the loaders that write the same DuckDB file share
the pool "warehouse" (see the README on serialising DuckDB writers).

With ANTHROPIC_API_KEY set, the RLM assets use Claude. Without it they use the offline DEMO
model (a scripted fake Messages API, not an LLM), and say so in the run log and in each
asset's metadata (rlm/provider: demo).
"""

import logging
import os
from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from rlm_dagster import RLMResource, rlm_asset

DATA = Path(__file__).parent / "data"
WAREHOUSE = os.environ.get("RLM_WAREHOUSE", str(DATA / "warehouse.duckdb"))
WAREHOUSE_POOL = "warehouse"
SOURCES = {
    "customers": "Customer accounts: plan, country, seats, MRR.",
    "orders": "Orders per customer: product, amount, status.",
    "tickets": "Support tickets with free-text subject and body.",
}


def _loader(table: str, description: str) -> dg.AssetsDefinition:
    @dg.asset(
        name=table, kinds={"duckdb"}, group_name="raw", description=description, pool=WAREHOUSE_POOL
    )
    def load(context: dg.AssetExecutionContext, duckdb: DuckDBResource) -> dg.MaterializeResult:
        path = DATA / "source" / f"{table}.csv"
        with duckdb.get_connection() as con:
            con.execute(
                f"CREATE OR REPLACE TABLE {table} AS SELECT * FROM read_csv(?, header = true)",
                [str(path)],
            )
            rows = con.sql(f"SELECT count(*) FROM {table}").fetchall()[0][0]
        context.log.info(f"loaded {rows} rows into {table}")
        return dg.MaterializeResult(metadata={"dagster/row_count": rows, "source": str(path)})

    return load


churn_reasons = rlm_asset(
    name="churn_reasons",
    question=(
        "Which enterprise customers threatened to cancel or not renew in the 90 days up to "
        "2026-11-15, in which ticket, and why?"
    ),
    tables=["tickets", "customers"],
    output={
        "customer_id": "BIGINT",
        "customer_name": "VARCHAR",
        "ticket_id": "BIGINT",
        "reason": "VARCHAR",
    },
    group_name="insights",
    pool=WAREHOUSE_POOL,
    max_iterations=12,
    max_sub_calls=500,
    max_cost_usd=2.0,
)

urgent_ticket_themes = rlm_asset(
    name="urgent_ticket_themes",
    question="What are the main themes of urgent support tickets in the 30 days up to 2026-11-15, with counts?",
    tables=["tickets"],
    group_name="insights",
    pool=WAREHOUSE_POOL,
    max_iterations=10,
    max_sub_calls=300,
    max_cost_usd=1.0,
)


@dg.asset(deps=[churn_reasons], kinds={"duckdb"}, group_name="insights", pool=WAREHOUSE_POOL)
def churn_by_reason(
    context: dg.AssetExecutionContext, duckdb: DuckDBResource
) -> dg.MaterializeResult:
    """A plain downstream asset: churn threats per reason, from the RLM's output table."""
    with duckdb.get_connection() as con:
        con.execute(
            "CREATE OR REPLACE TABLE churn_by_reason AS SELECT reason, count(*) AS threats, "
            "count(DISTINCT customer_id) AS customers FROM churn_reasons GROUP BY reason "
            "ORDER BY threats DESC, reason"
        )
        rows = con.sql("SELECT * FROM churn_by_reason").fetchall()
    context.log.info(f"{len(rows)} churn reasons")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(rows),
            "preview": dg.MetadataValue.md(
                "\n".join(["| reason | threats | customers |", "|---|---|---|"])
                + "".join(f"\n| {r} | {t} | {c} |" for r, t, c in rows)
            ),
        }
    )


rlm_answers = dg.define_asset_job(
    "rlm_answers", selection=dg.AssetSelection.assets(churn_reasons, urgent_ticket_themes)
)
morning_refresh = dg.ScheduleDefinition(
    name="morning_refresh", job=rlm_answers, cron_schedule="0 6 * * *", execution_timezone="UTC"
)


@dg.asset_sensor(asset_key=dg.AssetKey("tickets"), job=rlm_answers)
def tickets_reloaded(
    context: dg.SensorEvaluationContext, asset_event: dg.EventLogEntry
) -> dg.RunRequest:
    """Re-ask the RLM questions whenever the tickets table is reloaded."""
    return dg.RunRequest(run_key=context.cursor)


def _rlm_resource() -> RLMResource:
    if os.environ.get("ANTHROPIC_API_KEY"):
        return RLMResource(
            api_key=dg.EnvVar("ANTHROPIC_API_KEY"),
            base_url=os.environ.get("ANTHROPIC_BASE_URL") or None,
            root_model=os.environ.get("RLM_ROOT_MODEL", "claude-sonnet-5-5"),
            sub_model=os.environ.get("RLM_SUB_MODEL", "claude-haiku-5-5"),
        )
    logging.getLogger("rlm_dagster").warning(
        "ANTHROPIC_API_KEY is not set: RLM assets use the offline DEMO model (scripted, not an LLM)."
    )
    return RLMResource(provider="demo")


defs = dg.Definitions(
    assets=[
        *(_loader(t, d) for t, d in SOURCES.items()),
        churn_reasons,
        urgent_ticket_themes,
        churn_by_reason,
    ],
    jobs=[rlm_answers],
    schedules=[morning_refresh],
    sensors=[tickets_reloaded],
    resources={"duckdb": DuckDBResource(database=WAREHOUSE), "rlm": _rlm_resource()},
)
