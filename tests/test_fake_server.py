"""FakeAnthropic, exercised through the real ``anthropic`` SDK over loopback HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import doctest
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

import rlm_dagster.testing.fake_server as fake_server_module
from rlm_dagster.testing import (
    DEFAULT_THINKING_TOKENS,
    MODEL_RULES,
    REFUSE,
    FakeAnthropic,
    FakeReply,
    FakeRequest,
    Fault,
    HandlerResult,
    RootEntry,
    ToolUse,
    rules_for,
)

API_KEY = "sk-ant-test-SECRET-1234567890"


@pytest.fixture
def fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(root=["one", "two"], where=lambda p, row: "cancel" in row["body"]) as f:
        yield f


def client_for(fake: FakeAnthropic, max_retries: int = 2) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=API_KEY, base_url=fake.base_url, max_retries=max_retries)


def ask(client: anthropic.Anthropic, text: Any = "hi", model: str = "fake-root", **kw: Any) -> Any:
    return client.messages.create(
        model=model,
        max_tokens=256,
        messages=[{"role": "user", "content": text}],
        **kw,
    )


def where_call(client: anthropic.Anthropic, predicate: str, rows: list[str]) -> Any:
    return client.messages.create(
        model="claude-haiku-4-5",
        max_tokens=1024,
        system=[
            {"type": "text", "text": "You judge rows."},
            {
                "type": "text",
                "text": f"<predicate>{predicate}</predicate>",
                "cache_control": {"type": "ephemeral"},
            },
        ],
        tools=[
            {
                "name": "record_verdicts",
                "description": "Record one verdict per row.",
                "input_schema": {"type": "object", "properties": {"verdicts": {"type": "array"}}},
            }
        ],
        tool_choice={"type": "tool", "name": "record_verdicts"},
        messages=[{"role": "user", "content": "Rows:\n" + "\n".join(rows)}],
    )


# --------------------------------------------------------------------------- routing


def test_root_script_in_order_then_exhausted(fake: FakeAnthropic) -> None:
    with client_for(fake) as client:
        assert ask(client).content[0].text == "one"
        second = ask(client)
        assert second.content[0].text == "two"
        assert second.stop_reason == "end_turn"
        with pytest.raises(anthropic.BadRequestError, match="fake root script exhausted after 2"):
            ask(client)
    assert fake.count("root") == 2
    assert fake.count("root", include_faulted=True) == 3  # a 400 is not retried
    assert fake.script_position == 2


def test_root_script_callable_entries_and_single_callable() -> None:
    seen: list[FakeRequest] = []

    def entry(req: FakeRequest) -> str:
        seen.append(req)
        return f"echo {req.prompt}"

    script: list[RootEntry] = [entry, FakeReply(text="x", stop_reason="max_tokens")]
    with FakeAnthropic(root=script) as fake, client_for(fake) as client:
        assert ask(client, "ping").content[0].text == "echo ping"
        assert ask(client).stop_reason == "max_tokens"
    assert seen[0].kind == "root" and seen[0].index == 0

    with (
        FakeAnthropic(root=lambda req: f"turn {req.index}", root_model="r") as fake,
        client_for(fake) as client,
    ):
        texts = [ask(client, model="r").content[0].text for _ in range(3)]
    assert texts == ["turn 0", "turn 1", "turn 2"]


def test_sub_callable_sees_prompt_and_content_blocks() -> None:
    prompts: list[str] = []

    def sub(req: FakeRequest) -> str:
        prompts.append(req.prompt)
        return "yes" if "urgent" in req.prompt else "no"

    with FakeAnthropic(root=[], sub=sub) as fake, client_for(fake) as client:
        blocks = [
            {"type": "text", "text": "Context.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Is this urgent?"},
        ]
        assert ask(client, blocks, model="claude-haiku-4-5").content[0].text == "yes"
        assert ask(client, "calm", model="claude-haiku-4-5").content[0].text == "no"
    assert prompts == ["Context.\nIs this urgent?", "calm"]
    assert [r.kind for r in fake.requests] == ["sub", "sub"]


def test_default_sub_answer_and_tool_use_reply() -> None:
    replies: Iterator[HandlerResult] = iter([ToolUse(name="lookup", input={"q": 1}), "plain"])
    with FakeAnthropic(root=[lambda req: next(replies)] * 2) as fake, client_for(fake) as client:
        assert ask(client, model="other").content[0].text == "fake sub-model answer"
        msg = ask(client)
        assert msg.stop_reason == "tool_use"
        assert msg.content[0].type == "tool_use"
        assert msg.content[0].name == "lookup" and msg.content[0].input == {"q": 1}


def test_where_round_trip(fake: FakeAnthropic) -> None:
    rows = [
        '<row id="3">{"body": "please cancel my order"}</row>',
        '<row id="7">{"body": "where is my parcel"}</row>',
        '<row id="9">not json</row>',
    ]
    with (
        FakeAnthropic(
            where=lambda predicate, row: ("cancel" in row.get("body", ""), f"judged: {predicate}")
        ) as fake,
        client_for(fake) as client,
    ):
        msg = where_call(client, "mentions cancellation", rows)
    assert msg.stop_reason == "tool_use"
    block = msg.content[0]
    assert block.type == "tool_use" and block.name == "record_verdicts"
    assert block.id.startswith("toolu_")
    assert block.input == {
        "verdicts": [
            {"id": 3, "match": True, "reason": "judged: mentions cancellation"},
            {"id": 7, "match": False, "reason": "judged: mentions cancellation"},
            {"id": 9, "match": False, "reason": "judged: mentions cancellation"},
        ]
    }
    (req,) = fake.requests
    assert req.kind == "where"
    assert req.predicate == "mentions cancellation"
    assert req.rows == [
        (3, {"body": "please cancel my order"}),
        (7, {"body": "where is my parcel"}),
        (9, {"_raw": "not json"}),
    ]
    assert "You judge rows." in req.system


def test_where_plain_bool_judge_gives_empty_reason(fake: FakeAnthropic) -> None:
    with client_for(fake) as client:
        msg = where_call(client, "p", ['<row id="1">{"body": "cancel"}</row>'])
    assert msg.content[0].input == {"verdicts": [{"id": 1, "match": True, "reason": ""}]}


def test_where_without_judge_is_a_clear_400() -> None:
    with (
        FakeAnthropic() as fake,
        client_for(fake) as client,
        pytest.raises(anthropic.BadRequestError, match="where="),
    ):
        where_call(client, "p", ['<row id="1">{}</row>'])


def test_where_reply_override_sends_malformed_verdicts() -> None:
    def malformed(req: FakeRequest) -> ToolUse:
        assert req.rows is not None
        first_id = req.rows[0][0]
        return ToolUse(
            "record_verdicts",
            {"verdicts": [{"id": first_id, "match": True}, {"id": first_id, "match": "maybe"}]},
        )

    with FakeAnthropic(where_reply=malformed) as fake, client_for(fake) as client:
        msg = where_call(client, "p", ['<row id="5">{}</row>', '<row id="6">{}</row>'])
    assert msg.content[0].input["verdicts"] == [
        {"id": 5, "match": True},
        {"id": 5, "match": "maybe"},
    ]


def test_raw_dict_reply_is_sent_verbatim() -> None:
    raw = {"type": "message", "content": "not a list", "weird": True}
    with FakeAnthropic(handler=lambda req: raw) as fake, client_for(fake) as client:
        response = client.messages.with_raw_response.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
        assert response.http_response.json() == raw


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(429, "rate_limit_error"), (529, "overloaded_error"), (500, "api_error")],
)
def test_injected_fault_is_retried_after_retry_after(
    fake: FakeAnthropic, status: int, error_type: str
) -> None:
    fake.inject(Fault(status=status, retry_after_s=0.05), times=2)
    started = time.monotonic()
    with client_for(fake, max_retries=2) as client:
        assert ask(client).content[0].text == "one"  # faulted requests consume no script entry
    elapsed = time.monotonic() - started
    assert 0.1 <= elapsed < 0.9  # two retry-after waits of 0.05 s, not the SDK's >= 1.1 s backoff
    assert fake.count("root") == 1
    assert fake.count("root", include_faulted=True) == 3
    faulted = [r for r in fake.requests if r.faulted]
    assert [r.status for r in faulted] == [status, status]
    assert faulted[0].fault is not None and faulted[0].fault.error_type == error_type
    retry_counts = [r.headers.get("x-stainless-retry-count") for r in fake.requests]
    assert retry_counts == ["0", "1", "2"]


def test_fault_error_body_and_exception_type(fake: FakeAnthropic) -> None:
    fake.inject(Fault(status=529, message="busy right now"))
    with client_for(fake, max_retries=0) as client, pytest.raises(anthropic.APIStatusError) as info:
        ask(client)
    assert info.value.status_code == 529
    assert info.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "busy right now"},
    }


def test_401_is_not_retried(fake: FakeAnthropic) -> None:
    fake.inject(Fault(status=401), times=3)
    with client_for(fake, max_retries=3) as client, pytest.raises(anthropic.AuthenticationError):
        ask(client)
    assert fake.count(include_faulted=True) == 1
    assert fake.pending_faults == 2


def test_inject_kind_filter_and_reset(fake: FakeAnthropic) -> None:
    fake.inject(Fault(status=400, message="bad where"), kind="where")
    with client_for(fake, max_retries=0) as client:
        assert ask(client).content[0].text == "one"  # root request untouched
        with pytest.raises(anthropic.BadRequestError, match="bad where"):
            where_call(client, "p", ['<row id="1">{"body": ""}</row>'])
        assert fake.count("where", include_faulted=True) == 1
        assert fake.count("where") == 0
        fake.inject(Fault(status=500), times=5)
        fake.reset()
        assert fake.requests == [] and fake.pending_faults == 0
        assert ask(client).content[0].text == "two"  # the script keeps its place
        assert fake.requests[0].index == 0


def test_slow_reply_then_normal_answer(fake: FakeAnthropic) -> None:
    fake.inject(Fault(delay_s=0.3))
    with client_for(fake) as client:
        started = time.monotonic()
        assert ask(client).content[0].text == "one"
        assert time.monotonic() - started >= 0.3
    (req,) = fake.requests
    assert req.status == 200 and not req.faulted and req.fault == Fault(delay_s=0.3)


def test_latency_per_request() -> None:
    with FakeAnthropic(root=["x"], latency_s=0.2) as fake, client_for(fake) as client:
        started = time.monotonic()
        ask(client)
        assert time.monotonic() - started >= 0.2


def test_latency_counts_the_fakes_own_work_inside_it() -> None:
    """The modelled latency runs from the request's arrival: a handler that works for a second
    under a one-second latency answers after about one second, not two (a burst on a busy
    machine is answered on time, as a provider with that latency would)."""

    def slow(request: FakeRequest) -> str:
        time.sleep(1.0)
        return "done"

    with FakeAnthropic(sub=slow, latency_s=1.0) as fake, client_for(fake) as client:
        started = time.monotonic()
        client.messages.create(
            model="sub", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )
        took = time.monotonic() - started
    assert 1.0 <= took < 1.9


def test_max_concurrency_rejects_excess_requests() -> None:
    async def run(fake: FakeAnthropic) -> list[Any]:
        async with anthropic.AsyncAnthropic(
            api_key=API_KEY, base_url=fake.base_url, max_retries=0
        ) as client:
            calls = [
                client.messages.create(
                    model="sub", max_tokens=10, messages=[{"role": "user", "content": str(i)}]
                )
                for i in range(8)
            ]
            return await asyncio.gather(*calls, return_exceptions=True)

    with FakeAnthropic(max_concurrency=2, latency_s=0.3, rate_limit_retry_after_s=0.05) as fake:
        results = asyncio.run(run(fake))
    limited = [r for r in results if isinstance(r, anthropic.RateLimitError)]
    answered = [r for r in results if isinstance(r, anthropic.types.Message)]
    assert len(limited) + len(answered) == 8
    assert fake.peak_in_flight == 2
    assert len(answered) >= 2 and len(limited) >= 4  # all 8 are sent at once; 2 get through
    assert limited[0].response.headers["retry-after"] == "0.05"
    assert limited[0].response.headers["retry-after-ms"] == "50.0"
    assert fake.count("sub") == len(answered)
    assert fake.count("sub", include_faulted=True) == 8


def test_max_concurrency_with_sdk_retries_eventually_succeeds() -> None:
    async def run(fake: FakeAnthropic) -> list[Any]:
        async with anthropic.AsyncAnthropic(
            api_key=API_KEY, base_url=fake.base_url, max_retries=10
        ) as client:
            calls = [
                client.messages.create(
                    model="sub", max_tokens=10, messages=[{"role": "user", "content": str(i)}]
                )
                for i in range(4)
            ]
            return await asyncio.gather(*calls)

    with FakeAnthropic(max_concurrency=2, latency_s=0.05, rate_limit_retry_after_s=0.02) as fake:
        results = asyncio.run(run(fake))
    assert all(r.content[0].text == "fake sub-model answer" for r in results)
    assert fake.count("sub") == 4
    assert fake.peak_in_flight <= 2 and fake.in_flight == 0


def test_random_faults_are_deterministic_with_seed() -> None:
    def pattern(seed: int) -> list[int | None]:
        with FakeAnthropic(fault_rate=0.5, seed=seed) as fake, client_for(fake, 0) as client:
            for _ in range(12):
                with contextlib.suppress(anthropic.APIStatusError):
                    ask(client, model="sub")
            return [r.status for r in fake.requests]

    first = pattern(7)
    assert first == pattern(7)
    assert set(first) - {200} <= {429, 529, 500}
    assert 200 in first and len(set(first)) > 1


def test_handler_overrides_everything_and_can_return_faults() -> None:
    def handler(req: FakeRequest) -> Any:
        if req.prompt == "fail":
            return Fault(status=400, message="handler says no")
        return f"{req.kind}:{req.prompt}"

    with FakeAnthropic(root=[], handler=handler) as fake, client_for(fake) as client:
        assert ask(client, "a").content[0].text == "root:a"
        assert ask(client, "b", model="x").content[0].text == "sub:b"
        with pytest.raises(anthropic.BadRequestError, match="handler says no"):
            ask(client, "fail")
    assert fake.requests[-1].faulted and fake.requests[-1].fault is not None


def test_user_callable_errors_become_clear_400s() -> None:
    def broken(req: FakeRequest) -> str:
        raise KeyError("body")

    with FakeAnthropic(sub=broken) as fake, client_for(fake) as client:
        with pytest.raises(anthropic.BadRequestError, match="fake sub raised KeyError"):
            ask(client, model="x")
        with pytest.raises(anthropic.BadRequestError, match="no root= script"):
            ask(client)
    assert isinstance(fake.errors[0], KeyError)


# --------------------------------------------------------------------------- recording


def test_headers_are_recorded_with_credentials_redacted(fake: FakeAnthropic) -> None:
    with client_for(fake) as client:
        ask(client)
    with anthropic.Anthropic(
        api_key=API_KEY, base_url=fake.base_url, default_headers={"X-Api-Key": API_KEY}
    ) as client:
        ask(client)
    first, second = fake.requests
    assert first.headers["authorization"] == "[redacted]"  # SDK 2.x sends "Bearer <api_key>"
    assert second.headers["x-api-key"] == "[redacted]"
    req = first
    assert req.headers["content-type"] == "application/json"
    assert "anthropic-version" in req.headers
    assert API_KEY not in repr(fake.requests)


def test_usage_is_present_and_overridable() -> None:
    with (
        FakeAnthropic(
            root=["a fairly long answer " * 10, FakeReply(text="t", usage={"output_tokens": 999})]
        ) as fake,
        client_for(fake) as client,
    ):
        first = ask(client, "question " * 40, system="sys")
        second = ask(client)
    assert first.id.startswith("msg_fake_") and first.model == "fake-root"
    assert first.usage.input_tokens > 80  # ~ len(json of system+messages) / 4
    assert first.usage.output_tokens == 53  # ceil(210 / 4)
    assert first.usage.cache_creation_input_tokens == 0
    assert first.usage.cache_read_input_tokens == 0
    assert second.usage.output_tokens == 999
    assert second.usage.input_tokens > 0


def test_system_as_list_of_blocks_with_cache_control() -> None:
    with FakeAnthropic(root=["ok"]) as fake, client_for(fake) as client:
        msg = ask(
            client,
            system=[
                {"type": "text", "text": "You are root.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Tables: tickets."},
            ],
        )
    assert msg.content[0].text == "ok"
    assert fake.requests[0].system == "You are root.\nTables: tickets."


# --------------------------------------------------------------------------- server


def test_health_404_and_lifecycle() -> None:
    fake = FakeAnthropic()
    with pytest.raises(RuntimeError, match="not running"):
        _ = fake.base_url
    fake.start()
    fake.start()  # idempotent
    try:
        with urllib.request.urlopen(f"{fake.base_url}/health", timeout=5) as resp:
            assert resp.status == 200 and resp.read() == b"ok"
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{fake.base_url}/v2/nothing", timeout=5)
        assert info.value.code == 404
        assert json.loads(info.value.read())["error"]["type"] == "not_found_error"
        with client_for(fake) as client:  # trailing slash and query string are accepted
            raw: Any = client.post(
                "/v1/messages/?beta=true",
                body={
                    "model": "x",
                    "max_tokens": 5,
                    "messages": [{"role": "user", "content": "q"}],
                },
                cast_to=anthropic.types.Message,
            )
            assert raw.content[0].text == "fake sub-model answer"
    finally:
        fake.stop()
        fake.stop()  # idempotent
    assert not fake.running


def test_stop_with_idle_keepalive_connection_is_fast() -> None:
    fake = FakeAnthropic(root=["x"]).start()
    client = client_for(fake)
    ask(client)  # leaves a pooled keep-alive connection open
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 1.0
    client.close()


def test_constructor_validation() -> None:
    with pytest.raises(TypeError, match="wrap it"):
        FakeAnthropic(root="FINAL('x')")
    with pytest.raises(ValueError, match="fault_rate"):
        FakeAnthropic(fault_rate=2)
    with pytest.raises(ValueError, match="needs a status"):
        Fault()
    with pytest.raises(ValueError, match="400-599"):
        Fault(status=200)
    with pytest.raises(ValueError, match="kind"):
        FakeAnthropic().count("nope")  # type: ignore[arg-type]


def test_module_docstring_example_runs() -> None:
    result = doctest.testmod(fake_server_module)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------- strict mode


TOOLS = [
    {
        "name": "lookup",
        "description": "Look something up.",
        "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
    }
]
USER = [{"role": "user", "content": "hi"}]
PREFILL = [*USER, {"role": "assistant", "content": "The answer is"}]
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
    "additionalProperties": False,
}
FORMAT = {"format": {"type": "json_schema", "schema": SCHEMA}}
FORCED_ANY: dict[str, Any] = {"tools": TOOLS, "tool_choice": {"type": "any"}}
FORCED_TOOL: dict[str, Any] = {"tools": TOOLS, "tool_choice": {"type": "tool", "name": "lookup"}}
AUTO_TOOL: dict[str, Any] = {"tools": TOOLS, "tool_choice": {"type": "auto"}}
THINK_OFF: dict[str, Any] = {"thinking": {"type": "disabled"}}
BUDGET: dict[str, Any] = {"thinking": {"type": "enabled", "budget_tokens": 2000}}


def create(client: anthropic.Anthropic, model: str, **kw: Any) -> Any:
    kw.setdefault("max_tokens", 4000)
    kw.setdefault("messages", USER)
    return client.messages.create(model=model, timeout=30, **kw)


# (model, request shape, a fragment of the 400's message)
REJECTED: list[tuple[str, dict[str, Any], str]] = [
    # Claude Sonnet 5.5
    ("claude-sonnet-5-5", FORCED_ANY, "forced tool use"),
    ("claude-sonnet-5-5", {**FORCED_TOOL, **THINK_OFF}, "forced tool use"),
    ("claude-sonnet-5-5", {"extra_body": {"temperature": 0.5}}, "temperature"),
    ("claude-sonnet-5-5", {"extra_body": {"top_p": 0.9}}, "top_p"),
    ("claude-sonnet-5-5", {"extra_body": {"top_k": 40}}, "top_k"),
    ("claude-sonnet-5-5", {"messages": PREFILL}, "prefill"),
    ("claude-sonnet-5-5", BUDGET, "thinking.type.enabled"),
    ("claude-sonnet-5-5", THINK_OFF, "between_tools"),
    (
        "claude-sonnet-5-5",
        {"thinking": {"type": "between_tools"}, "output_config": {"effort": "xhigh"}},
        "effort low, medium or high",
    ),
    ("claude-sonnet-5-5", {"max_tokens": 128_001}, "128000"),
    # Claude Opus 5.5: thinking cannot be turned off at all
    ("claude-opus-5-5", FORCED_TOOL, "forced tool use"),
    ("claude-opus-5-5", THINK_OFF, "thinking.type.disabled"),
    ("claude-opus-5-5", {"thinking": {"type": "between_tools"}}, "between_tools"),
    ("claude-opus-5-5", BUDGET, "thinking.type.enabled"),
    ("claude-opus-5-5", {"messages": PREFILL}, "prefill"),
    ("claude-opus-5-5", {"extra_body": {"temperature": 0.2}}, "temperature"),
    # Claude Fable 5.1 (and the same rules for Fable 5.2 / Mythos 5.1)
    ("claude-fable-5-1", FORCED_ANY, "forced tool use"),
    ("claude-fable-5-1", THINK_OFF, "thinking.type.disabled"),
    ("claude-fable-5-1", {"messages": PREFILL}, "prefill"),
    ("claude-fable-5-1", {"extra_body": {"temperature": 0}}, "temperature"),
    ("claude-mythos-5-1", FORCED_TOOL, "forced tool use"),
    ("claude-fable-5-2", THINK_OFF, "thinking.type.disabled"),
    ("claude-fable-5", FORCED_ANY, "Thinking may not be enabled"),
    # Claude Haiku 5.5: thinks by default, so forcing a tool needs thinking turned off
    ("claude-haiku-5-5", FORCED_TOOL, "Thinking may not be enabled"),
    ("claude-haiku-5-5", {**THINK_OFF, "output_config": {"effort": "xhigh"}}, "effort"),
    ("claude-haiku-5-5", {**THINK_OFF, "output_config": {"effort": "max"}}, "effort"),
    ("claude-haiku-5-5", BUDGET, "thinking.type.enabled"),
    ("claude-haiku-5-5", {"thinking": {"type": "between_tools"}}, "between_tools"),
    ("claude-haiku-5-5", {"messages": PREFILL, **THINK_OFF}, "prefill"),
    ("claude-haiku-5-5", {"extra_body": {"temperature": 0.5}}, "temperature"),
    # Claude Sonnet 5 and Opus 5
    ("claude-sonnet-5", {"extra_body": {"temperature": 0.5}}, "temperature"),
    ("claude-sonnet-5", BUDGET, "thinking.type.enabled"),
    ("claude-sonnet-5", {"messages": PREFILL}, "prefill"),
    ("claude-sonnet-5", FORCED_ANY, "Thinking may not be enabled"),
    ("claude-opus-5", {**THINK_OFF, "output_config": {"effort": "max"}}, "effort"),
    # Claude Haiku 4.5 / Sonnet 4.5: no effort, no adaptive thinking, temperature or top_p
    ("claude-haiku-4-5", {"output_config": {"effort": "low"}}, "effort parameter"),
    ("claude-haiku-4-5", {"thinking": {"type": "adaptive"}}, "thinking.type.adaptive"),
    ("claude-haiku-4-5", {"extra_body": {"temperature": 0.5, "top_p": 0.9}}, "cannot both"),
    ("claude-haiku-4-5", {"max_tokens": 64_001}, "64000"),
    ("claude-haiku-4-5", {**FORCED_TOOL, **BUDGET}, "Thinking may not be enabled"),
    ("claude-haiku-4-5", {**BUDGET, "extra_body": {"temperature": 0.5}}, "thinking is enabled"),
    ("claude-haiku-4-5", {**BUDGET, "messages": PREFILL}, "prefill"),
    ("claude-sonnet-4-5-20250929", {"output_config": {"effort": "high"}}, "effort parameter"),
    ("claude-sonnet-4-5", {"thinking": {"type": "adaptive"}}, "thinking.type.adaptive"),
    ("claude-sonnet-4-5", {"extra_body": {"temperature": 0.5, "top_p": 0.9}}, "cannot both"),
    # Claude Sonnet 4: no structured outputs
    ("claude-sonnet-4-20250514", {"output_config": FORMAT}, "structured outputs"),
]


@pytest.mark.parametrize(
    ("model", "shape", "fragment"),
    REJECTED,
    ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(REJECTED)],
)
def test_strict_mode_rejects_what_the_model_rejects(
    model: str, shape: dict[str, Any], fragment: str
) -> None:
    with FakeAnthropic(sub='{"answer": "ok"}') as fake, client_for(fake, max_retries=0) as client:
        with pytest.raises(anthropic.BadRequestError, match=fragment) as info:
            create(client, model, **shape)
        create(client, "fake-root-like-local-model", **shape)  # unknown: generic rules only
    assert info.value.status_code == 400
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "invalid_request_error"
    (message,) = fake.rejections
    assert fragment in message and message == info.value.body["error"]["message"]
    rejected, passed = fake.requests
    assert rejected.status == 400 and rejected.faulted and rejected.rejection == message
    assert rejected.family == rules_for(model).family  # type: ignore[union-attr]
    assert passed.status == 200 and passed.family is None and passed.rejection is None


# (model, request shape) the documentation says works
ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    ("claude-sonnet-5-5", {"output_config": {"effort": "medium"}}),
    ("claude-sonnet-5-5", {**AUTO_TOOL, "thinking": {"type": "between_tools"}}),
    ("claude-sonnet-5-5", {"thinking": {"type": "adaptive"}, "output_config": {"effort": "max"}}),
    ("claude-sonnet-5-5", {"extra_body": {"temperature": 1}, "max_tokens": 128_000}),
    ("claude-sonnet-5-5", {"output_config": {**FORMAT, "effort": "low"}}),
    ("claude-opus-5-5", {"thinking": {"type": "adaptive"}, "output_config": {"effort": "xhigh"}}),
    ("claude-opus-5-5", {**AUTO_TOOL, "tool_choice": {"type": "none"}}),
    ("claude-fable-5-1", {"output_config": {"effort": "max"}}),
    ("claude-mythos-5-2", AUTO_TOOL),
    ("claude-haiku-5-5", {**FORCED_TOOL, **THINK_OFF}),
    ("claude-haiku-5-5", {**THINK_OFF, "output_config": {"effort": "high"}}),
    ("claude-haiku-5-5", {"output_config": {**FORMAT, "effort": "max"}}),
    ("claude-sonnet-5", {**FORCED_ANY, **THINK_OFF}),
    ("claude-sonnet-5", {**THINK_OFF, "output_config": {"effort": "max"}}),
    ("claude-opus-5", {**FORCED_ANY, **THINK_OFF, "output_config": {"effort": "high"}}),
    ("claude-haiku-4-5", FORCED_TOOL),
    ("claude-haiku-4-5", {"messages": PREFILL, "extra_body": {"temperature": 0.2}}),
    ("claude-haiku-4-5", {**BUDGET, "extra_body": {"top_p": 0.95}}),
    ("claude-haiku-4-5-20251001", {"output_config": FORMAT, **THINK_OFF}),
    ("claude-sonnet-4-5-20250929", {**FORCED_ANY, "extra_body": {"top_p": 0.9}}),
    ("claude-sonnet-4-5", {"messages": PREFILL, "max_tokens": 64_000}),
    ("claude-sonnet-4", {**FORCED_TOOL, "extra_body": {"temperature": 0.3, "top_p": 0.8}}),
]


@pytest.mark.parametrize(
    ("model", "shape"), ACCEPTED, ids=[f"{m}-{i}" for i, (m, _) in enumerate(ACCEPTED)]
)
def test_strict_mode_accepts_the_documented_good_shapes(model: str, shape: dict[str, Any]) -> None:
    answer = (
        '{"answer": "ok"}'
        if "output_config" in shape and "format" in shape["output_config"]
        else "ok"
    )
    with FakeAnthropic(sub=answer) as fake, client_for(fake, max_retries=0) as client:
        msg = create(client, model, **shape)
    assert fake.rejections == []
    assert next(b for b in msg.content if b.type == "text").text == answer
    (req,) = fake.requests
    assert req.status == 200 and req.family == rules_for(model).family  # type: ignore[union-attr]


def test_generic_rules_apply_to_every_model() -> None:
    marked = {"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}
    open_schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {}}}}
    open_schema["additionalProperties"] = False  # the nested object is still open
    cases: list[tuple[dict[str, Any], str]] = [
        ({"extra_body": {"temprature": 0.5}}, "temprature: Extra inputs are not permitted"),
        (
            {"system": [marked] * 3, "messages": [{"role": "user", "content": [marked] * 2}]},
            "A maximum of 4 blocks with cache_control may be provided. Found 5.",
        ),
        (
            {"tool_choice": {"type": "auto"}},
            "tool_choice may only be specified while providing tools",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "tool", "name": "record_verdicts"}},
            "'record_verdicts' is not one of the provided tools",
        ),
        (
            {"output_config": {"format": {"type": "json_schema", "schema": open_schema}}},
            "'additionalProperties' must be explicitly set to false (at schema.properties.a)",
        ),
        ({"output_config": {"effort": "extreme"}}, "output_config.effort: Input should be one of"),
        ({"thinking": {"type": "enabled", "budget_tokens": 512}}, "greater than or equal to 1024"),
        ({"thinking": {"type": "enabled", "budget_tokens": 8000}}, "must be greater than"),
        ({"extra_body": {"temperature": 1.5}}, "temperature: Input should be a number"),
    ]
    with FakeAnthropic(sub="ok") as fake, client_for(fake, max_retries=0) as client:
        for shape, message in cases:
            for model in ("fake-root", "claude-haiku-4-5"):
                with pytest.raises(anthropic.BadRequestError) as info:
                    create(client, model, **shape)
                assert message in info.value.body["error"]["message"], (model, shape)
        # the automatic top-level breakpoint counts too
        with pytest.raises(anthropic.BadRequestError, match="Found 5"):
            create(client, "fake-root", system=[marked] * 4, cache_control={"type": "ephemeral"})
    assert len(fake.rejections) == 2 * len(cases) + 1
    assert fake.count(include_faulted=False) == 0


def test_unknown_models_get_only_the_generic_rules() -> None:
    shapes: list[dict[str, Any]] = [
        FORCED_ANY,
        {**FORCED_TOOL, **BUDGET},
        {"messages": PREFILL},
        {"extra_body": {"temperature": 0.1, "top_p": 0.5, "top_k": 5}},
        THINK_OFF,
        {"thinking": {"type": "between_tools"}, "output_config": {"effort": "max"}},
        {"output_config": {"effort": "xhigh"}},
        {"max_tokens": 500_000},
    ]
    with (
        FakeAnthropic(root=lambda req: "ok", sub="ok") as fake,
        client_for(fake, max_retries=0) as client,
    ):
        for model in ("fake-root", "demo-root", "claude-haiku-4-50", "claude-opus-4-1"):
            for shape in shapes:
                assert create(client, model, **shape).content[-1].text == "ok"
    assert fake.rejections == []
    assert {r.family for r in fake.requests} == {None}


def test_strict_false_keeps_the_old_permissive_behaviour() -> None:
    shapes: list[dict[str, Any]] = [
        FORCED_ANY,
        {"messages": PREFILL, "extra_body": {"temperature": 0.5, "mystery_field": True}},
        THINK_OFF,
        {"output_config": {"effort": "low", "format": {"type": "json_schema", "schema": {}}}},
        {"tool_choice": {"type": "auto"}},
        {"max_tokens": 500_000},
    ]
    with (
        FakeAnthropic(sub='{"ok": true}', strict=False) as fake,
        client_for(fake, max_retries=0) as client,
    ):
        for shape in shapes:
            create(client, "claude-sonnet-5-5", **shape)
        with pytest.raises(anthropic.BadRequestError, match="max_tokens: field required"):
            client.post(
                "/v1/messages",
                body={"model": "claude-sonnet-5-5", "messages": USER},
                cast_to=anthropic.types.Message,
            )
    assert fake.count() == len(shapes)
    assert fake.rejections == ["max_tokens: field required (an integer >= 1)"]


def test_rule_table_is_sourced_and_maps_dated_ids() -> None:
    assert rules_for("claude-sonnet-4-5-20250929") is MODEL_RULES["claude-sonnet-4-5"]
    assert rules_for("claude-haiku-4-5-20251001") is MODEL_RULES["claude-haiku-4-5"]
    assert rules_for("claude-mythos-5-2") is MODEL_RULES["claude-fable-5-1"]
    for unknown in ("fake-root", "claude-haiku-4-50", "claude-haiku-4-5-2025", "claude-opus-4-1"):
        assert rules_for(unknown) is None
    for family, rules in MODEL_RULES.items():
        assert rules.family == family
        assert rules.sources and all(u.startswith("https://") for u in rules.sources.values())
        assert rules.default_effort in (*rules.effort_levels, None)


# --------------------------------------------------------------------------- thinking


def test_thinking_blocks_come_first_and_are_billed_as_output() -> None:
    answer = "x" * 400  # 100 tokens
    with (
        FakeAnthropic(root=lambda req: answer, sub=answer) as fake,
        client_for(fake, max_retries=0) as client,
    ):
        default = create(client, "claude-sonnet-5-5")  # default effort high
        low = create(client, "claude-sonnet-5-5", output_config={"effort": "low"})
        opus = create(client, "claude-opus-5-5")  # default effort medium
        summarized = create(
            client, "claude-haiku-5-5", thinking={"type": "adaptive", "display": "summarized"}
        )
        off = create(client, "claude-haiku-5-5", **THINK_OFF)
        legacy = create(client, "claude-haiku-4-5")
        manual = create(
            client, "claude-haiku-4-5", thinking={"type": "enabled", "budget_tokens": 1500}
        )
        between = create(client, "claude-sonnet-5-5", thinking={"type": "between_tools"})
        local = create(client, "fake-root", thinking={"type": "adaptive"})
    thinking, text = default.content
    assert thinking.type == "thinking" and thinking.thinking == ""  # display omitted on 5.x
    assert thinking.signature.startswith("fake-signature-")
    assert text.type == "text" and text.text == answer
    assert default.usage.output_tokens == DEFAULT_THINKING_TOKENS["high"] + 100
    assert default.usage.output_tokens_details.thinking_tokens == DEFAULT_THINKING_TOKENS["high"]
    assert low.usage.output_tokens_details.thinking_tokens == DEFAULT_THINKING_TOKENS["low"]
    assert opus.usage.output_tokens_details.thinking_tokens == DEFAULT_THINKING_TOKENS["medium"]
    assert summarized.content[0].type == "thinking" and summarized.content[0].thinking
    for reply in (off, legacy, between):
        assert [b.type for b in reply.content] == ["text"]
        assert reply.usage.output_tokens == 100 and reply.usage.output_tokens_details is None
    assert manual.content[0].thinking  # Claude 4.5 summarizes by default
    assert manual.usage.output_tokens_details.thinking_tokens == 600  # min(high, budget)
    assert local.content[0].type == "thinking" and local.content[0].thinking
    reqs = fake.requests
    assert reqs[1].effort == "low" and reqs[0].effort is None
    assert reqs[4].thinking == {"type": "disabled"} and reqs[0].thinking is None


def test_thinking_tokens_are_configurable_and_can_exhaust_max_tokens() -> None:
    spend = {"low": 10, "high": 300}
    with (
        FakeAnthropic(sub="y" * 400, thinking_tokens=spend) as fake,
        client_for(fake, max_retries=0) as client,
    ):
        fits = create(client, "claude-sonnet-5-5", output_config={"effort": "low"})
        cut = create(client, "claude-sonnet-5-5", max_tokens=320)
        starved = create(client, "claude-sonnet-5-5", max_tokens=250)
    assert fits.usage.output_tokens == 110 and fits.stop_reason == "end_turn"
    assert cut.stop_reason == "max_tokens"
    assert [b.type for b in cut.content] == ["thinking", "text"]
    assert cut.content[1].text == "y" * 80  # the 20 tokens left after 300 of thinking
    assert cut.usage.output_tokens == 320
    assert starved.stop_reason == "max_tokens"
    assert [b.type for b in starved.content] == ["thinking"]
    assert starved.usage.output_tokens == 250
    assert starved.usage.output_tokens_details.thinking_tokens == 250
    with pytest.raises(ValueError, match="effort levels"):
        FakeAnthropic(thinking_tokens={"huge": 1})


def test_thinking_that_leaves_no_room_drops_the_tool_call() -> None:
    tool = ToolUse(name="lookup", input={"q": "z" * 200})
    with FakeAnthropic(sub=lambda req: tool) as fake, client_for(fake, max_retries=0) as client:
        room = create(client, "claude-sonnet-5", **AUTO_TOOL)
        cut = create(client, "claude-sonnet-5", max_tokens=620, **AUTO_TOOL)
    assert [b.type for b in room.content] == ["thinking", "tool_use"]
    assert room.stop_reason == "tool_use"
    assert [b.type for b in cut.content] == ["thinking"] and cut.stop_reason == "max_tokens"


# --------------------------------------------------------------------------- refusals


def test_where_judge_refusal_makes_the_whole_reply_a_refusal() -> None:
    def judge(predicate: str, row: dict[str, Any]) -> Any:
        return REFUSE if "exploit" in row["body"] else True

    rows = ['<row id="1">{"body": "hello"}</row>', '<row id="2">{"body": "write an exploit"}</row>']
    with FakeAnthropic(where=judge) as fake, client_for(fake, max_retries=0) as client:
        msg = where_call(client, "is benign", rows)
    assert msg.stop_reason == "refusal" and msg.content == []
    assert msg.stop_details is not None
    assert msg.stop_details.type == "refusal"
    assert msg.stop_details.category is None
    assert msg.stop_details.explanation == "fake refusal"
    assert fake.requests[0].status == 200  # a refusal is not an HTTP error


def test_scripted_refusals_render_with_stop_details() -> None:
    script: list[RootEntry] = [
        REFUSE,
        FakeReply(stop_reason="refusal"),
        FakeReply(
            text="Here is how",
            stop_reason="refusal",
            stop_details={"type": "refusal", "category": "cyber", "explanation": "no"},
        ),
        "fine",
    ]
    with (
        FakeAnthropic(root=script, root_model="claude-sonnet-5-5") as fake,
        client_for(fake, max_retries=0) as client,
    ):
        first, second, partial, normal = (create(client, "claude-sonnet-5-5") for _ in range(4))
        replies = [first, second, partial, normal]
    for reply in (first, second):
        assert reply.content == [] and reply.stop_reason == "refusal"
        assert reply.stop_details.explanation == "fake refusal"
        assert reply.usage.output_tokens_details is None  # no thinking before a refusal
    assert [b.text for b in partial.content] == ["Here is how"]
    assert partial.stop_details.category == "cyber"
    assert normal.stop_details is None and normal.stop_reason == "end_turn"
    assert [r.content[0].type for r in replies[3:]] == ["thinking"]
    assert fake.script_position == 4


# --------------------------------------------------------------------------- structured outputs

VERDICT_SCHEMA = {
    "type": "object",
    "properties": {
        "verdicts": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "match": {"type": "boolean"},
                    "reason": {"type": "string"},
                },
                "required": ["id", "match", "reason"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["verdicts"],
    "additionalProperties": False,
}
ROWS = ['<row id="4">{"body": "please cancel"}</row>', '<row id="5">{"body": "thanks"}</row>']


def structured_where(client: anthropic.Anthropic, model: str, **kw: Any) -> Any:
    return create(
        client,
        model,
        system="You judge rows.\n<predicate>mentions cancellation</predicate>",
        messages=[{"role": "user", "content": "Rows:\n" + "\n".join(ROWS)}],
        output_config={"format": {"type": "json_schema", "schema": VERDICT_SCHEMA}},
        **kw,
    )


def test_structured_output_verdicts() -> None:
    with (
        FakeAnthropic(where=lambda p, row: ("cancel" in row["body"], "looked")) as fake,
        client_for(fake, max_retries=0) as client,
    ):
        haiku = structured_where(client, "claude-haiku-5-5", **THINK_OFF)
        sonnet = structured_where(client, "claude-sonnet-5-5")
        legacy = structured_where(client, "claude-haiku-4-5")
    expected = {
        "verdicts": [
            {"id": 4, "match": True, "reason": "looked"},
            {"id": 5, "match": False, "reason": "looked"},
        ]
    }
    for msg in (haiku, sonnet, legacy):
        (text,) = [b for b in msg.content if b.type == "text"]
        assert json.loads(text.text) == expected
        assert msg.stop_reason == "end_turn"
    assert [b.type for b in sonnet.content] == ["thinking", "text"]
    assert [r.kind for r in fake.requests] == ["where"] * 3
    assert [r.verdict_channel for r in fake.requests] == ["structured"] * 3
    assert fake.requests[0].predicate == "mentions cancellation"
    assert fake.requests[0].output_format is not None


def test_verdict_channels_tool_and_forced_tool() -> None:
    tool = [
        {
            "name": "record_verdicts",
            "description": "Record one verdict per row.",
            "input_schema": VERDICT_SCHEMA,
        }
    ]
    with (
        FakeAnthropic(where=lambda p, row: True) as fake,
        client_for(fake, max_retries=0) as client,
    ):
        auto = create(
            client,
            "claude-sonnet-5-5",
            system="<predicate>p</predicate>",
            tools=tool,
            tool_choice={"type": "auto"},
            messages=[{"role": "user", "content": "\n".join(ROWS)}],
        )
        where_call(client, "p", ROWS)  # claude-haiku-4-5, forced record_verdicts
        with pytest.raises(anthropic.BadRequestError, match="forced tool use"):
            create(
                client,
                "claude-sonnet-5-5",
                system="<predicate>p</predicate>",
                tools=tool,
                tool_choice={"type": "tool", "name": "record_verdicts"},
            )
    assert [b.type for b in auto.content] == ["thinking", "tool_use"]
    assert auto.content[1].input["verdicts"][0] == {"id": 4, "match": True, "reason": ""}
    assert [r.verdict_channel for r in fake.requests] == ["tool", "forced_tool", "forced_tool"]
    assert fake.requests[2].status == 400


def test_structured_output_root_and_sub_replies_must_be_json() -> None:
    fmt = {"format": {"type": "json_schema", "schema": SCHEMA}}
    with (
        FakeAnthropic(root=['{"answer": "42"}', "forty-two"], sub="not json") as fake,
        client_for(fake, max_retries=0) as client,
    ):
        ok = create(client, "fake-root", output_config=fmt)
        with pytest.raises(anthropic.BadRequestError, match="not valid JSON"):
            create(client, "fake-root", output_config=fmt)
        with pytest.raises(anthropic.BadRequestError, match="structured output"):
            create(client, "claude-haiku-4-5", output_config=fmt)
    assert json.loads(ok.content[0].text) == {"answer": "42"}
    assert [r.kind for r in fake.requests] == ["root", "root", "sub"]
    assert fake.rejections == []  # a script bug, not an API rule


def test_cache_minimum_follows_the_model_family() -> None:
    prefix = "word " * 3000  # ~3750 tokens with the JSON around it

    def cached(model: str) -> int:
        with (
            FakeAnthropic(root=lambda req: "ok", sub="ok") as fake,
            client_for(fake, max_retries=0) as client,
        ):
            system = [{"type": "text", "text": prefix, "cache_control": {"type": "ephemeral"}}]
            return int(create(client, model, system=system).usage.cache_creation_input_tokens)

    assert cached("claude-sonnet-5-5") > 0  # 512-token minimum
    assert cached("fake-root") > 0  # 1024 by default
    assert cached("claude-haiku-4-5") == 0  # 4096-token minimum
    with FakeAnthropic(sub="ok", cache_min_tokens=8000) as fake, client_for(fake) as client:
        system = [{"type": "text", "text": prefix, "cache_control": {"type": "ephemeral"}}]
        assert (
            create(client, "claude-sonnet-5-5", system=system).usage.cache_creation_input_tokens
            == 0
        )
