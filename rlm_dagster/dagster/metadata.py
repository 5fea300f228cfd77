"""How an RLM run becomes Dagster metadata.

    >>> usage_metadata(accounting)  # doctest: +SKIP
    {'anthropic.claude-haiku-4-5.input_tokens': 1234, ...}

Usage is keyed with the model name (``anthropic.{model}.{field}``), as dagster-openai does,
so Dagster+ Insights can aggregate tokens and cost per model. Those keys count what this run
paid; calls replayed from the cache appear as ``cache_hits`` only. ``rlm/cost_usd`` is what
the answer cost, replayed calls included; ``rlm/paid_usd`` what this run paid.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
import pyarrow as pa

from rlm_dagster.engine.loop import RLMResult
from rlm_dagster.models.client import Accounting
from rlm_dagster.redact import redact


def usage_metadata(accounting: Accounting) -> dict[str, Any]:
    """Per-model calls, tokens and USD; a model with an unknown price has no cost key."""
    out: dict[str, Any] = {}
    for model, t in sorted(accounting.by_model().items()):
        prefix = f"anthropic.{model}"
        out[f"{prefix}.calls"] = t.calls
        out[f"{prefix}.cache_hits"] = t.cache_hits
        out[f"{prefix}.input_tokens"] = t.usage.input_tokens
        out[f"{prefix}.output_tokens"] = t.usage.output_tokens
        out[f"{prefix}.cache_creation_input_tokens"] = t.usage.cache_creation_input_tokens
        out[f"{prefix}.cache_read_input_tokens"] = t.usage.cache_read_input_tokens
        out[f"{prefix}.total_tokens"] = t.usage.total_tokens
        if t.cost_known:
            out[f"{prefix}.cost_usd"] = round(t.cost_usd, 6)
    return out


def run_summary(
    result: RLMResult, *, written: tuple[str, int] | None = None, cache_path: str | None = None
) -> str:
    """What the end of a run says in the run log (and so on the CLI's output): the answer,
    where it went, what it cost (paid now vs replayed), who answered, and where to see more."""
    acc = result.accounting
    calls, replayed = len(acc.records), sum(1 for r in acc.records if r.cache_hit)
    unknown = unknown_price_models(acc)
    cost = f"${acc.paid_usd:.4f} paid now" + (
        f", ${acc.cost_usd - acc.paid_usd:.4f} replayed" if replayed else ""
    )
    if unknown:
        cost += f" (price unknown for {', '.join(unknown)})"
    if calls and replayed == calls:
        calls_line = f"all {calls} model calls replayed from the cache: nothing was paid"
    else:
        calls_line = f"{calls} model calls, {replayed} replayed from the cache"
    who = f"{result.provider} {result.root_model} (root) + {result.sub_model} (sub)"
    if result.provider == "demo":
        who += " [the offline DEMO model: scripted, not an LLM]"
    table = result.answer.table
    if table is not None and table.num_columns:
        first = (
            " | ".join(str(v) for v in table.slice(0, 1).to_pylist()[0].values())
            if (table.num_rows)
            else "(no rows)"
        )
        preview = (
            f"a table of {table.num_rows:,} rows ({', '.join(table.column_names)}); "
            f"first row: {first}"
        )
    else:
        preview = " ".join(result.answer.text.split())
    lines = [
        f"RLM answer ({result.answer.form}): {preview[:300]}{'…' if len(preview) > 300 else ''}",
        f"  written to: {written[0]} ({written[1]:,} rows)" if written else "",
        f"  cost: {cost}; {calls_line}",
        f"  answered by: {who}; {result.iterations} root turns, sandbox "
        + (result.sandbox.split(" ", 1)[0] or "unknown"),
        "  see more: the asset's page in the Dagster UI (rlm/trajectory, rlm/call_tree, checks)"
        + (f"; every call is in the ledger at {cache_path}" if cache_path else ""),
    ]
    return redact("\n".join(line for line in lines if line))


def unknown_price_models(accounting: Accounting) -> list[str]:
    return sorted(m for m, t in accounting.by_model().items() if not t.cost_known)


def run_metadata(result: RLMResult) -> dict[str, Any]:
    """Metadata common to successful and failed runs, with key-shaped strings redacted."""
    acc = result.accounting
    unknown = unknown_price_models(acc)
    meta: dict[str, Any] = {
        "rlm/provider": result.provider,
        "rlm/root_model": result.root_model,
        "rlm/sub_model": result.sub_model,
        "rlm/question": result.question,
        "rlm/iterations": result.iterations,
        "rlm/root_calls": acc.calls("root"),
        "rlm/sub_calls": acc.calls("sub") + acc.calls("where"),
        "rlm/total_tokens": acc.usage.total_tokens,
        "rlm/cost_usd": round(acc.cost_usd, 6),
        "rlm/paid_usd": round(acc.paid_usd, 6),
        "rlm/cache_hits": sum(1 for r in acc.records if r.cache_hit),
        "rlm/duration_s": round(result.duration_s, 3),
        "rlm/trajectory": dg.MetadataValue.md(result.trajectory_markdown() or "(no turns)"),
        "rlm/call_tree": dg.MetadataValue.json(result.call_tree()),
    }
    if result.where_stats:
        meta["rlm/where_calls"] = len(result.where_stats)
        meta["rlm/where_undecided_rows"] = result.where_undecided_rows
        meta["rlm/where_clipped_rows"] = result.where_clipped_rows
    if unknown:
        meta["rlm/cost_unknown_models"] = ", ".join(unknown)
    if result.sandbox:
        meta["rlm/sandbox"] = result.sandbox
    if result.provider == "demo":
        note = (
            "Answered by the offline DEMO model (scripted programs and keyword rules, not an LLM). "
            "Set ANTHROPIC_API_KEY to use Claude."
        )
        meta = {"rlm/note": note, **meta}
    meta.update(usage_metadata(acc))
    return {k: _redacted(v) for k, v in meta.items()}


def _redacted(value: Any) -> Any:
    """``value`` with key-shaped strings redacted: text, Markdown and JSON metadata."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dg.MarkdownMetadataValue):
        return dg.MetadataValue.md(redact(value.md_str or ""))
    if isinstance(value, dg.JsonMetadataValue):
        return dg.MetadataValue.json(_redacted_json(value.data))
    return value


def _redacted_json(data: Any) -> Any:
    if isinstance(data, str):
        return redact(data)
    if isinstance(data, dict):
        return {k: _redacted_json(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_redacted_json(v) for v in data]
    return data


def column_schema(table: pa.Table) -> dg.TableSchema:
    return dg.TableSchema(
        columns=[dg.TableColumn(name=f.name, type=str(f.type)) for f in table.schema]
    )
