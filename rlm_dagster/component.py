"""``RLMComponent``: an RLM asset declared in YAML, as a Dagster component.

    # defs/churn_reasons/defs.yaml — `dg scaffold defs rlm_dagster.RLMComponent churn_reasons`
    type: rlm_dagster.RLMComponent
    attributes:
      name: churn_reasons
      question: Which enterprise customers threatened to cancel in the last 90 days, and why?
      tables: [tickets, customers]
      output: {customer_id: BIGINT, reason: VARCHAR}
      max_cost_usd: 2.0

Every attribute is the :func:`~rlm_dagster.rlm_asset` keyword of the same name, with the same
default. Three take a YAML shape instead of a Python object: ``partitions_def`` is Dagster's
own (``{type: daily, start_date: "2026-01-01"}``, ``{type: static, partition_keys: [eu, us]}``;
also ``hourly``, ``weekly``, ``time_window``), ``retry_policy`` is
``{max_retries, delay, backoff, jitter}`` or ``null`` for no retries, and ``context`` is an
asset key string such as ``raw/guidelines``. Several RLM assets go in one ``defs.yaml`` as YAML
documents separated by ``---``.

As with dagster-sling, resources stay in the project's definitions: the asset needs an
:class:`~rlm_dagster.RLMResource` under ``rlm`` and a ``DuckDBResource`` under ``duckdb`` (or the
keys named by ``rlm_resource_key`` / ``duckdb_resource_key``). The class is registered with
``dg`` through the ``dagster_dg_cli.registry_modules`` entry point, so ``dg list components``
shows it and ``dg scaffold defs`` writes a commented ``defs.yaml`` to start from.
"""

import re
import textwrap
from typing import Annotated, Literal

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

from rlm_dagster.assets import DEFAULT_RETRY_POLICY, rlm_asset
from rlm_dagster.errors import ConfigError

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


class RLMComponentScaffolder(dg.Scaffolder):
    """Writes a commented ``defs.yaml`` for one RLM asset named after the target folder."""

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        if request.scaffold_format != "yaml":
            dg.scaffold_component(request)
            return
        if request.append:  # another YAML document in an existing defs.yaml
            with request.target_path.open("a", encoding="utf-8") as f:
                f.write("---\n" + _TEMPLATE.format(type_name=request.type_name, name="my_question"))
            return
        name = re.sub(r"\W", "_", request.target_path.name)
        (request.target_path / "defs.yaml").write_text(
            _TEMPLATE.format(type_name=request.type_name, name=name), encoding="utf-8"
        )


_TEMPLATE = textwrap.dedent(
    """\
    # One RLM asset: the answer to `question` over the DuckDB tables in `tables`, written to a
    # DuckDB table named after the asset. Every attribute is the rlm_asset() keyword of the same
    # name (see the rlm_dagster README). The project's definitions must provide the resources
    # `rlm` (rlm_dagster.RLMResource) and `duckdb` (dagster_duckdb.DuckDBResource).
    type: {type_name}

    attributes:
      name: {name}
      question: >-
        Which enterprise customers threatened to cancel or not renew in the last 90 days,
        in which ticket, and why?
      # Bound in the REPL by name, and the asset's upstream deps ("schema.table" also works).
      tables: [tickets, customers]
      # Column -> DuckDB type of the answer table. Omit it for a free-text answer.
      output:
        customer_id: BIGINT
        customer_name: VARCHAR
        ticket_id: BIGINT
        reason: VARCHAR
      # Limits enforced by the host on every run (null = no limit for max_cost_usd).
      max_iterations: 20
      max_sub_calls: 5000
      max_cost_usd: 5.0
      group_name: insights
      # key_prefix: support            # also the schema of the answer table
      # owners: [team:support]
      # tags: {{domain: support}}
      # root_model: claude-sonnet-5-5  # override the RLMResource's models for this asset
      # sub_model: claude-haiku-5-5
      # root_effort: high  # override the RLMResource's efforts for this asset
      # sub_effort: low
      # One run per day of tickets; customers is bound whole:
      # partitions_def: {{type: daily, start_date: "2026-01-01"}}
      # partition_column: {{tickets: created_at}}
      # An upstream asset (text, documents, a DataFrame) bound as the REPL variable `context`:
      # context: support_playbook
    """
)


@dg.scaffold_with(RLMComponentScaffolder)
class RLMComponent(dg.Component, dg.Resolvable, dg.Model):
    """An RLM asset declared in YAML; the attributes are ``rlm_asset``'s keywords.

    .. code-block:: yaml

        type: rlm_dagster.RLMComponent
        attributes:
          name: urgent_ticket_themes
          question: What are the main themes of urgent support tickets, with counts?
          tables: [tickets]
          max_cost_usd: 1.0

    Needs the resources ``rlm`` (``RLMResource``) and ``duckdb`` (``DuckDBResource``).
    """

    # PartitionsDefinition and RetryPolicy are plain classes, checked with isinstance.
    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: Annotated[str, _doc("Asset name; also the name of the answer's DuckDB table.")]
    question: Annotated[str, _doc("The question the RLM answers.")]
    tables: Annotated[
        list[str], _doc('Tables bound in the REPL, also the asset\'s deps: "t" or "schema.t".')
    ]
    output: Annotated[
        dict[str, str] | None, _doc("Column -> DuckDB type of the answer table; omit for text.")
    ] = None
    max_iterations: Annotated[int, _doc("Root-model turns before the final-answer request.")] = 20
    max_depth: Annotated[int, _doc("Recursion depth of rlm_query.")] = 1
    max_sub_calls: Annotated[int, _doc("Sub-model calls per run.")] = 5_000
    max_cost_usd: Annotated[float | None, _doc("USD per run; null = no cap.")] = 5.0
    max_tokens: Annotated[int | None, _doc("Tokens per run; null = no cap.")] = None
    max_wall_time_s: Annotated[float | None, _doc("Seconds per run; null = no cap.")] = 3_600.0
    cell_timeout_s: Annotated[float, _doc("Seconds one REPL cell may run.")] = 300.0
    max_observation_chars: Annotated[int, _doc("Output of a turn shown to the model.")] = 20_000
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

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        """The one RLM asset; the ``rlm`` and ``duckdb`` resources come from the project."""
        try:
            asset = rlm_asset(**dict(self))
        except ConfigError as err:
            # rlm_asset names the keyword at fault (`output=`), which is the YAML attribute's
            # name; say which component it is. Same class, so OutputSchemaError stays one.
            where = context.path
            if where.is_relative_to(context.project_root):
                where = where.relative_to(context.project_root)
            problem = str(err).removeprefix(f"rlm_asset({self.name!r}): ")
            raise type(err)(
                f"Invalid attributes of RLMComponent {self.name!r} ({where}): {problem}"
            ) from err
        return dg.Definitions(assets=[asset])
