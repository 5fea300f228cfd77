"""``RLMAssetArgs``: the one argument model of an RLM asset.

``rlm_asset(...)`` (Python) and ``RLMComponent`` (YAML) take the same arguments with the same
defaults and descriptions, declared once here. Limit defaults come from :class:`Limits`.

    >>> args = RLMAssetArgs(name="churn", question="Who threatens to cancel?", tables=["tickets"])
    >>> args.limits().max_iterations, args.key().to_user_string()
    (20, 'churn')

Three attributes take a YAML shape in a component and a Python object in ``rlm_asset``:
``partitions_def`` (Dagster's own ``{type: daily, start_date: ...}``), ``retry_policy``
(``{max_retries, delay, backoff, jitter}``) and ``context`` (an asset key string).
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

import dagster as dg
from dagster.components.resolved.core_models import (
    DailyPartitionsDefinitionModel,
    HourlyPartitionsDefinitionModel,
    StaticPartitionsDefinitionModel,
    TimeWindowPartitionsDefinitionModel,
    WeeklyPartitionsDefinitionModel,
    resolve_partitions_def,
)
from pydantic import ConfigDict, Field

from rlm_dagster.engine.budget import Limits
from rlm_dagster.errors import ConfigError
from rlm_dagster.models.profiles import EFFORTS
from rlm_dagster.prompts import PROMPT_VERSION
from rlm_dagster.sql.output import OutputSchema

DEFAULT_RETRY_POLICY = dg.RetryPolicy(
    max_retries=3, delay=30, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)
_LIMITS = Limits()

# Dagster's own YAML shape for partitions; `type` picks the variant, so a mistake gets one
# clear error instead of one per variant.
PartitionsDefModel = Annotated[
    HourlyPartitionsDefinitionModel
    | DailyPartitionsDefinitionModel
    | WeeklyPartitionsDefinitionModel
    | TimeWindowPartitionsDefinitionModel
    | StaticPartitionsDefinitionModel,
    Field(discriminator="type"),
]


class RetryPolicyModel(dg.Resolvable, dg.Model):
    """``retry_policy`` in YAML; the defaults are ``rlm_asset``'s default policy."""

    max_retries: int = Field(default=3, description="Retries after the first attempt.")
    delay: float | None = Field(default=30, description="Seconds before the first retry.")
    backoff: Literal["linear", "exponential"] | None = "exponential"
    jitter: Literal["full", "plus_minus"] | None = "plus_minus"


def _resolve_retry_policy(
    context: dg.ResolutionContext, model: RetryPolicyModel | None
) -> dg.RetryPolicy | None:
    if model is None:
        return None
    return dg.RetryPolicy(
        max_retries=model.max_retries,
        delay=model.delay,
        backoff=dg.Backoff[model.backoff.upper()] if model.backoff else None,
        jitter=dg.Jitter[model.jitter.upper()] if model.jitter else None,
    )


def _resolve_asset_key(context: dg.ResolutionContext, key: str | None) -> dg.AssetKey | None:
    return None if key is None else dg.AssetKey.from_user_string(key)


def _doc(description: str) -> dg.Resolver:
    """A plain attribute with a description for the YAML schema (``dg`` and editors show it)."""
    return dg.Resolver.default(description=description)


class RLMAssetArgs(dg.Resolvable, dg.Model):
    """Everything that defines one RLM asset. ``rlm_asset`` keywords = these fields."""

    # PartitionsDefinition, RetryPolicy and AssetKey are plain classes, checked by isinstance.
    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: Annotated[str, _doc("Asset name; also the name of the answer's DuckDB table.")]
    question: Annotated[str, _doc("The question the RLM answers.")]
    tables: Annotated[
        list[str], _doc('Tables bound in the REPL, also the asset\'s deps: "t" or "schema.t".')
    ]
    # Any values: OutputSchema.parse checks them and names the column at fault.
    output: Annotated[
        dict[str, Any] | None, _doc("Column -> DuckDB type of the answer table; omit for text.")
    ] = None
    max_iterations: Annotated[int, _doc("Root-model turns before the final-answer request.")] = (
        _LIMITS.max_iterations
    )
    max_depth: Annotated[int, _doc("Recursion depth of rlm_query.")] = _LIMITS.max_depth
    max_sub_calls: Annotated[int, _doc("Sub-model calls per run.")] = _LIMITS.max_sub_calls
    max_cost_usd: Annotated[float | None, _doc("USD per run; null = no cap.")] = (
        _LIMITS.max_cost_usd
    )
    max_tokens: Annotated[int | None, _doc("Tokens per run; null = no cap.")] = _LIMITS.max_tokens
    max_wall_time_s: Annotated[float | None, _doc("Seconds per run; null = no cap.")] = (
        _LIMITS.max_wall_time_s
    )
    cell_timeout_s: Annotated[float, _doc("Seconds one REPL cell may run.")] = (
        _LIMITS.cell_timeout_s
    )
    max_observation_chars: Annotated[int, _doc("Output of a turn shown to the model.")] = (
        _LIMITS.max_observation_chars
    )
    key_prefix: Annotated[
        str | list[str] | None, _doc("Asset key prefix; its last part is the table's schema.")
    ] = None
    group_name: Annotated[str | None, _doc("Dagster asset group.")] = None
    description: Annotated[str | None, _doc("Asset description; defaults to the question.")] = None
    tags: Annotated[dict[str, str] | None, _doc("Asset tags.")] = None
    owners: Annotated[list[str] | None, _doc('Asset owners, e.g. ["team:support"].')] = None
    root_model: Annotated[str | None, _doc("Overrides RLMResource.root_model.")] = None
    sub_model: Annotated[str | None, _doc("Overrides RLMResource.sub_model.")] = None
    root_effort: Annotated[
        str | None, _doc("Overrides RLMResource.root_effort (low, medium, high, xhigh, max).")
    ] = None
    sub_effort: Annotated[str | None, _doc("Overrides RLMResource.sub_effort.")] = None
    partitions_def: Annotated[
        dg.PartitionsDefinition | None,
        dg.Resolver(
            resolve_partitions_def,
            model_field_type=PartitionsDefModel,
            description='e.g. {type: daily, start_date: "2026-01-01"} or '
            "{type: static, partition_keys: [eu, us]}.",
        ),
    ] = None
    partition_column: Annotated[
        str | dict[str, str] | None,
        _doc("Column the partition key filters: one for all tables, or {table: column}."),
    ] = None
    retry_policy: Annotated[
        dg.RetryPolicy | None,
        dg.Resolver(
            _resolve_retry_policy,
            model_field_type=RetryPolicyModel | None,
            description="{max_retries, delay, backoff, jitter}; null = no retries.",
        ),
    ] = DEFAULT_RETRY_POLICY
    pool: Annotated[str | None, _doc("Dagster concurrency pool of the asset.")] = None
    fail_on_undecided_rows: Annotated[
        bool, _doc("Make the llm_where_rows_decided check blocking (ERROR).")
    ] = False
    where_batches: Annotated[
        bool,
        _doc(
            "Send llm_where requests as message batches: half the price, results within 24 h "
            "(most within an hour); a retried run resumes the batches it submitted."
        ),
    ] = False
    context: Annotated[
        dg.AssetKey | None,
        dg.Resolver(
            _resolve_asset_key,
            model_field_type=str | None,
            description='Upstream asset bound as the REPL variable `context`, e.g. "raw/docs".',
        ),
    ] = None
    rlm_resource_key: Annotated[str, _doc("Resource key of the RLMResource.")] = "rlm"
    duckdb_resource_key: Annotated[str, _doc("Resource key of the DuckDBResource.")] = "duckdb"

    # -- derived ------------------------------------------------------------------------------

    def _problem(self, message: str) -> ConfigError:
        return ConfigError(f"rlm_asset({self.name!r}): {message}")

    def check(self) -> None:
        """Raise :class:`ConfigError` (naming the argument) for what types cannot catch."""
        if not self.question.strip():
            raise self._problem("question= must be a non-empty string.")
        if not self.tables:
            raise self._problem(
                'tables= must be a non-empty list of table names, e.g. ["tickets", "customers"].'
            )
        for option, effort in (("root_effort", self.root_effort), ("sub_effort", self.sub_effort)):
            if effort is not None and effort not in EFFORTS:
                raise self._problem(f"{option}={effort!r}: use one of {EFFORTS}.")
        self.output_schema()
        self.limits()
        self.partition_columns()

    def limits(self) -> Limits:
        return Limits(
            max_iterations=self.max_iterations,
            max_depth=self.max_depth,
            max_sub_calls=self.max_sub_calls,
            max_cost_usd=self.max_cost_usd,
            max_tokens=self.max_tokens,
            max_wall_time_s=self.max_wall_time_s,
            cell_timeout_s=self.cell_timeout_s,
            max_observation_chars=self.max_observation_chars,
        )

    def output_schema(self) -> OutputSchema | None:
        return OutputSchema.parse(self.output) if self.output is not None else None

    def key(self) -> dg.AssetKey:
        prefix = [self.key_prefix] if isinstance(self.key_prefix, str) else self.key_prefix or []
        return dg.AssetKey([*prefix, self.name])

    def context_key(self) -> dg.AssetKey | None:
        return None if self.context is None else dg.AssetKey.from_coercible(self.context)

    def partition_columns(self) -> dict[str, str]:
        """Which column of which bound table the partition key filters."""
        if self.partitions_def is None:
            if self.partition_column is not None:
                raise self._problem("partition_column= needs partitions_def=.")
            return {}
        if isinstance(self.partitions_def, dg.MultiPartitionsDefinition):
            raise self._problem(
                "multi-dimensional partitions are not supported; use a time-window or static "
                "PartitionsDefinition."
            )
        if self.partition_column is None:
            raise self._problem(
                "partitions_def= needs partition_column=, the column of the bound tables that "
                'the partition key filters, e.g. "created_at" or {"tickets": "created_at"}.'
            )
        if isinstance(self.partition_column, str):
            return {t: self.partition_column for t in self.tables}
        unknown = sorted(set(self.partition_column) - set(self.tables))
        if unknown:
            raise self._problem(
                f"partition_column names tables {unknown} that are not in "
                f"tables={list(self.tables)}."
            )
        return dict(self.partition_column)

    def code_version(self) -> str:
        """What the asset's answer depends on besides its inputs: a change marks it stale."""
        schema = self.output_schema()
        context_key = self.context_key()
        return digest(
            {
                "question": self.question,
                "output": schema.as_dict() if schema else None,
                "tables": list(self.tables),
                "limits": self.limits().as_dict(),
                "models": [self.root_model, self.sub_model],
                **(
                    {"efforts": [self.root_effort, self.sub_effort]}
                    if self.root_effort or self.sub_effort
                    else {}
                ),
                "partition_columns": self.partition_columns(),
                "context": None if context_key is None else context_key.to_user_string(),
                "prompts": PROMPT_VERSION,
            }
        )


def digest(value: Any) -> str:
    """A short, stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
