"""Message batches: FakeAnthropic's batch endpoints as the real SDK sees them, and the
BatchRunner (splitting, metering at the batch price, errors, deadlines, resume after a kill)."""

from __future__ import annotations

import datetime
import doctest
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anthropic
import pytest

import rlm_dagster.models.batches as batches_module
from rlm_dagster.cache import Cache
from rlm_dagster.engine.budget import Budget, Limits
from rlm_dagster.errors import (
    BatchCanceled,
    BatchExpired,
    BatchPending,
    BudgetExceeded,
    ConfigError,
    ModelBadRequest,
    ModelNotFound,
    ProviderAuthError,
    ProviderOverloaded,
    ProviderServerError,
)
from rlm_dagster.models.batches import (
    BatchProgress,
    BatchRequest,
    BatchResult,
    BatchRunner,
    batch_cost_usd,
)
from rlm_dagster.models.client import LM
from rlm_dagster.models.prices import BATCH_PRICE_FACTOR
from rlm_dagster.testing import FakeAnthropic, Fault
from rlm_dagster.testing.fake_server import FakeRequest

MODEL = "claude-haiku-4-5"
ROOT = Path(__file__).resolve().parents[1]


class MemoryStore:
    """The BatchStore interface in memory."""

    def __init__(self) -> None:
        self.batches: dict[str, tuple[str, str, dict[str, bytes]]] = {}
        self.finished: list[str] = []

    def put_batch(self, job: str, batch_id: str, model: str, requests: Mapping[str, bytes]) -> None:
        self.batches[batch_id] = (job, model, dict(requests))

    def open_batches(self, job: str) -> list[tuple[str, dict[str, bytes]]]:
        return [
            (batch_id, dict(blobs))
            for batch_id, (owner, _, blobs) in self.batches.items()
            if owner == job and batch_id not in self.finished
        ]

    def finish_batch(self, batch_id: str) -> None:
        self.finished.append(batch_id)


def echo(request: FakeRequest) -> str:
    return f"answer to {request.prompt}"


def client_for(fake: FakeAnthropic, max_retries: int = 0) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="test-key", base_url=fake.base_url, max_retries=max_retries)


def raw_request(custom_id: str, text: str = "hi", **params: Any) -> dict[str, Any]:
    body = {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": text}]}
    return {"custom_id": custom_id, "params": {**body, **params}}


def wait_ended(client: anthropic.Anthropic, batch_id: str, timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.messages.batches.retrieve(batch_id)
        if batch.processing_status == "ended" or time.monotonic() > deadline:
            return batch
        time.sleep(0.02)


def params(lm: LM, text: str, model: str = MODEL, max_tokens: int = 64) -> dict[str, Any]:
    return lm._request(
        "sub", model, "Be brief.", [{"role": "user", "content": text}], max_tokens, None, None
    )


def requests_for(lm: LM, n: int, model: str = MODEL) -> list[BatchRequest]:
    return [
        BatchRequest(f"r{i}", params(lm, f"q{i}", model), f"row-{i}".encode()) for i in range(n)
    ]


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def runner_for(store: MemoryStore) -> Callable[..., BatchRunner]:
    def make(lm: LM, **options: Any) -> BatchRunner:
        return BatchRunner(lm, store, poll_interval_s=0.05, max_poll_interval_s=0.1, **options)

    return make


def by_id(results: list[BatchResult]) -> dict[str, BatchResult]:
    assert len({r.custom_id for r in results}) == len(results), "a custom_id came back twice"
    return {r.custom_id: r for r in results}


# -- the fake's endpoints, through the SDK -------------------------------------------------


def test_a_batch_is_in_progress_then_ended_with_what_messages_would_answer() -> None:
    with FakeAnthropic(sub=echo, batch_delay_s=0.3) as fake:
        client = client_for(fake)
        batch = client.messages.batches.create(
            requests=[raw_request(f"req-{i}", f"q{i}") for i in range(3)]
        )
        assert batch.type == "message_batch" and batch.id.startswith("msgbatch_")
        assert batch.processing_status == "in_progress"
        assert batch.request_counts.processing == 3 and batch.request_counts.succeeded == 0
        assert batch.results_url is None and batch.ended_at is None
        assert batch.cancel_initiated_at is None
        assert batch.expires_at - batch.created_at == datetime.timedelta(hours=24)
        assert fake.requests == []  # nothing answered while it processes

        ended = wait_ended(client, batch.id)
        assert ended.processing_status == "ended" and ended.ended_at is not None
        assert ended.request_counts.succeeded == 3 and ended.request_counts.processing == 0
        assert ended.results_url == f"{fake.base_url}/v1/messages/batches/{batch.id}/results"

        lines = list(client.messages.batches.results(batch.id))
        assert sorted(line.custom_id for line in lines) == ["req-0", "req-1", "req-2"]
        online = client.messages.create(**raw_request("x", "q1")["params"])
        for line in lines:
            assert line.result.type == "succeeded"
            message = line.result.message
            assert message.content[0].text == f"answer to q{line.custom_id[-1]}"
        batched = next(line.result.message for line in lines if line.custom_id == "req-1")
        assert batched.content == online.content and batched.usage == online.usage
        assert batched.stop_reason == online.stop_reason and batched.model == online.model
        logged = [r for r in fake.requests if r.batch_id == batch.id]
        assert sorted(r.custom_id or "" for r in logged) == ["req-0", "req-1", "req-2"]
        assert all(r.status == 200 and r.kind == "sub" for r in logged)
        client.close()


def test_where_judges_and_root_scripts_answer_batch_requests() -> None:
    judge = lambda predicate, row: ("cancel" in row["body"], "says so")  # noqa: E731
    with FakeAnthropic(root=["FINAL('x')"], where=judge) as fake:
        client = client_for(fake)
        rows = '<row id="0">{"body": "please cancel"}</row>\n<row id="1">{"body": "thanks"}</row>'
        where = raw_request(
            "where-0",
            rows,
            system="<predicate>wants to cancel</predicate>",
            tools=[{"name": "record_verdicts", "input_schema": {"type": "object"}}],
            tool_choice={"type": "tool", "name": "record_verdicts"},
        )
        root = raw_request("root-0", "go", model="fake-root")
        batch = client.messages.batches.create(requests=[where, root])
        wait_ended(client, batch.id)
        results = {
            line.custom_id: line.result for line in client.messages.batches.results(batch.id)
        }
        tool = results["where-0"].message.content[-1]
        assert tool.type == "tool_use" and tool.input == {
            "verdicts": [
                {"id": 0, "match": True, "reason": "says so"},
                {"id": 1, "match": False, "reason": "says so"},
            ]
        }
        assert results["root-0"].message.content[0].text == "FINAL('x')"
        assert fake.script_position == 1 and fake.count("where") == 1
        client.close()


@pytest.mark.parametrize(
    "requests, problem",
    [
        ([raw_request("a"), raw_request("a")], "custom_id 'a' is also used by requests.0"),
        ([raw_request("has space")], "requests.0.custom_id: String should match pattern"),
        ([raw_request("x" * 65)], "requests.0.custom_id: String should match pattern"),
        ([], "requests: List should have at least 1 item"),
        ([raw_request(f"r{i}") for i in range(6)], "at most 5 items"),
        ([{**raw_request("a"), "extra": 1}], "requests.0.extra: Extra inputs are not permitted"),
    ],
)
def test_a_malformed_batch_is_refused_whole(requests: list[Any], problem: str) -> None:
    with FakeAnthropic(max_batch_requests=5) as fake:
        client = client_for(fake)
        with pytest.raises(anthropic.BadRequestError) as refused:
            client.messages.batches.create(requests=requests)
        assert refused.value.body["error"]["type"] == "invalid_request_error"
        assert problem in refused.value.body["error"]["message"]
        assert fake.batches == [] and [c.status for c in fake.batch_calls] == [400]
        client.close()


def test_a_batch_over_the_size_limit_is_a_413() -> None:
    with FakeAnthropic(max_batch_bytes=2_000) as fake:
        client = client_for(fake)
        with pytest.raises(anthropic.APIStatusError) as refused:
            client.messages.batches.create(requests=[raw_request("a", "x" * 3_000)])
        assert refused.value.status_code == 413
        assert refused.value.body["error"]["type"] == "request_too_large"
        assert fake.batches == []
        client.close()


def test_bad_params_come_back_errored_with_the_messages_api_message() -> None:
    """As with the real API, params are validated asynchronously: the batch is accepted and
    the bad request's result is errored with what /v1/messages would have said."""
    with FakeAnthropic(sub=echo) as fake:
        client = client_for(fake)
        bad = raw_request("bad", output_config={"effort": "low"})  # haiku-4-5 has no effort
        batch = client.messages.batches.create(requests=[raw_request("good"), bad])
        with pytest.raises(anthropic.BadRequestError) as online:
            client.messages.create(**bad["params"])
        wait_ended(client, batch.id)
        results = {
            line.custom_id: line.result for line in client.messages.batches.results(batch.id)
        }
        assert results["good"].type == "succeeded"
        errored = results["bad"]
        assert errored.type == "errored"
        assert errored.error.error.type == "invalid_request_error"
        assert errored.error.error.message == online.value.body["error"]["message"]
        counts = client.messages.batches.retrieve(batch.id).request_counts
        assert (counts.succeeded, counts.errored) == (1, 1)
        client.close()


def test_cancel_keeps_what_was_processed_and_cancels_the_rest() -> None:
    with FakeAnthropic(sub=echo, batch_delay_s=2.0) as fake:
        client = client_for(fake)
        batch = client.messages.batches.create(requests=[raw_request(f"r{i}") for i in range(10)])
        time.sleep(1.0)
        canceling = client.messages.batches.cancel(batch.id)
        assert canceling.processing_status == "canceling"
        assert canceling.cancel_initiated_at is not None
        ended = client.messages.batches.retrieve(batch.id)
        counts = ended.request_counts
        assert ended.processing_status == "ended"
        assert counts.succeeded + counts.canceled == 10 and 1 <= counts.succeeded <= 9
        kinds = [line.result.type for line in client.messages.batches.results(batch.id)]
        assert kinds.count("canceled") == counts.canceled
        assert len([r for r in fake.requests if r.batch_id]) == counts.succeeded
        client.close()


def test_list_pages_newest_first_and_delete_needs_an_ended_batch() -> None:
    with FakeAnthropic(sub=echo, batch_delay_s=5.0) as fake:
        client = client_for(fake)
        made = [client.messages.batches.create(requests=[raw_request("a")]).id for _ in range(3)]
        assert [b.id for b in client.messages.batches.list(limit=2)] == made[::-1]  # 2 pages
        with pytest.raises(anthropic.BadRequestError):
            client.messages.batches.delete(made[0])
        fake.batch_delay_s = 0
        assert client.messages.batches.delete(made[0]).type == "message_batch_deleted"
        with pytest.raises(anthropic.NotFoundError):
            client.messages.batches.retrieve(made[0])
        assert [b.id for b in fake.batches] == made[1:]
        client.close()


def test_batch_endpoint_faults_are_retried_by_the_sdk() -> None:
    with FakeAnthropic(sub=echo) as fake:
        fake.inject_batch_fault(Fault(status=529, retry_after_s=0.01), operation="create")
        client = client_for(fake, max_retries=2)
        batch = client.messages.batches.create(requests=[raw_request("a")])
        assert [(c.operation, c.status) for c in fake.batch_calls] == [
            ("create", 529),
            ("create", 200),
        ]
        assert [b.id for b in fake.batches] == [batch.id]
        client.close()


def test_batch_outcomes_choose_errored_and_expired_results() -> None:
    outcome = {"e1": "api_error", "e2": "overloaded_error", "x": "expired"}
    with FakeAnthropic(sub=echo, batch_outcome=lambda r: outcome.get(r.custom_id or "")) as fake:
        client = client_for(fake)
        ids = ["ok", "e1", "e2", "x"]
        batch = client.messages.batches.create(requests=[raw_request(i) for i in ids])
        counts = wait_ended(client, batch.id).request_counts
        assert (counts.succeeded, counts.errored, counts.expired) == (1, 2, 1)
        results = {
            line.custom_id: line.result for line in client.messages.batches.results(batch.id)
        }
        assert results["e1"].error.error.type == "api_error"
        assert results["e2"].error.error.type == "overloaded_error"
        assert results["x"].type == "expired"
        statuses = {r.custom_id: r.status for r in fake.requests}
        assert statuses == {"ok": 200, "e1": 500, "e2": 529}  # the expired one never ran
        client.close()


# -- the runner -------------------------------------------------------------------------------


def test_the_runner_maps_results_by_custom_id_at_the_batch_price(
    make_lm: Callable[..., LM], runner_for: Callable[..., BatchRunner], store: MemoryStore
) -> None:
    with FakeAnthropic(sub=echo, batch_delay_s=0.1) as fake:
        lm = make_lm(fake)
        budget = Budget(Limits(max_cost_usd=1.0))
        results = by_id(runner_for(lm).run("job", requests_for(lm, 5), role="where", meter=budget))
        assert sorted(results) == [f"r{i}" for i in range(5)]
        batch_id = fake.batches[0].id
        for i in range(5):
            result = results[f"r{i}"]
            assert result.ok and result.error is None
            assert result.blob == f"row-{i}".encode() and result.batch_id == batch_id
            assert result.completion is not None
            assert result.completion.text == f"answer to q{i}"
            record = result.completion.record
            assert record.role == "where" and record.model == MODEL
            assert record.batch_id == batch_id
            full = lm.catalog.cost_usd(MODEL, record.usage)
            assert full and record.cost_usd == pytest.approx(full * BATCH_PRICE_FACTOR)
            assert record.cost_usd == batch_cost_usd(lm.catalog, MODEL, record.usage)
            assert record.latency_s >= 0.1
        assert budget.accounting.calls() == 5 and budget.sub_calls_started == 5
        assert budget.accounting.cost_usd == pytest.approx(
            sum(r.completion.record.cost_usd for r in results.values() if r.completion)
        )
        assert budget._reserved_usd == pytest.approx(0.0)
        assert store.open_batches("job") == [] and store.finished == [batch_id]
        assert store.batches[batch_id] == (
            "job",
            MODEL,
            {f"r{i}": f"row-{i}".encode() for i in range(5)},
        )


def test_requests_are_split_by_count_size_and_model(
    make_lm: Callable[..., LM], runner_for: Callable[..., BatchRunner]
) -> None:
    with FakeAnthropic(sub=echo, max_batch_requests=4) as fake:
        lm = make_lm(fake)
        results = runner_for(lm, max_requests=4).run("count", requests_for(lm, 10))
        assert len(by_id(results)) == 10 and all(r.ok for r in results)
        assert [len(b.custom_ids) for b in fake.batches] == [4, 4, 2]

    with FakeAnthropic(sub=echo) as fake:
        lm = make_lm(fake)
        items = requests_for(lm, 9)
        one = len(json.dumps({"custom_id": "r0", "params": items[0].params})) + 2
        limit = 3 * one + 40  # three requests and the envelope fit, four do not
        fake.max_batch_bytes = limit  # the fake would answer a bigger batch 413
        sonnet = [BatchRequest(f"s{i}", params(lm, f"s{i}", "claude-sonnet-4-5")) for i in range(2)]
        results = runner_for(lm, max_bytes=limit).run("size", items + sonnet)
        assert len(by_id(results)) == 11 and all(r.ok for r in results)
        assert [len(b.custom_ids) for b in fake.batches] == [3, 3, 3, 2]
        assert {b.params[0]["model"] for b in fake.batches[:3]} == {MODEL}
        assert fake.batches[3].custom_ids == ("s0", "s1")
        by_model = {r.custom_id: r.completion.record.model for r in results if r.completion}
        assert by_model["s1"] == "claude-sonnet-4-5" and by_model["r8"] == MODEL


class _Tracked(dict):  # type: ignore[type-arg]
    """Request params that count how many of them are alive at once."""

    alive = 0
    peak = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _Tracked.alive += 1
        _Tracked.peak = max(_Tracked.peak, _Tracked.alive)

    def __del__(self) -> None:
        _Tracked.alive -= 1


def test_a_request_source_is_read_twice_and_never_held_whole(
    make_lm: Callable[..., LM], runner_for: Callable[..., BatchRunner]
) -> None:
    """Given a function, the runner bounds every request first (a budget that cannot hold
    the run still refuses it before anything is sent), then builds and submits the batches
    one at a time: at most the batches being filled are in memory, not the run. A source
    that gives other requests the second time is an error, not a silent mix."""
    with FakeAnthropic(sub=echo, max_batch_requests=10) as fake:
        lm = make_lm(fake)
        calls = 0

        def source() -> Any:
            nonlocal calls
            calls += 1
            for i in range(95):
                yield BatchRequest(f"r{i}", _Tracked(params(lm, f"q{i}")), f"row-{i}".encode())

        _Tracked.alive = _Tracked.peak = 0
        results = runner_for(lm, max_requests=10).run("stream", source)
        assert calls == 2 and len(by_id(results)) == 95 and all(r.ok for r in results)
        assert [len(b.custom_ids) for b in fake.batches] == [10] * 9 + [5]
        assert _Tracked.peak <= 10 + 1  # a batch and the request being read; not all 95

        with pytest.raises(BudgetExceeded):
            runner_for(lm, max_requests=10).run(
                "refused", source, meter=Budget(Limits(max_cost_usd=1e-9))
            )
        assert len(fake.batches) == 10  # nothing more was sent

        shifting = iter(
            [[("a", params(lm, "a")), ("b", params(lm, "b"))], [("a", params(lm, "a"))]]
        )
        with pytest.raises(ConfigError, match="changed between the two passes"):
            runner_for(lm).run("shifting", lambda: next(shifting))
        assert len(fake.batches) == 10


def test_a_request_too_big_for_any_batch_is_an_error_and_not_sent(
    make_lm: Callable[..., LM], runner_for: Callable[..., BatchRunner]
) -> None:
    with FakeAnthropic(sub=echo) as fake:
        lm = make_lm(fake)
        huge = BatchRequest("huge", params(lm, "x" * 5_000))
        results = by_id(runner_for(lm, max_bytes=2_000).run("big", [huge, *requests_for(lm, 2)]))
        assert isinstance(results["huge"].error, ModelBadRequest)
        assert results["r0"].ok and results["r1"].ok
        assert [b.custom_ids for b in fake.batches] == [("r0", "r1")]


def test_progress_is_reported_per_batch_until_all_requests_are_done(
    make_lm: Callable[..., LM], runner_for: Callable[..., BatchRunner]
) -> None:
    with FakeAnthropic(sub=echo, batch_delay_s=0.2) as fake:
        lm = make_lm(fake)
        seen: list[BatchProgress] = []
        runner_for(lm, max_requests=3).run("p", requests_for(lm, 5), on_progress=seen.append)
        ids = [b.id for b in fake.batches]
        assert {p.batch_id for p in seen} == set(ids)
        for batch_id, size in zip(ids, (3, 2), strict=True):
            mine = [p for p in seen if p.batch_id == batch_id]
            assert mine[0].status == "in_progress" and mine[0].counts["processing"] == size
            assert mine[-1].status == "ended" and mine[-1].counts["succeeded"] == size
            assert all(p.batch_requests == size for p in mine)
        done = [p.requests_done for p in seen]
        assert done == sorted(done) and all(p.requests_total == 5 for p in seen)
        assert seen[-1].requests_done == 5 and seen[-1].batches_open == 0


def test_errored_expired_and_canceled_results_are_errors_not_billed(
    make_lm: Callable[..., LM], runner_for: Callable[..., BatchRunner]
) -> None:
    outcome = {"r1": "api_error", "r2": "overloaded_error", "r3": "expired"}
    with FakeAnthropic(sub=echo, batch_outcome=lambda r: outcome.get(r.custom_id or "")) as fake:
        lm = make_lm(fake)
        items = requests_for(lm, 4)
        bad = dict(items[0].params, output_config={"effort": "low"})  # not on haiku-4-5
        items.append(BatchRequest("r4", bad))
        budget = Budget(Limits(max_cost_usd=1.0))
        results = by_id(runner_for(lm).run("errors", items, meter=budget))
        assert results["r0"].ok
        expected = {
            "r1": ProviderServerError,
            "r2": ProviderOverloaded,
            "r3": BatchExpired,
            "r4": ModelBadRequest,
        }
        for custom_id, kind in expected.items():
            error = results[custom_id].error
            assert type(error) is kind and results[custom_id].completion is None
            assert custom_id in str(error) and "not billed" in str(error)
            assert error.retryable is (kind is not ModelBadRequest)
        assert "effort" in str(results["r4"].error)
        assert budget.accounting.calls() == 1  # only the success is paid
        assert budget._reserved_usd == pytest.approx(0.0)
        assert fake.count() == 1


def test_a_canceled_batch_yields_canceled_errors(
    make_lm: Callable[..., LM], runner_for: Callable[..., BatchRunner], store: MemoryStore
) -> None:
    with FakeAnthropic(sub=echo, batch_delay_s=30.0) as fake:
        lm = make_lm(fake)
        runner = runner_for(lm)
        with pytest.raises(BatchPending):
            runner.run("c", requests_for(lm, 3), deadline=time.monotonic() + 0.2)
        client = client_for(fake)
        client.messages.batches.cancel(fake.batches[0].id)  # e.g. by hand, in the console
        client.close()
        results = runner.resume("c")
        assert all(isinstance(r.error, BatchCanceled) and r.error.retryable for r in results)
        assert sorted(r.blob for r in results) == [b"row-0", b"row-1", b"row-2"]
        assert store.open_batches("c") == []


def test_a_budget_that_cannot_hold_the_batch_refuses_it_before_anything_is_sent(
    make_lm: Callable[..., LM], runner_for: Callable[..., BatchRunner]
) -> None:
    with FakeAnthropic(sub=echo) as fake:
        lm = make_lm(fake)
        items = requests_for(lm, 20)
        online = sum(lm.upper_bound(item.params)[1] or 0.0 for item in items)
        runner = runner_for(lm)
        batch_bound = sum(runner.upper_bound(item.params)[1] or 0.0 for item in items)
        assert batch_bound == pytest.approx(online * BATCH_PRICE_FACTOR)

        budget = Budget(Limits(max_cost_usd=batch_bound * 0.9))
        with pytest.raises(BudgetExceeded) as refused:
            runner.run("too-big", items, meter=budget)
        assert refused.value.limit == "max_cost_usd" and "20 requests" in str(refused.value)
        assert fake.batch_calls == []
        assert budget._reserved_usd == pytest.approx(0.0)  # what did fit was released

        # The same run fits at the batch price where online calls would not.
        fits = Budget(Limits(max_cost_usd=online * 0.75))
        results = runner.run("fits", items, meter=fits)
        assert all(r.ok for r in results) and len(fake.batches) == 1


def test_custom_ids_and_params_are_checked_before_anything_is_sent(
    make_lm: Callable[..., LM], runner_for: Callable[..., BatchRunner]
) -> None:
    with FakeAnthropic(sub=echo) as fake:
        lm = make_lm(fake)
        runner = runner_for(lm)
        good = params(lm, "q")
        for items in (
            [("a", good), ("a", good)],
            [("not ok!", good)],
            [("a", {"messages": []})],
        ):
            with pytest.raises(ConfigError):
                runner.run("bad", items)
        assert fake.batch_calls == []


def test_the_deadline_leaves_the_batch_recorded_and_resume_collects_it_without_resubmitting(
    make_lm: Callable[..., LM], runner_for: Callable[..., BatchRunner], store: MemoryStore
) -> None:
    with FakeAnthropic(sub=echo, batch_delay_s=30.0) as fake:
        lm = make_lm(fake)
        runner = runner_for(lm, max_requests=2)
        budget = Budget(Limits(max_cost_usd=1.0))
        items = requests_for(lm, 3)
        with pytest.raises(BatchPending) as pending:
            runner.run("slow", items, meter=budget, deadline=time.monotonic() + 0.3)
        error = pending.value
        assert error.retryable and error.limit == "max_wall_time_s"
        assert isinstance(error, BudgetExceeded) and error.partial == []
        assert set(error.batch_ids) == {b.id for b in fake.batches} and len(error.batch_ids) == 2
        assert not any(b.cancel_requested for b in fake.batches)  # left to finish, not canceled
        assert budget._reserved_usd == pytest.approx(0.0)
        assert [b for b, _ in store.open_batches("slow")] == list(error.batch_ids)

        with pytest.raises(ConfigError, match="Resume them first"):
            runner.run("slow", items)  # would pay for the same requests twice

        fake.batch_delay_s = 0
        resumed = by_id(runner.resume("slow", role="where", meter=budget))
        assert sorted(resumed) == ["r0", "r1", "r2"]
        assert {r.blob for r in resumed.values()} == {b"row-0", b"row-1", b"row-2"}
        assert all(
            r.completion and r.completion.text == f"answer to q{r.custom_id[1]}"
            for r in resumed.values()
        )
        assert budget.accounting.calls() == 3
        assert store.open_batches("slow") == [] and runner.resume("slow") == []
        assert [c.operation for c in fake.batch_calls].count("create") == 2


def test_batch_endpoint_failures_are_retried_then_mapped_like_online_calls(
    make_lm: Callable[..., LM], runner_for: Callable[..., BatchRunner], store: MemoryStore
) -> None:
    with FakeAnthropic(sub=echo) as fake:
        lm = make_lm(fake, max_retries=2)
        runner = runner_for(lm)
        fake.inject_batch_fault(
            Fault(status=529, retry_after_s=0.01), times=2, operation="retrieve"
        )
        fake.inject_batch_fault(Fault(status=500, retry_after_s=0.01), operation="results")
        assert all(r.ok for r in runner.run("flaky", requests_for(lm, 2)))
        statuses = [(c.operation, c.status) for c in fake.batch_calls]
        assert statuses.count(("retrieve", 529)) == 2 and ("results", 500) in statuses

        fake.inject_batch_fault(Fault(status=529, retry_after_s=0.01), times=5, operation="create")
        with pytest.raises(ProviderOverloaded) as overloaded:
            runner.run("down", requests_for(lm, 2))
        assert overloaded.value.retryable and "3 attempts" in str(overloaded.value)
        assert store.open_batches("down") == [] and len(fake.batches) == 1

        fake.inject_batch_fault(Fault(status=401), operation="create")
        with pytest.raises(ProviderAuthError):
            runner.run("key", requests_for(lm, 1))

        fake.inject_batch_fault(Fault(status=404), operation="create")
        with pytest.raises(ModelNotFound, match="no Message Batches API"):
            runner.run("no-batches", requests_for(lm, 1))


def test_a_store_that_fails_to_record_the_batch_cancels_it(
    make_lm: Callable[..., LM], store: MemoryStore
) -> None:
    class Broken(MemoryStore):
        def put_batch(self, *args: Any) -> None:
            raise OSError("disk full")

    with FakeAnthropic(sub=echo, batch_delay_s=30.0) as fake:
        lm = make_lm(fake)
        with pytest.raises(OSError):
            BatchRunner(lm, Broken(), poll_interval_s=0.05).run("j", requests_for(lm, 2))
        assert [b.cancel_requested for b in fake.batches] == [True]


def test_the_module_doctests_run() -> None:
    result = doctest.testmod(batches_module)
    assert result.failed == 0 and result.attempted >= 1


# -- resume after a kill ------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import json, sys
    from rlm_dagster.cache import Cache
    from rlm_dagster.models.batches import BatchRequest, BatchRunner
    from rlm_dagster.models.client import LM

    base_url, cache_path, mode = sys.argv[1:4]
    lm = LM(api_key="test-key", base_url=base_url, root_model="fake-root",
            sub_model="claude-haiku-4-5", max_retries=2)
    runner = BatchRunner(lm, Cache(cache_path), poll_interval_s=0.05, max_poll_interval_s=0.1)
    if mode == "submit":
        requests = [
            BatchRequest(f"r{i}", lm._request("sub", "claude-haiku-4-5", "Be brief.",
                         [{"role": "user", "content": f"q{i}"}], 64, None, None),
                         f"row-{i}".encode())
            for i in range(6)
        ]
        runner.run("job-kill", requests, role="where")
        print("the batch ended before the kill", flush=True)
    else:
        results = runner.resume("job-kill", role="where")
        print(json.dumps([
            [r.custom_id, r.blob.decode(), r.completion.text, r.completion.record.cost_usd,
             r.completion.record.batch_id]
            for r in results
        ]))
    lm.close()
    """
)


def run_worker(script: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, str(script), *args], stdout=subprocess.PIPE, text=True, env=env
    )


def test_a_killed_run_is_resumed_by_the_next_process_without_paying_twice(
    tmp_path: Path,
) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cache_path = tmp_path / "batches.sqlite3"
    with FakeAnthropic(sub=echo, batch_delay_s=120.0) as fake:
        submitter = run_worker(script, fake.base_url, str(cache_path), "submit")
        try:
            recorded: list[Any] = []
            deadline = time.monotonic() + 60
            while not recorded and time.monotonic() < deadline and submitter.poll() is None:
                time.sleep(0.05)
                if cache_path.exists():
                    with Cache(cache_path) as cache:
                        recorded = cache.open_batches("job-kill")
            assert recorded, "the submitting process never recorded its batch"
            os.kill(submitter.pid, signal.SIGKILL)
        finally:
            submitter.kill()
            submitter.communicate(timeout=30)
        assert submitter.returncode == -signal.SIGKILL
        [batch] = fake.batches
        assert batch.processing_status == "in_progress" and recorded[0][0] == batch.id

        fake.batch_delay_s = 0.5  # it finishes while the next process waits for it
        resumer = run_worker(script, fake.base_url, str(cache_path), "resume")
        out, _ = resumer.communicate(timeout=120)
        assert resumer.returncode == 0, out
        results = {row[0]: row[1:] for row in json.loads(out)}
        assert sorted(results) == [f"r{i}" for i in range(6)]
        for i in range(6):
            blob, text, cost, batch_id = results[f"r{i}"]
            assert (blob, text, batch_id) == (f"row-{i}", f"answer to q{i}", batch.id)
            assert cost > 0
        assert len(fake.batches) == 1
        assert [c.operation for c in fake.batch_calls].count("create") == 1
        assert len([r for r in fake.requests if r.batch_id]) == 6  # each answered once
        with Cache(cache_path) as cache:
            assert cache.open_batches("job-kill") == []
