"""Run a suite: every task through every strategy, scored, metered and cached.

    >>> config = SuiteConfig(base_url="http://127.0.0.1:8089", root_model="smollm2",
    ...                      sub_model="smollm2", budget_usd=2.0)
    >>> report = run_suite(config)  # doctest: +SKIP
    >>> print(report.table())  # doctest: +SKIP

Questions run one after another, each through the strategies in turn (question-major, so a
stop leaves every strategy with the same questions). Every call goes through one
:class:`~rlm_dagster.models.client.LM` with the project's call cache: re-running a suite
after a crash replays what was paid for and pays only for what is missing. Each question is
capped by :class:`~rlm_dagster.Limits` (``max_cost_usd`` and the rest); the suite by
``budget_usd``: a question is not started unless one question's cap still fits in what is
left, so the suite never spends past its budget.
"""

from __future__ import annotations

import contextlib
import ipaddress
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rlm_dagster.cache import open_cache, redact_location
from rlm_dagster.engine.budget import Limits
from rlm_dagster.errors import ConfigError
from rlm_dagster.eval.prompts import EVAL_PROMPT_VERSION
from rlm_dagster.eval.report import FAKE_LABEL, Report, Result
from rlm_dagster.eval.scoring import Unparseable, answer_span, parse_answer, score, to_json
from rlm_dagster.eval.strategies import STRATEGIES, Attempt, Harness, check_tools_supported
from rlm_dagster.eval.suite import FAMILIES, build_suite
from rlm_dagster.eval.task import Task
from rlm_dagster.models.client import LM
from rlm_dagster.models.profiles import ModelCatalog
from rlm_dagster.prompts import PROMPT_VERSION
from rlm_dagster.repl.seam import REPLFactory


@dataclass(frozen=True)
class SuiteConfig:
    """What to run, against which endpoint and models, under which limits."""

    base_url: str
    root_model: str
    sub_model: str
    api_key: str | None = None  # None: a placeholder, for local servers that need none
    suite: str = "small"
    families: tuple[str, ...] = FAMILIES
    strategies: tuple[str, ...] = ("rlm", "direct", "tools")
    seed: int = 0
    budget_usd: float | None = 10.0  # the whole suite
    max_cost_usd: float | None = 1.0  # each question, each strategy
    max_iterations: int = 12
    max_sub_calls: int = 500
    max_wall_time_s: float = 900.0
    root_thinking: str = "off"
    max_concurrency: int = 8
    request_timeout_s: float = 120.0
    model_profiles: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    out: Path | None = None
    cache_path: str | None = None  # default: <out>/cache.sqlite3 (or no cache without out)
    data_dir: Path | None = None
    sandbox: str = "auto"
    fake: bool = False  # the endpoint is known to be a fake (``--fake``)

    def limits(self) -> Limits:
        return Limits(
            max_iterations=self.max_iterations,
            max_sub_calls=self.max_sub_calls,
            max_cost_usd=self.max_cost_usd,
            max_wall_time_s=self.max_wall_time_s,
        )

    def check(self) -> None:
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            raise ConfigError(
                f"--strategies: unknown {unknown or 'empty list'}; choose from "
                f"{', '.join(STRATEGIES)}."
            )
        if self.budget_usd is not None and self.budget_usd <= 0:
            raise ConfigError(f"--budget-usd must be positive, got {self.budget_usd}.")


def model_kind(base_url: str, *, fake: bool = False, timeout_s: float = 2.0) -> str:
    """``"fake"`` (the project's FakeAnthropic, or ``fake``), ``"local"`` (a server on
    loopback) or ``"remote"``. The fake is recognised by the ``Server`` header it sends on
    every reply; the probe is one ``GET /health``, whatever it answers."""
    if fake:
        return "fake"
    host = urlsplit(base_url).hostname or ""
    local = host == "localhost"
    with contextlib.suppress(ValueError):
        local = local or ipaddress.ip_address(host).is_loopback
    if local:
        server = ""
        try:
            with urllib.request.urlopen(base_url.rstrip("/") + "/health", timeout=timeout_s) as r:
                server = r.headers.get("Server", "")
        except urllib.error.HTTPError as err:
            server = err.headers.get("Server", "")
        except (OSError, ValueError):
            pass
        return "fake" if server.startswith("FakeAnthropic") else "local"
    return "remote"


def label(kind: str, config: SuiteConfig) -> str:
    """What the table's first line says about the model that answered."""
    if kind == "fake":
        return FAKE_LABEL
    models = f"{config.root_model} (root) + {config.sub_model} (sub)"
    if kind == "local":
        return (
            f"LOCAL MODEL {models} at {config.base_url}: check the model's size before "
            "reading these numbers as quality"
        )
    return f"{models} at {config.base_url}"


def make_lm(config: SuiteConfig, cache: Any) -> LM:
    return LM(
        api_key=config.api_key or "no-key",
        base_url=config.base_url,
        root_model=config.root_model,
        sub_model=config.sub_model,
        max_concurrency=config.max_concurrency,
        request_timeout_s=config.request_timeout_s,
        cache=cache,
        catalog=ModelCatalog(config.model_profiles),
        root_thinking=config.root_thinking,
    )


def run_suite(
    config: SuiteConfig,
    *,
    tasks: Sequence[Task] | None = None,
    repl: REPLFactory | None = None,
    log: Callable[[str], None] = print,
) -> Report:
    """Run ``tasks`` (default: ``config.suite`` for ``config.seed``) through the strategies;
    the report is also written to ``config.out`` after every question."""
    config.check()
    if tasks is None:
        tasks = build_suite(
            config.suite, seed=config.seed, families=config.families, data_dir=config.data_dir
        )
    cache_path = config.cache_path or (
        str(config.out / "cache.sqlite3") if config.out is not None else None
    )
    if cache_path is not None and config.out is not None:
        config.out.mkdir(parents=True, exist_ok=True)
    if cache_path is not None:
        _claim_cache(cache_path, "fake" if config.fake else config.base_url)
    cache = open_cache(cache_path) if cache_path else None
    lm = make_lm(config, cache)
    try:
        if "tools" in config.strategies and (why := check_tools_supported(lm)):
            raise ConfigError(why)
        kind = model_kind(config.base_url, fake=config.fake)
        limits = config.limits()
        report = Report(
            provenance={
                "label": label(kind, config),
                "model_kind": kind,
                "endpoint": config.base_url,
                "root_model": config.root_model,
                "sub_model": config.sub_model,
                "suite": config.suite,
                "seed": _seed(tasks, config.seed),
                "strategies": list(config.strategies),
                "prompt_version": PROMPT_VERSION,
                "eval_prompt_version": EVAL_PROMPT_VERSION,
                "root_thinking": config.root_thinking,
                "limits": limits.as_dict(),
                "budget_usd": config.budget_usd,
                "cache": redact_location(cache_path) if cache_path else None,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
        )
        unpriced = sorted(
            {
                m
                for m in (config.root_model, config.sub_model)
                if lm.catalog.profile(m).price is None
            }
        )
        if unpriced:
            report.notes.append(
                f"USD unknown for {', '.join(unpriced)} (not in the price table): USD columns "
                "say n/a, and neither max_cost_usd nor --budget-usd can be enforced. Declare "
                "prices with --model-profiles."
            )
        harness = Harness(
            lm=lm,
            limits=limits,
            cache=cache,
            sandbox=config.sandbox,
            repl=repl,
            run_id=f"eval-{uuid.uuid4().hex[:8]}",
        )
        provenance = {
            k: report.provenance[k]
            for k in (
                "endpoint",
                "root_model",
                "sub_model",
                "seed",
                "prompt_version",
                "eval_prompt_version",
                "model_kind",
            )
        } | {"fake_model": kind == "fake"}
        total = len(tasks) * len(config.strategies)
        for task in tasks:
            for strategy in config.strategies:
                done = len(report.results) + 1
                if not report.stopped_by_budget:
                    report.stopped_by_budget = _budget_stop(config, report.paid_usd)
                if report.stopped_by_budget:
                    result = _skipped(task, strategy)
                else:
                    result = _run_one(task, strategy, harness)
                result.provenance = {
                    **provenance,
                    "seed": task.params.get("seed", config.seed),
                    "strategy": strategy,
                }
                report.results.append(result)
                log(f"[{done}/{total}] {_line(result)}")
                if config.out is not None:
                    report.write(config.out)
        return report
    finally:
        lm.close()
        if cache is not None:
            cache.close()


def _seed(tasks: Sequence[Task], default: int) -> int | list[int]:
    """The seed the tasks were generated from (all of them, if they differ)."""
    seeds = sorted({int(t.params.get("seed", default)) for t in tasks})
    return seeds[0] if len(seeds) == 1 else seeds or default


def _claim_cache(cache_path: str, endpoint: str) -> None:
    """Refuse a cache file that an earlier suite filled from another endpoint.

    The call cache is keyed by model name and request, not by endpoint (one model is one
    model, wherever it is served); but two endpoints serving different models under one name
    (two local servers, two GGUFs behind one alias) would silently replay each other's
    answers. A SQLite cache remembers its endpoint in ``<cache>.endpoint``."""
    if "://" in cache_path or cache_path == ":memory:":
        return  # a shared PostgreSQL cache is the deployment's to manage
    marker = Path(cache_path + ".endpoint")
    if marker.is_file() and (seen := marker.read_text(encoding="utf-8").strip()) != endpoint:
        raise ConfigError(
            f"the call cache {cache_path} holds answers from {seen}, not {endpoint}: its replays "
            "would be another endpoint's. Use another --out (or --cache) for this endpoint."
        )
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(endpoint + "\n", encoding="utf-8")


def _budget_stop(config: SuiteConfig, paid: float) -> str:
    """Why no new question may start, or ``""``."""
    if config.budget_usd is None:
        return ""
    cap = config.max_cost_usd or 0.0
    left = config.budget_usd - paid
    if left <= 0 or (cap and left < cap):
        return (
            f"${left:.4f} left of --budget-usd ${config.budget_usd:.2f}, less than one "
            f"question's cap (max_cost_usd ${cap:.2f}); the questions after it were not started."
        )
    return ""


def _skipped(task: Task, strategy: str) -> Result:
    return Result(
        task_id=task.id,
        family=task.family,
        group=task.group,
        strategy=strategy,
        kind=task.kind,
        status="skipped",
        question=task.question,
        truth=task.truth_json(),
        error="not started: the suite budget ran out",
        error_type="SuiteBudget",
        rows=task.rows,
    )


def _run_one(task: Task, strategy: str, harness: Harness) -> Result:
    started = time.monotonic()
    try:
        attempt = STRATEGIES[strategy](task, harness)
    except Exception as err:  # a bug of the harness: recorded whole, and the suite goes on
        attempt = Attempt(error=err, seconds=time.monotonic() - started)
        result = _scored(task, strategy, attempt)
        result.error = traceback.format_exc(limit=8)
        return result
    attempt.seconds = time.monotonic() - started
    return _scored(task, strategy, attempt)


def _scored(task: Task, strategy: str, attempt: Attempt) -> Result:
    records = attempt.accounting.records
    result = Result(
        task_id=task.id,
        family=task.family,
        group=task.group,
        strategy=strategy,
        kind=task.kind,
        status="answered",
        question=task.question,
        truth=task.truth_json(),
        cost_usd=None
        if any(r.cost_usd is None for r in records)
        else sum(r.cost_usd or 0.0 for r in records),
        paid_usd=sum(r.paid_usd for r in records),
        root_tokens=sum(r.usage.total_tokens for r in records if r.role == "root"),
        sub_calls=sum(1 for r in records if r.role != "root" or r.depth > 0),
        calls=len(records),
        cache_hits=sum(r.cache_hit for r in records),
        turns=attempt.turns,
        wall_s=attempt.seconds,
        rows=task.rows,
        truncation=attempt.truncation,
    )
    if attempt.error is not None:
        result.status, result.score = "failed", 0.0
        result.error_type = type(attempt.error).__name__
        result.error = str(attempt.error)[:2_000]
        return result
    result.answer = answer_span(attempt.text)[:2_000]
    try:
        predicted = parse_answer(task.kind, attempt.text, attempt.table)
    except Unparseable as err:
        result.status, result.score = "failed", 0.0
        result.error_type, result.error = "Unparseable", str(err)
        return result
    result.predicted = to_json(predicted)
    result.score = score(task.kind, predicted, task.truth, task.tolerance)
    return result


def _line(result: Result) -> str:
    what = (
        f"score {result.score:.2f}"
        if result.status == "answered" and result.score is not None
        else f"{result.status.upper()} ({result.error_type}: {result.error[:100]})"
    )
    cost = "USD n/a" if result.cost_usd is None else f"${result.cost_usd:.4f}"
    return (
        f"{result.task_id} {result.strategy}: {what} · {cost} · {result.calls} calls "
        f"({result.cache_hits} cached) · {result.wall_s:.1f} s"
    )
