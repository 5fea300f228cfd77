"""Tests for ``LM`` (the Anthropic SDK wrapper), prices and the host-enforced ``Budget``.

Every model call goes to ``FakeAnthropic`` on the loopback interface; no real API is used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from rlm_dagster.engine.budget import Budget, Limits
from rlm_dagster.errors import BudgetExceeded, ConfigError, ModelError
from rlm_dagster.models import prices
from rlm_dagster.models.client import LM, Accounting, CallRecord, Usage, cached_system
from rlm_dagster.testing import FakeAnthropic, FakeReply, FakeRequest, Fault, ToolUse

HAIKU = "claude-haiku-4-5"
MESSAGES = [{"role": "user", "content": "Is ticket 7 urgent?"}]


@pytest.fixture()
def fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(
        root=["print(1)", "print(2)", "print(3)"], sub=lambda req: f"echo: {req.prompt}"
    ) as server:
        yield server


def make_lm(fake: FakeAnthropic, **kwargs: object) -> LM:
    options: dict[str, object] = {
        "api_key": "test-key",
        "root_model": "fake-root",
        "sub_model": HAIKU,
        "base_url": fake.base_url,
        "max_retries": 2,
    }
    options.update(kwargs)
    return LM(**options)  # type: ignore[arg-type]


@pytest.fixture()
def lm(fake: FakeAnthropic) -> Iterator[LM]:
    client = make_lm(fake)
    yield client
    client.close()


def sub_call(lm: LM, model: str = HAIKU, prompt: str = "Is ticket 7 urgent?") -> object:
    return lm.complete(
        role="sub", model=model, system="Be brief.", messages=[{"role": "user", "content": prompt}]
    )


# -- complete and accounting ---------------------------------------------------------------


def test_complete_returns_text_usage_and_cost(fake: FakeAnthropic, lm: LM) -> None:
    reply = lm.complete(role="sub", model=HAIKU, system="Be brief.", messages=MESSAGES)
    assert reply.text == "echo: Is ticket 7 urgent?"
    assert reply.stop_reason == "end_turn"
    record = reply.record
    assert record.role == "sub"
    assert record.model == HAIKU
    assert record.usage.input_tokens > 0
    assert record.usage.output_tokens > 0
    assert record.cost_usd is not None and record.cost_usd > 0
    assert record.cost_usd == prices.cost_usd(HAIKU, record.usage)
    assert lm.accounting.records == [record]
    assert lm.accounting.cost_usd == record.cost_usd
    assert lm.accounting.calls("sub") == 1
    assert lm.accounting.calls("root") == 0
    sent = fake.requests[-1]
    assert sent.body["system"] == "Be brief."
    assert sent.body["max_tokens"] == lm.sub_max_tokens
    # the key travels as a credential header (redacted by the fake), never in the body
    assert "[redacted]" in (sent.headers.get("x-api-key"), sent.headers.get("authorization"))
    assert "test-key" not in str(sent.body)


def test_root_calls_use_root_max_tokens_and_explicit_override(fake: FakeAnthropic, lm: LM) -> None:
    reply = lm.complete(role="root", model="fake-root", system="s", messages=MESSAGES)
    assert reply.text == "print(1)"
    assert fake.requests[-1].body["max_tokens"] == lm.root_max_tokens
    lm.complete(role="sub", model=HAIKU, system="s", messages=MESSAGES, max_tokens=7)
    assert fake.requests[-1].body["max_tokens"] == 7


def test_usage_from_the_server_is_priced_with_cache_tokens() -> None:
    usage = {
        "input_tokens": 1000,
        "output_tokens": 200,
        "cache_creation_input_tokens": 3000,
        "cache_read_input_tokens": 50_000,
    }
    with FakeAnthropic(sub=lambda req: FakeReply(text="ok", usage=usage)) as fake:
        lm = make_lm(fake)
        try:
            reply = lm.complete(
                role="sub", model=HAIKU, system=cached_system("fixed prefix"), messages=MESSAGES
            )
        finally:
            lm.close()
    assert reply.record.usage == Usage(1000, 200, 3000, 50_000)
    # haiku: $1/M input, $5/M output, cache write 1.25x input, cache read 0.1x input
    expected = (1000 * 1.0 + 200 * 5.0 + 3000 * 1.25 + 50_000 * 0.1) / 1_000_000
    assert reply.record.cost_usd == pytest.approx(expected)
    assert fake.requests[-1].body["system"][0]["cache_control"] == {"type": "ephemeral"}


def test_tool_use_input_is_returned(fake: FakeAnthropic) -> None:
    with FakeAnthropic(sub=lambda req: ToolUse(name="pick", input={"ids": [1, 2]})) as tools:
        lm = make_lm(tools)
        try:
            reply = lm.complete(
                role="sub",
                model=HAIKU,
                system="s",
                messages=MESSAGES,
                tools=[{"name": "pick", "input_schema": {"type": "object"}}],
                tool_choice={"type": "tool", "name": "pick"},
            )
        finally:
            lm.close()
    assert reply.tool_input("pick") == {"ids": [1, 2]}
    assert reply.tool_input("other") is None  # only the named tool is read
    assert reply.stop_reason == "tool_use"
    assert tools.requests[-1].body["tool_choice"] == {"type": "tool", "name": "pick"}


def test_unknown_model_has_unknown_cost(fake: FakeAnthropic, lm: LM) -> None:
    sub_call(lm, model="my-local-llama")
    sub_call(lm, model=HAIKU)
    records = lm.accounting.records
    assert records[0].cost_usd is None
    totals = lm.accounting.by_model()
    assert totals["my-local-llama"].cost_known is False
    assert totals["my-local-llama"].cost_usd == 0.0
    assert totals["my-local-llama"].calls == 1
    assert totals[HAIKU].cost_known is True
    assert totals[HAIKU].cost_usd == records[1].cost_usd
    assert lm.accounting.cost_usd == records[1].cost_usd  # known spend only


def test_invalid_role_is_refused_before_any_request(fake: FakeAnthropic, lm: LM) -> None:
    with pytest.raises(ConfigError, match="role must be one of"):
        lm.complete(role="boss", model=HAIKU, system="s", messages=MESSAGES)
    assert fake.count(include_faulted=True) == 0


def test_accounting_totals() -> None:
    acc = Accounting()
    acc.add(CallRecord("root", "m1", Usage(10, 5), 0.5, 0.1))
    acc.add(CallRecord("sub", "m1", Usage(1, 1, 2, 3), 0.25, 0.1))
    acc.add(CallRecord("sub", "m2", Usage(4, 4), None, 0.1))
    assert acc.calls() == 3
    assert acc.calls("sub") == 2
    assert acc.usage == Usage(15, 10, 2, 3)
    assert acc.usage.total_tokens == 30
    assert acc.cost_usd == 0.75
    by_model = acc.by_model()
    assert by_model["m1"].calls == 2
    assert by_model["m1"].cost_usd == 0.75
    assert by_model["m1"].usage == Usage(11, 6, 2, 3)
    assert by_model["m2"].cost_known is False


# -- prices --------------------------------------------------------------------------------


def test_price_for_dated_model_ids_matches_the_family() -> None:
    assert prices.price_for("claude-sonnet-4-5-20250929") == prices.PRICES["claude-sonnet-4-5"]
    assert prices.price_for("claude-haiku-4-5-20251001") == prices.PRICES["claude-haiku-4-5"]
    # the longest listed prefix wins: opus 4.5 is not priced like opus 4
    assert prices.price_for("claude-opus-4-5-20251101") == prices.Price(5.0, 25.0)
    assert prices.price_for("claude-opus-4-20250514") == prices.Price(15.0, 75.0)


def test_price_for_unknown_models_is_none() -> None:
    assert prices.price_for("llama3.1:8b") is None
    assert prices.price_for("claude-haiku") is None  # a prefix of a listed name is not a match
    assert prices.price_for("claude-haiku-4-50") is None  # no '-' boundary
    assert prices.cost_usd("llama3.1:8b", Usage(100, 100)) is None


def test_cost_usd_of_a_million_tokens() -> None:
    assert prices.cost_usd("claude-sonnet-4-5", Usage(1_000_000, 1_000_000)) == pytest.approx(18.0)
    assert prices.cost_usd("demo-root", Usage(5_000, 5_000)) == 0.0


def test_price_for_an_unlisted_model_version_is_unknown() -> None:
    assert prices.price_for("claude-opus-4-9") is None  # not listed: unknown, not opus-4's price
    assert prices.price_for("claude-fable-5-3") is None
    assert prices.price_for("claude-opus-4-20250514") == prices.PRICES["claude-opus-4"]


# -- retries and errors --------------------------------------------------------------------


def test_rate_limit_with_retry_after_is_retried(fake: FakeAnthropic, lm: LM) -> None:
    fake.inject(Fault(status=429, retry_after_s=0.01), times=2)
    reply = sub_call(lm)
    assert reply.text == "echo: Is ticket 7 urgent?"  # type: ignore[attr-defined]
    assert fake.count("sub", include_faulted=True) == 3
    assert fake.count("sub") == 1
    assert fake.pending_faults == 0
    assert lm.accounting.calls() == 1  # only the call that completed is accounted


def test_rate_limit_beyond_max_retries_is_a_retryable_model_error(fake: FakeAnthropic) -> None:
    lm = make_lm(fake, max_retries=1)
    try:
        fake.inject(Fault(status=429, retry_after_s=0.01), times=2)
        with pytest.raises(ModelError) as info:
            sub_call(lm)
    finally:
        lm.close()
    assert info.value.retryable is True
    assert "429" in str(info.value)
    assert fake.count(include_faulted=True) == 2
    assert lm.accounting.calls() == 0


def test_authentication_error_names_the_api_key(fake: FakeAnthropic, lm: LM) -> None:
    fake.inject(Fault(status=401), times=5)
    with pytest.raises(ModelError) as info:
        sub_call(lm)
    assert "ANTHROPIC_API_KEY" in str(info.value)
    assert "401" in str(info.value)
    assert info.value.retryable is False
    assert fake.count(include_faulted=True) == 1  # a 401 is not retried
    assert "test-key" not in str(info.value)


def test_persistent_overload_is_retryable(fake: FakeAnthropic, lm: LM) -> None:
    fake.inject(Fault(status=529, retry_after_s=0.01), times=10)
    with pytest.raises(ModelError) as info:
        sub_call(lm)
    assert info.value.retryable is True
    assert "529" in str(info.value)
    assert fake.count(include_faulted=True) == 3  # first try + max_retries=2


@pytest.mark.parametrize(("status", "needle"), [(400, "400"), (404, "404"), (403, "403")])
def test_client_errors_are_not_retryable(
    fake: FakeAnthropic, lm: LM, status: int, needle: str
) -> None:
    fake.inject(Fault(status=status), times=5)
    with pytest.raises(ModelError) as info:
        sub_call(lm)
    assert needle in str(info.value)
    assert info.value.retryable is False
    assert fake.count(include_faulted=True) == 1


def test_unreachable_endpoint_is_a_retryable_connection_error() -> None:
    with FakeAnthropic() as fake:
        base_url = fake.base_url
    lm = LM(api_key="k", root_model="r", sub_model=HAIKU, base_url=base_url, max_retries=0)
    try:
        with pytest.raises(ModelError) as info:
            sub_call(lm)
    finally:
        lm.close()
    assert info.value.retryable is True
    assert base_url in str(info.value)


# -- async fan-out -------------------------------------------------------------------------


def test_acomplete_respects_max_concurrency() -> None:
    with FakeAnthropic(
        sub=lambda req: req.prompt.upper(), latency_s=0.15, max_concurrency=2
    ) as fake:
        lm = make_lm(fake, max_concurrency=2, max_retries=0)
        prompts = [f"item {i}" for i in range(6)]

        async def fan_out() -> list[str]:
            replies = await asyncio.gather(
                *(
                    lm.acomplete(
                        role="sub",
                        model=HAIKU,
                        system="s",
                        messages=[{"role": "user", "content": p}],
                    )
                    for p in prompts
                )
            )
            return [r.text for r in replies]

        try:
            texts = lm.run_async(fan_out)
        finally:
            lm.close()
    assert texts == [p.upper() for p in prompts]  # order kept
    assert fake.count(include_faulted=True) == 6  # no 429 from the server's limit
    assert fake.peak_in_flight == 2
    assert lm.accounting.calls("sub") == 6


def test_acomplete_errors_propagate_through_run_async(fake: FakeAnthropic, lm: LM) -> None:
    fake.inject(Fault(status=401))

    async def one() -> object:
        return await lm.acomplete(role="sub", model=HAIKU, system="s", messages=MESSAGES)

    with pytest.raises(ModelError, match="ANTHROPIC_API_KEY"):
        lm.run_async(one)


# -- the meter: budgets are reservations ---------------------------------------------------


def metered(lm: LM, budget: Budget, role: str = "sub", model: str = HAIKU) -> object:
    return lm.complete(
        role=role,
        model=model,
        system="Be brief.",
        messages=[{"role": "user", "content": "Is ticket 7 urgent?"}],
        meter=budget,
    )


def test_a_meter_can_refuse_before_any_request(fake: FakeAnthropic, lm: LM) -> None:
    seen: list[str] = []

    class Refuse:
        def reserve(self, **call: object) -> object:
            seen.append(str(call["role"]))
            raise BudgetExceeded("no more calls", limit="test")

    with pytest.raises(BudgetExceeded, match="no more calls"):
        lm.complete(role="sub", model=HAIKU, system="s", messages=MESSAGES, meter=Refuse())

    async def one() -> object:
        return await lm.acomplete(
            role="where", model=HAIKU, system="s", messages=MESSAGES, meter=Refuse()
        )

    with pytest.raises(BudgetExceeded):
        lm.run_async(one)
    assert seen == ["sub", "where"]
    assert fake.count(include_faulted=True) == 0
    assert lm.accounting.calls() == 0


def test_reserve_sub_calls_refuses_over_budget_fan_out() -> None:
    budget = Budget(Limits(max_sub_calls=10), Accounting())
    budget.reserve_sub_calls(10)  # fits exactly
    for _ in range(4):
        budget.reserve(role="sub", depth=0, model="m", tokens=0, usd=0.0).release()
    budget.reserve_sub_calls(6)
    with pytest.raises(BudgetExceeded) as info:
        budget.reserve_sub_calls(7)
    message = str(info.value)
    assert "7 sub-calls requested" in message
    assert "only 6" in message
    assert "max_sub_calls=10" in message
    assert info.value.limit == "max_sub_calls"
    assert budget.sub_calls_started == 4  # refusing reserves nothing


def test_budget_counts_sub_calls_and_child_root_turns(fake: FakeAnthropic, lm: LM) -> None:
    budget = Budget(Limits(max_sub_calls=2), lm.accounting)
    metered(lm, budget)
    metered(lm, budget, role="root", model="fake-root")  # the root's own turn: not counted
    budget.reserve(role="root", depth=1, model="fake-root", tokens=0, usd=0.0).release()
    assert budget.sub_calls_started == 2  # a child run's root turn counts
    with pytest.raises(BudgetExceeded) as info:
        metered(lm, budget)
    assert info.value.limit == "max_sub_calls"
    assert "max_sub_calls=2" in str(info.value)
    assert fake.count("sub", include_faulted=True) == 1
    # the root can still answer with what it has
    metered(lm, budget, role="root", model="fake-root")
    assert fake.count("root") == 2


def test_a_call_is_refused_when_its_upper_bound_would_pass_the_cost_limit(
    fake: FakeAnthropic, lm: LM
) -> None:
    request = lm._request("sub", HAIKU, "Be brief.", MESSAGES, None, None, None)
    _, bound = lm.upper_bound(request)
    assert bound is not None and bound > 0
    budget = Budget(Limits(max_cost_usd=bound * 1.001), lm.accounting)
    metered(lm, budget)  # reserves the bound, pays far less
    spent = lm.accounting.cost_usd
    assert 0.001 * bound < spent < bound
    # what is left is less than one more bound: refused before it is sent, though it would
    # probably have fitted (a limit is a reservation, not a hope)
    with pytest.raises(BudgetExceeded, match="can cost up to") as info:
        metered(lm, budget)
    assert info.value.limit == "max_cost_usd"
    assert fake.count(include_faulted=True) == 1


def test_concurrent_calls_cannot_overspend_together(fake: FakeAnthropic, lm: LM) -> None:
    """Reservations are held while calls are in flight: ten concurrent calls under a budget
    of three upper bounds send three, whatever their real cost."""
    request = lm._request("sub", HAIKU, "Be brief.", MESSAGES, None, None, None)
    _, bound = lm.upper_bound(request)
    assert bound is not None
    budget = Budget(Limits(max_cost_usd=bound * 3.01), lm.accounting)
    fake.latency_s = 0.2

    async def one() -> object:
        return await lm.acomplete(
            role="sub", model=HAIKU, system="Be brief.", messages=MESSAGES, meter=budget
        )

    async def many() -> list[object]:
        return await asyncio.gather(*(one() for _ in range(10)), return_exceptions=True)

    results = lm.run_async(many)
    refused = [r for r in results if isinstance(r, BudgetExceeded)]
    assert len(refused) == 7 and fake.count("sub") == 3
    assert lm.accounting.cost_usd <= bound * 3.01


def test_budget_token_limit_reserves_prompt_and_max_tokens() -> None:
    acc = Accounting()
    budget = Budget(Limits(max_tokens=1_000), acc)
    budget.reserve(role="sub", depth=0, model="m", tokens=600, usd=None).release()
    held = budget.reserve(role="sub", depth=0, model="m", tokens=600, usd=None)
    with pytest.raises(BudgetExceeded) as info:
        budget.reserve(role="root", depth=0, model="m", tokens=500, usd=None)
    assert info.value.limit == "max_tokens" and "600 are used or reserved" in str(info.value)
    held.release()
    acc.add(CallRecord("sub", "m", Usage(60, 40), None, 0.0))
    budget.reserve(role="root", depth=0, model="m", tokens=900, usd=None).release()


def test_budget_wall_time_limit() -> None:
    budget = Budget(Limits(max_wall_time_s=0), Accounting())
    with pytest.raises(BudgetExceeded) as info:
        budget.check()
    assert info.value.limit == "max_wall_time_s"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"max_sub_calls": -1}, "max_sub_calls"), ({"max_iterations": 0}, "max_iterations")],
)
def test_limits_validate(kwargs: dict[str, int], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        Limits(**kwargs)  # type: ignore[arg-type]


def test_identical_prompts_in_one_llm_query_batched_are_sent_once(
    fake: FakeAnthropic, lm: LM
) -> None:
    """1,000 prompts, 10 distinct: 10 requests, each reply given to every copy, order kept,
    and 10 sub-calls counted."""
    from rlm_dagster import Limits, Warehouse
    from rlm_dagster.engine.budget import Budget
    from rlm_dagster.semantic import Semantic

    budget = Budget(Limits(), lm.accounting)
    sem = Semantic(lm, Warehouse.from_frames({}), budget)
    prompts = [f"question {i % 10}" for i in range(1_000)]
    before = fake.count("sub")
    replies = sem.query_batched(prompts)
    assert fake.count("sub") - before == 10
    assert len(replies) == 1_000
    assert len(set(replies)) == 10
    assert all(replies[i] == replies[i % 10] for i in range(1_000))
    assert budget.sub_calls_started == 10


def test_a_failing_prompt_stops_llm_query_batched_from_starting_the_rest() -> None:
    """The breaker: 200 prompts at concurrency 2, the first one fails for good; the prompts
    in flight finish, no new one starts, and the provider error ends the call."""
    from rlm_dagster import Limits, ProviderServerError, Warehouse
    from rlm_dagster.semantic import Semantic

    def sub(req: FakeRequest) -> object:
        return Fault(status=500) if req.prompt == "prompt 0" else "fine"

    with FakeAnthropic(sub=sub, latency_s=0.02) as server:
        lm = make_lm(server, max_concurrency=2, max_retries=0)
        sem = Semantic(lm, Warehouse.from_frames({}), Budget(Limits(), lm.accounting))
        with pytest.raises(ProviderServerError):
            sem.query_batched([f"prompt {i}" for i in range(200)])
        assert server.count("sub", include_faulted=True) < 10
        lm.close()


def test_every_client_of_the_process_shares_one_verifying_tls_context(fake: FakeAnthropic) -> None:
    """Building a TLS context loads the CA bundle (35-70 ms of CPU): the process builds one,
    verifying certificates and host names, and each new LM's client uses it (reached through
    httpx2's transport, which has no public accessor)."""
    import ssl

    from rlm_dagster.models.client import _ssl_context

    context = _ssl_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] > 0  # the CA bundle is loaded
    for _ in range(2):
        lm = LM(api_key="k", base_url=fake.base_url, root_model="r", sub_model="s")
        try:
            lm.complete(
                role="sub", model="s", system="s", messages=[{"role": "user", "content": "hi"}]
            )
            assert lm._aclient is not None
            assert lm._aclient._client._transport._pool._ssl_context is context  # type: ignore[attr-defined]
        finally:
            lm.close()
