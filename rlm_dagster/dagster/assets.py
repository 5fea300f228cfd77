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
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import dagster as dg
import pyarrow as pa
import pydantic
from dagster_duckdb import DuckDBResource
from sqlglot import exp

from rlm_dagster.dagster.definition import DEFAULT_RETRY_POLICY, RLMAssetArgs, digest
from rlm_dagster.dagster.metadata import (
    VERDICTS_PREVIEW_ROWS,
    answer_preview,
    answer_table,
    column_schema,
    run_summary,
    verdicts_preview,
)
from rlm_dagster.dagster.resource import RLMResource, failure
from rlm_dagster.dagster.translator import RLMTranslator
from rlm_dagster.engine.budget import Limits
from rlm_dagster.engine.loop import fenced
from rlm_dagster.errors import ConfigError, RLMError
from rlm_dagster.redact import redact
from rlm_dagster.sql.output import OutputSchema
from rlm_dagster.sql.warehouse import quote_ident

__all__ = ["DEFAULT_RETRY_POLICY", "build_rlm_asset", "rlm_asset"]

_LIMITS = Limits()


def rlm_asset(
    *,
    name: str,
    question: str,
    tables: Sequence[str],
    output: Mapping[str, str] | None = None,
    max_iterations: int = _LIMITS.max_iterations,
    max_depth: int = _LIMITS.max_depth,
    max_sub_calls: int = _LIMITS.max_sub_calls,
    max_cost_usd: float | None = _LIMITS.max_cost_usd,
    max_tokens: int | None = _LIMITS.max_tokens,
    max_wall_time_s: float | None = _LIMITS.max_wall_time_s,
    cell_timeout_s: float = _LIMITS.cell_timeout_s,
    max_observation_chars: int = _LIMITS.max_observation_chars,
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
    where_batches: bool = False,
    context: str | Sequence[str] | dg.AssetKey | None = None,
    rlm_resource_key: str = "rlm",
    duckdb_resource_key: str = "duckdb",
    translator: RLMTranslator | None = None,
) -> dg.AssetsDefinition:
    """Define an asset whose value is an RLM's answer to ``question`` over ``tables``.

    The keywords are :class:`~rlm_dagster.dagster.definition.RLMAssetArgs`' fields (the same as
    ``RLMComponent``'s attributes, with the same defaults; a test keeps them equal).
    ``root_model`` / ``sub_model`` override the resource's models for this asset, and
    ``root_effort`` / ``sub_effort`` its efforts (all enter its code version). With
    ``partitions_def`` (time-window or static), ``partition_column`` names the column that the
    partition key filters: one name for every bound table, or a ``{table: column}`` mapping
    (tables left out are bound whole, e.g. dimension tables); the output table gets a
    ``_partition`` column and is replaced one partition at a time. ``context`` names an
    upstream asset whose value (text, a list of documents, a dict or a DataFrame, loaded by
    its IO manager) is bound as the REPL variable ``context``. ``retry_policy`` defaults to
    three retries with exponential backoff and jitter; errors a retry cannot fix (auth, bad
    request, policy, schema, budget) are never retried. ``pool`` puts the asset in a Dagster
    concurrency pool (see the README on DuckDB writers). ``fail_on_undecided_rows`` makes the
    ``llm_where_rows_decided`` check blocking (ERROR): a run whose ``llm_where`` calls left
    rows NULL (the model's replies stayed malformed, or it refused them) then fails its check
    and stops downstream assets; by default it warns. ``where_batches`` sends the run's
    ``llm_where`` requests as message batches (half the price; a retry resumes them). ``translator`` (an
    :class:`~rlm_dagster.dagster.translator.RLMTranslator` subclass) changes how the definition
    becomes Dagster objects: key, deps, group, metadata, checks.
    """
    values = {k: v for k, v in locals().items() if k != "translator"}
    if isinstance(tables, str):
        raise ConfigError(
            f"rlm_asset({name!r}): tables= must be a non-empty list of table names, e.g. "
            '["tickets", "customers"].'
        )
    if context is not None:
        values["context"] = dg.AssetKey.from_coercible(context)
    for option in ("tables", "owners"):
        if values[option] is not None:
            values[option] = list(values[option])
    for option in ("tags", "output", "partition_column"):
        if isinstance(values[option], Mapping):
            values[option] = dict(values[option])
    if values["key_prefix"] is not None and not isinstance(values["key_prefix"], str):
        values["key_prefix"] = list(values["key_prefix"])
    try:
        args = RLMAssetArgs(**values)
    except pydantic.ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}= {e['msg'].lower()}" for e in err.errors()
        )
        raise ConfigError(f"rlm_asset({name!r}): {problems}.") from None
    return build_rlm_asset(args, translator)


def build_rlm_asset(
    args: RLMAssetArgs, translator: RLMTranslator | None = None
) -> dg.AssetsDefinition:
    """The asset for ``args`` (what ``rlm_asset`` and ``RLMComponent`` both call)."""
    args.check()
    translator = translator or RLMTranslator()
    spec = translator.get_asset_spec(args)
    key = spec.key
    limits, schema = args.limits(), args.output_schema()
    partition_columns = args.partition_columns()
    context_key = args.context_key()
    ins = {} if context_key is None else {"rlm_context": dg.AssetIn(key=context_key)}
    if context_key is not None:  # a multi-asset's inputs are also its spec's deps
        spec = spec.replace_attributes(deps=[*spec.deps, dg.AssetDep(context_key)])

    def materialize(context: dg.AssetExecutionContext, context_value: Any) -> dg.MaterializeResult:
        rlm: RLMResource = getattr(context.resources, args.rlm_resource_key)
        duckdb: DuckDBResource = getattr(context.resources, args.duckdb_resource_key)
        partition = context.partition_key if context.has_partition_key else None
        filters = None
        if args.partitions_def is not None:
            filters = {
                t: _partition_filter(context, args.partitions_def, c)
                for t, c in partition_columns.items()
            }
        result = rlm.run(
            context,
            args.question,
            tables=args.tables,
            duckdb=duckdb,
            output=schema,
            limits=limits,
            context_value=context_value,
            filters=filters,
            root_model=args.root_model,
            sub_model=args.sub_model,
            root_effort=args.root_effort,
            sub_effort=args.sub_effort,
            where_batches=args.where_batches,
            log_summary=False,  # said below, with where the answer was written
        )
        answer = result.answer
        table = answer.table
        if table is None:
            table = pa.table({"question": [args.question], "answer": [answer.text]})
        sink = translator.get_answer_sink(args, duckdb)
        verdicts = None
        verdicts_head: pa.Table | None = None
        verdicts_rows = 0
        try:
            written = sink.write(key.path, table, partition)
            if result.verdicts is not None:
                # every judged row, queryable beside the answer, streamed from the run's file
                verdicts_path = [*key.path[:-1], f"{key.path[-1]}_llm_where_verdicts"]
                verdicts = sink.write(verdicts_path, result.verdicts.reader(), partition)
                verdicts_head = result.verdicts.head(VERDICTS_PREVIEW_ROWS)
                verdicts_rows = result.verdicts.num_rows
            # the whole trajectory, unclipped (the Markdown on the page clips long pieces)
            steps = result.trajectory_table()
            trajectory = sink.write(
                [*key.path[:-1], f"{key.path[-1]}_trajectory"], steps, partition
            )
        except RLMError as err:
            raise failure(err) from err
        finally:
            if result.verdicts is not None:
                result.verdicts.close()
        context.log.info(
            run_summary(
                result, written=(written.table, table.num_rows), cache_path=rlm.cache_location()
            )
        )
        # The page lists metadata in order and folds Markdown over 1,000 characters behind a
        # click: the answer first (preview, table, the whole), then what it rests on, then
        # how it was produced and what it cost.
        metadata: dict[str, Any] = {
            "rlm/answer_preview": redact(_one_line(answer_preview(answer), 900))
        }
        if answer.table is not None:
            metadata["rlm/answer_table"] = answer_table(table, written.columns)
        metadata["rlm/answer"] = dg.MetadataValue.md(
            redact(_answer_markdown(answer.text, answer.form))
        )
        if verdicts is not None and verdicts_head is not None:
            metadata["rlm/verdicts"] = verdicts_preview(verdicts_head)
            metadata["rlm/verdicts_table"] = (
                f"{verdicts.table} ({verdicts_rows:,} rows: every row llm_where "
                "judged, with its verdict, reason, how it was decided and its cost share)"
            )
        metadata.update(translator.get_run_metadata(result))
        metadata["rlm/trajectory_table"] = (
            f"{trajectory.table} ({steps.num_rows:,} rows: every reply, cell, output and error "
            "in full; the Markdown trajectory clips long pieces)"
        )
        metadata.update(
            {
                "rlm/final_form": answer.form,
                "dagster/row_count": table.num_rows,
                "dagster/table_name": written.table,
                "dagster/column_schema": column_schema(table, written.columns),
            }
        )
        data_version = digest(
            {
                "inputs": result.inputs,
                "models": [result.root_model, result.sub_model],
                "answer": _table_digest(table),
            }
        )
        checks = _check_results(
            schema,
            written.columns,
            answer.text,
            table,
            result.accounting.cost_usd,
            result.where_undecided_rows,
            result.where_clipped_rows,
            len(result.where_stats),
            limits,
            args.fail_on_undecided_rows,
        )
        selected = {c.name for c in context.selected_asset_check_keys}
        return dg.MaterializeResult(
            asset_key=key,
            metadata=metadata,
            data_version=dg.DataVersion(data_version),
            check_results=[c for c in checks if c.check_name in selected],
        )

    def stored_checks(context: dg.AssetExecutionContext) -> list[dg.AssetCheckResult]:
        """The checks, from the stored answer and its last materialization: no model call."""
        duckdb: DuckDBResource = getattr(context.resources, args.duckdb_resource_key)
        partition = context.partition_key if context.has_partition_key else None
        *schema_parts, name = key.path
        table_schema = schema_parts[-1] if schema_parts else "main"
        with duckdb.get_connection() as con:
            written = dict(
                con.execute(
                    "SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_schema = ? AND table_name = ?",
                    [table_schema, name],
                ).fetchall()
            )
            table = pa.table({})
            if written:
                stored = con.sql(f"SELECT * FROM {quote_ident(table_schema)}.{quote_ident(name)}")
                if partition is not None:
                    mine = exp.EQ(
                        this=exp.column("_partition"), expression=exp.Literal.string(partition)
                    )
                    stored = stored.filter(mine.sql(dialect="duckdb"))
                table = stored.to_arrow_table()
        event = context.instance.get_latest_materialization_event(key)
        meta = (
            {k: v.value for k, v in event.asset_materialization.metadata.items()}
            if event is not None and event.asset_materialization is not None
            else {}
        )
        text = " ".join(str(v) for row in table.to_pylist() for v in row.values())
        checks = _check_results(
            schema,
            written,
            text,
            table,
            float(meta.get("rlm/cost_usd") or 0.0),
            int(meta.get("rlm/where_undecided_rows") or 0),
            int(meta.get("rlm/where_clipped_rows") or 0),
            int(meta.get("rlm/where_calls") or 0),
            limits,
            args.fail_on_undecided_rows,
        )
        selected = {c.name for c in context.selected_asset_check_keys}
        return [c for c in checks if c.check_name in selected]

    def body(context: dg.AssetExecutionContext, context_value: Any) -> Iterator[Any]:
        if key in context.selected_asset_keys:
            yield materialize(context, context_value)
        else:  # only checks were selected: they read what is stored, no model is called
            yield from stored_checks(context)

    # A multi-asset that can be subset: its checks alone run from what is stored (the UI's
    # "Execute checks", a selection of checks) without calling a model.
    decorate = dg.multi_asset(
        name=key.to_python_identifier(),
        specs=[spec],
        ins=ins,
        required_resource_keys={args.rlm_resource_key, args.duckdb_resource_key},
        partitions_def=args.partitions_def,
        retry_policy=args.retry_policy,
        pool=args.pool,
        check_specs=translator.get_check_specs(args, key),
        can_subset=True,
    )
    if context_key is None:

        def _rlm_asset(context: dg.AssetExecutionContext) -> Iterator[Any]:
            yield from body(context, None)

        return decorate(_rlm_asset)

    def _rlm_asset_with_context(
        context: dg.AssetExecutionContext, rlm_context: Any
    ) -> Iterator[Any]:
        yield from body(context, rlm_context)

    return decorate(_rlm_asset_with_context)


def _table_digest(table: pa.Table) -> str:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def _partition_filter(
    context: dg.AssetExecutionContext, partitions_def: dg.PartitionsDefinition, column: str
) -> str:
    """Host-built SQL (through sqlglot) selecting the rows of the current partition."""
    col = exp.column(column, quoted=True)
    condition: exp.Expr
    if isinstance(partitions_def, dg.TimeWindowPartitionsDefinition):
        window = context.partition_time_window
        start, end = (
            exp.cast(exp.Literal.string(t.strftime("%Y-%m-%d %H:%M:%S")), "TIMESTAMP")
            for t in (window.start, window.end)
        )
        condition = exp.and_(exp.GTE(this=col, expression=start), exp.LT(this=col, expression=end))
    else:
        key = exp.Literal.string(context.partition_key)
        condition = exp.EQ(this=exp.cast(col, "VARCHAR"), expression=key)
    return condition.sql(dialect="duckdb")


def _check_results(
    schema: OutputSchema | None,
    written: dict[str, str],
    text: str,
    table: pa.Table,
    spent: float,
    undecided: int,
    clipped: int,
    where_calls: int,
    limits: Limits,
    fail_on_undecided_rows: bool,
) -> list[dg.AssetCheckResult]:
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
                "clipped_rows": clipped,
                "llm_where_calls": where_calls,
            },
        ),
        dg.AssetCheckResult(
            check_name="answer_not_empty",
            passed=table.num_rows > 0 and bool(text.strip()),
            metadata={"rows": table.num_rows, "answer_chars": len(text)},
        ),
    ]
    budget = limits.max_cost_usd
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


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _answer_markdown(text: str, form: str, limit: int = 4_000) -> str:
    shown = text if len(text) <= limit else text[:limit] + "\n…"
    return f"{fenced(shown)}\n\n_(ended by {form})_"
