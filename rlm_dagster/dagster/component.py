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

import dagster as dg

from rlm_dagster.dagster.assets import build_rlm_asset
from rlm_dagster.dagster.definition import RLMAssetArgs
from rlm_dagster.errors import ConfigError


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
class RLMComponent(dg.Component, RLMAssetArgs):
    """An RLM asset declared in YAML; the attributes are ``rlm_asset``'s keywords (both are
    :class:`~rlm_dagster.dagster.definition.RLMAssetArgs`).

    .. code-block:: yaml

        type: rlm_dagster.RLMComponent
        attributes:
          name: urgent_ticket_themes
          question: What are the main themes of urgent support tickets, with counts?
          tables: [tickets]
          max_cost_usd: 1.0

    Needs the resources ``rlm`` (``RLMResource``) and ``duckdb`` (``DuckDBResource``).
    """

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        """The one RLM asset; the ``rlm`` and ``duckdb`` resources come from the project."""
        try:
            asset = build_rlm_asset(RLMAssetArgs(**dict(self)))
        except ConfigError as err:
            # The message names the attribute at fault (`output=`); say which component and
            # file it is. Same class, so OutputSchemaError stays one.
            where = context.path
            if where.is_relative_to(context.project_root):
                where = where.relative_to(context.project_root)
            problem = str(err).removeprefix(f"rlm_asset({self.name!r}): ")
            raise type(err)(
                f"Invalid attributes of RLMComponent {self.name!r} ({where}): {problem}"
            ) from err
        return dg.Definitions(assets=[asset])
