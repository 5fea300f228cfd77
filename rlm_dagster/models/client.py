"""Model calls through the official ``anthropic`` SDK, with usage and USD accounting.

    >>> lm = LM(api_key="sk-...", root_model="claude-sonnet-4-5", sub_model="claude-haiku-4-5")
    >>> reply = lm.complete(role="sub", model=lm.sub_model, system="Be brief.",
    ...                     messages=[{"role": "user", "content": "2+2?"}])  # doctest: +SKIP
    >>> reply.text, reply.record.cost_usd  # doctest: +SKIP
    ('4', 1.3e-05)

Root turns use the sync client, whose retries (honouring ``retry-after``) are the SDK's own.
Fan-out (``llm_query_batched``, ``llm_where``) uses the async client on one background event
loop owned by the ``LM``, with retries of its own so that every 429/529 is seen by an
:class:`AdaptiveLimiter`: the number of requests in flight drops by one per overload answer
and climbs back by one per ``limit`` successes, up to ``max_concurrency``; other transient
faults (5xx, timeouts, resets) back off alone, leaving the limit as it is. Every completed
call becomes a :class:`CallRecord` in :attr:`LM.accounting`. This module knows nothing about
Dagster.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

import anthropic
import httpx2

from rlm_dagster.cache import call_key
from rlm_dagster.errors import (
    BudgetExceeded,
    ConfigError,
    EndpointUnreachable,
    ModelBadRequest,
    ModelError,
    ModelNotFound,
    ModelRefused,
    ProviderAuthError,
    ProviderOverloaded,
    ProviderServerError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from rlm_dagster.models.profiles import ModelCatalog

T = TypeVar("T")

ROLES = ("root", "sub", "where")
# The root writes code turn after turn, and the REPL loop is where it reasons (it runs code,
# reads the output, tries again), so a turn needs less up-front thinking than a one-shot
# answer: "medium". Sub-calls and llm_where classify or summarise short texts: "low", with
# up-front thinking off where the model allows it.
DEFAULT_ROOT_EFFORT = "medium"
DEFAULT_SUB_EFFORT = "low"
# max_tokens room for thinking on top of the answer's own room, per effort: thinking tokens
# count against max_tokens, and are billed only as used.
THINKING_ROOM = {"low": 2_048, "medium": 8_192, "high": 16_384, "xhigh": 32_768, "max": 32_768}


class Reservation(Protocol):
    def release(self) -> None: ...


class CallStore(Protocol):
    """Where completed calls are kept, so that a retried run replays them instead of paying
    again: all the client knows of caching. The stores of :mod:`rlm_dagster.cache` (a SQLite
    file, or PostgreSQL shared by hosts) implement these three methods and more."""

    def get_call(self, key: str) -> dict[str, Any] | None: ...

    def put_call(self, key: str, model: str, response: Mapping[str, Any]) -> None: ...

    def record(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append ledger rows (the client writes those of calls made outside any run)."""
        ...


class Meter(Protocol):
    """A run's metering, which the shared client never holds: reserve a call's upper bound
    before it is sent, and record what it used once it completed (accounting and ledger).
    :class:`~rlm_dagster.engine.budget.Budget` is the run's meter."""

    def reserve(
        self, *, role: str, depth: int, model: str, tokens: int, usd: float | None
    ) -> Reservation: ...

    def record(self, record: CallRecord) -> None: ...

    replay: bool
    """Whether calls found in the call store are replayed (False: a fresh answer)."""


@dataclass(frozen=True)
class Usage:
    """Token counts of one or more calls."""

    input_tokens: int = 0
    output_tokens: int = 0  # billed output, thinking included
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    thinking_tokens: int = 0  # the part of output_tokens spent thinking (already in it)

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cache_creation_input_tokens + other.cache_creation_input_tokens,
            self.cache_read_input_tokens + other.cache_read_input_tokens,
            self.thinking_tokens + other.thinking_tokens,
        )

    @property
    def total_tokens(self) -> int:
        return (
            self.input_tokens
            + self.output_tokens
            + self.cache_creation_input_tokens
            + self.cache_read_input_tokens
        )


@dataclass(frozen=True)
class CallRecord:
    """One completed model call: who made it, what it used and what it cost."""

    role: str
    model: str
    usage: Usage
    cost_usd: float | None
    latency_s: float
    stop_reason: str | None = None
    cache_hit: bool = False  # replayed from the call cache: counted, not paid again
    depth: int = 0  # 0 for the root RLM, 1 for its rlm_query children, ...

    @property
    def paid_usd(self) -> float:
        return 0.0 if self.cache_hit else (self.cost_usd or 0.0)


@dataclass
class ModelTotals:
    """Totals of one model across a run; ``usage`` and ``cost_usd`` are what was paid."""

    calls: int = 0
    cache_hits: int = 0
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    cost_known: bool = True


class Accounting:
    """Thread-safe list of completed calls with per-model and per-role totals.

    The run totals are kept as calls arrive: the budget reads them before every request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[CallRecord] = []
        self._cost_usd = 0.0
        self._paid_usd = 0.0
        self._usage = Usage()

    def add(self, record: CallRecord) -> None:
        with self._lock:
            self._records.append(record)
            self._cost_usd += record.cost_usd or 0.0
            self._paid_usd += record.paid_usd
            self._usage = self._usage + record.usage

    @property
    def records(self) -> list[CallRecord]:
        with self._lock:
            return list(self._records)

    def calls(self, role: str | None = None) -> int:
        return sum(1 for r in self.records if role is None or r.role == role)

    @property
    def cost_usd(self) -> float:
        """What the run's calls cost, replayed ones at their original price: budgets use it, so
        a retried run meets its limits at the same points. Unknown prices count as nothing."""
        return self._cost_usd

    @property
    def paid_usd(self) -> float:
        """What this process actually paid (cache hits excluded)."""
        return self._paid_usd

    @property
    def usage(self) -> Usage:
        return self._usage

    def by_model(self) -> dict[str, ModelTotals]:
        out: dict[str, ModelTotals] = {}
        for r in self.records:
            t = out.setdefault(r.model, ModelTotals())
            t.calls += 1
            if r.cache_hit:
                t.cache_hits += 1
                continue
            t.usage = t.usage + r.usage
            if r.cost_usd is None:
                t.cost_known = False
            else:
                t.cost_usd += r.cost_usd
        return out


class AdaptiveLimiter:
    """Concurrency limit for async calls that adapts to the provider's overload answers.

        >>> limiter = AdaptiveLimiter(16)
        >>> async def call():
        ...     await limiter.acquire()
        ...     try:
        ...         ...  # send the request
        ...     finally:
        ...         limiter.release()

    A 429/529 lowers the limit to what is still in flight (what the provider is holding), or
    by one if that is higher, but never by more than half at once. So a burst of 32 of which
    16 are refused lands on 16, and refused requests wait for a free slot instead of being
    refused again. Each success raises the limit by ``1/limit`` (one step per round of
    successes), up to ``max_limit``; near the limit where the provider last refused, by an
    eighth of that, so a provider that holds exactly 16 is probed with a 17th request every
    eight rounds, not every round (each probe costs a refusal and a retry). A ``retry-after`` of a second or more pauses all new
    requests until then, as a quota reset requires.

    Waiting requests queue first come, first served (a retry re-enters at the head: it has
    already waited its turn). A freed slot is handed to the first waiter directly, so a release
    wakes one task, not every task waiting: a fan-out of n prompts costs O(n), not O(n²).
    """

    def __init__(self, max_limit: int) -> None:
        self.max_limit = max_limit
        self.limit = float(max_limit)
        self.in_flight = 0
        self.peak_in_flight = 0
        self.overloads = 0
        self._refused_at: float | None = None  # the limit when the provider last refused
        self._paused_until = 0.0
        # Futures of waiting acquirers, in the order they are served. A cancelled waiter's
        # future stays until it reaches the head and is dropped there: removing it at once
        # would cost O(n) per cancellation, O(n²) for a cancelled fan-out.
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._resume: asyncio.TimerHandle | None = None

    async def acquire(self, *, retry: bool = False) -> None:
        """Wait for a slot, and take it. ``retry``: the request was sent before and failed,
        so it goes ahead of those that have not been sent yet."""
        while self._waiters and self._waiters[0].done():
            self._waiters.popleft()
        if not self._waiters and self._free() > 0:
            self._take()
            return
        waiter = asyncio.get_running_loop().create_future()
        if retry:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        self._wake()  # a pause may need its timer
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # Handed a slot, then cancelled before running: pass the slot on.
                self.in_flight -= 1
                self._wake()
            raise

    def release(self, *, overloaded: bool = False, retry_after: float | None = None) -> bool:
        """Free a slot; on an overload answer, lower the limit. Whether the limit came down
        (the answer was about our own concurrency, not yet a sign of an outage)."""
        self.in_flight -= 1
        lowered = False
        if overloaded:
            self.overloads += 1
            before = self.limit
            self._refused_at = before
            self.limit = max(1.0, min(self.limit - 1.0, max(float(self.in_flight), self.limit / 2)))
            # Only an overload while others were in flight can be blamed on our concurrency.
            lowered = self.in_flight > 0 and int(self.limit) < int(before)
            if retry_after is not None and retry_after >= 1.0:
                self._paused_until = max(self._paused_until, time.monotonic() + retry_after)
        self._wake()
        return lowered

    def on_success(self) -> None:
        step = 1.0 / self.limit
        if self._refused_at is not None and abs(self.limit - self._refused_at) < 1.0:
            step /= 8  # at the edge of what the provider held last time: probe it slowly
        self.limit = min(float(self.max_limit), self.limit + step)
        self._wake()

    def _free(self) -> int:
        """Slots a new request may take now (none during a retry-after pause)."""
        if time.monotonic() < self._paused_until:
            return 0
        return max(1, int(self.limit)) - self.in_flight

    def _take(self) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def _wake(self) -> None:
        """Hand each free slot to the next live waiter: one wake-up per slot."""
        free = self._free()
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if waiter.done():  # cancelled while waiting
                continue
            self._take()
            waiter.set_result(None)
            free -= 1
        pause = self._paused_until - time.monotonic()
        if pause > 0 and self._waiters and self._resume is None:
            loop = self._waiters[-1].get_loop()
            self._resume = loop.call_later(pause, self._resumed)

    def _resumed(self) -> None:
        self._resume = None
        self._wake()  # re-arms itself if the pause was extended meanwhile


_SSL_CONTEXT: ssl.SSLContext | None = None
_SSL_LOCK = threading.Lock()


def _ssl_context() -> ssl.SSLContext:
    """One verifying TLS context for every client of the process, built as httpx2 builds it
    (its CA bundle, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``). Building one loads the CA
    bundle, 35-70 ms of CPU that each run's new client would otherwise pay again."""
    global _SSL_CONTEXT
    with _SSL_LOCK:
        if _SSL_CONTEXT is None:
            _SSL_CONTEXT = httpx2.create_ssl_context()
        return _SSL_CONTEXT


_CONNECT_RETRIES = 2  # a host that refuses or never answers connections is not coming back soon
_OVERLOAD = (anthropic.RateLimitError, anthropic.OverloadedError)
_TRANSIENT = (
    anthropic.RateLimitError,
    anthropic.InternalServerError,  # 500, 529 (OverloadedError), 503...
    anthropic.APIConnectionError,  # includes APITimeoutError
)


def _retry_after(err: anthropic.AnthropicError) -> float | None:
    response = getattr(err, "response", None)
    if response is None:
        return None
    for header, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = response.headers.get(header)
        if value:
            try:
                return float(value) * scale
            except ValueError:
                continue
    return None


@dataclass(frozen=True)
class Completion:
    """The parts of a Messages API reply the engine uses.

    ``text`` joins the reply's text blocks only: thinking blocks are kept apart in
    ``thinking`` (their text, empty where the model omits it) and never read as prose."""

    text: str
    stop_reason: str | None
    record: CallRecord
    tool_calls: tuple[tuple[str, dict[str, Any]], ...] = ()
    thinking: str = ""

    def tool_input(self, name: str) -> dict[str, Any] | None:
        """The input of the first call of tool ``name`` in the reply (other tools ignored)."""
        return next((args for called, args in self.tool_calls if called == name), None)

    def check_not_refused(self, what: str) -> None:
        """Raise :class:`ModelRefused` if the model stopped with ``refusal``."""
        if self.stop_reason == "refusal":
            raise ModelRefused(
                f"{self.record.model} refused {what} (stop_reason: refusal). The request "
                "falls under the model's usage policy; retrying the same request will not "
                "help. Rephrase the question, or use another model for this asset."
            )


def _model_error(err: anthropic.AnthropicError, model: str, base_url: str) -> ModelError:
    """The error a retry cannot fix, named for what happened and what to do."""
    if isinstance(err, anthropic.AuthenticationError):
        return ProviderAuthError(
            f"The model endpoint {base_url} rejected the API key (401): {_message(err)}. Set a "
            "valid ANTHROPIC_API_KEY or pass RLMResource(api_key=...)."
        )
    if isinstance(err, anthropic.PermissionDeniedError):
        return ProviderAuthError(
            f"The API key may not use model {model!r} at {base_url} (403): {_message(err)}. "
            "Use a key with access to it, or another model."
        )
    if isinstance(err, anthropic.NotFoundError):
        return ModelNotFound(
            f"{base_url} answered 404 for model {model!r}: {_message(err)}. Check "
            "root_model/sub_model on RLMResource, and that base_url is an Anthropic-compatible "
            "endpoint serving POST /v1/messages."
        )
    if isinstance(err, anthropic.APIStatusError) and err.status_code in (400, 413, 422):
        return ModelBadRequest(
            f"{base_url} rejected the request to {model!r} ({err.status_code}): "
            f"{_message(err)}. If the model's profile is wrong, declare it with "
            "RLMResource(model_profiles=...)."
        )
    if isinstance(err, anthropic.APIStatusError):
        return ModelBadRequest(
            f"{base_url} answered {model!r} with HTTP {err.status_code}: {_message(err)}."
        )
    return ModelBadRequest(f"{model!r} call to {base_url} failed: {err}")


def _message(err: anthropic.AnthropicError) -> str:
    return str(getattr(err, "message", "") or err)[:500]


def _connect_failure(err: BaseException) -> bool:
    """Whether the connection itself failed (refused, unreachable, DNS, connect timeout)."""
    cause = err.__cause__
    return isinstance(err, anthropic.APIConnectionError) and isinstance(
        cause, httpx2.ConnectError | httpx2.ConnectTimeout
    )


def _unavailable(
    err: BaseException, model: str, base_url: str, attempt: int, timeout: float, cut: bool
) -> ProviderUnavailable:
    kind: type[ProviderUnavailable] = ProviderUnavailable
    if isinstance(err, TimeoutError):
        what = f"no complete reply within {timeout:.0f} s (request_timeout_s)"
        kind = ProviderTimeout
    elif _connect_failure(err):
        what = f"could not connect ({err.__cause__ or err})"
        kind = EndpointUnreachable
    elif isinstance(err, anthropic.APIStatusError):
        what = f"HTTP {err.status_code}: {_message(err)}"
        kind = {429: RateLimited, 529: ProviderOverloaded}.get(err.status_code, ProviderServerError)
    elif isinstance(err, anthropic.APITimeoutError):
        what, kind = str(err), ProviderTimeout
    else:
        what, kind = str(err), EndpointUnreachable  # the connection broke mid-request
    what = what.rstrip(". ")
    tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
    why = "; max_wall_time_s left no time for another retry" if cut else ""
    return kind(
        f"{model!r} at {base_url} failed after {tries}: {what}{why}. Check that base_url is "
        "right and the provider is up; the run can be retried, and calls that already "
        "succeeded replay from the cache."
    )


def _usage(raw: Any) -> Usage:
    details = getattr(raw, "output_tokens_details", None)
    return Usage(
        input_tokens=raw.input_tokens or 0,
        output_tokens=raw.output_tokens or 0,
        cache_creation_input_tokens=getattr(raw, "cache_creation_input_tokens", None) or 0,
        cache_read_input_tokens=getattr(raw, "cache_read_input_tokens", None) or 0,
        thinking_tokens=getattr(details, "thinking_tokens", None) or 0,
    )


class LM:
    """Anthropic Messages API client pair with routing, concurrency and accounting.

    A call made with a ``meter`` (a run's :class:`~rlm_dagster.engine.budget.Budget`) reserves its
    upper-bound cost (known input + ``max_tokens``, priced at the model's tier) with the meter
    before it is sent, and releases the reservation when it ends; the meter may refuse.
    """

    def __init__(
        self,
        *,
        api_key: str,
        root_model: str,
        sub_model: str,
        base_url: str | None = None,
        max_concurrency: int = 8,
        request_timeout_s: float = 120.0,
        max_retries: int = 4,
        root_max_tokens: int = 4096,
        sub_max_tokens: int = 1024,
        provider: str = "anthropic",
        cache: CallStore | None = None,
        catalog: ModelCatalog | None = None,
        root_effort: str | None = DEFAULT_ROOT_EFFORT,
        sub_effort: str | None = DEFAULT_SUB_EFFORT,
        root_thinking: str = "auto",
        sub_thinking: str = "off",
    ) -> None:
        self.root_model = root_model
        self.sub_model = sub_model
        self.base_url = base_url or "https://api.anthropic.com"
        self.provider = provider
        self.max_concurrency = max_concurrency
        self.root_max_tokens = root_max_tokens
        self.sub_max_tokens = sub_max_tokens
        self.max_retries = max_retries
        self.catalog = catalog or ModelCatalog()
        # Per role ("root"; "sub" covers llm_query, llm_where and rlm_query's fallback).
        self.effort = {"root": root_effort, "sub": sub_effort}
        self.thinking_mode = {"root": root_thinking, "sub": sub_thinking}
        for model in {root_model, sub_model}:
            profile = self.catalog.profile(model)
            for role in ("root", "sub"):
                profile.thinking_param(self.thinking_mode[role], profile.effort(self.effort[role]))
        # The client holds no run's state: each call is metered by the ``meter`` it is given
        # (its run's budget, accounting and ledger tags). Calls made without one (direct use
        # of the client, outside any run) are accounted here and written untagged.
        self.accounting = Accounting()
        self.cache = cache
        self.request_timeout_s = request_timeout_s
        # Retries are ours (so every attempt has a total deadline and each 429/529 reaches the
        # limiter); httpx2's own timeouts only bound each phase, connect the tightest.
        self._client_kwargs: dict[str, Any] = {
            "api_key": api_key,
            "base_url": base_url,
            "timeout": httpx2.Timeout(request_timeout_s, connect=min(10.0, request_timeout_s)),
            "max_retries": 0,
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._aclient: anthropic.AsyncAnthropic | None = None
        self.limiter = AdaptiveLimiter(max_concurrency)
        self._loop_lock = threading.Lock()

    # -- calls ----------------------------------------------------------------------------

    def complete(self, **request: Any) -> Completion:
        """One blocking call (the root loop's turns and single sub-calls): :meth:`acomplete`
        with the same keywords, run on the LM's event loop, with the same retries and
        deadlines."""
        return self.run_async(lambda: self.acomplete(**request))

    async def acomplete(
        self,
        *,
        role: str,
        model: str,
        system: str | list[dict[str, Any]],
        messages: Iterable[dict[str, Any]],
        max_tokens: int | None = None,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: dict[str, Any] | None = None,
        output_format: dict[str, Any] | None = None,
        depth: int = 0,
        deadline: float | None = None,
        meter: Meter | None = None,
        cached: bool = True,
    ) -> Completion:
        """One call on the LM's event loop under the adaptive limiter.

        ``cached`` replays the call from the call cache and stores it there once it succeeds;
        a caller that caches results its own way (``llm_where``: verdicts per value) passes
        ``False``.

        Every attempt has a total deadline (connect + send + receive) of ``request_timeout_s``,
        cut to what is left before ``deadline`` (a ``time.monotonic()`` value: the run's wall
        limit). 429, 529, 5xx, refused or reset connections and timeouts are retried
        (``retry-after`` honoured, else jittered backoff; connection failures at most twice),
        never past ``deadline``; then :class:`ProviderUnavailable` (retryable). Only 429 and 529
        lower the limiter's concurrency; a retry waits for a slot ahead of requests not yet
        sent. 400, 401, 403 and 404 are raised at once as errors a retry cannot fix."""
        assert self._aclient is not None, "call acomplete through LM.run_async"
        kwargs = self._request(
            role, model, system, messages, max_tokens, tools, tool_choice, output_format
        )
        meter = meter or _Unmetered(self.accounting, self.cache)
        tokens, usd = self.upper_bound(kwargs)
        reservation = meter.reserve(role=role, depth=depth, model=model, tokens=tokens, usd=usd)
        try:
            return await self._call(role, model, kwargs, depth, deadline, meter, cached)
        finally:
            reservation.release()

    def upper_bound(self, request: dict[str, Any]) -> tuple[int, float | None]:
        """The most a request can use: its prompt (estimated at 3 characters a token, on the
        high side) plus ``max_tokens``, in tokens and in USD at the model's price (the prompt
        as if written to the prompt cache, 1.25x; the long-prompt tier where it applies)."""
        prompt = {k: request.get(k) for k in ("system", "messages", "tools")}
        prompt_tokens = len(json.dumps(prompt, default=str)) // 3 + 16
        out = int(request["max_tokens"])
        usd = self.catalog.cost_usd(
            request["model"], Usage(cache_creation_input_tokens=prompt_tokens, output_tokens=out)
        )
        return prompt_tokens + out, usd

    async def _call(
        self,
        role: str,
        model: str,
        kwargs: dict[str, Any],
        depth: int,
        deadline: float | None,
        meter: Meter,
        cached: bool,
    ) -> Completion:
        assert self._aclient is not None, "call acomplete through LM.run_async"
        if not cached:
            key, hit = None, None
        elif meter.replay:
            key, hit = self._cached(role, kwargs, depth, meter)
        else:  # a fresh answer: pay again, and keep what is paid for
            key, hit = call_key(kwargs), None
        if hit is not None:
            return hit
        attempt = 0
        sent = False
        while True:
            self._time_left(deadline, role, model)  # not worth queueing for once it is up
            await self.limiter.acquire(retry=sent)
            sent = True
            try:
                # The wait for a slot may have been long: the attempt gets what is left then.
                timeout = self._time_left(deadline, role, model)
                started = time.monotonic()
                message = await asyncio.wait_for(self._aclient.messages.create(**kwargs), timeout)
            except (*_TRANSIENT, TimeoutError) as err:
                retry_after = _retry_after(err) if isinstance(err, anthropic.APIError) else None
                # Only an overload answer (429/529) is about how much we send at once: it lowers
                # the limit (a long retry-after also pauses new requests), and while it does, it
                # is retried without spending one of the request's retries. Any other transient
                # fault (5xx, timeout, reset) is this request's own: it backs off alone, and the
                # others keep their slots and the limit.
                adapting = self.limiter.release(
                    overloaded=isinstance(err, _OVERLOAD), retry_after=retry_after
                )
                if isinstance(err, TimeoutError) and timeout < self.request_timeout_s:
                    # The attempt was cut short by the run's wall limit, not by the provider.
                    raise BudgetExceeded(
                        f"max_wall_time_s reached while waiting for {model!r} ({role} call). "
                        "Raise max_wall_time_s on the asset.",
                        limit="max_wall_time_s",
                    ) from None
                retries = self.max_retries
                if _connect_failure(err):
                    retries = min(retries, _CONNECT_RETRIES)
                delay = (
                    retry_after if retry_after is not None else min(8.0, 0.25 * 2 ** (attempt + 1))
                )
                delay *= random.uniform(1.0, 1.2)
                cut = deadline is not None and time.monotonic() + delay >= deadline
                if attempt >= retries or cut:
                    raise _unavailable(err, model, self.base_url, attempt, timeout, cut) from err
                if not adapting:
                    attempt += 1
                await asyncio.sleep(delay)
                continue
            except anthropic.AnthropicError as err:
                self.limiter.release()
                raise _model_error(err, model, self.base_url) from err
            except BaseException:
                self.limiter.release()
                raise
            self.limiter.on_success()
            self.limiter.release()
            latency = time.monotonic() - started
            return self._completion(role, model, message, latency, meter, key, depth)

    def _time_left(self, deadline: float | None, role: str, model: str) -> float:
        """An attempt's timeout: ``request_timeout_s``, cut to what is left before
        ``deadline``; :class:`BudgetExceeded` if nothing is."""
        if deadline is None:
            return self.request_timeout_s
        left = deadline - time.monotonic()
        if left <= 0:
            raise BudgetExceeded(
                f"max_wall_time_s reached before a {role} call to {model!r} could be made. "
                "Raise max_wall_time_s on the asset.",
                limit="max_wall_time_s",
            )
        return min(self.request_timeout_s, left)

    def run_async(self, coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``coro_fn()`` on the LM's background event loop and wait for its result."""
        loop = self._ensure_loop()
        return asyncio.run_coroutine_threadsafe(coro_fn(), loop).result()

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._loop_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def serve() -> None:
                    asyncio.set_event_loop(loop)
                    self._aclient = anthropic.AsyncAnthropic(
                        **self._client_kwargs,
                        http_client=anthropic.DefaultAsyncHttpxClient(verify=_ssl_context()),
                    )
                    ready.set()
                    loop.run_forever()

                self._loop_thread = threading.Thread(target=serve, name="rlm-lm-loop", daemon=True)
                self._loop_thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def close(self) -> None:
        """Close both HTTP clients and stop the background loop."""
        with self._loop_lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            if self._aclient is not None:
                asyncio.run_coroutine_threadsafe(self._aclient.close(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(timeout=10)

    # -- shared -------------------------------------------------------------------------

    def _request(
        self,
        role: str,
        model: str,
        system: str | list[dict[str, Any]],
        messages: Iterable[dict[str, Any]],
        max_tokens: int | None,
        tools: list[dict[str, Any]] | None,
        tool_choice: dict[str, Any] | None,
        output_format: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The request body, shaped by the model's profile: only fields it accepts are sent."""
        if role not in ROLES:
            raise ConfigError(f"role must be one of {ROLES}, not {role!r}")
        profile = self.catalog.profile(model)
        forced = bool(tool_choice) and (tool_choice or {}).get("type") in ("tool", "any")
        if forced and not profile.forced_tool_choice:
            raise ConfigError(
                f"{model!r} does not accept a forced tool_choice (its profile: "
                f"{profile.family}); offer the tool with tool_choice auto instead."
            )
        if output_format is not None and not profile.structured_outputs:
            raise ConfigError(
                f"{model!r} has no structured outputs (its profile: {profile.family}); "
                "declare them with RLMResource(model_profiles=...) if the endpoint has them."
            )
        kind = "root" if role == "root" else "sub"
        effort = profile.effort(self.effort[kind])
        thinking = profile.thinking_param(self.thinking_mode[kind], effort)
        if max_tokens is None:
            max_tokens = self.root_max_tokens if role == "root" else self.sub_max_tokens
        if profile.thinks(thinking):
            max_tokens += THINKING_ROOM[effort or profile.default_effort or "high"]
        kwargs: dict[str, Any] = {
            "model": model,
            "max_tokens": min(max_tokens, profile.max_output_tokens),
            "system": system,
            "messages": list(messages),
        }
        if tools:
            kwargs["tools"] = tools
        if tool_choice:
            kwargs["tool_choice"] = tool_choice
        if thinking is not None:
            kwargs["thinking"] = thinking
        output_config: dict[str, Any] = {}
        if effort is not None:
            output_config["effort"] = effort
        if output_format is not None:
            output_config["format"] = output_format
        if output_config:
            kwargs["output_config"] = output_config
        return kwargs

    def _cached(
        self, role: str, request: dict[str, Any], depth: int, meter: Meter
    ) -> tuple[str | None, Completion | None]:
        """The call-cache key of ``request`` and its stored completion, if any."""
        if self.cache is None:
            return None, None
        key = call_key(request)
        stored = self.cache.get_call(key)
        if stored is None:
            return key, None
        usage = Usage(**stored["usage"])
        record = CallRecord(
            role=role,
            model=request["model"],
            usage=usage,
            cost_usd=self.catalog.cost_usd(request["model"], usage),
            latency_s=0.0,
            stop_reason=stored["stop_reason"],
            cache_hit=True,
            depth=depth,
        )
        meter.record(record)
        completion = Completion(
            text=stored["text"],
            stop_reason=stored["stop_reason"],
            record=record,
            tool_calls=tuple((name, args) for name, args in stored.get("tool_calls", ())),
            thinking=stored.get("thinking", ""),
        )
        return key, completion

    def _completion(
        self,
        role: str,
        model: str,
        message: Any,
        latency: float,
        meter: Meter,
        key: str | None = None,
        depth: int = 0,
    ) -> Completion:
        usage = _usage(message.usage)
        record = CallRecord(
            role=role,
            model=model,
            usage=usage,
            cost_usd=self.catalog.cost_usd(model, usage),
            latency_s=latency,
            stop_reason=message.stop_reason,
            depth=depth,
        )
        blocks = [(getattr(b, "type", None), b) for b in message.content]
        completion = Completion(
            text="".join(b.text for kind, b in blocks if kind == "text"),
            stop_reason=message.stop_reason,
            record=record,
            tool_calls=tuple(
                (str(b.name), dict(b.input)) for kind, b in blocks if kind == "tool_use"
            ),
            thinking="\n\n".join(b.thinking for kind, b in blocks if kind == "thinking"),
        )
        # A refusal is paid and recorded, but not cached: re-running the same request is a
        # deliberate new attempt, not a replay.
        if key is not None and self.cache is not None and message.stop_reason != "refusal":
            self.cache.put_call(
                key,
                model,
                {
                    "text": completion.text,
                    "stop_reason": completion.stop_reason,
                    "tool_calls": [list(call) for call in completion.tool_calls],
                    "thinking": completion.thinking,
                    "usage": asdict(usage),
                },
            )
        meter.record(record)
        return completion


class _NoReservation:
    def release(self) -> None:
        """Nothing was reserved."""


class _Unmetered:
    """The meter of calls made outside any run: no limits; accounted on the client and
    written to the ledger at once, untagged."""

    replay = True

    def __init__(self, accounting: Accounting, cache: CallStore | None) -> None:
        self.accounting, self.cache = accounting, cache

    def reserve(
        self, *, role: str, depth: int, model: str, tokens: int, usd: float | None
    ) -> Reservation:
        return _NoReservation()

    def record(self, record: CallRecord) -> None:
        self.accounting.add(record)
        if self.cache is not None:
            self.cache.record([ledger_row(record)])


def ledger_row(record: CallRecord, tags: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ledger row of one completed call, with the run's ``tags`` (run id, asset,
    partition)."""
    return {
        **(tags or {}),
        "depth": record.depth,
        "role": record.role,
        "model": record.model,
        **asdict(record.usage),
        "cost_usd": record.paid_usd if record.cost_usd is not None else None,
        "latency_s": record.latency_s,
        "cache_hit": int(record.cache_hit),
        # the message batch it was answered in (a BatchCallRecord), else None
        "batch_id": getattr(record, "batch_id", None) or None,
    }


def cached_system(text: str) -> list[dict[str, Any]]:
    """A system prompt as one text block marked for prompt caching (a stable prefix)."""
    return [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]
