"""The eval suite as a Dagster asset, materialized and checked like any other.

.. code-block:: text

    dagster asset materialize -m rlm_dagster.eval.definitions --select eval_results \\
        --config-json '{"ops": {"eval_results": {"config": {"base_url": "http://127.0.0.1:8089",
                        "root_model": "smollm2", "sub_model": "smollm2"}}}}'

One asset, ``eval_results``: it runs the suite (:func:`~rlm_dagster.eval.run_suite`) with
the run's config, writes ``results.json`` and ``results.md`` to ``out``, and records the
table as metadata (Markdown, plus one numeric entry per family and strategy, which Dagster+
Insights can chart over time). Its checks:

* ``no_failures`` — every question started got a usable answer (ERROR when not);
* ``score_floor`` — every family and strategy scores at least ``score_floor`` (ERROR);
* ``real_model`` — the numbers come from a real model, not the harness's fake (WARN when
  they do not: a fake's numbers check the harness, they are never a quality result).
"""

# No ``from __future__ import annotations``: Dagster reads the asset's config type from its
# signature at definition time.
import json
import os
from pathlib import Path

import dagster as dg
from pydantic import Field

from rlm_dagster.errors import ConfigError
from rlm_dagster.eval.fake import fake_endpoint
from rlm_dagster.eval.report import Report
from rlm_dagster.eval.runner import SuiteConfig, run_suite
from rlm_dagster.eval.suite import FAMILIES

ASSET = "eval_results"


class EvalConfig(dg.Config):
    """The suite to run: the CLI's options (``python -m rlm_dagster.eval --help``)."""

    base_url: str = os.environ.get("ANTHROPIC_BASE_URL", "https://api.anthropic.com")
    root_model: str = os.environ.get("RLM_ROOT_MODEL", "claude-sonnet-5-5")
    sub_model: str = os.environ.get("RLM_SUB_MODEL", "claude-haiku-5-5")
    suite: str = "small"
    tasks: list[str] = Field(default_factory=lambda: list(FAMILIES))
    strategies: list[str] = Field(default_factory=lambda: ["rlm", "direct", "tools"])
    seed: int = 0
    budget_usd: float = 10.0
    max_cost_usd: float = 1.0
    max_iterations: int = 12
    max_sub_calls: int = 500
    max_wall_time_s: float = 900.0
    root_thinking: str = "off"
    model_profiles: str = "{}"  # JSON, as RLMResource(model_profiles=...)
    out: str = "eval-results"
    score_floor: float = 0.0
    fake: bool = False  # run the harness against its scripted fake (a harness check)


def _suite_config(config: EvalConfig) -> SuiteConfig:
    return SuiteConfig(
        base_url=config.base_url,
        root_model=config.root_model,
        sub_model=config.sub_model,
        api_key=os.environ.get("ANTHROPIC_API_KEY") or None,
        suite=config.suite,
        families=tuple(config.tasks),
        strategies=tuple(config.strategies),
        seed=config.seed,
        budget_usd=config.budget_usd,
        max_cost_usd=config.max_cost_usd,
        max_iterations=config.max_iterations,
        max_sub_calls=config.max_sub_calls,
        max_wall_time_s=config.max_wall_time_s,
        root_thinking=config.root_thinking,
        model_profiles=json.loads(config.model_profiles),
        out=Path(config.out),
    )


def checks(report: Report, score_floor: float) -> list[dg.AssetCheckResult]:
    """The asset's check results for ``report``."""
    rows = report.rows
    started = [r for r in report.results if r.status != "skipped"]
    failed = [r for r in started if r.status == "failed"]
    low = [r for r in rows if r.score is not None and r.score < score_floor]
    label = report.provenance.get("label", "")
    return [
        dg.AssetCheckResult(
            check_name="no_failures",
            passed=not failed,
            metadata={
                "failed": len(failed),
                "started": len(started),
                "first_failures": "; ".join(
                    f"{r.task_id}/{r.strategy}: {r.error_type}" for r in failed[:5]
                ),
                "label": label,
            },
        ),
        dg.AssetCheckResult(
            check_name="score_floor",
            passed=not low,
            metadata={
                "floor": score_floor,
                "below": "; ".join(f"{r.group}/{r.strategy}: {r.score:.2f}" for r in low),
                "label": label,
            },
        ),
        dg.AssetCheckResult(
            check_name="real_model",
            passed=not report.is_fake,
            severity=dg.AssetCheckSeverity.WARN,
            description=label,
            metadata={"model_kind": str(report.provenance.get("model_kind"))},
        ),
    ]


def metadata(report: Report, out: Path) -> dict[str, dg.MetadataValue]:
    """The table as Markdown, and one number per family, strategy and measure."""
    values: dict[str, dg.MetadataValue] = {
        "eval/label": dg.MetadataValue.text(str(report.provenance.get("label", ""))),
        "eval/model_kind": dg.MetadataValue.text(str(report.provenance.get("model_kind"))),
        "eval/table": dg.MetadataValue.md(report.markdown()),
        "eval/results_json": dg.MetadataValue.path(str(out / "results.json")),
        "eval/paid_usd": dg.MetadataValue.float(report.paid_usd),
        "eval/stopped_by_budget": dg.MetadataValue.text(report.stopped_by_budget or "no"),
    }
    for row in report.rows:
        base = f"eval/{row.group}/{row.strategy}"
        if row.score is not None:
            values[f"{base}/score"] = dg.MetadataValue.float(row.score)
        if row.usd_per_question is not None:
            values[f"{base}/usd_per_question"] = dg.MetadataValue.float(row.usd_per_question)
        values[f"{base}/failed"] = dg.MetadataValue.int(row.failed)
    return values


@dg.asset(
    name=ASSET,
    group_name="rlm_eval",
    kinds={"rlm", "python"},
    description="rlm vs direct vs tools on generated tasks with known answers "
    "(python -m rlm_dagster.eval as an asset).",
    check_specs=[
        dg.AssetCheckSpec("no_failures", asset=ASSET),
        dg.AssetCheckSpec("score_floor", asset=ASSET),
        dg.AssetCheckSpec("real_model", asset=ASSET),
    ],
)
def eval_results(context: dg.AssetExecutionContext, config: EvalConfig) -> dg.MaterializeResult:
    suite = _suite_config(config)
    try:
        if config.fake:
            with fake_endpoint(suite) as (ready, tasks):
                report = run_suite(ready, tasks=tasks, log=context.log.info)
        else:
            report = run_suite(suite, log=context.log.info)
    except ConfigError as err:
        raise dg.Failure(str(err)) from err
    context.log.info("\n" + report.table())
    return dg.MaterializeResult(
        metadata=metadata(report, Path(config.out)),
        check_results=checks(report, config.score_floor),
    )


defs = dg.Definitions(assets=[eval_results])
