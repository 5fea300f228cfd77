"""``rlm_asset``: an RLM run as a Dagster asset.

    >>> churn = rlm_asset(
    ...     name="churn_reasons",
    ...     question="Which enterprise customers threatened to cancel in the last 90 days, and why?",
    ...     tables=["tickets", "customers"],
    ...     output={"customer_id": "BIGINT", "reason": "VARCHAR"},
    ... )
    >>> churn.key.to_user_string()
    'churn_reasons'

The asset depends on the assets named after its ``tables``; at run time it snapshots them
read-only from the ``duckdb`` resource's file, runs the engine, then writes the answer to a
DuckDB table named after the asset key (``key_prefix`` becomes the schema) in one short write
transaction, and returns a ``MaterializeResult`` with the answer, trajectory and usage.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
import pyarrow as pa
from dagster_duckdb import DuckDBResource

from rlm_dagster.budget import Limits
from rlm_dagster.engine import Event, RLMRun
from rlm_dagster.errors import BudgetExceeded, ConfigError, ModelError, NoFinalAnswer, RLMError
from rlm_dagster.metadata import column_schema, run_metadata, unknown_price_models
from rlm_dagster.output import OutputSchema
from rlm_dagster.redact import redact
from rlm_dagster.resource import RLMResource
from rlm_dagster.warehouse import Warehouse, quote_ident


def rlm_asset(
    *,
    name: str,
    question: str,
    tables: Sequence[str],
    output: Mapping[str, str] | None = None,
    max_iterations: int = 20,
    max_depth: int = 1,
    max_sub_calls: int = 5_000,
    max_cost_usd: float | None = 5.0,
    max_tokens: int | None = None,
    max_wall_time_s: float | None = 3_600.0,
    cell_timeout_s: float = 300.0,
    max_observation_chars: int = 20_000,
    key_prefix: str | Sequence[str] | None = None,
    group_name: str | None = None,
    description: str | None = None,
    tags: Mapping[str, str] | None = None,
    owners: Sequence[str] | None = None,
    rlm_resource_key: str = "rlm",
    duckdb_resource_key: str = "duckdb",
) -> dg.AssetsDefinition:
    """Define an asset whose value is an RLM's answer to ``question`` over ``tables``."""
    if not question or not question.strip():
        raise ConfigError(f"rlm_asset({name!r}): question= must be a non-empty string.")
    if isinstance(tables, str) or not tables:
        raise ConfigError(
            f"rlm_asset({name!r}): tables= must be a non-empty list of table names, e.g. "
            '["tickets", "customers"].'
        )
    schema = OutputSchema.parse(output) if output is not None else None
    limits = Limits(
        max_iterations=max_iterations,
        max_depth=max_depth,
        max_sub_calls=max_sub_calls,
        max_cost_usd=max_cost_usd,
        max_tokens=max_tokens,
        max_wall_time_s=max_wall_time_s,
        cell_timeout_s=cell_timeout_s,
        max_observation_chars=max_observation_chars,
    )
    prefix = [key_prefix] if isinstance(key_prefix, str) else list(key_prefix or [])
    key = dg.AssetKey([*prefix, name])
    deps = [dg.AssetKey(t.split(".")) for t in tables]
    definition_metadata: dict[str, Any] = {
        "rlm/question": question,
        "rlm/tables": ", ".join(tables),
        "rlm/limits": dg.MetadataValue.json(limits.as_dict()),
    }
    if schema is not None:
        definition_metadata["dagster/column_schema"] = dg.TableSchema(
            columns=[dg.TableColumn(n, t) for n, t in schema.columns]
        )

    @dg.asset(
        key=key,
        deps=deps,
        kinds={"rlm", "anthropic", "duckdb"},
        required_resource_keys={rlm_resource_key, duckdb_resource_key},
        description=description or question,
        group_name=group_name,
        metadata=definition_metadata,
        tags=dict(tags or {}),
        owners=list(owners or []),
    )
    def _rlm_asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        rlm: RLMResource = getattr(context.resources, rlm_resource_key)
        duckdb: DuckDBResource = getattr(context.resources, duckdb_resource_key)
        try:
            with rlm.open_cache() as cache, rlm.open_lm(cache=cache) as lm:
                lm.context.update(
                    run_id=context.run_id,
                    asset=key.to_user_string(),
                    partition=context.partition_key if context.has_partition_key else None,
                )
                if lm.provider == "demo":
                    context.log.warning(
                        "Using the offline DEMO model (scripted programs and keyword rules, not an "
                        "LLM) because RLMResource(provider='demo'). Set ANTHROPIC_API_KEY for Claude."
                    )
                warehouse = Warehouse.snapshot(duckdb.database, tables)
                run = RLMRun(
                    question,
                    warehouse=warehouse,
                    lm=lm,
                    limits=limits,
                    output=schema,
                    on_event=lambda event: _log_event(context, event),
                    sandbox=rlm.sandbox,
                    where_config=rlm.where_config(),
                )
                try:
                    result = run.run()
                except NoFinalAnswer as err:
                    raise dg.Failure(
                        description=str(err),
                        metadata=run_metadata(err.trajectory, lm),
                        allow_retries=False,
                    ) from err
                except BudgetExceeded as err:
                    raise dg.Failure(
                        description=f"Budget exceeded: {err}",
                        metadata=run_metadata(err.partial, lm) if err.partial else {},
                        allow_retries=False,
                    ) from err
                finally:
                    warehouse.close()
                for model in unknown_price_models(lm.accounting):
                    context.log.warning(
                        f"The price of model {model!r} is unknown, so its cost is reported as "
                        "unknown (rlm/cost_unknown_models); add it to rlm_dagster.prices.PRICES."
                    )
                answer = result.answer
                table = answer.table
                if table is None:
                    table = pa.table({"question": [question], "answer": [answer.text]})
                table_name = _write_table(duckdb, key, table)
                metadata = run_metadata(result, lm)
        except ModelError as err:
            if err.retryable:
                raise
            raise dg.Failure(description=str(err), allow_retries=False) from err
        except dg.Failure:
            raise
        except RLMError as err:
            raise dg.Failure(
                description=f"{type(err).__name__}: {err}", allow_retries=False
            ) from err
        metadata.update(
            {
                "rlm/answer": dg.MetadataValue.md(_answer_markdown(answer.text, answer.form)),
                "rlm/final_form": answer.form,
                "dagster/row_count": table.num_rows,
                "dagster/table_name": table_name,
                "dagster/column_schema": column_schema(table),
            }
        )
        return dg.MaterializeResult(metadata=metadata)

    return _rlm_asset


def _log_event(context: dg.AssetExecutionContext, event: Event) -> None:
    if event["type"] == "iteration":
        context.log.info(
            redact(
                f"iteration {event['iteration']}/{event['max_iterations']}: ran {event['cells']} cell(s), "
                f"{event['code_lines']} lines of code, {event['output_chars']:,} chars of output"
                + (f", {event['errors']} error(s)" if event["errors"] else "")
                + f"; sub-calls so far {event['sub_calls']:,}, spend so far ${event['cost_usd']:.4f}"
                + ("; final answer received" if event["final"] else "")
                + (f" [{event['note'][:200]}]" if event["note"] else "")
            )
        )
    elif event["type"] in ("llm_where", "llm_where_progress"):
        context.log.info(redact(str(event["summary"])))


def _answer_markdown(text: str, form: str, limit: int = 4_000) -> str:
    shown = text if len(text) <= limit else text[:limit] + "\n…"
    return f"```\n{shown}\n```\n\n_(ended by {form})_"


def _write_table(duckdb: DuckDBResource, key: dg.AssetKey, table: pa.Table) -> str:
    """Replace the asset's table in one short write transaction; return its qualified name."""
    *schema_parts, name = key.path
    schema = schema_parts[-1] if schema_parts else "main"
    qualified = f"{quote_ident(schema)}.{quote_ident(name)}"
    with duckdb.get_connection() as con:
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
            con.register("__rlm_answer", table)
            con.execute(f"CREATE OR REPLACE TABLE {qualified} AS SELECT * FROM __rlm_answer")
            con.unregister("__rlm_answer")
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
    return f"{schema}.{name}"
