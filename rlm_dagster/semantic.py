"""Semantic operators the REPL calls: ``llm_where`` and ``llm_query_batched``.

    >>> sem = Semantic(lm, warehouse, budget)  # doctest: +SKIP
    >>> sem.where("tickets", "the customer threatens to cancel", where="priority = 'urgent'")
    ... # doctest: +SKIP

``llm_where`` speaks the wire protocol of ARCHITECTURE.md: the predicate sits in the system
prompt (a cache-marked prefix identical across batches), rows go in the user message as
``<row id="K">{json}</row>`` lines, and the model must call the ``record_verdicts`` tool.
A reply with missing, duplicated or malformed ids is re-asked for those rows in a smaller
batch, then one row alone; a row that still fails is NULL with its error, never silently
true or false. Identical projected values are judged once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from rlm_dagster.budget import Budget
from rlm_dagster.errors import ModelError, QueryError
from rlm_dagster.lm import LM, cached_system
from rlm_dagster.prompts import render
from rlm_dagster.sql_policy import check_sql
from rlm_dagster.warehouse import TableInfo, Warehouse

RECORD_VERDICTS_TOOL: dict[str, Any] = {
    "name": "record_verdicts",
    "description": "Record, for every row id you were given, whether the predicate holds.",
    "input_schema": {
        "type": "object",
        "properties": {
            "verdicts": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer"},
                        "match": {"type": "boolean"},
                        "reason": {"type": "string", "description": "at most 15 words"},
                    },
                    "required": ["id", "match", "reason"],
                },
            }
        },
        "required": ["verdicts"],
    },
}

_ROW_ID = "__rid"
VERDICT_REASON = "_verdict_reason"


@dataclass
class Verdict:
    match: bool | None
    reason: str = ""
    error: str | None = None


@dataclass
class WhereStats:
    rows_in: int = 0
    distinct: int = 0
    requests: int = 0
    matches: int = 0
    failed: int = 0
    reasked: int = 0
    errors: list[str] = field(default_factory=list)


class Semantic:
    """Runs semantic operators for one RLM run, charging every call to its budget."""

    def __init__(
        self,
        lm: LM,
        warehouse: Warehouse,
        budget: Budget,
        *,
        batch_size: int = 20,
        max_row_chars: int = 4_000,
    ) -> None:
        self.lm = lm
        self.warehouse = warehouse
        self.budget = budget
        self.batch_size = batch_size
        self.max_row_chars = max_row_chars

    # -- llm_query / llm_query_batched ----------------------------------------------------

    def query(self, prompt: str, model: str | None = None) -> str:
        reply = self.lm.complete(
            role="sub",
            model=model or self.lm.sub_model,
            system="Answer the request directly and concisely.",
            messages=[{"role": "user", "content": prompt}],
        )
        return reply.text

    def query_batched(self, prompts: Sequence[str], model: str | None = None) -> list[str]:
        self.budget.reserve_sub_calls(len(prompts))

        async def one(prompt: str) -> str:
            try:
                reply = await self.lm.acomplete(
                    role="sub",
                    model=model or self.lm.sub_model,
                    system="Answer the request directly and concisely.",
                    messages=[{"role": "user", "content": prompt}],
                )
            except ModelError as err:
                if not err.retryable:
                    raise
                return f"ERROR: {err}"
            return reply.text

        async def run() -> list[str]:
            return list(await asyncio.gather(*(one(p) for p in prompts)))

        return self.lm.run_async(run)

    # -- llm_where -----------------------------------------------------------------------

    def where(
        self,
        table: str,
        predicate: str,
        *,
        columns: Sequence[str] | None = None,
        where: str | None = None,
        limit: int | None = None,
    ) -> tuple[TableInfo, WhereStats]:
        if not predicate.strip():
            raise ValueError("llm_where needs a non-empty natural-language predicate")
        if limit is not None and limit < 1:
            raise ValueError("limit must be a positive number of rows")
        rows = self._input(table, where)
        stats = WhereStats(rows_in=rows.num_rows)
        user_columns = [c for c in rows.column_names if c != _ROW_ID and c != VERDICT_REASON]
        projected = list(columns) if columns is not None else user_columns
        unknown = [c for c in projected if c not in user_columns]
        if unknown:
            raise QueryError(
                f"llm_where columns {unknown} do not exist; columns are: {', '.join(user_columns)}"
            )
        # One verdict per distinct projected value, joined back to every row that has it.
        keys = [
            json.dumps(r, sort_keys=True, default=str, ensure_ascii=False)
            for r in rows.select(projected).to_pylist()
        ]
        distinct = list(dict.fromkeys(keys))
        stats.distinct = len(distinct)
        verdicts = self._judge(predicate, distinct, stats, limit)
        row_verdicts = [
            verdicts.get(k, Verdict(None, error="not evaluated (limit reached)")) for k in keys
        ]
        keep = [i for i, v in enumerate(row_verdicts) if v.match is True]
        if limit is not None:
            keep = keep[:limit]
        stats.matches = len(keep)
        stats.failed = sum(
            1 for v in row_verdicts if v.match is None and v.error and "limit" not in v.error
        )
        result = rows.take(pa.array(keep, type=pa.int64())).drop_columns([_ROW_ID])
        reasons = pa.array([row_verdicts[i].reason for i in keep], type=pa.string())
        if VERDICT_REASON in result.column_names:
            result = result.drop_columns([VERDICT_REASON])
        result = result.append_column(VERDICT_REASON, reasons)
        info = self.warehouse.create_scratch("where", result)
        return info, stats

    def _input(self, table: str, where: str | None) -> pa.Table:
        base = self.warehouse.input_query(table)
        query = f"SELECT * FROM ({base}) AS __in"
        if where:
            query += f" WHERE {where}"
            check_sql(query, allowed_tables=self.warehouse.tables.keys())
        try:
            data = self.warehouse.trusted_arrow(query)
        except Exception as err:
            raise QueryError(f"llm_where input failed: {err}") from None
        return data.append_column(_ROW_ID, pa.array(range(data.num_rows), type=pa.int64()))

    def _judge(
        self, predicate: str, values: list[str], stats: WhereStats, limit: int | None
    ) -> dict[str, Verdict]:
        batches = [values[i : i + self.batch_size] for i in range(0, len(values), self.batch_size)]
        self.budget.reserve_sub_calls(len(batches))
        system = cached_system(render("where_system.md", predicate=predicate))
        verdicts: dict[str, Verdict] = {}
        wave = max(1, self.lm.max_concurrency)

        async def run() -> None:
            for start in range(0, len(batches), wave):
                results = await asyncio.gather(
                    *(self._ask(system, b, stats) for b in batches[start : start + wave])
                )
                for result in results:
                    verdicts.update(result)
                if limit is not None and sum(v.match is True for v in verdicts.values()) >= limit:
                    return

        self.lm.run_async(run)
        return verdicts

    async def _ask(
        self, system: list[dict[str, Any]], values: list[str], stats: WhereStats
    ) -> dict[str, Verdict]:
        """Judge ``values``; re-ask what the reply left unjudged in halves, then alone."""
        stats.requests += 1
        lines = [f'<row id="{k}">{self._clip(v)}</row>' for k, v in enumerate(values)]
        try:
            reply = await self.lm.acomplete(
                role="where",
                model=self.lm.sub_model,
                system=system,
                messages=[{"role": "user", "content": "\n".join(lines)}],
                max_tokens=200 + 60 * len(values),
                tools=[RECORD_VERDICTS_TOOL],
                tool_choice={"type": "tool", "name": "record_verdicts"},
            )
            judged, problem = parse_verdicts(reply.tool_input, len(values))
        except ModelError as err:
            if not err.retryable:
                raise
            judged, problem = {}, str(err)
        out = {values[k]: v for k, v in judged.items()}
        missing = [values[k] for k in range(len(values)) if k not in judged]
        if not missing:
            return out
        if len(values) == 1:
            stats.errors.append(problem)
            out[values[0]] = Verdict(None, error=problem)
            return out
        stats.reasked += len(missing)
        half = max(1, len(missing) // 2) if len(missing) == len(values) else len(missing)
        parts = [missing[i : i + half] for i in range(0, len(missing), half)]
        for part in parts:
            out.update(await self._ask(system, part, stats))
        return out

    def _clip(self, value: str) -> str:
        if len(value) <= self.max_row_chars:
            return value
        return value[: self.max_row_chars] + "…(truncated)"


def parse_verdicts(tool_input: dict[str, Any] | None, n: int) -> tuple[dict[int, Verdict], str]:
    """Valid verdicts by row id, and a description of what was wrong with the rest."""
    if not isinstance(tool_input, dict) or not isinstance(tool_input.get("verdicts"), list):
        return {}, "reply did not call record_verdicts with a verdicts list"
    seen: dict[int, Verdict] = {}
    duplicated: set[int] = set()
    problems: list[str] = []
    for item in tool_input["verdicts"]:
        if not isinstance(item, dict):
            problems.append("a verdict is not an object")
            continue
        k, match = item.get("id"), item.get("match")
        if isinstance(k, str) and k.isdigit():
            k = int(k)
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < n:
            problems.append(f"unknown id {item.get('id')!r}")
            continue
        if not isinstance(match, bool):
            problems.append(f"id {k} has no boolean match")
            continue
        if k in seen:
            duplicated.add(k)
        reason = item.get("reason")
        seen[k] = Verdict(match, reason if isinstance(reason, str) else "")
    for k in duplicated:
        del seen[k]
        problems.append(f"id {k} duplicated")
    if len(seen) < n and not problems:
        problems.append("ids missing from the reply")
    return seen, "; ".join(problems)
