"""Many Messages requests sent as message batches: half the price, answers within 24 hours.

    >>> runner = BatchRunner(lm, store)  # doctest: +SKIP
    >>> done = runner.run("where:p0", [("r0", params, b"keys")], meter=budget)  # doctest: +SKIP
    >>> done[0].completion.text, done[0].completion.record.cost_usd  # doctest: +SKIP
    ('{"verdicts": [{"id": 0, "match": true, "reason": "asks to cancel"}]}', 4.2e-05)

A :class:`BatchRunner` sends ``(custom_id, params)`` requests (``params`` as
:meth:`LM._request <rlm_dagster.models.client.LM._request>` builds them) through the Message
Batches API of the ``LM``'s endpoint and gives back one :class:`BatchResult` per custom_id: a
:class:`~rlm_dagster.models.client.Completion` metered like an online call (its record priced
at :data:`~rlm_dagster.models.prices.BATCH_PRICE_FACTOR` of the standard price, and carrying
the ``batch_id``), or the error that says why there is none (``errored``, ``expired`` and
``canceled`` requests are not billed; the caller decides what to ask again, and how).

Nothing is paid twice: every batch is recorded in a :class:`BatchStore` under the caller's
``job`` key the moment the API has made it, before anything else can fail, and is marked
finished only once all its results were taken. A run killed (or out of wall time) while its
batches process leaves them recorded; the retried run calls :meth:`BatchRunner.resume` first,
which waits for those same batches and streams their results (with the blobs the caller
stored for each request) instead of submitting again. Results are delivered at least once: a
consumer killed after taking a result but before its batch was finished sees it again.

Facts from Anthropic's batch-processing guide and API reference: at most
100,000 requests or 256 MB per batch; ``custom_id`` matches ``^[a-zA-Z0-9_-]{1,64}$`` and is
unique within its batch; each request's params are validated asynchronously (a bad request
becomes an ``errored`` result, not a refused batch); ``processing_status`` is ``in_progress``,
``canceling`` or ``ended``; ``request_counts`` stay at ``processing`` until the batch ends;
results (JSONL at ``results_url``, in any order) are ``succeeded``, ``errored``, ``canceled``
or ``expired``, only the first billed; batches expire 24 hours after creation. The SDK's
``messages.batches.results(id)`` retrieves the batch and then downloads its ``results_url``.
This module knows nothing about Dagster.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple, Protocol, TypeVar, cast

import anthropic
import httpx2

from rlm_dagster.errors import (
    BatchCanceled,
    BatchExpired,
    BatchPending,
    BudgetExceeded,
    ConfigError,
    ModelBadRequest,
    ModelError,
    ModelNotFound,
    ProviderAuthError,
    ProviderOverloaded,
    ProviderServerError,
    RateLimited,
    RLMError,
)
from rlm_dagster.models.client import (
    _CONNECT_RETRIES,
    _TRANSIENT,
    LM,
    ROLES,
    CallRecord,
    Completion,
    Meter,
    Reservation,
    Usage,
    _connect_failure,
    _message,
    _model_error,
    _retry_after,
    _unavailable,
    _Unmetered,
)
from rlm_dagster.models.prices import BATCH_PRICE_FACTOR
from rlm_dagster.models.profiles import ModelCatalog

T = TypeVar("T")

#: The Message Batches API's limits per batch: requests, and bytes of the create body (256 MB,
#: counted in decimal megabytes to stay below the limit whichever megabyte it means).
MAX_BATCH_REQUESTS = 100_000
MAX_BATCH_BYTES = 256_000_000
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_ENVELOPE_BYTES = len('{"requests": []}')

# An ``errored`` result's error type -> the error it is here (retryable or not, by class).
_ERRORED: dict[str, type[ModelError]] = {
    "invalid_request_error": ModelBadRequest,
    "request_too_large": ModelBadRequest,
    "authentication_error": ProviderAuthError,
    "permission_error": ProviderAuthError,
    "not_found_error": ModelNotFound,
    "rate_limit_error": RateLimited,
    "api_error": ProviderServerError,
    "overloaded_error": ProviderOverloaded,
}


class BatchStore(Protocol):
    """Where submitted batches are recorded until their results were taken, per ``job`` (the
    caller's key for one piece of work, e.g. one ``llm_where`` over one partition). The stores
    of :mod:`rlm_dagster.cache` implement it."""

    def put_batch(self, job: str, batch_id: str, model: str, requests: Mapping[str, bytes]) -> None:
        """Record a batch the API has made: per custom_id, the caller's opaque blob."""
        ...

    def open_batches(self, job: str) -> list[tuple[str, dict[str, bytes]]]:
        """The recorded, unfinished batches of ``job``, oldest first."""
        ...

    def finish_batch(self, batch_id: str) -> None:
        """Mark a batch finished: all its results were taken."""
        ...


class BatchRequest(NamedTuple):
    """One request of a batch run: its ``custom_id`` (``^[a-zA-Z0-9_-]{1,64}$``, unique in
    the run), its Messages ``params``, and the ``blob`` stored with it (given back with its
    result, also by :meth:`BatchRunner.resume` in another process)."""

    custom_id: str
    params: Mapping[str, Any]
    blob: bytes = b""


@dataclass(frozen=True)
class BatchCallRecord(CallRecord):
    """A :class:`CallRecord` of a request answered in a message batch: ``cost_usd`` is at the
    batch price, ``latency_s`` the time from the batch's creation to its result."""

    batch_id: str = ""


@dataclass(frozen=True)
class BatchResult:
    """The outcome of one batch request: ``completion`` (``ok``) or ``error``.

    ``error`` is a :class:`ModelError`: ``errored`` results by their error type
    (``api_error`` -> :class:`ProviderServerError`, ``overloaded_error`` ->
    :class:`ProviderOverloaded`, ``invalid_request_error`` -> :class:`ModelBadRequest`, ...),
    :class:`BatchExpired` and :class:`BatchCanceled`; ``error.retryable`` says whether asking
    the same request again can succeed. None of those was billed. ``batch_id`` is empty for
    a request that was never submitted (too big for any batch)."""

    custom_id: str
    batch_id: str
    blob: bytes
    completion: Completion | None = None
    error: ModelError | None = None

    @property
    def ok(self) -> bool:
        return self.completion is not None


@dataclass(frozen=True)
class BatchProgress:
    """Where a batch run stands, reported after each look at one of its batches.

    ``batch_id``, ``status`` (``processing_status``), ``counts`` (its ``request_counts``:
    all ``processing`` until the batch ends) and ``batch_requests`` are about the batch just
    looked at; ``requests_done`` / ``requests_total`` count the run's results given back so
    far out of all its requests, and ``batches_open`` its batches not finished yet."""

    batch_id: str
    status: str
    counts: Mapping[str, int]
    batch_requests: int
    requests_done: int
    requests_total: int
    batches_open: int
    elapsed_s: float


def batch_cost_usd(catalog: ModelCatalog, model: str, usage: Usage) -> float | None:
    """USD cost of ``usage`` answered in a message batch: the standard price (long-prompt tier
    and prompt-cache rates included) times :data:`BATCH_PRICE_FACTOR`; ``None`` if unknown.

    >>> batch_cost_usd(ModelCatalog(), "claude-haiku-4-5", Usage(input_tokens=1_000_000))
    0.5
    """
    cost = catalog.cost_usd(model, usage)
    return None if cost is None else cost * BATCH_PRICE_FACTOR


@dataclass
class _Open:
    """A submitted batch not finished yet, and what the run holds for it."""

    batch_id: str
    blobs: dict[str, bytes]
    model: str | None  # None when resumed: each result's message names its model
    reservations: dict[str, Reservation] = field(default_factory=dict)
    created: float | None = None  # time.time() of its creation, once known


Requests = Iterable[BatchRequest | tuple[str, Mapping[str, Any]]]
"""A run's requests: :class:`BatchRequest` or ``(custom_id, params)`` (blob empty)."""
RequestSource = Requests | Callable[[], Requests]
"""The requests, or a function that gives the same requests each time it is called (then
they are read twice, never all held: see :meth:`BatchRunner.astream`)."""


@dataclass
class _Plan:
    """What the first pass over a run's requests keeps: per request its custom_id and batch
    (in order; -1: too big for any batch), its model and bound; per batch its model and size;
    the oversized requests' blobs. Not the requests themselves."""

    order: list[tuple[str, int]] = field(default_factory=list)
    bounds: list[tuple[str, str, int, float | None]] = field(default_factory=list)
    chunk_models: list[str] = field(default_factory=list)
    chunk_sizes: list[int] = field(default_factory=list)
    oversized: list[tuple[str, bytes]] = field(default_factory=list)


class _Discard:
    """A meter that keeps nothing: the LM builds a completion, the runner meters it."""

    replay = False

    def reserve(
        self, *, role: str, depth: int, model: str, tokens: int, usd: float | None
    ) -> Reservation:
        raise AssertionError("nothing is reserved through _Discard")

    def record(self, record: CallRecord) -> None:
        """The runner records the batch-priced record itself."""


class BatchRunner:
    """Sends Messages requests as message batches through ``lm``'s endpoint and key,
    recording every batch in ``store``.

    ``max_requests`` / ``max_bytes`` bound each batch (the API's limits by default; smaller in
    tests). Batches are polled every ``poll_interval_s``, growing by half each round up to
    ``max_poll_interval_s``. Calls to the batch endpoints get the same retries and errors as
    online calls: 429, 529, 5xx, connection failures and timeouts are retried (``retry-after``
    honoured, else jittered backoff) up to ``lm.max_retries`` times, then
    :class:`~rlm_dagster.errors.ProviderUnavailable`; 400/401/403/404 raise at once.
    """

    def __init__(
        self,
        lm: LM,
        store: BatchStore,
        *,
        max_requests: int = MAX_BATCH_REQUESTS,
        max_bytes: int = MAX_BATCH_BYTES,
        poll_interval_s: float = 10.0,
        max_poll_interval_s: float = 60.0,
    ) -> None:
        if not 1 <= max_requests <= MAX_BATCH_REQUESTS:
            raise ConfigError(f"max_requests must be 1..{MAX_BATCH_REQUESTS}, not {max_requests}")
        if not _ENVELOPE_BYTES < max_bytes <= MAX_BATCH_BYTES:
            raise ConfigError(f"max_bytes must be at most {MAX_BATCH_BYTES}, not {max_bytes}")
        if poll_interval_s <= 0 or max_poll_interval_s < poll_interval_s:
            raise ConfigError("poll intervals must be > 0, max_poll_interval_s >= poll_interval_s")
        self.lm = lm
        self.store = store
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.poll_interval_s = poll_interval_s
        self.max_poll_interval_s = max_poll_interval_s

    def upper_bound(self, params: Mapping[str, Any]) -> tuple[int, float | None]:
        """The most one request can use in a batch: :meth:`LM.upper_bound` (tokens, USD), the
        USD at the batch price. A dry-run plan shows it beside the online bound."""
        tokens, usd = self.lm.upper_bound(dict(params))
        return tokens, None if usd is None else usd * BATCH_PRICE_FACTOR

    # -- blocking ---------------------------------------------------------------------------

    def run(
        self,
        job: str,
        requests: RequestSource,
        *,
        role: str = "sub",
        depth: int = 0,
        meter: Meter | None = None,
        deadline: float | None = None,
        on_progress: Callable[[BatchProgress], None] | None = None,
    ) -> list[BatchResult]:
        """:meth:`astream` run on the LM's event loop, its results collected in a list. On an
        error, the results given back before it are on ``error.partial``."""
        return self._collect(
            lambda: self.astream(
                job,
                requests,
                role=role,
                depth=depth,
                meter=meter,
                deadline=deadline,
                on_progress=on_progress,
            )
        )

    def resume(
        self,
        job: str,
        *,
        role: str = "sub",
        depth: int = 0,
        meter: Meter | None = None,
        deadline: float | None = None,
        on_progress: Callable[[BatchProgress], None] | None = None,
    ) -> list[BatchResult]:
        """:meth:`aresume` run on the LM's event loop, its results collected in a list. On an
        error, the results given back before it are on ``error.partial``."""
        return self._collect(
            lambda: self.aresume(
                job,
                role=role,
                depth=depth,
                meter=meter,
                deadline=deadline,
                on_progress=on_progress,
            )
        )

    def _collect(self, stream: Callable[[], AsyncIterator[BatchResult]]) -> list[BatchResult]:
        async def collect() -> list[BatchResult]:
            results: list[BatchResult] = []
            try:
                async for result in stream():
                    results.append(result)
            except RLMError as err:
                if err.partial is None:
                    err.partial = results
                raise
            return results

        return self.lm.run_async(collect)

    # -- streaming ---------------------------------------------------------------------------

    async def astream(
        self,
        job: str,
        requests: RequestSource,
        *,
        role: str = "sub",
        depth: int = 0,
        meter: Meter | None = None,
        deadline: float | None = None,
        on_progress: Callable[[BatchProgress], None] | None = None,
    ) -> AsyncIterator[BatchResult]:
        """Submit ``requests`` as message batches and yield one :class:`BatchResult` per
        custom_id, batch by batch as each ends (iterate on the LM's event loop, as
        ``acomplete`` is called).

        Requests are grouped by model (one model per batch) and split to fit ``max_requests``
        and ``max_bytes``; a request too big for any batch is yielded at once as a
        :class:`ModelBadRequest` (ask it online). Before anything is submitted, the whole
        run's upper bound at the batch price is reserved with ``meter`` (one reservation per
        request, so each counts as a sub-call): a run that cannot fit raises
        :class:`BudgetExceeded` and sends nothing. ``requests`` may be a function that gives
        the same requests each time it is called: they are then read twice (first to check,
        size, bound and assign each to a batch, keeping only those facts; then to submit each
        batch as soon as it is complete), so memory holds the batches being filled, not the
        whole run. An iterable is kept in a list instead. Each reservation is released once its
        result is recorded. Each batch is recorded in the store (``job``, its id, model, and
        each request's blob) right after the API made it, and finished once all its results
        were yielded.

        ``deadline`` (a ``time.monotonic()`` value, the run's wall limit) is never waited
        past: a batch still processing then is not canceled (a canceled batch still bills
        what it processed, and its results stay downloadable for 29 days) but left recorded,
        and :class:`BatchPending` (retryable) is raised after the results of the batches that
        had ended. A batch that has ended is always streamed to its end.

        Raises :class:`ConfigError` if a custom_id is malformed or repeated, if params lack
        ``model`` or ``max_tokens``, or if ``job`` still has recorded batches (call
        :meth:`aresume` first, so that nothing is paid twice)."""
        self._check_loop(role)
        source = requests if callable(requests) else _replayable(requests)
        plan = self._plan(source())
        if not plan.order:
            return
        recorded = self.store.open_batches(job)
        if recorded:
            ids = ", ".join(batch_id for batch_id, _ in recorded)
            raise ConfigError(
                f"Job {job!r} has {len(recorded)} unfinished message batch(es) recorded "
                f"({ids}). Resume them first (BatchRunner.resume/aresume), so their requests "
                "are not paid for twice."
            )
        meter = meter or _Unmetered(self.lm.accounting, self.lm.cache)
        started = time.monotonic()
        reservations = self._reserve(job, plan, meter, role, depth)
        opened: list[_Open] = []
        try:
            for custom_id, blob in plan.oversized:
                yield BatchResult(
                    custom_id,
                    "",
                    blob,
                    error=ModelBadRequest(
                        f"Request {custom_id} is larger than a message batch may be "
                        f"({self.max_bytes:,} bytes); send it as an online request."
                    ),
                )
            total = sum(plan.chunk_sizes)
            for model, chunk in self._chunks(source(), plan):
                if deadline is not None and time.monotonic() >= deadline:
                    if opened:
                        raise self._pending(job, opened)
                    raise BudgetExceeded(
                        f"max_wall_time_s reached before message batches for {job!r} could "
                        "be submitted. Raise max_wall_time_s on the asset.",
                        limit="max_wall_time_s",
                    )
                body = [{"custom_id": r.custom_id, "params": dict(r.params)} for r in chunk]
                create = self._client.messages.batches.create
                batch = await self._api(
                    "create", model, partial(create, requests=cast(Any, body)), deadline
                )
                try:
                    self.store.put_batch(job, batch.id, model, {r.custom_id: r.blob for r in chunk})
                except BaseException:
                    # Unrecorded, it could not be resumed: stop it to bill as little as can be.
                    await _quietly(self._client.messages.batches.cancel(batch.id))
                    raise
                held = {r.custom_id: reservations.pop(r.custom_id) for r in chunk}
                opened.append(_Open(batch.id, {r.custom_id: r.blob for r in chunk}, model, held))
                self._report(on_progress, opened[-1], batch, 0, total, len(opened), started)
                del chunk, body  # sent and recorded: not held while the next one is built
            async for result in self._drain(
                job, opened, total, role, depth, meter, deadline, on_progress, started
            ):
                yield result
        finally:
            # What was reserved for requests without a result yet (the run failed, or stopped
            # at its deadline): released, those not submitted are not spent.
            for reservation in reservations.values():
                reservation.release()
            for ob in opened:
                for reservation in ob.reservations.values():
                    reservation.release()
                ob.reservations.clear()

    async def aresume(
        self,
        job: str,
        *,
        role: str = "sub",
        depth: int = 0,
        meter: Meter | None = None,
        deadline: float | None = None,
        on_progress: Callable[[BatchProgress], None] | None = None,
    ) -> AsyncIterator[BatchResult]:
        """Yield the results of ``job``'s recorded, unfinished batches (submitted by an
        earlier, killed or timed-out run), waiting for them to end; nothing is submitted.
        Each :class:`BatchResult` carries the blob stored with its request; each batch is
        finished in the store once its results were yielded. A batch the API no longer knows
        (404: deleted, or made with a key of another workspace) yields a
        :class:`ModelNotFound` for each of its requests and is finished.

        Nothing is reserved (the batches were paid for when submitted); results are recorded
        with ``meter`` at the batch price, their model the one each message names. The
        ``deadline`` is honoured as in :meth:`astream`."""
        self._check_loop(role)
        recorded = self.store.open_batches(job)
        if not recorded:
            return
        meter = meter or _Unmetered(self.lm.accounting, self.lm.cache)
        opened = [_Open(batch_id, dict(blobs), None) for batch_id, blobs in recorded]
        total = sum(len(ob.blobs) for ob in opened)
        async for result in self._drain(
            job, opened, total, role, depth, meter, deadline, on_progress, time.monotonic()
        ):
            yield result

    # -- internals ----------------------------------------------------------------------------

    @property
    def _client(self) -> anthropic.AsyncAnthropic:
        client = self.lm._aclient
        assert client is not None, "iterate BatchRunner streams on the LM's loop (LM.run_async)"
        return client

    def _check_loop(self, role: str) -> None:
        if role not in ROLES:
            raise ConfigError(f"role must be one of {ROLES}, not {role!r}")
        assert self.lm._aclient is not None, "iterate BatchRunner streams through LM.run_async"

    def _plan(self, requests: Requests) -> _Plan:
        """The first pass over the requests: each is checked, sized and bounded, and assigned
        to a batch of its model within the limits (request order kept per model); only these
        facts are kept, not the requests."""
        plan = _Plan()
        seen: set[str] = set()
        open_chunk: dict[str, tuple[int, int]] = {}  # model -> (chunk index, its bytes)
        for raw in requests:
            item = BatchRequest(*raw)
            _check_request(item, seen)
            model = str(item.params["model"])
            item_bytes = _request_bytes(item)
            if _ENVELOPE_BYTES + item_bytes > self.max_bytes:
                plan.oversized.append((item.custom_id, item.blob))
                plan.order.append((item.custom_id, -1))
                continue
            index, size = open_chunk.get(model, (-1, 0))
            if index < 0 or (
                plan.chunk_sizes[index] >= self.max_requests or size + item_bytes > self.max_bytes
            ):
                index, size = len(plan.chunk_sizes), _ENVELOPE_BYTES
                plan.chunk_sizes.append(0)
                plan.chunk_models.append(model)
            plan.chunk_sizes[index] += 1
            open_chunk[model] = (index, size + item_bytes)
            plan.order.append((item.custom_id, index))
            tokens, usd = self.upper_bound(item.params)
            plan.bounds.append((model, item.custom_id, tokens, usd))
        return plan

    def _chunks(self, requests: Requests, plan: _Plan) -> Iterator[tuple[str, list[BatchRequest]]]:
        """The second pass: the requests again, each batch given as soon as its last request
        is read, so memory holds the batches being filled (one per model), not the run."""
        filling: dict[int, list[BatchRequest]] = {}
        position = 0
        for raw in requests:
            item = BatchRequest(*raw)
            if position >= len(plan.order) or plan.order[position][0] != item.custom_id:
                raise ConfigError(
                    "The batch requests changed between the two passes over them (request "
                    f"{position}: {item.custom_id!r}); a request source must give the same "
                    "requests each time it is called."
                )
            index = plan.order[position][1]
            position += 1
            if index < 0:
                continue  # too big for any batch: already answered
            chunk = filling.setdefault(index, [])
            chunk.append(item)
            if len(chunk) == plan.chunk_sizes[index]:
                del filling[index]
                yield plan.chunk_models[index], chunk
        if position != len(plan.order) or filling:
            raise ConfigError(
                f"The batch requests changed between the two passes over them ({position:,} "
                f"requests the second time, {len(plan.order):,} the first); a request source "
                "must give the same requests each time it is called."
            )

    def _reserve(
        self, job: str, plan: _Plan, meter: Meter, role: str, depth: int
    ) -> dict[str, Reservation]:
        """Reserve every request's upper bound at the batch price, all or nothing."""
        held: dict[str, Reservation] = {}
        try:
            for model, custom_id, tokens, usd in plan.bounds:
                held[custom_id] = meter.reserve(
                    role=role, depth=depth, model=model, tokens=tokens, usd=usd
                )
        except BudgetExceeded as err:
            for reservation in held.values():
                reservation.release()
            usd_total = sum(usd or 0.0 for *_, usd in plan.bounds)
            raise BudgetExceeded(
                f"Message batches for {job!r} were not submitted: their {len(plan.bounds):,} "
                f"requests can cost up to ${usd_total:.4f} at the batch price "
                f"({BATCH_PRICE_FACTOR:.0%} of standard), and the budget refused it: {err}",
                limit=err.limit,
            ) from err
        return held

    async def _drain(
        self,
        job: str,
        opened: list[_Open],
        total: int,
        role: str,
        depth: int,
        meter: Meter,
        deadline: float | None,
        on_progress: Callable[[BatchProgress], None] | None,
        started: float,
    ) -> AsyncIterator[BatchResult]:
        """Poll the open batches until each ends; stream each one's results as it does."""
        pending = list(opened)
        done = 0
        interval = self.poll_interval_s
        while pending:
            for ob in list(pending):
                model = ob.model or "message batch"
                try:
                    batch = await self._api(
                        "retrieve",
                        model,
                        partial(self._client.messages.batches.retrieve, ob.batch_id),
                        deadline,
                        lambda: self._pending(job, pending),
                    )
                except ModelNotFound as err:
                    for custom_id, blob in ob.blobs.items():
                        done += 1
                        yield self._lost(ob, custom_id, blob, err)
                    self.store.finish_batch(ob.batch_id)
                    pending.remove(ob)
                    continue
                ob.created = batch.created_at.timestamp()
                if batch.processing_status == "ended":
                    async for result in self._results(ob, role, depth, meter):
                        done += 1
                        yield result
                    self.store.finish_batch(ob.batch_id)
                    pending.remove(ob)
                self._report(on_progress, ob, batch, done, total, len(pending), started)
            if not pending:
                return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise self._pending(job, pending)
            wait = interval if deadline is None else min(interval, deadline - now)
            await asyncio.sleep(wait)
            interval = min(interval * 1.5, self.max_poll_interval_s)

    async def _results(
        self, ob: _Open, role: str, depth: int, meter: Meter
    ) -> AsyncIterator[BatchResult]:
        """Stream the results of an ended batch, once per custom_id: a download cut off is
        started again (the same retries as other calls), skipping what was already given."""
        model = ob.model or "message batch"
        seen: set[str] = set()
        attempt = 0
        while True:
            stream = await self._api(
                "results", model, partial(self._client.messages.batches.results, ob.batch_id)
            )
            try:
                async for line in stream:
                    if line.custom_id in seen:
                        continue
                    seen.add(line.custom_id)
                    yield self._result(ob, line, role, depth, meter)
                break
            except (anthropic.APIConnectionError, httpx2.HTTPError, json.JSONDecodeError) as err:
                if attempt >= self.lm.max_retries:
                    raise _unavailable(
                        err, model, self.lm.base_url, attempt, self.lm.request_timeout_s, False
                    ) from err
                attempt += 1
                await asyncio.sleep(min(8.0, 0.25 * 2**attempt) * random.uniform(1.0, 1.2))
            finally:
                await stream.close()
        for custom_id, blob in ob.blobs.items():
            if custom_id not in seen:  # the API promises one line per request
                yield BatchResult(
                    custom_id,
                    ob.batch_id,
                    blob,
                    error=ProviderServerError(
                        f"Message batch {ob.batch_id} ended without a result for request "
                        f"{custom_id}; ask it again."
                    ),
                )

    def _result(self, ob: _Open, line: Any, role: str, depth: int, meter: Meter) -> BatchResult:
        custom_id = line.custom_id
        blob = ob.blobs.get(custom_id, b"")
        outcome = line.result
        reservation = ob.reservations.pop(custom_id, None)
        try:
            if outcome.type == "succeeded":
                message = outcome.message
                model = ob.model or str(message.model)
                latency = max(0.0, time.time() - ob.created) if ob.created else 0.0
                # The LM reads the reply as for an online call; the record is re-priced here.
                online = self.lm._completion(role, model, message, latency, _Discard(), None, depth)
                fields = {
                    f.name: getattr(online.record, f.name) for f in dataclasses.fields(CallRecord)
                }
                fields["cost_usd"] = batch_cost_usd(self.lm.catalog, model, online.record.usage)
                record = BatchCallRecord(**fields, batch_id=ob.batch_id)
                meter.record(record)
                completion = dataclasses.replace(online, record=record)
                return BatchResult(custom_id, ob.batch_id, blob, completion=completion)
            where = f"Request {custom_id} of message batch {ob.batch_id}"
            error: ModelError
            if outcome.type == "errored":
                body = outcome.error.error
                etype, text = str(body.type), str(getattr(body, "message", "") or "")[:500]
                kind = _ERRORED.get(etype, ProviderServerError)
                fix = (
                    "Ask it again (online or in a new batch)."
                    if kind.retryable
                    else "Fix the request: asking the same again gets the same answer."
                )
                error = kind(f"{where} errored ({etype}: {text}); it was not billed. {fix}")
            elif outcome.type == "expired":
                error = BatchExpired(
                    f"{where} expired: the batch reached its 24-hour limit before the request "
                    "was processed (not billed). Ask it again online or in a new batch."
                )
            else:
                error = BatchCanceled(
                    f"{where} was {outcome.type} before it was processed (not billed). Ask it "
                    "again online or in a new batch."
                )
            return BatchResult(custom_id, ob.batch_id, blob, error=error)
        finally:
            if reservation is not None:
                reservation.release()

    def _lost(self, ob: _Open, custom_id: str, blob: bytes, err: ModelError) -> BatchResult:
        reservation = ob.reservations.pop(custom_id, None)
        if reservation is not None:
            reservation.release()
        return BatchResult(
            custom_id,
            ob.batch_id,
            blob,
            error=ModelNotFound(
                f"Message batch {ob.batch_id} is not found at {self.lm.base_url} (deleted, or "
                f"made with a key of another workspace), so request {custom_id} has no result: "
                f"ask it again. ({err})"
            ),
        )

    def _pending(self, job: str, pending: list[_Open]) -> BatchPending:
        ids = tuple(ob.batch_id for ob in pending)
        waiting = sum(len(ob.blobs) for ob in pending)
        return BatchPending(
            f"max_wall_time_s reached while {len(ids)} message batch(es) of {job!r} "
            f"({', '.join(ids)}; {waiting:,} requests) were still processing. They are not "
            "canceled and stay recorded: retrying the run resumes them and pays nothing twice. "
            "Retry later, or raise max_wall_time_s on the asset.",
            batch_ids=ids,
        )

    def _report(
        self,
        on_progress: Callable[[BatchProgress], None] | None,
        ob: _Open,
        batch: Any,
        done: int,
        total: int,
        batches_open: int,
        started: float,
    ) -> None:
        if on_progress is None:
            return
        on_progress(
            BatchProgress(
                batch_id=ob.batch_id,
                status=str(batch.processing_status),
                counts=batch.request_counts.model_dump(),
                batch_requests=len(ob.blobs),
                requests_done=done,
                requests_total=total,
                batches_open=batches_open,
                elapsed_s=time.monotonic() - started,
            )
        )

    async def _api(
        self,
        what: str,
        model: str,
        call: Callable[[], Awaitable[T]],
        deadline: float | None = None,
        past_deadline: Callable[[], RLMError] | None = None,
    ) -> T:
        """One call to a batch endpoint with the retries and error mapping of online calls
        (see :meth:`LM.acomplete`), its attempts cut to ``deadline`` if one is given (then
        ``past_deadline()`` is raised once it has passed)."""
        lm = self.lm
        attempt = 0
        while True:
            timeout = lm.request_timeout_s
            cut_short = False
            if deadline is not None and past_deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise past_deadline()
                if left < timeout:
                    timeout, cut_short = left, True
            try:
                return await asyncio.wait_for(call(), timeout)
            except (*_TRANSIENT, TimeoutError) as err:
                if isinstance(err, TimeoutError) and cut_short:
                    assert past_deadline is not None
                    raise past_deadline() from None
                retry_after = _retry_after(err) if isinstance(err, anthropic.APIError) else None
                retries = lm.max_retries
                if _connect_failure(err):
                    retries = min(retries, _CONNECT_RETRIES)
                delay = (
                    retry_after if retry_after is not None else min(8.0, 0.25 * 2 ** (attempt + 1))
                )
                delay *= random.uniform(1.0, 1.2)
                cut = deadline is not None and time.monotonic() + delay >= deadline
                if attempt >= retries or cut:
                    raise _unavailable(err, model, lm.base_url, attempt, timeout, cut) from err
                attempt += 1
                await asyncio.sleep(delay)
            except anthropic.NotFoundError as err:
                if what != "create":
                    raise _model_error(err, model, lm.base_url) from err
                # Params are checked only once the batch runs: a 404 here is the endpoint's.
                raise ModelNotFound(
                    f"{lm.base_url} has no Message Batches API (404 on POST "
                    f"/v1/messages/batches: {_message(err)}). Send these requests online."
                ) from err
            except anthropic.AnthropicError as err:
                raise _model_error(err, model, lm.base_url) from err


def _check_request(item: BatchRequest, seen: set[str]) -> None:
    """One request of a run: a valid custom_id not ``seen`` before (added), and params with
    a model and max_tokens."""
    if not isinstance(item.custom_id, str) or not CUSTOM_ID.match(item.custom_id):
        raise ConfigError(
            f"custom_id {item.custom_id!r} is not valid for a message batch: use 1-64 "
            "letters, digits, '_' or '-'."
        )
    if item.custom_id in seen:
        raise ConfigError(
            f"custom_id {item.custom_id!r} is used twice; each request of a batch run "
            "needs its own."
        )
    seen.add(item.custom_id)
    if not isinstance(item.params.get("model"), str) or "max_tokens" not in item.params:
        raise ConfigError(
            f"Request {item.custom_id}: params need 'model' and 'max_tokens' (build them "
            "with LM._request)."
        )


def _replayable(requests: Requests) -> Callable[[], Requests]:
    """A source that gives the same requests each time: ``requests`` kept in a list (a
    caller that wants memory not to grow with the run passes a callable instead)."""
    items = list(requests)
    return lambda: items


def _request_bytes(item: BatchRequest) -> int:
    """The request's size in the create body, over-estimated: ASCII-escaped JSON with spaces,
    never smaller than what the SDK sends, plus its separator."""
    entry = {"custom_id": item.custom_id, "params": item.params}
    return len(json.dumps(entry, default=str)) + 2


async def _quietly(call: Awaitable[Any]) -> None:
    try:
        await call
    except Exception:  # the caller is already failing; this is damage control
        return
