"""How an RLM run becomes Dagster metadata.

Usage is a few numeric keys that Insights can chart (``rlm/paid_usd``, ``rlm/cost_usd``,
``rlm/total_tokens``, ``rlm/input_tokens``, ``rlm/output_tokens``, ``rlm/root_calls``,
``rlm/sub_calls``, ``rlm/cache_hits``, ``rlm/duration_s``) plus one table, ``rlm/usage``: a
row per role and model with calls, replays, tokens and USD paid. ``rlm/cost_usd`` is what the
answer cost, replayed calls included; ``rlm/paid_usd`` what this run paid.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
import pyarrow as pa

from rlm_dagster.engine.loop import Answer, RLMResult
from rlm_dagster.models.client import Accounting
from rlm_dagster.redact import redact


def usage_metadata(accounting: Accounting) -> dict[str, Any]:
    """Usage as a few numeric keys (what Insights charts) plus one breakdown table.

    The numbers count what this run paid (calls replayed from the cache are in
    ``rlm/cache_hits`` and in the table's ``replayed`` column); ``rlm/cost_usd`` (written by
    :func:`run_metadata`) is what the answer cost, replays included."""
    paid = [r for r in accounting.records if not r.cache_hit]
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in accounting.records:
        row = rows.setdefault(
            (r.role, r.model),
            {
                "role": r.role,
                "model": r.model,
                "calls": 0,
                "replayed": 0,
                "input_tokens": 0,
                "output_tokens": 0,
                "cache_read_tokens": 0,
                "cache_write_tokens": 0,
                "paid_usd": 0.0,
            },
        )
        row["calls"] += 1
        if r.cache_hit:
            row["replayed"] += 1
            continue
        row["input_tokens"] += r.usage.input_tokens
        row["output_tokens"] += r.usage.output_tokens
        row["cache_read_tokens"] += r.usage.cache_read_input_tokens
        row["cache_write_tokens"] += r.usage.cache_creation_input_tokens
        if r.cost_usd is None or row["paid_usd"] is None:
            row["paid_usd"] = None  # an unknown price: no made-up number
        else:
            row["paid_usd"] += r.cost_usd
    for row in rows.values():
        if row["paid_usd"] is not None:
            row["paid_usd"] = round(row["paid_usd"], 6)
    return {
        "rlm/input_tokens": sum(r.usage.input_tokens for r in paid),
        "rlm/output_tokens": sum(r.usage.output_tokens for r in paid),
        "rlm/usage": _table(
            [row for _, row in sorted(rows.items())],
            role="string",
            model="string",
            calls="int",
            replayed="int",
            input_tokens="int",
            output_tokens="int",
            cache_read_tokens="int",
            cache_write_tokens="int",
            paid_usd="float",
        ),
    }


def answer_preview(answer: Answer) -> str:
    """One line: a text answer flattened, a table answer as its size, columns and first row."""
    table = answer.table
    if table is None or not table.num_columns:
        return " ".join(answer.text.split())
    first = (
        " | ".join(str(v) for v in table.slice(0, 1).to_pylist()[0].values())
        if table.num_rows
        else "(no rows)"
    )
    return (
        f"a table of {table.num_rows:,} rows ({', '.join(table.column_names)}); first row: {first}"
    )


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
    preview = answer_preview(result.answer)
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
    meta["rlm/calls"] = calls_table(acc)
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


def column_schema(table: pa.Table, types: dict[str, str] | None = None) -> dg.TableSchema:
    """The answer table's columns, with the types as stored (``types``: DuckDB's names, e.g.
    BIGINT where the asset declared BIGINT), else Arrow's."""
    return dg.TableSchema(
        columns=[
            dg.TableColumn(name=f.name, type=(types or {}).get(f.name) or str(f.type))
            for f in table.schema
        ]
    )


def answer_table(table: pa.Table, types: dict[str, str] | None = None, rows: int = 50) -> Any:
    """The first ``rows`` rows of a table answer, as a table on the asset's page."""
    records = [
        dg.TableRecord({k: _cell(v) for k, v in row.items()})
        for row in table.slice(0, rows).to_pylist()
    ]
    return dg.MetadataValue.table(records=records, schema=column_schema(table, types))


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(str(value))[:500]


VERDICTS_PREVIEW_ROWS = 50


def verdicts_preview(verdicts: pa.Table, rows: int = VERDICTS_PREVIEW_ROWS) -> Any:
    """The first ``rows`` judged rows of the run's ``llm_where`` calls, as a table on the
    asset's page (the whole set is the ``<asset>_llm_where_verdicts`` table)."""
    columns = {
        "llm_where": "string",
        "_verdict": "bool",
        "_verdict_reason": "string",
        "_decided_by": "string",
        "_cost_usd": "float",
        "row": "string",
    }
    rows_shown = [
        {k: _cell(row[k]) for k in columns} for row in verdicts.slice(0, rows).to_pylist()
    ]
    return _table(rows_shown, **columns)


def calls_table(accounting: Accounting, rows: int = 200) -> Any:
    """Each model call of the run (the first ``rows``): role, depth, model, tokens, USD,
    latency, replayed; the ledger holds them all."""
    calls = [
        {
            "role": r.role,
            "depth": r.depth,
            "model": r.model,
            "input_tokens": r.usage.input_tokens,
            "output_tokens": r.usage.output_tokens,
            "usd": None if r.cost_usd is None else round(r.cost_usd, 6),
            "latency_s": round(r.latency_s, 3),
            "replayed": r.cache_hit,
        }
        for r in accounting.records[:rows]
    ]
    return _table(
        calls,
        role="string",
        depth="int",
        model="string",
        input_tokens="int",
        output_tokens="int",
        usd="float",
        latency_s="float",
        replayed="bool",
    )


def _table(rows: list[dict[str, Any]], **columns: str) -> Any:
    """A table metadata value: ``rows`` under ``columns`` (name -> type), in that order."""
    return dg.MetadataValue.table(
        records=[dg.TableRecord(row) for row in rows],
        schema=dg.TableSchema(columns=[dg.TableColumn(n, t) for n, t in columns.items()]),
    )
