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
    FakeAnthropic,
    FakeReply,
    FakeRequest,
    Fault,
    HandlerResult,
    RootEntry,
    ToolUse,
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
