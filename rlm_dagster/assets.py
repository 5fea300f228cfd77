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

import hashlib
import json
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import dagster as dg
import pyarrow as pa
from dagster_duckdb import DuckDBResource

from rlm_dagster.budget import Limits
from rlm_dagster.engine import RLMResult, RLMRun, fenced, wire_context
from rlm_dagster.errors import (
    BudgetExceeded,
    ConfigError,
    NoFinalAnswer,
    RLMError,
    WarehouseBusy,
)
from rlm_dagster.events import Event
from rlm_dagster.lm import LM
from rlm_dagster.metadata import column_schema, run_metadata, unknown_price_models
from rlm_dagster.models import EFFORTS
from rlm_dagster.output import OutputSchema
from rlm_dagster.prompts import PROMPT_VERSION
from rlm_dagster.redact import redact
from rlm_dagster.resource import RLMResource
from rlm_dagster.warehouse import Warehouse, is_lock_error, quote_ident

DEFAULT_RETRY_POLICY = dg.RetryPolicy(
    max_retries=3, delay=30, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)


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
    root_model: str | None = None,
    sub_model: str | None = None,
    root_effort: str | None = None,
    sub_effort: str | None = None,
    partitions_def: dg.PartitionsDefinition | None = None,
    partition_column: str | Mapping[str, str] | None = None,
    retry_policy: dg.RetryPolicy | None = DEFAULT_RETRY_POLICY,
    pool: str | None = None,
    fail_on_undecided_rows: bool = False,
    context: str | Sequence[str] | dg.AssetKey | None = None,
    rlm_resource_key: str = "rlm",
    duckdb_resource_key: str = "duckdb",
) -> dg.AssetsDefinition:
    """Define an asset whose value is an RLM's answer to ``question`` over ``tables``.

    ``root_model`` / ``sub_model`` override the resource's models for this asset, and
    ``root_effort`` / ``sub_effort`` its efforts (all enter its code version). With ``partitions_def`` (time-window or static), ``partition_column``
    names the column that the partition key filters: one name for every bound table, or a
    ``{table: column}`` mapping (tables left out are bound whole, e.g. dimension tables); the
    output table gets a ``_partition`` column and is replaced one partition at a time.
    ``context`` names an upstream asset whose value (text, a list of documents, a dict or a
    DataFrame, loaded by its IO manager) is bound as the REPL variable ``context``.
    ``retry_policy`` defaults to three retries with exponential backoff and jitter; errors a
    retry cannot fix (auth, bad request, policy, schema, budget) are never retried. ``pool``
    puts the asset in a Dagster concurrency pool (see the README on DuckDB writers).
    ``fail_on_undecided_rows`` makes the ``llm_where_rows_decided`` check blocking (ERROR): a
    run whose ``llm_where`` calls left rows NULL (the model's replies stayed malformed, or it
    refused them) then fails its check and stops downstream assets; by default it warns.
    """
    if not question or not question.strip():
        raise ConfigError(f"rlm_asset({name!r}): question= must be a non-empty string.")
    if isinstance(tables, str) or not tables:
        raise ConfigError(
            f"rlm_asset({name!r}): tables= must be a non-empty list of table names, e.g. "
            '["tickets", "customers"].'
        )
    for option, effort in (("root_effort", root_effort), ("sub_effort", sub_effort)):
        if effort is not None and effort not in EFFORTS:
            raise ConfigError(f"rlm_asset({name!r}): {option}={effort!r}: use one of {EFFORTS}.")
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
    partition_columns = _partition_columns(name, tables, partitions_def, partition_column)
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
    code_version = _digest(
        {
            "question": question,
            "output": schema.as_dict() if schema else None,
            "tables": list(tables),
            "limits": limits.as_dict(),
            "models": [root_model, sub_model],
            **({"efforts": [root_effort, sub_effort]} if root_effort or sub_effort else {}),
            "partition_columns": partition_columns,
            "context": None
            if context is None
            else dg.AssetKey.from_coercible(context).to_user_string(),
            "prompts": PROMPT_VERSION,
        }
    )
    check_specs = [
        dg.AssetCheckSpec(
            "answer_not_empty", asset=key, description="The run produced a non-empty answer."
        ),
        dg.AssetCheckSpec(
            "spend_within_budget",
            asset=key,
            description="The run spent less than 80% of max_cost_usd (warning).",
        ),
    ]
    check_specs.append(
        dg.AssetCheckSpec(
            "llm_where_rows_decided",
            asset=key,
            blocking=fail_on_undecided_rows,
            description="Every row llm_where judged got a verdict (none left NULL).",
        )
    )
    if schema is not None:
        check_specs.append(
            dg.AssetCheckSpec(
                "output_schema",
                asset=key,
                blocking=True,
                description=f"The output table has the declared columns: {schema.describe()}.",
            )
        )

    context_key = None if context is None else dg.AssetKey.from_coercible(context)
    ins = {} if context_key is None else {"rlm_context": dg.AssetIn(key=context_key)}

    def materialize(context: dg.AssetExecutionContext, context_value: Any) -> dg.MaterializeResult:
        rlm: RLMResource = getattr(context.resources, rlm_resource_key)
        duckdb: DuckDBResource = getattr(context.resources, duckdb_resource_key)
        lm: LM | None = None
        try:
            partition = context.partition_key if context.has_partition_key else None
            with rlm.open_lm(
                root_model=root_model,
                sub_model=sub_model,
                root_effort=root_effort,
                sub_effort=sub_effort,
            ) as lm:
                if lm.provider == "demo":
                    context.log.warning(
                        "Using the offline DEMO model (scripted programs and keyword rules, not an "
                        "LLM) because RLMResource(provider='demo'). Set ANTHROPIC_API_KEY for Claude."
                    )
                filters = (
                    {
                        t: _partition_filter(context, partitions_def, c)
                        for t, c in partition_columns.items()
                    }
                    if partitions_def is not None
                    else None
                )
                warehouse = Warehouse.snapshot(duckdb.database, tables, filters=filters)
                fingerprints = warehouse.fingerprints()
                run = RLMRun(
                    question,
                    warehouse=warehouse,
                    lm=lm,
                    limits=limits,
                    output=schema,
                    on_event=lambda event: _log_event(context, event),
                    sandbox=rlm.sandbox,
                    where_config=rlm.where_config(),
                    worker_limits=rlm.worker_limits(),
                    context=wire_context(context_value),
                    tags={
                        "run_id": context.run.run_id,
                        "asset": key.to_user_string(),
                        "partition": partition,
                    },
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
                for model in unknown_price_models(result.accounting):
                    context.log.warning(
                        f"The price of model {model!r} is unknown, so its cost is reported as "
                        "unknown (rlm/cost_unknown_models); add it to rlm_dagster.prices.PRICES."
                    )
                answer = result.answer
                table = answer.table
                if table is None:
                    table = pa.table({"question": [question], "answer": [answer.text]})
                table_name, written = _write_table(duckdb, key, table, partition)
                metadata = run_metadata(result, lm)
                data_version = _digest(
                    {
                        "inputs": fingerprints,
                        "models": [lm.root_model, lm.sub_model],
                        "answer": _table_digest(table),
                    }
                )
        except dg.Failure:
            raise
        except RLMError as err:
            # One decision for every cause: retryable errors (the provider kept failing, the
            # warehouse was locked) go to the retry policy, the rest fail for good; both with
            # the error and, when the run had started, its trajectory so far.
            retryable = err.retryable
            failure: dict[str, Any] = {"rlm/error": type(err).__name__, "rlm/retryable": retryable}
            partial = err.partial
            if isinstance(partial, RLMResult) and lm is not None:
                failure.update(run_metadata(partial, lm))
            raise dg.Failure(
                description=f"{type(err).__name__}: {err}",
                metadata=failure,
                allow_retries=retryable,
            ) from err
        # The UI lists metadata in order and folds Markdown over 1,000 characters behind a
        # click: a short plain preview goes first.
        metadata = {"rlm/answer_preview": redact(_one_line(answer.text, 900)), **metadata}
        metadata["rlm/sandbox"] = (
            f"{run.worker.level} ({', '.join(run.worker.layers) or 'no layers'})"
        )
        metadata.update(
            {
                "rlm/answer": dg.MetadataValue.md(
                    redact(_answer_markdown(answer.text, answer.form))
                ),
                "rlm/final_form": answer.form,
                "dagster/row_count": table.num_rows,
                "dagster/table_name": table_name,
                "dagster/column_schema": column_schema(table),
            }
        )
        return dg.MaterializeResult(
            metadata=metadata,
            data_version=dg.DataVersion(data_version),
            check_results=_check_results(
                schema, written, answer.text, table, result, limits, fail_on_undecided_rows
            ),
        )

    decorate = dg.asset(
        key=key,
        deps=deps,
        ins=ins,
        kinds={"rlm", "anthropic", "duckdb"},
        required_resource_keys={rlm_resource_key, duckdb_resource_key},
        description=description or question,
        group_name=group_name,
        metadata=definition_metadata,
        tags=dict(tags or {}),
        owners=list(owners or []),
        partitions_def=partitions_def,
        retry_policy=retry_policy,
        pool=pool,
        code_version=code_version,
        check_specs=check_specs,
    )
    if context_key is None:

        def _rlm_asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
            return materialize(context, None)

        return decorate(_rlm_asset)

    def _rlm_asset_with_context(
        context: dg.AssetExecutionContext, rlm_context: Any
    ) -> dg.MaterializeResult:
        return materialize(context, rlm_context)

    return decorate(_rlm_asset_with_context)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _table_digest(table: pa.Table) -> str:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def _partition_columns(
    name: str,
    tables: Sequence[str],
    partitions_def: dg.PartitionsDefinition | None,
    partition_column: str | Mapping[str, str] | None,
) -> dict[str, str]:
    """Which column of which bound table the partition key filters."""
    if partitions_def is None:
        if partition_column is not None:
            raise ConfigError(f"rlm_asset({name!r}): partition_column= needs partitions_def=.")
        return {}
    if isinstance(partitions_def, dg.MultiPartitionsDefinition):
        raise ConfigError(
            f"rlm_asset({name!r}): multi-dimensional partitions are not supported; use a "
            "time-window or static PartitionsDefinition."
        )
    if partition_column is None:
        raise ConfigError(
            f"rlm_asset({name!r}): partitions_def= needs partition_column=, the column of the "
            'bound tables that the partition key filters, e.g. "created_at" or '
            '{"tickets": "created_at"}.'
        )
    if isinstance(partition_column, str):
        return {t: partition_column for t in tables}
    unknown = sorted(set(partition_column) - set(tables))
    if unknown:
        raise ConfigError(
            f"rlm_asset({name!r}): partition_column names tables {unknown} that are not in "
            f"tables={list(tables)}."
        )
    return dict(partition_column)


def _partition_filter(
    context: dg.AssetExecutionContext, partitions_def: dg.PartitionsDefinition, column: str
) -> str:
    """Host-built SQL selecting the rows of the current partition."""
    col = quote_ident(column)
    if isinstance(partitions_def, dg.TimeWindowPartitionsDefinition):
        window = context.partition_time_window
        start, end = (t.strftime("%Y-%m-%d %H:%M:%S") for t in (window.start, window.end))
        return f"{col} >= TIMESTAMP '{start}' AND {col} < TIMESTAMP '{end}'"
    key = context.partition_key.replace("'", "''")
    return f"CAST({col} AS VARCHAR) = '{key}'"


def _check_results(
    schema: OutputSchema | None,
    written: dict[str, str],
    text: str,
    table: pa.Table,
    result: RLMResult,
    limits: Limits,
    fail_on_undecided_rows: bool,
) -> list[dg.AssetCheckResult]:
    undecided = result.where_undecided_rows
    checks = [
        dg.AssetCheckResult(
            check_name="llm_where_rows_decided",
            passed=undecided == 0,
            severity=(
                dg.AssetCheckSeverity.ERROR
                if fail_on_undecided_rows
                else dg.AssetCheckSeverity.WARN
            ),
            metadata={
                "undecided_rows": undecided,
                "clipped_rows": result.where_clipped_rows,
                "llm_where_calls": len(result.where_stats),
            },
        ),
        dg.AssetCheckResult(
            check_name="answer_not_empty",
            passed=table.num_rows > 0 and bool(text.strip()),
            metadata={"rows": table.num_rows, "answer_chars": len(text)},
        ),
    ]
    spent, budget = result.accounting.cost_usd, limits.max_cost_usd
    checks.append(
        dg.AssetCheckResult(
            check_name="spend_within_budget",
            passed=budget is None or spent <= 0.8 * budget,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "cost_usd": round(spent, 6),
                "max_cost_usd": budget if budget is not None else "none",
            },
        )
    )
    if schema is not None:
        wrong = [
            f"{name} {type_} (table has {written.get(name, 'no such column')})"
            for name, type_ in schema.columns
            if written.get(name) != type_
        ]
        checks.append(
            dg.AssetCheckResult(
                check_name="output_schema",
                passed=not wrong,
                metadata={"declared": schema.describe(), "mismatches": ", ".join(wrong) or "none"},
            )
        )
    return checks


def _log_event(context: dg.AssetExecutionContext, event: Event) -> None:
    """Render a run's event in the run log, at its level, redacted."""
    log = context.log.warning if event.level == "warning" else context.log.info
    log(redact(event.describe()))


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _answer_markdown(text: str, form: str, limit: int = 4_000) -> str:
    shown = text if len(text) <= limit else text[:limit] + "\n…"
    return f"{fenced(shown)}\n\n_(ended by {form})_"


def _write_table(
    duckdb: DuckDBResource, key: dg.AssetKey, table: pa.Table, partition: str | None
) -> tuple[str, dict[str, str]]:
    """Write the answer in one short transaction: the whole table, or (partitioned) the rows
    of this partition only. Returns the qualified name and the table's column types."""
    *schema_parts, name = key.path
    schema = schema_parts[-1] if schema_parts else "main"
    qualified = f"{quote_ident(schema)}.{quote_ident(name)}"
    if partition is not None:
        table = table.append_column(
            "_partition", pa.array([partition] * table.num_rows, pa.string())
        )
    stack = ExitStack()
    try:
        con = stack.enter_context(duckdb.get_connection())
    except Exception as err:
        if is_lock_error(err):
            raise WarehouseBusy(
                f"Could not write the answer: the warehouse {duckdb.database!r} is locked by "
                f"another writer ({err}). The run can be retried (its model calls replay from "
                "the cache); put the assets that write this file in one Dagster pool."
            ) from err
        raise
    with stack:
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
            con.register("__rlm_answer", table)
            if partition is None:
                con.execute(f"CREATE OR REPLACE TABLE {qualified} AS SELECT * FROM __rlm_answer")
            else:
                con.execute(
                    f"CREATE TABLE IF NOT EXISTS {qualified} AS SELECT * FROM __rlm_answer LIMIT 0"
                )
                con.execute(f"DELETE FROM {qualified} WHERE _partition = ?", [partition])
                con.execute(f"INSERT INTO {qualified} BY NAME SELECT * FROM __rlm_answer")
            con.unregister("__rlm_answer")
            columns = dict(
                con.execute(
                    "SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_schema = ? AND table_name = ?",
                    [schema, name],
                ).fetchall()
            )
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
    return f"{schema}.{name}", columns
