"""Semantic operators the REPL calls: ``llm_where`` and ``llm_query_batched``.

    >>> sem = Semantic(lm, warehouse, budget, cache=Cache(path))  # doctest: +SKIP
    >>> sem.plan("tickets", "the customer threatens to cancel").describe()  # doctest: +SKIP
    '600 rows -> 600 after where -> 556 distinct -> 0 cached -> 556 to judge in 14 requests ...'

``llm_where`` runs the cheapest step first: ``where=`` in SQL, projection to ``columns``,
one verdict per distinct projected value, the persistent verdict cache, then packed requests
(a row cap and a token budget per request) sent concurrently under the LM's adaptive limiter.
Each request speaks the wire protocol of ARCHITECTURE.md: the predicate sits in the system
prompt (a cache-marked prefix identical across batches), rows go in the user message as
``<row id="K">{json}</row>`` lines, and the verdicts come back through the best channel the
sub model's profile allows (:attr:`~rlm_dagster.models.profiles.ModelProfile.verdict_channel`):
structured outputs, a forced ``record_verdicts`` tool, or that tool offered with
``tool_choice`` auto; only that channel of the reply is read. A reply with
missing, duplicated or malformed ids is re-asked for those rows in a smaller batch, then one
row alone; a row that still fails, or that the model refuses, is NULL with its error, never
silently true or false.
The plan is priced before anything is sent, and refused when it cannot fit the budget.

Rows, distinct values, cached verdicts, the values to judge and the verdicts judged live in
working tables of the run's DuckDB, read and written a chunk at a time: memory does not grow
with the table. Verdicts carry reasons for matches only by default (:data:`REASONS`). Three
opt-ins change how values get judged, never what a verdict means: ``calibrate`` measures the
batch size on a sample, ``batches`` sends the requests as message batches (resumed after a
kill), and a ``recall`` target lets a local proxy decide the values it is sure of, with the
target certified on a sample (:mod:`rlm_dagster.cascade`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import sqlglot
from sqlglot import exp

from rlm_dagster.cache import CacheStore, verdict_scope
from rlm_dagster.cascade import CascadeTargets, EmbeddingProxy, estimate_cascade, plan_cascade
from rlm_dagster.engine.budget import Budget
from rlm_dagster.engine.events import (
    Event,
    RunWarning,
    WhereBatchProgress,
    WhereCalibrated,
    WhereCascaded,
    WherePlanned,
    WhereProgress,
)
from rlm_dagster.errors import BudgetExceeded, ConfigError, QueryError
from rlm_dagster.models.batches import BatchProgress, BatchRequest, BatchResult, BatchRunner
from rlm_dagster.models.client import LM, Completion, Usage, cached_system
from rlm_dagster.models.prices import BATCH_PRICE_FACTOR
from rlm_dagster.models.profiles import ModelProfile, VerdictChannel
from rlm_dagster.prompts import render
from rlm_dagster.sql.policy import check_sql
from rlm_dagster.sql.spool import SpooledTable
from rlm_dagster.sql.tables import TableSource
from rlm_dagster.sql.warehouse import TableInfo

VERDICTS_SCHEMA: dict[str, Any] = {
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
                "additionalProperties": False,
            },
        }
    },
    "required": ["verdicts"],
    "additionalProperties": False,
}
_IDS: dict[str, Any] = {"type": "array", "items": {"type": "integer"}}
MATCH_REASONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "matches": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "reason": {"type": "string", "description": "at most 15 words"},
                },
                "required": ["id", "reason"],
                "additionalProperties": False,
            },
        },
        "non_matches": _IDS,
    },
    "required": ["matches", "non_matches"],
    "additionalProperties": False,
}
IDS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"matches": _IDS, "non_matches": _IDS},
    "required": ["matches", "non_matches"],
    "additionalProperties": False,
}
REASONS = ("matches", "all", "none")
"""Which verdicts carry a reason: only matches (the default), every row, or none.

Output tokens are the expensive side (5x the input price) and a per-row reason is most of a
verdict's output. The reasons people read are the matches' (the result table's
``_verdict_reason``, the audit of what was selected), and most rows of a filter do not
match: ``"matches"`` keeps those and sends non-matches as bare ids, several times cheaper
than ``"all"`` at typical selectivity; ``"none"`` is ids only. All three keep the same
guarantee: every row id must be in exactly one list, or the row is asked again."""
_SCHEMAS = {"all": VERDICTS_SCHEMA, "matches": MATCH_REASONS_SCHEMA, "none": IDS_SCHEMA}
_SHAPES = {
    "all": "where_shape_all.md",
    "matches": "where_shape_matches.md",
    "none": "where_shape_none.md",
}
# Estimated output tokens per row (planning), and the reply's token cap per row.
_OUTPUT_TOKENS_PER_ROW = {"all": 25, "matches": 12, "none": 4}
_MAX_TOKENS_PER_ROW = {"all": 60, "matches": 60, "none": 12}


def record_verdicts_tool(reasons: str = "all") -> dict[str, Any]:
    """The ``record_verdicts`` tool whose input has the verdict format ``reasons``."""
    return {
        "name": "record_verdicts",
        "description": "Record, for every row id you were given, whether the predicate holds.",
        "input_schema": _SCHEMAS[reasons],
    }


RECORD_VERDICTS_TOOL: dict[str, Any] = record_verdicts_tool("all")
REFUSED = "refused by the model (stop_reason: refusal)"

_KEY = "__rlm_value"
_WORK_ROWS = 10_000  # values streamed, looked up in the cache or stored per step
_HASH_BYTES = 16  # the value hash: a verdict key's tail
# Verdicts from message batches are committed in large sorted groups (and always before their
# batch is marked finished): the batch, not the flush interval, is what a killed run resumes.
_BATCH_FLUSH_VERDICTS = 50_000
VERDICT_REASON = "_verdict_reason"
# The columns a provenance table adds to the input rows besides the reason, which the
# matches table keeps.
_PROVENANCE_ONLY = (
    "_verdict",
    "_decided_by",
    "_model",
    "_batch",
    "_cost_usd",
    "_error",
    "_clipped",
)
# Token estimates (4 characters a token) for planning; replies are billed as reported.
_TOOL_OVERHEAD_TOKENS = 400  # tool definition + the API's tool-use preamble
_ROW_OVERHEAD_TOKENS = 8  # <row id="K"></row>
_OUTPUT_TOKENS_PER_REQUEST = 30
# Thinking a judge that cannot turn it off (Opus 5.5, Fable) spends per request, by effort.
_THINKING_TOKENS_PER_REQUEST = {
    "low": 300,
    "medium": 1_000,
    "high": 3_000,
    "xhigh": 6_000,
    "max": 6_000,
}
# Leases on llm_where work in the shared cache: held while judging, renewed every quarter of
# their life, so a run that dies frees them within a minute (at once for a run on this host:
# see _gone_holder_pid).
_LEASE_TTL_S = 60.0
_LEASE_POLL_S = 0.5
# Room kept under a long-prompt price threshold for the tokenizer's variance from our estimate.
_TIER_MARGIN = 0.8


@dataclass(frozen=True)
class WhereConfig:
    """How ``llm_where`` packs and reports; defaults suit short text rows."""

    batch_rows: int = 40
    batch_tokens: int = 4_000
    max_row_chars: int = 16_000  # longer rows are shown clipped, and marked _clipped
    progress_interval_s: float = 5.0
    default_latency_s: float = 3.0  # per request, until latencies have been observed
    reasons: str = "matches"  # which verdicts carry a reason: see REASONS
    # Choose batch_rows by measurement: judge `calibration_values` values one per request,
    # then packed at each size in `calibration_sizes`, and keep the largest size whose
    # verdicts agree with the single-row ones on at least `calibration_agreement` of them.
    calibrate: bool = False
    # Sub-linear judging (opt-in): a recall target turns on the cascade — a local embedding
    # proxy scores every value, the model judges a random sample and the values the proxy is
    # unsure of, and the rest are decided by the proxy with recall >= `recall` (and
    # precision >= `precision`, if set) with probability >= 1 - `delta`. When the sample
    # cannot certify it: judge everything ("fallback") or fail ("fail").
    recall: float | None = None
    precision: float | None = None
    delta: float = 0.05
    on_miss: str = "fallback"
    cascade_sample: int = 1_000
    calibration_values: int = 40
    calibration_sizes: tuple[int, ...] = (10, 20, 40, 80)
    calibration_agreement: float = 0.975
    # Send the requests as message batches (half price, answers within 24 h) unless a call
    # says otherwise; polled every batch_poll_s, growing to a minute.
    batches: bool = False
    batch_poll_s: float = 15.0


@dataclass
class Verdict:
    match: bool | None
    reason: str = ""
    error: str | None = None
    decided_by: str = "model"
    batch: str = ""
    cost_usd: float = 0.0


@dataclass
class WherePlan:
    """What ``llm_where`` would do and cost, computed without calling any model."""

    rows_in: int
    rows_after_where: int
    distinct: int
    cached: int
    to_evaluate: int
    requests: int
    est_input_tokens: int
    est_output_tokens: int
    est_cost_usd: float | None
    est_wall_s: float
    concurrency: int
    model: str
    est_batch_cost_usd: float | None = None  # the same requests as message batches
    batches: bool = False  # whether this call sends them as message batches
    cascade: str | None = None  # with a recall target: the cascade's calls against judging all

    def describe(self) -> str:
        if self.est_cost_usd is None:
            cost = "unknown (model not in the price table)"
        else:
            cost = f"${self.est_cost_usd:.4f} online"
            if self.est_batch_cost_usd is not None:
                cost += f" / ${self.est_batch_cost_usd:.4f} as message batches"
        when = (
            "sent as message batches (results within 24 h, most within an hour)"
            if self.batches
            else f"~{self.est_wall_s:.0f} s at concurrency {self.concurrency}"
        )
        return (
            f"{self.rows_in:,} rows -> {self.rows_after_where:,} after where -> {self.distinct:,} distinct "
            f"-> {self.cached:,} cached -> {self.to_evaluate:,} to judge in {self.requests:,} requests to "
            f"{self.model}; est. {self.est_input_tokens:,} input + {self.est_output_tokens:,} output tokens, "
            f"{cost}; {when}" + (f". With recall=: {self.cascade}" if self.cascade else "")
        )

    @property
    def chosen_cost_usd(self) -> float | None:
        """The estimate of the mode this call runs in."""
        return self.est_batch_cost_usd if self.batches else self.est_cost_usd

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.describe()}


@dataclass
class WhereStats:
    """What one ``llm_where`` call did (counts are of distinct values unless named rows)."""

    name: str = ""
    predicate: str = ""
    rows_in: int = 0
    rows_after_where: int = 0
    distinct: int = 0
    cached: int = 0
    judged: int = 0
    requests: int = 0
    matches: int = 0
    failed: int = 0
    reasked: int = 0
    clipped: int = 0  # rows whose value was shown to the model cut to max_row_chars
    cost_usd: float = 0.0
    seconds: float = 0.0
    stopped_early: bool = False
    errors: list[str] = field(default_factory=list)
    calibration: dict[str, Any] | None = None  # what calibrate measured, when it ran
    cascade: dict[str, Any] | None = None  # the cascade's decision and guarantee, when it ran
    proxy_decided: int = 0  # distinct values decided by the proxy, not the model

    def describe(self, *, deterministic: bool = False) -> str:
        """One line; ``deterministic`` leaves out what depends on the cache and the clock
        (what the root model sees must not change when a retried run replays)."""
        if deterministic:
            return (
                f"[llm_where: {self.rows_in:,} rows -> {self.rows_after_where:,} after where -> "
                f"{self.distinct:,} distinct; {self.matches:,} rows match"
                + (
                    f", {self.failed:,} failed (NULL, see {self.name}_provenance)"
                    if self.failed
                    else ""
                )
                + (", stopped at limit" if self.stopped_early else "")
                + self._clipped_note()
                + self._cascade_note()
                + f". Result: {self.name}]"
            )
        return (
            f"[llm_where: {self.rows_in:,} rows -> {self.rows_after_where:,} after where -> "
            f"{self.distinct:,} distinct -> {self.cached:,} cached -> {self.requests:,} requests; "
            f"{self.matches:,} rows match"
            + (
                f", {self.failed:,} failed (NULL, see {self.name}_provenance)"
                if self.failed
                else ""
            )
            + (", stopped at limit" if self.stopped_early else "")
            + self._clipped_note()
            + self._cascade_note()
            + f"; ${self.cost_usd:.4f}, {self.seconds:.1f} s. Result: {self.name}]"
        )

    def _cascade_note(self) -> str:
        if not self.cascade:
            return ""
        if self.cascade.get("action") == "fallback":
            return "; cascade fell back to judging every value (its target could not be certified)"
        return (
            f"; {self.proxy_decided:,} distinct values decided by the proxy "
            f"({self.cascade.get('guarantee', '')}; see _decided_by)"
        )

    def _clipped_note(self) -> str:
        if not self.clipped:
            return ""
        return (
            f", {self.clipped:,} rows judged on a clipped value (too long; see _clipped in "
            f"{self.name}_provenance, project fewer columns=)"
        )


class Semantic:
    """Runs semantic operators for one RLM run, charging every call to its budget."""

    def __init__(
        self,
        lm: LM,
        warehouse: TableSource,
        budget: Budget,
        *,
        cache: CacheStore | None = None,
        config: WhereConfig | None = None,
        on_event: Callable[[Event], None] | None = None,
        depth: int = 0,
    ) -> None:
        self.lm = lm
        self.depth = depth
        self.warehouse = warehouse
        self.budget = budget
        self.cache = cache
        self.config = config or WhereConfig()
        self.on_event = on_event or (lambda event: None)
        self._owner = f"{_PROCESS_PLACE}|{os.getpid()}|{uuid.uuid4().hex[:12]}"

    # -- llm_query / llm_query_batched ----------------------------------------------------

    def query(self, prompt: str, model: str | None = None) -> str:
        """One sub-call: ``prompt`` (text) to the sub model, or to ``model`` if it is one of
        the run's models."""
        reply = self.lm.complete(
            role="sub",
            model=self._model(model),
            system=_QUERY_SYSTEM,
            messages=[{"role": "user", "content": _prompt_text(prompt)}],
            depth=self.depth,
            deadline=self.budget.deadline,
            meter=self.budget,
        )
        reply.check_not_refused("the llm_query prompt")
        return reply.text

    def query_batched(self, prompts: Sequence[str], model: str | None = None) -> list[str]:
        """Concurrent sub-calls, order kept; identical prompts are sent once and their reply
        given to each. The whole fan-out's upper bound is checked against the budget before
        anything is sent, and each request reserves its own as it goes."""
        if isinstance(prompts, str) or not isinstance(prompts, list | tuple):
            raise QueryError("llm_query_batched takes a list of prompts (str).")
        texts = [_prompt_text(p) for p in prompts]
        distinct = list(dict.fromkeys(texts))
        model = self._model(model)
        self.budget.reserve_sub_calls(len(distinct))
        bounds = [
            self.lm.upper_bound(
                self.lm._request(
                    "sub",
                    model,
                    _QUERY_SYSTEM,
                    [{"role": "user", "content": t}],
                    None,
                    None,
                    None,
                )
            )[1]
            for t in distinct
        ]
        known = None if any(b is None for b in bounds) else sum(b or 0.0 for b in bounds)
        self.budget.check_plan("llm_query_batched", len(distinct), known)

        async def one(prompt: str) -> str:
            reply = await self.lm.acomplete(
                role="sub",
                model=model,
                system=_QUERY_SYSTEM,
                messages=[{"role": "user", "content": prompt}],
                depth=self.depth,
                deadline=self.budget.deadline,
                meter=self.budget,
            )
            if reply.stop_reason == "refusal":
                return "ERROR: refused by the model (stop_reason: refusal)"
            return reply.text

        async def run() -> list[str]:
            # A fixed pool of workers pulls prompts in order (memory and reservations stay
            # bounded by the concurrency, not the fan-out). The breaker: once a prompt fails
            # at the provider (after the LM's retries), no new prompt starts; those in flight
            # finish and are cached, then the error ends the call: a retry pays only for the
            # rest.
            results: list[str] = [""] * len(distinct)
            pending = iter(range(len(distinct)))
            failures: list[BaseException] = []

            async def worker() -> None:
                for i in pending:
                    if failures:
                        return
                    try:
                        results[i] = await one(distinct[i])
                    except BaseException as err:
                        failures.append(err)
                        return

            await asyncio.gather(
                *(worker() for _ in range(min(len(distinct), self.lm.max_concurrency)))
            )
            if failures:
                raise failures[0]
            return results

        replies = dict(zip(distinct, self.lm.run_async(run), strict=True))
        return [replies[t] for t in texts]

    def _model(self, model: str | None) -> str:
        """``model`` if the run was configured with it (root or sub), else an error: model
        code cannot reach a model nobody chose or priced."""
        if model is None:
            return self.lm.sub_model
        allowed = sorted({self.lm.sub_model, self.lm.root_model})
        if model not in allowed:
            raise QueryError(
                f"model={model!r} is not one of this run's models ({', '.join(allowed)}); "
                "leave model= out for the sub model, or configure the model on the asset."
            )
        return model

    # -- llm_where -----------------------------------------------------------------------

    def plan(
        self,
        table: str,
        predicate: str,
        *,
        columns: Sequence[str] | None = None,
        where: str | None = None,
        batches: bool | None = None,
        recall: float | None = None,
        precision: float | None = None,
        on_miss: str | None = None,
    ) -> WherePlan:
        """The cost of ``where(...)`` without calling any model: online and as message
        batches, and which of the two the call would use; with a recall target, the range of
        the cascade's model calls against judging everything."""
        targets = self._targets(recall, precision, on_miss, None)
        job = self._prepare(table, predicate, columns, where)
        try:
            job.plan.batches = self._batches(batches, None)
            self._plan_cascade(job.plan, targets)
            return job.plan
        finally:
            job.drop()

    def _batches(self, batches: bool | None, limit: int | None) -> bool:
        """Whether a call sends its requests as message batches: as it asks, else as the
        asset is configured; never with ``limit=`` (a batch cannot stop at the first
        matches, so those few requests go online)."""
        if batches is not None and not isinstance(batches, bool):
            raise QueryError(f"llm_where batches= must be True or False, not {batches!r}.")
        chosen = self.config.batches if batches is None else batches
        return chosen and limit is None

    def where(
        self,
        table: str,
        predicate: str,
        *,
        columns: Sequence[str] | None = None,
        where: str | None = None,
        limit: int | None = None,
        batches: bool | None = None,
        recall: float | None = None,
        precision: float | None = None,
        on_miss: str | None = None,
    ) -> tuple[TableInfo, TableInfo, WhereStats]:
        """Judge the rows; return the matches table, the provenance table and the stats.

        With ``batches`` (or :attr:`WhereConfig.batches`), the requests go out as message
        batches at half the price: first any batches an earlier, killed attempt of the same
        call submitted are resumed (never paid twice), then the rest is submitted; what the
        batches leave undecided (invalid replies, errored or expired requests) is judged
        online, as always.

        With ``recall`` (or :attr:`WhereConfig.recall`), most values are decided by a cheap
        local proxy instead: see :meth:`_cascade`. ``limit=`` calls never cascade."""
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise QueryError(
                f"llm_where limit= must be a whole number of rows >= 1, not {limit!r}; "
                "e.g. limit=5, or leave it out."
            )
        started = time.monotonic()
        targets = self._targets(recall, precision, on_miss, limit)
        job = self._prepare(table, predicate, columns, where, limit)
        try:
            lease = self._lease_name(job)
            if lease is not None and self._wait_for_lease(lease):
                # Another run judged these values meanwhile: what it finished is cached now.
                job.drop()
                job = self._prepare(table, predicate, columns, where, limit)
            try:
                plan = job.plan
                plan.batches = self._batches(batches, limit)
                self._plan_cascade(plan, targets)
                self.budget.check_plan("llm_where", plan.requests, plan.chosen_cost_usd)
                if plan.requests:
                    self.on_event(WherePlanned(plan.describe()))
                stats = WhereStats(
                    predicate=predicate,
                    rows_in=plan.rows_in,
                    rows_after_where=plan.rows_after_where,
                    distinct=plan.distinct,
                    cached=plan.cached,
                )
                if self.config.calibrate:
                    self._calibrate(job, stats)
                if targets is not None and job.batches:
                    self._cascade(job, stats, targets, predicate, lease)
                if plan.batches:
                    self._judge_batches(job, stats, lease)
                self._judge(job, stats, limit, lease)
            finally:
                if lease is not None and self.cache is not None:
                    self.cache.release_lease(lease, self._owner)
            info, prov = self._results(job, stats, limit)
        finally:
            job.drop()
        stats.seconds = time.monotonic() - started
        return info, prov, stats

    def verdicts(self, stats: Sequence[WhereStats]) -> SpooledTable | None:
        """Every row the ``llm_where`` calls of ``stats`` judged, in one shape whatever the
        tables were: the call's result name, its predicate, the row as JSON, and the verdict,
        reason, how it was decided, the model, the cost share, the error and whether the
        value was clipped. Streamed from the engine to a Parquet file a batch at a time, so
        memory does not grow with the rows; ``None`` when there were none."""
        verdict_columns = [
            "_verdict",
            VERDICT_REASON,
            "_decided_by",
            "_model",
            "_cost_usd",
            "_error",
            "_clipped",
        ]
        parts: list[exp.Query] = []
        for s in stats:
            name = f"{s.name}_provenance"
            if name not in self.warehouse.tables:
                continue
            added = {*_PROVENANCE_ONLY, VERDICT_REASON}  # what _results appended to the rows
            columns = [c for c in self.warehouse.info(name).columns if c not in added]
            row = exp.Struct(
                expressions=[
                    exp.PropertyEQ(this=exp.to_identifier(c), expression=exp.column(c, quoted=True))
                    for c in columns
                ]
            )
            parts.append(
                exp.select(
                    exp.alias_(exp.Literal.string(s.name), "llm_where"),
                    exp.alias_(exp.Literal.string(s.predicate), "predicate"),
                    exp.alias_(exp.cast(exp.func("to_json", row), "VARCHAR"), "row"),
                    *(exp.column(c, quoted=True) for c in verdict_columns),
                ).from_(exp.to_identifier(name, quoted=True))
            )
        if not parts:
            return None
        query = parts[0]
        for part in parts[1:]:
            query = exp.union(query, part, distinct=False)
        spooled = SpooledTable(
            self.warehouse.trusted_batches(query.sql(self.warehouse.dialect), _WORK_ROWS),
            prefix="rlm-verdicts-",
        )
        if not spooled.num_rows:
            spooled.close()
            return None
        return spooled

    def _lease_name(self, job: _Job) -> str | None:
        """The lease on the values this call must judge, shared by every run that would judge
        the same values with the same predicate, model and prompt (their cache keys)."""
        if self.cache is None or not job.batches:
            return None
        # An order-independent digest of the values to judge, computed in the engine with
        # the plan's counts (the todo table has not changed since).
        digest = hashlib.sha256(job.scope + job.todo_digest.encode())
        return f"llm_where:{digest.hexdigest()}"

    def _wait_for_lease(self, name: str) -> bool:
        """Take the lease, waiting while another live run holds it; whether it waited. A
        lease whose holder is a process of this host that no longer exists (a run killed
        mid-call, whose retry this may be) is taken over at once instead of waiting for it
        to expire: what the dead run finished is in the cache."""
        assert self.cache is not None
        waited = False
        while not self.cache.try_lease(name, self._owner, _LEASE_TTL_S):
            holder = self.cache.lease_holder(name)
            gone = None if holder is None else _gone_holder_pid(holder)
            if holder is not None and gone is not None:
                self.cache.release_lease(name, holder)
                self.on_event(
                    RunWarning(
                        f"llm_where: the run that was judging these rows (process {gone} on "
                        "this host) is gone; taking over its work (the verdicts it finished "
                        "are in the cache, not paid again)"
                    )
                )
                continue
            if not waited:
                self.on_event(WhereProgress(waiting=True))
            waited = True
            deadline = self.budget.deadline
            if deadline is not None and time.monotonic() >= deadline:
                raise BudgetExceeded(
                    "max_wall_time_s reached while waiting for another run judging the same "
                    "llm_where rows. Raise max_wall_time_s, or run one of them later.",
                    limit="max_wall_time_s",
                )
            time.sleep(_LEASE_POLL_S)
        return waited

    def _scalars(self, sql: str) -> list[Any]:
        """The first row of a host-built query, as Python values."""
        row = self.warehouse.trusted_arrow(sql).to_pylist()[0]
        return list(row.values())

    def _prepare(
        self,
        table: str,
        predicate: str,
        columns: Sequence[str] | None,
        where: str | None,
        limit: int | None = None,
    ) -> _Job:
        """Plan the call inside the engine: the input rows, their distinct values, the cached
        verdicts and what is left to judge become working tables; Python keeps only counts
        and the request boundaries, so memory does not grow with the data."""
        _check_where_args(predicate, columns, where)
        dialect = self.warehouse.dialect
        base = self.warehouse.input_query(table)
        parsed = sqlglot.parse_one(base, read=dialect)
        assert isinstance(parsed, exp.Query), base  # input_query returns one query
        source = parsed.subquery("__in")

        def select(*expressions: str | exp.Expr) -> exp.Select:
            return exp.select(*expressions, dialect=dialect).from_(source.copy())

        all_columns = self.warehouse.trusted_columns(select("*").sql(dialect))
        user_columns = [c for c in all_columns if c != VERDICT_REASON]
        projected = list(columns) if columns is not None else user_columns
        unknown = [c for c in projected if c not in user_columns]
        if unknown:
            raise QueryError(
                f"llm_where columns {unknown} do not exist; columns are: {', '.join(user_columns)}"
            )
        rows_in: int | None = None  # without a filter, the rows judged are all the input
        if where:
            count = select(exp.alias_(exp.func("count", exp.Star()), "n"))
            (rows_in,) = self._scalars(count.sql(dialect))
        # The value the sub-model reads (compact JSON of the projected columns) is built and
        # deduplicated in the engine, not row by row in Python. '<' and '>' are written as
        # JSON escapes, so no row can contain the wire format's delimiters (<row id="K">,
        # </row>); the model reads the same text.
        fields = exp.Struct(
            expressions=[
                exp.PropertyEQ(this=exp.to_identifier(c), expression=exp.column(c, quoted=True))
                for c in projected
            ]
        )
        value: exp.Expr = exp.cast(exp.func("to_json", fields), "VARCHAR")
        for char, escape in (("<", "\\u003c"), (">", "\\u003e")):
            value = exp.func("replace", value, exp.Literal.string(char), exp.Literal.string(escape))
        query = select("*", exp.alias_(value, _KEY))
        if where:
            # The model's filter: parsed and policed, then attached as an expression.
            condition = check_sql(
                select("*").sql(dialect) + f" WHERE {where}",
                self.warehouse.tables.keys(),
                dialect=dialect,
            ).args["where"]
            query = query.where(condition.this)
        model = self.lm.sub_model
        self.lm.catalog.check_can_judge(model)
        profile = self.lm.catalog.profile(model)
        channel = profile.verdict_channel
        assert channel is not None
        reasons = self.config.reasons
        if reasons not in REASONS:
            raise ConfigError(f"llm_where reasons must be one of {REASONS}, not {reasons!r}.")
        # Verdicts of another format hold other reasons: they are not replayed for this one.
        scope = verdict_scope(predicate, model, variant=f"reasons={reasons}")
        job = _Job(
            self.warehouse, scope, channel, reasons=reasons, batch_rows=self.config.batch_rows
        )
        job.reason_in_input = VERDICT_REASON in all_columns
        try:
            try:
                self.warehouse.trusted_execute(f"CREATE TABLE {job.rows} AS {query.sql(dialect)}")
            except Exception as err:
                raise QueryError(f"llm_where input failed: {err}") from None
            self._stage(job, limit)
            self._plan(job, profile, predicate, rows_in)
        except BaseException:
            job.drop()
            raise
        return job

    def _stage(self, job: _Job, limit: int | None) -> None:
        """Distinct values (keyed by a 16-byte hash of the value, the tail of their verdict
        key), the cache's verdicts for them, and the values left to judge, in the order they
        will be sent: first-seen order when a ``limit`` may stop early, else key order, so
        the verdicts reach the cache as ascending key ranges (few B-tree pages per write)."""
        wh = self.warehouse
        wh.trusted_execute(
            f"CREATE TABLE {job.vals} AS SELECT unhex(left(sha256({_KEY}), 32)) AS h, "
            f"{_KEY} AS v, count(*)::BIGINT AS n, min(rowid) AS first "
            f"FROM {job.rows} GROUP BY {_KEY}; "
            f"CREATE TABLE {job.hits} (h BLOB PRIMARY KEY, match BOOLEAN, reason VARCHAR)"
        )
        if self.cache is not None and self.budget.replay:
            for chunk in wh.trusted_batches(f"SELECT h FROM {job.vals} ORDER BY h", _WORK_ROWS):
                tails: list[bytes] = chunk.column(0).to_pylist()
                found = self.cache.get_verdicts([job.scope + h for h in tails])
                if found:
                    keys = sorted(found)
                    wh.insert_arrow(
                        job.hits,
                        pa.table(
                            {
                                "h": pa.array([k[len(job.scope) :] for k in keys], pa.binary()),
                                "match": pa.array([found[k][0] for k in keys], pa.bool_()),
                                "reason": pa.array([found[k][1] for k in keys], pa.string()),
                            }
                        ),
                    )
        order = "v.first" if limit is not None else "v.h"
        wh.trusted_execute(
            f"CREATE TABLE {job.todo} AS SELECT row_number() OVER (ORDER BY {order}) - 1 AS seq, "
            f"v.h, v.v, v.n FROM {job.vals} AS v WHERE NOT EXISTS "
            f"(SELECT 1 FROM {job.hits} AS c WHERE c.h = v.h) ORDER BY seq; "
            f"CREATE TABLE {job.judged} (h BLOB, match BOOLEAN, reason VARCHAR, "
            "decided_by VARCHAR, batch VARCHAR, cost DOUBLE, error VARCHAR)"
        )

    def _plan(self, job: _Job, profile: ModelProfile, predicate: str, rows_in: int | None) -> None:
        """Pack the values to judge into requests (streaming their lengths) and price them."""
        model = self.lm.sub_model
        answer_format = render(
            "where_answer_json.md" if job.channel == "structured" else "where_answer_tool.md",
            shape=render(_SHAPES[job.reasons]).strip(),
        ).strip()
        system_text = render("where_system.md", predicate=predicate, answer_format=answer_format)
        job.system = cached_system(system_text)
        job.forced_tool = profile.forced_tool_choice
        prefix_tokens = len(system_text) // 4 + _TOOL_OVERHEAD_TOKENS
        # A request stays under the model's long-prompt price tier (Haiku 5.5 bills a whole
        # request at the long rate once its prompt passes 100K tokens) and its context window.
        ceiling = min(
            profile.long_prompt_threshold or profile.context_window, profile.context_window
        )
        batch_tokens = max(
            1, min(self.config.batch_tokens, int(ceiling * _TIER_MARGIN) - prefix_tokens)
        )
        effort = profile.effort(self.lm.effort["sub"])
        thinks = profile.thinks(profile.thinking_param(self.lm.thinking_mode["sub"], effort))
        thinking_est = (
            _THINKING_TOKENS_PER_REQUEST[effort or profile.default_effort or "high"]
            if thinks
            else 0
        )
        job.packing = (prefix_tokens, batch_tokens, thinking_est)
        to_judge, est_in, est_out, est_cost = self._pack(job)
        # One round trip for every count the call needs before it sends anything: the plan's,
        # the lease's digest of the values to judge, and the rows the cache already matched.
        after_where, distinct, cached, todo_digest, cached_matches = self._scalars(
            f"SELECT (SELECT count(*) FROM {job.rows}), (SELECT count(*) FROM {job.vals}), "
            f"(SELECT count(*) FROM {job.hits}), "
            f"(SELECT count(*)::VARCHAR || ':' || coalesce(sum(hash(h))::HUGEINT, 0)::VARCHAR "
            f"FROM {job.todo}), "
            f"(SELECT coalesce(sum(v.n), 0) FROM {job.vals} AS v JOIN {job.hits} AS c "
            "ON c.h = v.h WHERE c.match)"
        )
        job.todo_digest, job.cached_match_rows = str(todo_digest), int(cached_matches)
        concurrency = max(1, int(self.lm.limiter.limit))
        latencies = [r.latency_s for r in self.budget.accounting.records if r.role == "where"]
        latency = sum(latencies) / len(latencies) if latencies else self.config.default_latency_s
        job.plan = WherePlan(
            rows_in=int(after_where if rows_in is None else rows_in),
            rows_after_where=int(after_where),
            distinct=int(distinct),
            cached=int(cached),
            to_evaluate=to_judge,
            requests=len(job.batches),
            est_input_tokens=est_in,
            est_output_tokens=est_out,
            est_cost_usd=est_cost,
            est_wall_s=-(-len(job.batches) // concurrency) * latency,
            concurrency=concurrency,
            model=model,
            est_batch_cost_usd=None if est_cost is None else est_cost * BATCH_PRICE_FACTOR,
        )

    def _pack(self, job: _Job) -> tuple[int, int, int, float | None]:
        """Pack the values left in the todo table into requests of at most ``batch_rows``
        rows and the token budget, streaming their lengths; sets ``job.batches`` and returns
        (values, estimated input tokens, output tokens, USD)."""
        prefix_tokens, batch_tokens, thinking_est = job.packing
        model = self.lm.sub_model
        job.batches = []
        est_in = est_out = 0
        est_cost: float | None = 0.0

        def close_request(rows: int, tokens: int) -> None:
            nonlocal est_in, est_out, est_cost
            request_in = prefix_tokens + tokens
            per_row = _OUTPUT_TOKENS_PER_ROW[job.reasons]
            request_out = _OUTPUT_TOKENS_PER_REQUEST + per_row * rows + thinking_est
            est_in += request_in
            est_out += request_out
            cost = self.lm.catalog.cost_usd(
                model, Usage(input_tokens=request_in, output_tokens=request_out)
            )
            est_cost = None if cost is None or est_cost is None else est_cost + cost

        start = seq = tokens = 0
        for chunk in self.warehouse.trusted_batches(
            f"SELECT length(v) FROM {job.todo} ORDER BY seq", _WORK_ROWS
        ):
            for length in chunk.column(0).to_pylist():
                cost = min(length, self.config.max_row_chars) // 4 + _ROW_OVERHEAD_TOKENS
                rows = seq - start
                if rows and (rows >= job.batch_rows or tokens + cost > batch_tokens):
                    job.batches.append((start, seq))
                    close_request(rows, tokens)
                    start, tokens = seq, 0
                tokens += cost
                seq += 1
        if seq > start:
            job.batches.append((start, seq))
            close_request(seq - start, tokens)
        return seq, est_in, est_out, est_cost

    def _requests(self, job: _Job) -> Iterator[tuple[str, list[_Value]]]:
        """The packed requests, read from the engine a chunk at a time: (batch id, values)."""
        boundaries = iter(enumerate(job.batches))
        number, (start, end) = next(boundaries)
        current: list[_Value] = []
        for chunk in self.warehouse.trusted_batches(
            f"SELECT h, v, n FROM {job.todo} ORDER BY seq", _WORK_ROWS
        ):
            for h, v, n in zip(*(chunk.column(i).to_pylist() for i in range(3)), strict=True):
                current.append(_Value(h, v, n))
                if len(current) == end - start:
                    yield f"b{number}", current
                    current = []
                    try:
                        number, (start, end) = next(boundaries)
                    except StopIteration:
                        return

    def _judge(self, job: _Job, stats: WhereStats, limit: int | None, lease: str | None) -> None:
        """Send the packed requests; stop (and cancel what is in flight) once ``limit`` rows
        match.

        Verdicts reach the cache in groups (every 1,000 or every second, and at the end),
        sorted by key, so a run killed mid-way loses at most about a second of judged values;
        they reach the engine's working table in groups too, so memory holds only what is in
        flight."""
        if not job.batches:
            return
        matched_rows = job.cached_match_rows
        total = len(job.batches)
        progress = {"done": 0, "last": time.monotonic(), "start": time.monotonic()}
        spent_before = self.budget.accounting.cost_usd
        pending: list[tuple[bytes, bool, str, str]] = []
        judged: list[tuple[_Value, Verdict]] = []
        flushed = [time.monotonic()]
        model = self.lm.sub_model

        def flush(force: bool = False) -> None:
            # A verdict and the ledger row of the request that paid for it are committed in one
            # transaction: a run killed between flushes loses both or neither.
            if force or len(judged) >= _WORK_ROWS:
                self._store_judged(job, judged)
                stats.judged += len(judged)
                judged.clear()
            if self.cache is None:
                return
            if force or len(pending) >= 1_000 or time.monotonic() - flushed[0] >= 1.0:
                self.cache.commit(verdicts=sorted(pending), ledger=self.budget.take_ledger())
                pending.clear()
                flushed[0] = time.monotonic()

        requests = self._requests(job)
        stop = False

        async def run() -> None:
            nonlocal matched_rows, stop

            async def worker() -> None:
                nonlocal matched_rows, stop
                while not stop:
                    item = next(requests, None)
                    if item is None:
                        return
                    batch_id, batch = item
                    try:
                        verdicts = await self._ask(job, batch, stats, batch_id)
                    except BaseException:
                        # The breaker: once a batch fails at the provider (after the LM's
                        # retries), no new batch starts; requests already in flight finish
                        # and are kept (they are paid for), then the error ends the operator.
                        stop = True
                        raise
                    judged.extend(verdicts)
                    pending.extend(
                        (job.scope + value.h, bool(v.match), v.reason, model)
                        for value, v in verdicts
                        if v.match is not None
                    )
                    flush()
                    matched_rows += sum(value.n for value, v in verdicts if v.match)
                    progress["done"] += 1
                    self._progress(progress, total, matched_rows, spent_before)
                    if limit is not None and matched_rows >= limit:
                        # Enough rows: start nothing new; what is in flight is awaited and
                        # cached, never thrown away after being paid for.
                        stats.stopped_early = progress["done"] < total
                        stop = True
                        return

            async def heartbeat() -> None:
                # Keep the lease while judging; a run that dies lets it expire.
                assert self.cache is not None and lease is not None
                while True:
                    await asyncio.sleep(_LEASE_TTL_S / 4)
                    await asyncio.to_thread(self.cache.try_lease, lease, self._owner, _LEASE_TTL_S)

            beat = asyncio.create_task(heartbeat()) if lease is not None else None
            workers = min(total, self.lm.max_concurrency)
            try:
                results = await asyncio.gather(
                    *(worker() for _ in range(workers)), return_exceptions=True
                )
            finally:
                if beat is not None:
                    beat.cancel()
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]

        try:
            self.lm.run_async(run)
        finally:
            flush(force=True)

    def _judge_batches(self, job: _Job, stats: WhereStats, lease: str | None) -> None:
        """Judge the values left through message batches: resume the batches an earlier
        attempt of this call submitted, then submit the rest. Valid verdicts are stored and
        cached like online ones (committed before their batch is marked finished, so a run
        killed in between gets them again from the batch); whatever the batches leave
        undecided stays in the todo table for the online pass."""
        if self.cache is None:
            raise ConfigError(
                "llm_where batches need the cache: it records every submitted batch, so a "
                "retried run resumes it instead of paying again. Set cache_path (or "
                "RLM_CACHE_PATH), or leave batches off."
            )
        cache = self.cache
        key = self._batch_key(job)
        model = self.lm.sub_model
        pending: list[tuple[bytes, bool, str, str]] = []
        judged: list[tuple[_Value, Verdict]] = []
        meter = self.budget.holding_ledger()

        def flush() -> None:
            self._store_judged(job, judged)
            stats.judged += len(judged)
            judged.clear()
            cache.commit(verdicts=sorted(pending), ledger=self.budget.take_ledger())
            pending.clear()

        def take(result: BatchResult) -> None:
            if result.completion is None:
                return  # errored, expired or canceled: not billed, judged online below
            reply = result.completion
            tails = [
                result.blob[i : i + _HASH_BYTES] for i in range(0, len(result.blob), _HASH_BYTES)
            ]
            cost = reply.record.cost_usd or 0.0
            stats.requests += 1
            stats.cost_usd += cost
            verdicts, _, _ = self._read_reply(job, reply, len(tails))
            share = cost / max(len(tails), 1)
            for k, v in verdicts.items():
                where = f"{result.batch_id}/{result.custom_id}"
                judged.append(
                    (
                        _Value(tails[k], "", 0),
                        Verdict(v.match, v.reason, decided_by="model", batch=where, cost_usd=share),
                    )
                )
                pending.append((job.scope + tails[k], bool(v.match), v.reason, model))
            if len(pending) >= _BATCH_FLUSH_VERDICTS:
                flush()

        def progress(p: BatchProgress) -> None:
            self.on_event(
                WhereBatchProgress(
                    batch_id=p.batch_id,
                    status=p.status,
                    requests_done=p.requests_done,
                    requests_total=p.requests_total,
                    batches_open=p.batches_open,
                    elapsed_s=p.elapsed_s,
                )
            )

        runner = BatchRunner(
            self.lm, _FlushFirst(cache, flush), poll_interval_s=self.config.batch_poll_s
        )
        options: dict[str, Any] = {
            "role": "where",
            "depth": self.depth,
            "meter": meter,
            "deadline": self.budget.deadline,
            "on_progress": progress,
        }

        def requests() -> Iterator[BatchRequest]:
            for batch_id, values in self._requests(job):
                r = self._where_request(job, values)
                params = self.lm._request(
                    "where",
                    model,
                    r["system"],
                    r["messages"],
                    r["max_tokens"],
                    r.get("tools"),
                    r.get("tool_choice"),
                    r.get("output_format"),
                )
                yield BatchRequest(batch_id, params, b"".join(v.h for v in values))

        async def run() -> None:
            async def heartbeat() -> None:
                assert lease is not None
                while True:
                    await asyncio.sleep(_LEASE_TTL_S / 4)
                    await asyncio.to_thread(cache.try_lease, lease, self._owner, _LEASE_TTL_S)

            beat = asyncio.create_task(heartbeat()) if lease is not None else None
            try:
                async for result in runner.aresume(key, **options):
                    take(result)
                flush()
                self._restage(job)
                if job.batches:
                    # The function, not its requests: the runner reads them twice (bound
                    # everything, then submit batch by batch), never holding them all.
                    async for result in runner.astream(key, requests, **options):
                        take(result)
            finally:
                if beat is not None:
                    beat.cancel()

        try:
            self.lm.run_async(run)
        finally:
            flush()
        self._restage(job)

    def _plan_cascade(self, plan: WherePlan, targets: CascadeTargets | None) -> None:
        if targets is None or not plan.to_evaluate:
            return
        per_value = None
        if plan.est_cost_usd is not None:
            per_value = plan.est_cost_usd / plan.to_evaluate
        plan.cascade = estimate_cascade(plan.to_evaluate, targets).describe(per_value)

    def _targets(
        self, recall: float | None, precision: float | None, on_miss: str | None, limit: int | None
    ) -> CascadeTargets | None:
        """The cascade's targets of this call (its own, else the configured ones), or None."""
        recall = self.config.recall if recall is None else recall
        if recall is None or limit is not None:
            return None
        for name, value in (("recall", recall), ("precision", precision)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise QueryError(f"llm_where {name}= must be a number below 1, not {value!r}.")
        return CascadeTargets(
            recall=float(recall),
            precision=self.config.precision if precision is None else float(precision),
            delta=self.config.delta,
            sample_size=self.config.cascade_sample,
            on_miss=on_miss or self.config.on_miss,  # type: ignore[arg-type]
        )

    def _cascade(
        self,
        job: _Job,
        stats: WhereStats,
        targets: CascadeTargets,
        predicate: str,
        lease: str | None,
    ) -> None:
        """Judge most values with a local embedding proxy, with a guarantee (see
        :mod:`rlm_dagster.cascade`): score every value left to judge (streamed, in key
        order, so the seeded sample is reproducible), have the model judge a random sample,
        then either the values the proxy is unsure of (the rest decided by the proxy, never
        cached as model verdicts), everything (fallback), or nothing more (fail, before
        another call is paid)."""
        proxy = EmbeddingProxy()
        seqs: list[int] = []
        scores: list[float] = []
        weights: list[int] = []
        for chunk in self.warehouse.trusted_batches(
            f"SELECT seq, v, n FROM {job.todo} ORDER BY seq", _WORK_ROWS
        ):
            seqs.extend(chunk.column(0).to_pylist())
            weights.extend(chunk.column(2).to_pylist())
            scores.extend(proxy.score(predicate, chunk.column(1).to_pylist()))
        plan = plan_cascade(scores, targets, weights=weights)
        seq_of = np.asarray(seqs, dtype=np.int64)
        self._judge_subset(job, stats, seq_of[plan.sample], lease)
        labels = self._labels(job, seq_of[plan.sample])
        decision = plan.decide(labels)
        stats.cascade = decision.as_dict()
        self.on_event(WhereCascaded(decision.describe(), decision.action))
        decision.raise_if_failed()
        if decision.action == "fallback":
            self._restage(job)  # everything left goes to the model
            return
        self._judge_subset(job, stats, seq_of[decision.to_oracle], lease)
        decided: list[tuple[_Value, Verdict]] = []
        score_of = np.asarray(scores, dtype=np.float64)
        for found, match in ((decision.rejected, False), (decision.accepted, True)):
            if not len(found):
                continue
            positions = np.sort(found)  # positions follow seq: the hashes come back in order
            threshold = decision.accept_threshold if match else decision.recall_threshold
            side = ">=" if match else "<"
            hashes = (h for chunk in self._hashes_at(job, seq_of[positions]) for h in chunk)
            for h, score in zip(hashes, score_of[positions], strict=True):
                reason = f"proxy score {score:.3f} {side} threshold {threshold:.3f}"
                decided.append((_Value(h, "", 0), Verdict(match, reason, decided_by="proxy")))
        self._store_judged(job, decided)
        stats.proxy_decided = len(decided)
        self._restage(job)

    def _hashes_at(self, job: _Job, seqs: Any) -> Iterator[list[bytes]]:
        """The value hashes of the todo values at ``seqs`` (ascending), in chunks."""
        self._select(job, seqs)
        for chunk in self.warehouse.trusted_batches(
            f"SELECT t.h FROM {job.todo_all} AS t JOIN {job.selected} USING (seq) ORDER BY seq",
            _WORK_ROWS,
        ):
            yield chunk.column(0).to_pylist()

    def _select(self, job: _Job, seqs: Any) -> None:
        """Put ``seqs`` (todo positions) into the job's selection table."""
        self.warehouse.trusted_execute(f"CREATE OR REPLACE TABLE {job.selected} (seq BIGINT)")
        for start in range(0, len(seqs), _WORK_ROWS * 10):
            part = pa.table({"seq": pa.array(seqs[start : start + _WORK_ROWS * 10], pa.int64())})
            self.warehouse.insert_arrow(job.selected, part)

    def _judge_subset(self, job: _Job, stats: WhereStats, seqs: Any, lease: str | None) -> None:
        """Judge with the model only the todo values at ``seqs``, as the online path does."""
        if not len(seqs):
            return
        self._select(job, seqs)
        self.warehouse.trusted_execute(
            f"CREATE OR REPLACE TABLE {job.subset} AS SELECT t.* FROM {job.todo} AS t "
            f"JOIN {job.selected} USING (seq) ORDER BY seq"
        )
        job.todo_override = job.subset
        try:
            self._pack(job)
            self._judge(job, stats, None, lease)
        finally:
            job.todo_override = None
        self._restage(job)

    def _labels(self, job: _Job, seqs: Any) -> list[bool | None]:
        """The model's verdicts of the values at ``seqs``, the subset just judged (None:
        failed or refused), in the order of ``seqs``."""
        found: dict[int, bool | None] = {}
        for chunk in self.warehouse.trusted_batches(
            f"SELECT t.seq, j.match FROM {job.subset} AS t LEFT JOIN {job.judged} AS j ON j.h = t.h"
        ):
            found.update(zip(chunk.column(0).to_pylist(), chunk.column(1).to_pylist(), strict=True))
        return [found.get(int(seq)) for seq in seqs]

    def _calibrate(self, job: _Job, stats: WhereStats) -> None:
        """Measure the batch size: judge a sample of the values to judge one per request
        (the reference, kept and cached like any verdict), then the same values packed at
        each candidate size; keep the largest size whose verdicts agree with the reference
        on at least ``calibration_agreement`` of the sample (the smallest candidate if none
        does), and pack the rest with it."""
        config = self.config
        sample = [
            _Value(h, v, n)
            for chunk in self.warehouse.trusted_batches(
                f"SELECT h, v, n FROM {job.todo} ORDER BY seq LIMIT {int(config.calibration_values)}"
            )
            for h, v, n in zip(*(chunk.column(i).to_pylist() for i in range(3)), strict=True)
        ]
        sizes = sorted({s for s in config.calibration_sizes if 1 < s <= max(len(sample), 2)})
        if len(sample) < config.calibration_values or not sizes:
            return  # too few values to measure anything: the configured size stays
        model = self.lm.sub_model

        async def judge(size: int) -> dict[bytes, bool | None]:
            parts = [sample[i : i + size] for i in range(0, len(sample), size)]
            replies = await asyncio.gather(
                *(
                    self._ask(job, part, stats, f"calibrate{size}.{k}")
                    for k, part in enumerate(parts)
                )
            )
            return {value.h: verdict.match for reply in replies for value, verdict in reply}

        async def run() -> tuple[list[tuple[_Value, Verdict]], dict[int, float]]:
            parts = await asyncio.gather(
                *(
                    self._ask(job, [value], stats, f"calibrate1.{k}")
                    for k, value in enumerate(sample)
                )
            )
            reference = [pair for part in parts for pair in part]
            truth = {value.h: verdict.match for value, verdict in reference}
            agreement = {}
            for size in sizes:
                packed = await judge(size)
                agreement[size] = sum(packed.get(h) == m for h, m in truth.items()) / len(truth)
            return reference, agreement

        reference, agreement = self.lm.run_async(run)
        self._store_judged(job, reference)
        stats.judged += len(reference)
        if self.cache is not None:
            self.cache.commit(
                verdicts=sorted(
                    (job.scope + value.h, bool(v.match), v.reason, model)
                    for value, v in reference
                    if v.match is not None
                ),
                ledger=self.budget.take_ledger(),
            )
        good = [size for size in sizes if agreement[size] >= config.calibration_agreement]
        job.batch_rows = max(good) if good else min(sizes)
        stats.calibration = {
            "values": len(sample),
            "agreement": {str(size): round(agreement[size], 4) for size in sizes},
            "batch_rows": job.batch_rows,
        }
        self.on_event(
            WhereCalibrated(
                values=len(sample),
                agreement=dict(agreement),
                batch_rows=job.batch_rows,
                target=config.calibration_agreement,
            )
        )
        self._restage(job)

    def _batch_key(self, job: _Job) -> str:
        """The key a call's message batches are recorded under: the same for every attempt
        of the same call (predicate, model, prompt version and all its distinct values,
        cached or not), so a retry finds what an earlier attempt submitted."""
        (summary,) = self._scalars(
            f"SELECT count(*)::VARCHAR || ':' || coalesce(sum(hash(h))::HUGEINT, 0)::VARCHAR "
            f"FROM {job.vals}"
        )
        digest = hashlib.sha256(job.scope + str(summary).encode())
        digest.update(f"{self.config.batch_rows}:{self.config.batch_tokens}".encode())
        return f"llm_where:{digest.hexdigest()[:40]}"

    def _restage(self, job: _Job) -> None:
        """Take the values decided so far out of the todo table and pack the rest."""
        self.warehouse.trusted_execute(
            f"DELETE FROM {job.todo_all} WHERE h IN (SELECT h FROM {job.judged})"
        )
        self._pack(job)

    def _store_judged(self, job: _Job, judged: Sequence[tuple[_Value, Verdict]]) -> None:
        if not judged:
            return
        self.warehouse.insert_arrow(
            job.judged,
            pa.table(
                {
                    "h": pa.array([value.h for value, _ in judged], pa.binary()),
                    "match": pa.array([v.match for _, v in judged], pa.bool_()),
                    "reason": pa.array([v.reason for _, v in judged], pa.string()),
                    "decided_by": pa.array([v.decided_by for _, v in judged], pa.string()),
                    "batch": pa.array([v.batch or None for _, v in judged], pa.string()),
                    "cost": pa.array([v.cost_usd for _, v in judged], pa.float64()),
                    "error": pa.array([v.error for _, v in judged], pa.string()),
                }
            ),
        )

    def _progress(
        self,
        progress: dict[str, float],
        total: int,
        matched_rows: int,
        spent_before: float,
    ) -> None:
        now = time.monotonic()
        if now - progress["last"] < self.config.progress_interval_s and progress["done"] < total:
            return
        progress["last"] = now
        done = int(progress["done"])
        elapsed = now - progress["start"]
        eta = elapsed / done * (total - done) if done else 0.0
        spent = self.budget.accounting.cost_usd - spent_before
        self.on_event(
            WhereProgress(
                requests_done=done,
                requests_total=total,
                matches=matched_rows,
                cost_usd=spent,
                eta_s=eta,
                concurrency=int(self.lm.limiter.limit),
            )
        )

    def _where_request(self, job: _Job, batch: Sequence[_Value]) -> dict[str, Any]:
        """The Messages request judging ``batch`` (the same online and in a message batch)."""
        lines = [f'<row id="{k}">{self._clip(value.v)}</row>' for k, value in enumerate(batch)]
        request: dict[str, Any] = {
            "system": job.system,
            "messages": [{"role": "user", "content": "\n".join(lines)}],
            "max_tokens": 200 + _MAX_TOKENS_PER_ROW[job.reasons] * len(batch),
        }
        if job.channel == "structured":
            request["output_format"] = {"type": "json_schema", "schema": _SCHEMAS[job.reasons]}
        else:
            request["tools"] = [record_verdicts_tool(job.reasons)]
            request["tool_choice"] = (
                {"type": "tool", "name": RECORD_VERDICTS_TOOL["name"]}
                if job.channel == "forced_tool"
                else {"type": "auto"}
            )
        return request

    def _read_reply(
        self, job: _Job, reply: Completion, n: int
    ) -> tuple[dict[int, Verdict], str, bool]:
        """The valid verdicts of a reply by row id, what was wrong with the rest, and whether
        it was a refusal. Only the channel the request asked for is read; a refusal covers
        the whole reply."""
        if reply.stop_reason == "refusal":
            return {}, REFUSED, True
        if job.channel == "structured":
            answer = _json_object(reply.text)
        else:
            answer = reply.tool_input(RECORD_VERDICTS_TOOL["name"])
        if job.reasons == "all":
            judged, problem = parse_verdicts(answer, n)
        else:
            judged, problem = parse_partition(answer, n, reasons=job.reasons == "matches")
        return judged, problem, False

    async def _ask(
        self, job: _Job, batch: list[_Value], stats: WhereStats, batch_id: str
    ) -> list[tuple[_Value, Verdict]]:
        """Judge ``batch``; re-ask what the reply left unjudged in smaller batches, then alone."""
        stats.requests += 1
        # Provider failures (after the LM's retries) are not a problem of this reply's content:
        # they propagate and end the operator; only content problems are re-asked below.
        reply = await self.lm.acomplete(
            role="where",
            model=self.lm.sub_model,
            depth=self.depth,
            deadline=self.budget.deadline,
            # verdicts are cached per value, and the batch's ledger row is committed with them
            meter=self.budget.holding_ledger(),
            cached=False,
            **self._where_request(job, batch),
        )
        cost = reply.record.cost_usd or 0.0
        stats.cost_usd += cost
        judged, problem, refused = self._read_reply(job, reply, len(batch))
        share = cost / len(batch)
        out = [
            (
                batch[k],
                Verdict(v.match, v.reason, decided_by="model", batch=batch_id, cost_usd=share),
            )
            for k, v in judged.items()
        ]
        missing = [batch[k] for k in range(len(batch)) if k not in judged]
        if not missing:
            return out
        if len(batch) == 1:
            stats.errors.append(problem)
            failed = Verdict(
                None,
                error=problem,
                decided_by="refused" if refused else "failed",
                batch=batch_id,
                cost_usd=share,
            )
            return [*out, (batch[0], failed)]
        stats.reasked += len(missing)
        # Nothing usable: halve. Some usable: re-ask just the rest, which is already smaller.
        size = max(1, len(missing) // 2) if len(missing) == len(batch) else len(missing)
        for n, start in enumerate(range(0, len(missing), size)):
            part = missing[start : start + size]
            for value, verdict in await self._ask(job, part, stats, f"{batch_id}.{n}"):
                verdict.cost_usd += share
                out.append((value, verdict))
        return out

    def _results(
        self, job: _Job, stats: WhereStats, limit: int | None
    ) -> tuple[TableInfo, TableInfo]:
        """The matching rows and the provenance of every row, as scratch tables: one verdict
        per distinct value (cached, judged, or not evaluated), joined to the rows in the
        engine, in the input's order. The provenance is built once and becomes its scratch
        table by a rename; the matches are read from it, so the rows are joined once.

        The verdicts are gathered per value first, so the join over the rows has one build
        side (the distinct values), not three held at once: what keeps 10M rows with 1M
        distinct values inside a 512 MB memory limit (``bench/where_scale.py``)."""
        model = _sql_string(self.lm.sub_model)
        wh = self.warehouse
        excluded = [_KEY, "__rlm_row", *([VERDICT_REASON] if job.reason_in_input else [])]
        verdict = "coalesce(c.match, j.match)"
        wh.trusted_execute(
            f"CREATE TABLE {job.per_value} AS SELECT v.v, "
            f"{verdict} AS _verdict, "
            f"CASE WHEN {verdict} IS NOT NULL "
            f"THEN nullif(coalesce(c.reason, j.reason), '') END AS {VERDICT_REASON}, "
            "CASE WHEN c.h IS NOT NULL THEN 'cache' WHEN j.h IS NOT NULL THEN j.decided_by "
            "ELSE 'not evaluated' END AS _decided_by, "
            "CASE WHEN j.decided_by = 'proxy' THEN 'proxy:wordllama' "
            f"WHEN c.h IS NOT NULL OR j.h IS NOT NULL THEN {model} END AS _model, "
            "j.batch AS _batch, coalesce(j.cost, 0) / v.n AS _cost_usd, "
            "CASE WHEN c.h IS NULL AND j.h IS NULL THEN 'not evaluated: limit reached' "
            "ELSE j.error END AS _error, "
            f"length(v.v) > {int(self.config.max_row_chars)} AS _clipped "
            f"FROM {job.vals} AS v LEFT JOIN {job.hits} AS c ON c.h = v.h "
            f"LEFT JOIN {job.judged} AS j ON j.h = v.h; "
            f"CREATE TABLE {job.provenance} AS SELECT i.* EXCLUDE ({', '.join(excluded)}), "
            f"p.* EXCLUDE (v) FROM (SELECT rowid AS __rlm_row, * FROM {job.rows}) AS i "
            f"JOIN {job.per_value} AS p ON p.v = i.{_KEY} ORDER BY i.__rlm_row"
        )
        # The engine keeps a table's insertion order, so the matches keep the input's order.
        matches = wh.create_scratch_from(
            "where",
            f"SELECT * EXCLUDE ({', '.join(_PROVENANCE_ONLY)}) FROM {job.provenance} "
            "WHERE _verdict" + (f" LIMIT {int(limit)}" if limit is not None else ""),
        )
        failed, clipped = self._scalars(
            "SELECT count(*) FILTER (WHERE _decided_by IN ('failed', 'refused')), "
            f"count(*) FILTER (WHERE _clipped AND _verdict IS NOT NULL) FROM {job.provenance}"
        )
        provenance = wh.adopt_scratch(job.provenance, "where", name=f"{matches.name}_provenance")
        stats.name = matches.name
        stats.matches = matches.rows
        stats.failed, stats.clipped = int(failed), int(clipped)
        return matches, provenance

    def _clip(self, value: str) -> str:
        if len(value) <= self.config.max_row_chars:
            return value
        return value[: self.config.max_row_chars] + "…(truncated)"


@dataclass
class _Value:
    """One distinct value to judge: its hash (the tail of its verdict key), its text, and
    how many input rows share it."""

    h: bytes
    v: str
    n: int


@dataclass
class _Job:
    """A prepared ``llm_where``: its working tables in the engine, the request boundaries and
    the plan. Working tables are named so model SQL cannot reach them (the policy admits only
    bound and scratch tables) and dropped when the call ends."""

    warehouse: TableSource
    scope: bytes  # the verdict-key prefix of (predicate, model, prompt version)
    channel: VerdictChannel  # structured outputs, forced tool, or offered tool (auto)
    batches: list[tuple[int, int]] = field(default_factory=list)  # [start, end) in todo order
    system: list[dict[str, Any]] = field(default_factory=list)
    plan: WherePlan = field(init=False)
    forced_tool: bool = False
    reasons: str = "matches"  # which verdicts carry a reason (REASONS)
    batch_rows: int = 40  # rows per request: the configured number, or the calibrated one
    reason_in_input: bool = False
    packing: tuple[int, int, int] = (0, 1, 0)  # prefix tokens, tokens per request, thinking
    todo_digest: str = ""  # count and hash sum of the values to judge, as planned
    cached_match_rows: int = 0  # input rows whose value the cache already matched
    prefix: str = field(default_factory=lambda: f"__rlm_where_{uuid.uuid4().hex[:12]}")

    @property
    def rows(self) -> str:
        return f"{self.prefix}_rows"

    @property
    def vals(self) -> str:
        return f"{self.prefix}_values"

    @property
    def hits(self) -> str:
        return f"{self.prefix}_cached"

    todo_override: str | None = None  # judge a subset: the table the requests are read from

    @property
    def todo(self) -> str:
        return self.todo_override or self.todo_all

    @property
    def todo_all(self) -> str:
        return f"{self.prefix}_todo"

    @property
    def subset(self) -> str:
        return f"{self.prefix}_subset"

    @property
    def selected(self) -> str:
        return f"{self.prefix}_selected"

    @property
    def judged(self) -> str:
        return f"{self.prefix}_judged"

    @property
    def per_value(self) -> str:
        return f"{self.prefix}_per_value"

    @property
    def provenance(self) -> str:
        """Every row with its verdict: the provenance table, until it is adopted as one."""
        return f"{self.prefix}_provenance"

    def drop(self) -> None:
        names = (
            self.provenance,
            self.per_value,
            self.judged,
            self.subset,
            self.selected,
            self.todo_all,
        )
        # One round trip: a statement costs the engine about as much as dropping a table.
        self.warehouse.trusted_execute(
            "; ".join(
                f"DROP TABLE IF EXISTS {name}" for name in (*names, self.hits, self.vals, self.rows)
            )
        )


class _FlushFirst:
    """The batch store, committing the verdicts taken so far before a batch is marked
    finished: a batch is finished only once what it decided is in the cache."""

    def __init__(self, store: CacheStore, before_finish: Callable[[], None]) -> None:
        self._store, self._before_finish = store, before_finish

    def put_batch(self, job: str, batch_id: str, model: str, requests: Mapping[str, bytes]) -> None:
        self._store.put_batch(job, batch_id, model, requests)

    def open_batches(self, job: str) -> list[tuple[str, dict[str, bytes]]]:
        return self._store.open_batches(job)

    def finish_batch(self, batch_id: str) -> None:
        self._before_finish()
        self._store.finish_batch(batch_id)


def _process_place() -> str:
    """Where a process id names a process: this host, this boot of its kernel and its pid
    namespace (two machines can share a host name, and every machine's first pid namespace
    has the same id). Empty after the host name when they cannot be read (e.g. off Linux)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        namespace = f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}|{namespace}"


_PROCESS_PLACE = _process_place()


def _gone_holder_pid(owner: str) -> int | None:
    """The pid of a lease's owner (``host|boot/pid namespace|pid|nonce``) if it is a process
    known to no longer exist, else None: only owners in this host's pid namespace can be
    told; a live process, another host, a process of another user or an unreadable owner
    counts as alive (the lease then expires on its own). A reused pid makes a dead owner
    look alive, never the reverse."""
    place, _, rest = owner.rpartition("|")[0].rpartition("|")
    if place != _PROCESS_PLACE or place.endswith("|") or not rest.isdigit():
        return None
    pid = int(rest)
    if pid == os.getpid():
        return None  # another call of this process: alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return pid
    except OSError:
        return None
    return None


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


_QUERY_SYSTEM = "Answer the request directly and concisely."
_MAX_PROMPT_CHARS = 2_000_000


def _prompt_text(prompt: Any) -> str:
    """A prompt as the API will get it: text only (no content blocks, images or URLs from
    model code), of a size a request can carry."""
    if not isinstance(prompt, str):
        raise QueryError(
            f"llm_query prompts must be text (str), not {type(prompt).__name__}; put the data "
            "you want judged into the prompt string."
        )
    if len(prompt) > _MAX_PROMPT_CHARS:
        raise QueryError(
            f"llm_query prompt of {len(prompt):,} characters is too long (at most "
            f"{_MAX_PROMPT_CHARS:,}); chunk it and use llm_query_batched."
        )
    return prompt


def _check_where_args(predicate: Any, columns: Any, where: Any) -> None:
    """Refuse malformed arguments before anything is planned or paid."""
    if not isinstance(predicate, str) or not predicate.strip():
        raise QueryError("llm_where needs a non-empty natural-language predicate (a str).")
    if columns is not None and (
        isinstance(columns, str)
        or not isinstance(columns, list | tuple)
        or not all(isinstance(c, str) for c in columns)
    ):
        raise QueryError(
            f"llm_where columns= must be a list of column names, not {columns!r}; "
            'e.g. columns=["body"].'
        )
    if columns is not None and not columns:
        raise QueryError(
            "llm_where columns=[] would show the model nothing to judge; name the columns "
            "the predicate needs, or leave columns out for all of them."
        )
    if where is not None and not isinstance(where, str):
        raise QueryError(f"llm_where where= must be a SQL condition (a str), not {where!r}.")


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def parse_verdicts(tool_input: dict[str, Any] | None, n: int) -> tuple[dict[int, Verdict], str]:
    """Valid verdicts by row id, and a description of what was wrong with the rest."""
    if not isinstance(tool_input, dict) or not isinstance(tool_input.get("verdicts"), list):
        return {}, "reply held no verdicts object with a verdicts list"
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


def parse_partition(
    answer: dict[str, Any] | None, n: int, *, reasons: bool
) -> tuple[dict[int, Verdict], str]:
    """Valid verdicts of a ``{"matches": [...], "non_matches": [...]}`` answer by row id, and
    what was wrong with the rest. Every id must be in exactly one list (an id in both, twice,
    unknown, or in neither is not a verdict: it is asked again); with ``reasons`` a match is
    ``{"id": K, "reason": str}``, else a bare id."""
    if (
        not isinstance(answer, dict)
        or not isinstance(answer.get("matches"), list)
        or not isinstance(answer.get("non_matches"), list)
    ):
        return {}, "reply held no matches and non_matches lists"
    problems: list[str] = []
    seen: dict[int, Verdict] = {}
    counts: dict[int, int] = {}

    def row_id(value: Any) -> int | None:
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
            problems.append(f"unknown id {value!r}")
            return None
        counts[value] = counts.get(value, 0) + 1
        return value

    for item in answer["matches"]:
        reason = ""
        if reasons:
            if not isinstance(item, dict):
                problems.append("a match is not an object with id and reason")
                continue
            given = item.get("reason")
            reason = given if isinstance(given, str) else ""
            item = item.get("id")
        elif isinstance(item, dict):  # a reason given anyway: the id is what counts
            item = item.get("id")
        if (k := row_id(item)) is not None:
            seen[k] = Verdict(True, str(reason))
    for item in answer["non_matches"]:
        if (k := row_id(item)) is not None:
            seen[k] = Verdict(False, "")
    for k, times in counts.items():
        if times > 1:
            del seen[k]
            problems.append(f"id {k} listed {times} times")
    if len(seen) < n and not problems:
        problems.append("ids missing from the reply")
    return seen, "; ".join(problems)
