"""``RLMResource``: how RLM assets reach a model.

    >>> import dagster as dg
    >>> rlm = RLMResource(api_key=dg.EnvVar("ANTHROPIC_API_KEY"),
    ...                   root_model="claude-sonnet-5-5", sub_model="claude-haiku-5-5")
    >>> demo = RLMResource(provider="demo")   # offline scripted model, labelled as such

``provider="anthropic"`` (the default) talks to ``base_url`` (Anthropic, or any
Anthropic-compatible endpoint: a proxy, vLLM, llama.cpp's server, Ollama) through the
official SDK. ``provider="demo"`` starts the offline demo model on 127.0.0.1 for the run; it
is never chosen implicitly when a key is configured.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import dagster as dg
import pyarrow as pa
from dagster_duckdb import DuckDBResource
from pydantic import Field

from rlm_dagster.cache import CacheStore, default_cache_path, open_cache, redact_location
from rlm_dagster.dagster.metadata import run_metadata, run_summary, unknown_price_models
from rlm_dagster.engine.budget import Budget, Limits
from rlm_dagster.engine.events import Event
from rlm_dagster.engine.loop import RLMResult, RLMRun, wire_context
from rlm_dagster.errors import (
    ConfigError,
    DemoCannotAnswer,
    MissingAPIKey,
    NoFinalAnswer,
    RLMError,
)
from rlm_dagster.models.client import DEFAULT_ROOT_EFFORT, DEFAULT_SUB_EFFORT, LM, Accounting
from rlm_dagster.models.profiles import EFFORTS, THINKING_MODES, ModelCatalog
from rlm_dagster.redact import redact
from rlm_dagster.repl.sandbox import WorkerLimits
from rlm_dagster.semantic import REASONS, Semantic, WhereConfig, WhereStats
from rlm_dagster.sql.output import OutputSchema
from rlm_dagster.sql.warehouse import DEFAULT_MEMORY_LIMIT_MB, Warehouse, quote_ident

PROVIDERS = ("anthropic", "demo")


class ModelProfileConfig(dg.Config):
    """What a model accepts, for a model rlm_dagster's table does not know (a local server's
    name, a newer release). Fields left out come from ``like`` (a known family) or, without
    it, from the conservative profile."""

    like: str | None = Field(default=None, description="A known family to start from.")
    tools: bool | None = Field(default=None, description="Accepts tools (tool_choice auto).")
    forced_tool_choice: bool | None = Field(default=None, description="Accepts a forced tool.")
    structured_outputs: bool | None = Field(
        default=None, description="Accepts output_config.format (JSON schema)."
    )
    thinks_by_default: bool | None = Field(default=None, description="Thinks unless told not to.")
    thinking_off: str | None = Field(
        default=None, description="'disabled' or 'between_tools': how to turn thinking off."
    )
    effort_levels: list[str] | None = Field(
        default=None, description="output_config.effort levels it accepts."
    )
    default_effort: str | None = Field(default=None, description="Its effort when none is sent.")
    max_output_tokens: int | None = Field(default=None, description="Largest max_tokens.")
    context_window: int | None = Field(default=None, description="Context window in tokens.")
    input_usd_per_mtok: float | None = Field(default=None, description="Input price, USD/MTok.")
    output_usd_per_mtok: float | None = Field(default=None, description="Output price, USD/MTok.")


class RLMResource(dg.ConfigurableResource):
    """Model access for RLM assets: credentials, endpoint, models and concurrency."""

    api_key: str | None = Field(
        default=None, description="Anthropic API key; use dg.EnvVar('ANTHROPIC_API_KEY')."
    )
    base_url: str | None = Field(
        default=None, description="Anthropic-compatible endpoint; default api.anthropic.com."
    )
    provider: str = Field(
        default="anthropic", description="'anthropic' (real models) or 'demo' (offline demo model)."
    )
    root_model: str = Field(
        default="claude-sonnet-5-5", description="Model that writes the REPL code."
    )
    sub_model: str = Field(
        default="claude-haiku-5-5", description="Model for llm_query / llm_where."
    )
    max_concurrency: int = Field(default=8, description="Concurrent sub-calls per run.")
    request_timeout_s: float = Field(default=120.0, description="Timeout of one HTTP request.")
    sandbox: str = Field(
        default="auto",
        description=(
            "REPL worker isolation: 'namespace' (bubblewrap namespaces), 'landlock' (kernel "
            "file and TCP rules), 'process' (rlimits, seccomp, audit hooks), or 'auto' for the "
            "strongest this machine has. See the README's Security model."
        ),
    )
    worker_memory_mb: int = Field(
        default=4_096, description="Address-space limit of each REPL worker, in MiB."
    )
    worker_cpu_s: int = Field(
        default=3_600, description="CPU seconds each REPL worker may use before it is replaced."
    )
    cache_path: str | None = Field(
        default=None,
        description="Cache of model results and the ledger: a SQLite file (safe across the "
        "processes of one machine), or a postgresql://user:password@host:port/database URL "
        "shared by every executor on any host (pip install 'rlm-dagster[postgres]'); default "
        "$RLM_CACHE_PATH, else .rlm_dagster/cache.sqlite3 in the project.",
    )
    where_reasons: str = Field(
        default="matches",
        description="Which llm_where verdicts carry a reason: 'matches' (default: the reasons "
        "people read, at a fraction of the output tokens), 'all', or 'none' (ids only).",
    )
    where_calibrate: bool = Field(
        default=False,
        description="Choose llm_where's rows per request by measurement: 40 values judged one "
        "per request and packed at 10/20/40 rows; the largest size that agrees on 97.5% wins.",
    )
    where_batch_poll_s: float = Field(
        default=15.0,
        description="Seconds between looks at llm_where's message batches (growing to 60).",
    )
    duckdb_memory_limit_mb: int = Field(
        default=DEFAULT_MEMORY_LIMIT_MB,
        description="Memory the run's DuckDB snapshot of the bound tables may use, in MiB; "
        "larger tables are paged from a temporary file and intermediates spill to disk.",
    )
    where_batch_rows: int = Field(default=40, description="Most rows in one llm_where request.")
    where_batch_tokens: int = Field(
        default=4_000, description="Most estimated input tokens of rows in one llm_where request."
    )
    max_retries: int = Field(
        default=6, description="Retries of a call on 429/529/5xx, honouring retry-after."
    )
    root_effort: str | None = Field(
        default=DEFAULT_ROOT_EFFORT,
        description="output_config.effort of root turns (low, medium, high, xhigh, max; null = "
        "the model's default). Sent only to models that take effort.",
    )
    sub_effort: str | None = Field(
        default=DEFAULT_SUB_EFFORT,
        description="Effort of llm_query, llm_query_batched and llm_where calls.",
    )
    root_thinking: str = Field(
        default="auto", description="'auto' (the model's default) or 'off' for root turns."
    )
    sub_thinking: str = Field(
        default="off",
        description="'off' turns up-front thinking off for sub-calls where the model allows it.",
    )
    model_profiles: dict[str, ModelProfileConfig] = Field(
        default_factory=dict,
        description="Profiles of models rlm_dagster does not know, by model id.",
    )

    def model_post_init(self, context: Any, /) -> None:
        # Definition load: a model that cannot return verdicts, or a bad effort or thinking
        # value, is an error now, not after the run has started paying.
        super().model_post_init(context)
        if isinstance(self.sub_model, str) and isinstance(self.model_profiles, dict):
            self.catalog().check_can_judge(self.sub_model)
        for name in ("root_effort", "sub_effort"):
            value = getattr(self, name)
            if isinstance(value, str) and value not in EFFORTS:
                raise ConfigError(f"RLMResource({name}={value!r}): use one of {EFFORTS} or None.")
        for name in ("root_thinking", "sub_thinking"):
            value = getattr(self, name)
            if isinstance(value, str) and value not in THINKING_MODES:
                raise ConfigError(f"RLMResource({name}={value!r}): use one of {THINKING_MODES}.")

    def catalog(self) -> ModelCatalog:
        """The built-in model profiles plus the ones declared in ``model_profiles``."""
        return ModelCatalog(
            {
                model: (spec.model_dump() if isinstance(spec, dg.Config) else dict(spec))
                for model, spec in (self.model_profiles or {}).items()
            }
        )

    def cache_location(self) -> str:
        """Where the call cache and ledger live, fit to print: a URL's password redacted."""
        return redact_location(self._cache_target())

    def _cache_target(self) -> str:
        """The cache's path or URL as configured, password included: open it, never print it."""
        return str(self.cache_path or default_cache_path())

    def worker_limits(self) -> WorkerLimits:
        return WorkerLimits(
            memory_bytes=self.worker_memory_mb * 1024**2, cpu_seconds=self.worker_cpu_s
        )

    def where_config(self, *, batches: bool = False) -> WhereConfig:
        if self.where_batch_rows < 1 or self.where_batch_tokens < 1:
            raise ConfigError("RLMResource where_batch_rows and where_batch_tokens must be >= 1.")
        if self.where_reasons not in REASONS:
            raise ConfigError(
                f"RLMResource(where_reasons={self.where_reasons!r}): use one of {REASONS}."
            )
        return WhereConfig(
            batch_rows=self.where_batch_rows,
            batch_tokens=self.where_batch_tokens,
            batches=batches,
            batch_poll_s=self.where_batch_poll_s,
            reasons=self.where_reasons,
            calibrate=self.where_calibrate,
        )

    @contextmanager
    def open_lm(
        self,
        root_model: str | None = None,
        sub_model: str | None = None,
        root_effort: str | None = None,
        sub_effort: str | None = None,
    ) -> Iterator[LM]:
        """The client for a run (models and efforts overridable per asset), with the call
        cache at ``cache_path``; for the demo provider, with its fake server running.

        Runs that use the same settings at the same time in this process share one client
        (one HTTP connection pool, event loop and adaptive concurrency limit towards the
        provider) and one cache connection; the last run to finish closes them. The client
        holds no run's state: each run meters its calls with its own budget."""
        if self.provider not in PROVIDERS:
            raise ConfigError(f"RLMResource(provider={self.provider!r}): use one of {PROVIDERS}.")
        if self.max_concurrency < 1:
            raise ConfigError("RLMResource(max_concurrency=...) must be at least 1.")
        cache_path = self._cache_target()
        if self.provider == "demo":
            key: tuple[Any, ...] = ("demo", cache_path, self.max_concurrency, self.max_retries)
            with _SHARED.use(key, lambda: self._demo_lm(cache_path)) as lm:
                yield lm
            return
        catalog = self.catalog()
        sub = sub_model or self.sub_model
        catalog.check_can_judge(sub)
        api_key = self.api_key
        if not api_key:
            if not self.base_url:
                raise MissingAPIKey(
                    "No Anthropic API key: set the ANTHROPIC_API_KEY environment variable and pass "
                    "RLMResource(api_key=dg.EnvVar('ANTHROPIC_API_KEY')), or use "
                    "RLMResource(provider='demo') for the offline demo model."
                )
            api_key = "not-needed"  # local Anthropic-compatible servers usually take no key
        settings: dict[str, Any] = {
            "api_key": api_key,
            "base_url": self.base_url,
            "root_model": root_model or self.root_model,
            "sub_model": sub,
            "max_concurrency": self.max_concurrency,
            "request_timeout_s": self.request_timeout_s,
            "max_retries": self.max_retries,
            "root_effort": root_effort or self.root_effort,
            "sub_effort": sub_effort or self.sub_effort,
            "root_thinking": self.root_thinking,
            "sub_thinking": self.sub_thinking,
        }
        key = (
            "anthropic",
            cache_path,
            repr(sorted(settings.items())),
            repr(sorted((self.model_profiles or {}).items())),
        )

        def make() -> tuple[LM, list[Callable[[], None]]]:
            cache = open_cache(cache_path)
            lm = LM(provider="anthropic", cache=cache, catalog=catalog, **settings)
            return lm, [cache.close]

        with _SHARED.use(key, make) as lm:
            yield lm

    # -- the composable path: RLM work inside any asset body ---------------------------------

    def run(
        self,
        context: dg.AssetExecutionContext | dg.OpExecutionContext,
        question: str,
        *,
        tables: Sequence[str] | Mapping[str, Any] = (),
        duckdb: DuckDBResource | str | None = None,
        output: Mapping[str, str] | OutputSchema | None = None,
        limits: Limits | None = None,
        context_value: Any = None,
        filters: Mapping[str, str] | None = None,
        root_model: str | None = None,
        sub_model: str | None = None,
        root_effort: str | None = None,
        sub_effort: str | None = None,
        where_batches: bool = False,
        log_summary: bool = True,
    ) -> RLMResult:
        """Run an RLM inside your own asset body; returns its :class:`RLMResult`.

            @dg.asset(deps=["tickets"])
            def churn(context: dg.AssetExecutionContext, rlm: RLMResource, duckdb: DuckDBResource):
                result = rlm.run(context, "Who threatens to cancel?", tables=["tickets"], duckdb=duckdb)
                return dg.MaterializeResult(metadata=run_metadata(result))

        ``tables`` are names in ``duckdb``'s file (snapshot read-only, ``filters`` maps a table
        to a trusted SQL predicate, e.g. a partition's rows), or a mapping of names to
        DataFrames. Metered, cached and logged like ``rlm_asset``'s runs: ledger rows carry
        the Dagster run id, the asset and the partition; events go to ``context.log``. A failure
        is a ``dg.Failure`` carrying the error, the trajectory so far and ``allow_retries``
        set exactly when a retry can help. Nothing is written to the warehouse.
        ``where_batches`` sends the run's ``llm_where`` requests as message batches.
        """
        schema = OutputSchema.parse(output) if isinstance(output, Mapping) else output
        with (
            self._failures(context),
            self.open_lm(
                root_model=root_model,
                sub_model=sub_model,
                root_effort=root_effort,
                sub_effort=sub_effort,
            ) as lm,
            _bound(tables, duckdb, filters, self.duckdb_memory_limit_mb) as warehouse,
        ):
            if lm.provider == "demo":
                from rlm_dagster.demo import unscripted

                columns = None if schema is None else [name for name, _ in schema.columns]
                if (why := unscripted(question, columns)) is not None:
                    raise DemoCannotAnswer(why)
                context.log.warning(_DEMO_NOTE)
            rlm_run = RLMRun(
                question,
                warehouse=warehouse,
                lm=lm,
                limits=limits,
                output=schema,
                on_event=lambda event: log_event(context, event),
                sandbox=self.sandbox,
                where_config=self.where_config(batches=where_batches),
                worker_limits=self.worker_limits(),
                context=wire_context(context_value),
                tags=run_tags(context),
                replay=replay(context),
            )
            result = rlm_run.run()
            result.inputs = warehouse.fingerprints()
            result.verdicts = rlm_run.semantic.verdicts(result.where_stats)
        for model in unknown_price_models(result.accounting):
            context.log.warning(
                f"The price of model {model!r} is unknown, so its cost is reported as unknown "
                "(rlm/cost_unknown_models); declare it with RLMResource(model_profiles=...)."
            )
        if log_summary:
            context.log.info(run_summary(result, cache_path=self.cache_location()))
        return result

    def llm_where(
        self,
        context: dg.AssetExecutionContext | dg.OpExecutionContext,
        table: str,
        predicate: str,
        *,
        duckdb: DuckDBResource | str | None = None,
        frame: Any = None,
        columns: Sequence[str] | None = None,
        where: str | None = None,
        limit: int | None = None,
        limits: Limits | None = None,
        sub_model: str | None = None,
        sub_effort: str | None = None,
        batches: bool = False,
        recall: float | None = None,
        precision: float | None = None,
        on_miss: str | None = None,
    ) -> WhereResult:
        """The rows of ``table`` for which ``predicate`` holds, judged by the sub model, inside
        your own asset body: the same operator as the REPL's ``llm_where`` (projection,
        dedupe, verdict cache, batching, validation), metered and cached like a run.

            rows = rlm.llm_where(context, "tickets", "The customer threatens to cancel",
                                 duckdb=duckdb, columns=["body"], where="plan = 'enterprise'")
            rows.matches.to_pandas(), rows.provenance  # matching rows; every row's verdict

        ``table`` is a table in ``duckdb``'s file, or the name for ``frame`` (a DataFrame or
        Arrow table). ``limits`` defaults to :class:`Limits` (``max_cost_usd`` $5).
        ``batches=True`` sends the requests as message batches: half the price, results
        within 24 h (most within an hour); a retried step resumes the batches it submitted.
        ``recall=0.95`` (``precision=``, ``on_miss="fallback"|"fail"``) judges most rows with
        a local embedding proxy and the model only a sample and the rows the proxy is unsure
        of, with the targets certified at 95% confidence (see the README).
        """
        tables: Mapping[str, Any] | Sequence[str] = {table: frame} if frame is not None else [table]
        with (
            self._failures(context),
            self.open_lm(sub_model=sub_model, sub_effort=sub_effort) as lm,
            _bound(tables, duckdb, None, self.duckdb_memory_limit_mb) as warehouse,
        ):
            cache = lm.cache if isinstance(lm.cache, CacheStore) else None
            budget = Budget(
                limits or Limits(), ledger=cache, tags=run_tags(context), replay=replay(context)
            )
            semantic = Semantic(
                lm,
                warehouse,
                budget,
                cache=cache,
                config=self.where_config(),
                on_event=lambda event: log_event(context, event),
            )
            name = table.rpartition(".")[2].lower() if frame is None else table
            matches, provenance, stats = semantic.where(
                name,
                predicate,
                columns=columns,
                where=where,
                limit=limit,
                batches=batches,
                recall=recall,
                precision=precision,
                on_miss=on_miss,
            )
            context.log.info(redact(stats.describe()))
            return WhereResult(
                # every row, not capped like model SQL (max_sql_rows): the caller asked for them
                matches=warehouse.trusted_arrow(f"SELECT * FROM {quote_ident(matches.name)}"),
                provenance=warehouse.trusted_arrow(f"SELECT * FROM {quote_ident(provenance.name)}"),
                stats=stats,
                accounting=budget.accounting,
            )

    @contextmanager
    def _failures(
        self, context: dg.AssetExecutionContext | dg.OpExecutionContext
    ) -> Iterator[None]:
        """Turn an :class:`RLMError` into the ``dg.Failure`` Dagster acts on. A run that had
        started also leaves its trajectory on the asset's page (an observation), not only in
        the run log."""
        try:
            yield
        except RLMError as err:
            failed = failure(err)
            keys = (
                list(context.selected_asset_keys)
                if isinstance(context, dg.AssetExecutionContext)
                else []
            )
            if len(keys) == 1 and "rlm/trajectory" in failed.metadata:
                context.log_event(
                    dg.AssetObservation(
                        asset_key=keys[0],
                        description=f"failed run: {failed.description}"[:1000],
                        metadata=failed.metadata,
                    )
                )
            raise failed from err

    def _demo_lm(self, cache_path: str) -> tuple[LM, list[Callable[[], None]]]:
        from rlm_dagster.demo import DEMO_PROFILES, DEMO_ROOT_MODEL, DEMO_SUB_MODEL, demo_server

        server = demo_server()
        fake = server.__enter__()
        cache = open_cache(cache_path)
        lm = LM(
            api_key="demo-no-key",
            base_url=fake.base_url,
            root_model=DEMO_ROOT_MODEL,
            sub_model=DEMO_SUB_MODEL,
            max_concurrency=self.max_concurrency,
            request_timeout_s=self.request_timeout_s,
            max_retries=self.max_retries,
            provider="demo",
            cache=cache,
            catalog=ModelCatalog(DEMO_PROFILES),
        )
        return lm, [cache.close, lambda: server.__exit__(None, None, None)]


class _SharedClients:
    """Clients in use in this process, by settings: shared by the runs that use them at the
    same time, closed (with their cache) when the last of those runs ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[Any, ...], list[Any]] = {}

    @contextmanager
    def use(
        self, key: tuple[Any, ...], make: Callable[[], tuple[LM, list[Callable[[], None]]]]
    ) -> Iterator[LM]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = [*make(), 0]
            entry[2] += 1
        try:
            yield entry[0]
        finally:
            with self._lock:
                entry[2] -= 1
                last = entry[2] == 0
                if last:
                    del self._entries[key]
            if last:
                lm: LM = entry[0]
                lm.close()
                for close in entry[1]:
                    close()


_SHARED = _SharedClients()


_DEMO_NOTE = (
    "Using the offline DEMO model (scripted programs and keyword rules, not an LLM) because "
    "RLMResource(provider='demo'). Set ANTHROPIC_API_KEY for Claude."
)


@dataclass(frozen=True)
class WhereResult:
    """What :meth:`RLMResource.llm_where` found: the matching rows, every judged row's
    verdict (``_verdict``, ``_verdict_reason``, ``_decided_by``, ...), and what it cost."""

    matches: pa.Table
    provenance: pa.Table
    stats: WhereStats
    accounting: Accounting


@contextmanager
def _bound(
    tables: Sequence[str] | Mapping[str, Any],
    duckdb: DuckDBResource | str | None,
    filters: Mapping[str, str] | None,
    memory_limit_mb: int,
) -> Iterator[Warehouse]:
    """The tables a run binds: a read-only snapshot of named tables, or given frames."""
    if isinstance(tables, Mapping):
        warehouse = Warehouse.from_frames(tables, memory_limit_mb=memory_limit_mb)
    else:
        if not tables:
            warehouse = Warehouse.from_frames({}, memory_limit_mb=memory_limit_mb)
        else:
            if duckdb is None:
                raise ConfigError(
                    f"tables={list(tables)} are warehouse tables: pass duckdb= (your "
                    "DuckDBResource, or the database file's path)."
                )
            database = duckdb if isinstance(duckdb, str) else duckdb.database
            warehouse = Warehouse.snapshot(
                database, list(tables), filters=filters, memory_limit_mb=memory_limit_mb
            )
    try:
        yield warehouse
    finally:
        warehouse.close()


def run_tags(context: dg.AssetExecutionContext | dg.OpExecutionContext) -> dict[str, Any]:
    """Ledger tags of a run in a Dagster step: run id, asset, partition."""
    keys = (
        list(context.selected_asset_keys) if isinstance(context, dg.AssetExecutionContext) else []
    )
    return {
        "run_id": context.run.run_id,
        "asset": keys[0].to_user_string() if len(keys) == 1 else None,
        "partition": context.partition_key if context.has_partition_key else None,
    }


FRESH_TAG = "rlm/fresh"
"""A run tag: ``true`` asks for a fresh answer (nothing replayed from the cache)."""


def replay(context: dg.AssetExecutionContext | dg.OpExecutionContext) -> bool:
    """Whether this run replays cached calls and verdicts: yes, unless a fresh answer was asked
    for with the run tag ``rlm/fresh: true`` (the launchpad) or ``RLM_FRESH=1`` (the CLI)."""
    wanted = context.run.tags.get(FRESH_TAG) or os.environ.get("RLM_FRESH", "")
    fresh = wanted.strip().lower() in ("1", "true", "yes")
    if fresh:
        context.log.info(
            "A fresh answer was asked for (rlm/fresh / RLM_FRESH): cached calls and verdicts are "
            "not replayed; what this run pays for is cached."
        )
    return not fresh


def log_event(context: dg.AssetExecutionContext | dg.OpExecutionContext, event: Event) -> None:
    """Render a run's event in the run log, at its level, redacted."""
    log = context.log.warning if event.level == "warning" else context.log.info
    log(redact(event.describe()))


def failure(err: RLMError) -> dg.Failure:
    """The ``dg.Failure`` for an error: its name and message, the trajectory so far when the
    run had started, and ``allow_retries`` exactly when a retry can help (the provider kept
    failing, the warehouse was locked)."""
    metadata: dict[str, Any] = {"rlm/error": type(err).__name__, "rlm/retryable": err.retryable}
    partial = err.trajectory if isinstance(err, NoFinalAnswer) else err.partial
    if isinstance(partial, RLMResult):
        metadata.update(run_metadata(partial))
    return dg.Failure(
        description=f"{type(err).__name__}: {err}",
        metadata=metadata,
        allow_retries=err.retryable,
    )
