"""``RLMTranslator``: how an RLM definition becomes Dagster objects.

Like dagster-dbt's ``DagsterDbtTranslator``: every decision is one method, so a subclass
changes one thing (the asset key, the deps of a table, the group, the check specs, the
run's metadata) and keeps the rest::

    class TeamTranslator(RLMTranslator):
        def get_asset_key(self, args: RLMAssetArgs) -> dg.AssetKey:
            return dg.AssetKey(["insights", args.name])

    churn = rlm_asset(name="churn", question="...", tables=["tickets"],
                      translator=TeamTranslator())
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from dagster_duckdb import DuckDBResource

from rlm_dagster.dagster.definition import RLMAssetArgs
from rlm_dagster.dagster.metadata import run_metadata
from rlm_dagster.engine.loop import RLMResult
from rlm_dagster.sql.tables import AnswerSink, DuckDBSink


class RLMTranslator:
    """The default mapping; subclass and override any ``get_*`` method."""

    def get_asset_key(self, args: RLMAssetArgs) -> dg.AssetKey:
        """``key_prefix`` + ``name``; the key's last two parts name the answer's table."""
        return args.key()

    def get_dep_key(self, args: RLMAssetArgs, table: str) -> dg.AssetKey:
        """The upstream asset a bound table comes from: ``"schema.t"`` -> ``["schema", "t"]``."""
        return dg.AssetKey(table.split("."))

    def get_description(self, args: RLMAssetArgs) -> str:
        return args.description or args.question

    def get_group_name(self, args: RLMAssetArgs) -> str | None:
        return args.group_name

    def get_tags(self, args: RLMAssetArgs) -> dict[str, str]:
        return dict(args.tags or {})

    def get_owners(self, args: RLMAssetArgs) -> list[str]:
        return list(args.owners or [])

    def get_kinds(self, args: RLMAssetArgs) -> set[str]:
        """``rlm`` and ``duckdb``, plus ``anthropic`` when the asset names a Claude model.
        Kinds are fixed when the definitions load, before the resource (and so the provider:
        Claude, a local server, the demo) is known, so no provider kind is claimed that a run
        may not use; each run's provider is in its metadata (``rlm/provider``)."""
        models = (args.root_model or "", args.sub_model or "")
        claude = any(m.startswith("claude") for m in models)
        return {"rlm", "duckdb", *(["anthropic"] if claude else [])}

    def get_metadata(self, args: RLMAssetArgs) -> dict[str, Any]:
        """Definition metadata: the question, the tables, the limits, the declared schema."""
        metadata: dict[str, Any] = {
            "rlm/question": args.question,
            "rlm/tables": ", ".join(args.tables),
            "rlm/limits": dg.MetadataValue.json(args.limits().as_dict()),
        }
        schema = args.output_schema()
        if schema is not None:
            metadata["dagster/column_schema"] = dg.TableSchema(
                columns=[dg.TableColumn(n, t) for n, t in schema.columns]
            )
        return metadata

    def get_asset_spec(self, args: RLMAssetArgs) -> dg.AssetSpec:
        """The asset's spec, from the methods above."""
        return dg.AssetSpec(
            key=self.get_asset_key(args),
            deps=[self.get_dep_key(args, t) for t in args.tables],
            description=self.get_description(args),
            group_name=self.get_group_name(args),
            metadata=self.get_metadata(args),
            tags=self.get_tags(args),
            owners=self.get_owners(args),
            kinds=self.get_kinds(args),
            code_version=args.code_version(),
        )

    def get_check_specs(self, args: RLMAssetArgs, key: dg.AssetKey) -> list[dg.AssetCheckSpec]:
        """The checks every run reports (their results are computed by the run)."""
        specs = [
            dg.AssetCheckSpec(
                "answer_not_empty", asset=key, description="The run produced a non-empty answer."
            ),
            dg.AssetCheckSpec(
                "spend_within_budget",
                asset=key,
                description="The run spent less than 80% of max_cost_usd (warning).",
            ),
            dg.AssetCheckSpec(
                "llm_where_rows_decided",
                asset=key,
                blocking=args.fail_on_undecided_rows,
                description="Every row llm_where judged got a verdict (none left NULL).",
            ),
        ]
        schema = args.output_schema()
        if schema is not None:
            specs.append(
                dg.AssetCheckSpec(
                    "output_schema",
                    asset=key,
                    blocking=True,
                    description=f"The output table has the declared columns: {schema.describe()}.",
                )
            )
        return specs

    def get_answer_sink(self, args: RLMAssetArgs, duckdb: DuckDBResource) -> AnswerSink:
        """Where the answer table is written (the ``duckdb`` resource's file by default)."""
        return DuckDBSink(duckdb)

    def get_run_metadata(self, result: RLMResult) -> dict[str, Any]:
        """Metadata of a materialization (and of a failed run's ``Failure``)."""
        return run_metadata(result)
