"""Tests for ``AdaptiveLimiter``: one wake-up per freed slot, first come first served,
cancellation that leaks nothing, and which provider answers lower the limit.

Wake-ups are counted, never timed: :class:`CountingLoop` counts the callbacks the event loop
is asked to run, and every resumption of a waiting task is one of them. The only clock
reads are lower bounds (a pause lasts at least its ``retry-after``), which a slow machine
cannot break.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from rlm_dagster.models.client import LM, AdaptiveLimiter
from rlm_dagster.testing import FakeAnthropic, Fault

T = TypeVar("T")
HAIKU = "claude-haiku-4-5"


class CountingLoop(asyncio.SelectorEventLoop):
    """An event loop that counts the callbacks scheduled on it (task steps among them)."""

    def __init__(self) -> None:
        super().__init__()
        self.scheduled = 0

    def call_soon(self, callback: Any, *args: Any, context: Any = None) -> asyncio.Handle:  # type: ignore[override]
        self.scheduled += 1
        return super().call_soon(callback, *args, context=context)


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    with asyncio.Runner(loop_factory=CountingLoop) as runner:
        return runner.run(main())


def scheduled() -> int:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, CountingLoop)
    return loop.scheduled


async def settle() -> None:
    """Let every ready task run until it waits again."""
    for _ in range(5):
        await asyncio.sleep(0)


# -- wake-ups and order ------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 4])
def test_each_release_wakes_one_waiter(limit: int) -> None:
    """1,000 waiters, each releasing as soon as it runs: about one wake-up per release, not one
    per waiter per release (~500,000 with a wake-everyone event)."""
    n = 1_000

    async def main() -> tuple[list[int], int]:
        limiter = AdaptiveLimiter(limit)
        for _ in range(limit):
            await limiter.acquire()
        order: list[int] = []

        async def waiter(i: int) -> None:
            await limiter.acquire()
            order.append(i)
            await asyncio.sleep(0)  # hold the slot for a step, as a request would
            limiter.release()

        tasks = [asyncio.create_task(waiter(i)) for i in range(n)]
        await settle()
        assert limiter.in_flight == limit and order == []
        before = scheduled()
        for _ in range(limit):
            limiter.release()
        await asyncio.gather(*tasks)
        assert limiter.in_flight == 0 and limiter.peak_in_flight == limit
        return order, scheduled() - before

    order, callbacks = run(main)
    assert order == list(range(n))  # first come, first served
    # per waiter: its wake-up, one step while it holds the slot, and gather's done callback
    assert callbacks <= 4 * n, f"{callbacks:,} callbacks for {n:,} releases"


def test_a_retry_goes_ahead_of_requests_not_yet_sent() -> None:
    async def main() -> list[str]:
        limiter = AdaptiveLimiter(1)
        await limiter.acquire()
        order: list[str] = []

        async def waiter(name: str, retry: bool = False) -> None:
            await limiter.acquire(retry=retry)
            order.append(name)
            limiter.release()

        tasks = [asyncio.create_task(waiter(f"new {i}")) for i in range(3)]
        await settle()
        tasks.append(asyncio.create_task(waiter("retry", retry=True)))
        await settle()
        limiter.release()
        await asyncio.gather(*tasks)
        return order

    assert run(main) == ["retry", "new 0", "new 1", "new 2"]


def test_a_higher_limit_wakes_as_many_waiters_as_it_frees() -> None:
    async def main() -> None:
        limiter = AdaptiveLimiter(4)
        limiter.limit = 1.0  # as after overloads
        await limiter.acquire()
        tasks = [asyncio.create_task(limiter.acquire()) for _ in range(5)]
        await settle()
        assert sum(t.done() for t in tasks) == 0
        for _ in range(3):  # 1 -> 2 -> 2.5 -> 2.9: one more slot
            limiter.on_success()
        await settle()
        assert sum(t.done() for t in tasks) == 1 and limiter.in_flight == 2
        limiter.limit = 3.99
        limiter.on_success()  # 4: two more
        await settle()
        assert sum(t.done() for t in tasks) == 3 and limiter.in_flight == 4
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    run(main)


# -- cancellation ------------------------------------------------------------------------------


def test_a_waiter_cancelled_before_its_turn_takes_no_slot() -> None:
    async def main() -> None:
        limiter = AdaptiveLimiter(1)
        await limiter.acquire()
        got: list[str] = []

        async def waiter(name: str) -> None:
            await limiter.acquire()
            got.append(name)

        a, b, c = (asyncio.create_task(waiter(x)) for x in "abc")
        await settle()
        b.cancel()
        await settle()
        limiter.release()
        await settle()
        assert got == ["a"] and limiter.in_flight == 1
        limiter.release()  # to c: b's place is skipped, not served
        await settle()
        assert got == ["a", "c"] and limiter.in_flight == 1
        limiter.release()
        assert limiter.in_flight == 0
        await asyncio.gather(a, b, c, return_exceptions=True)
        assert b.cancelled()

    run(main)


def test_a_waiter_cancelled_after_it_was_handed_a_slot_passes_it_on() -> None:
    async def main() -> None:
        limiter = AdaptiveLimiter(1)
        await limiter.acquire()
        first = asyncio.create_task(limiter.acquire())
        second = asyncio.create_task(limiter.acquire())
        await settle()
        limiter.release()  # the slot is handed to `first`, which has not run yet
        first.cancel()
        await settle()
        assert first.cancelled()
        assert second.done() and limiter.in_flight == 1  # passed on, counted once
        limiter.release()
        assert limiter.in_flight == 0

    run(main)


def test_a_cancelled_fan_out_leaves_the_limiter_as_it_found_it() -> None:
    n = 1_000

    async def main() -> int:
        limiter = AdaptiveLimiter(4)
        holders = [asyncio.create_task(limiter.acquire()) for _ in range(4)]
        tasks = [asyncio.create_task(limiter.acquire()) for _ in range(n)]
        await settle()
        before = scheduled()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in holders:
            limiter.release()
        assert limiter.in_flight == 0 and limiter.peak_in_flight == 4
        for _ in range(4):  # every slot is free again, at once
            await asyncio.wait_for(limiter.acquire(), timeout=60)
        assert limiter.in_flight == 4
        return scheduled() - before

    callbacks = run(main)
    assert callbacks <= 4 * n, f"{callbacks:,} callbacks to cancel {n:,} waiters"


# -- retry-after pause -------------------------------------------------------------------------


def test_a_long_retry_after_pauses_new_requests_then_wakes_them() -> None:
    async def main() -> tuple[float, float]:
        limiter = AdaptiveLimiter(4)
        await limiter.acquire()
        await limiter.acquire()
        paused_at = time.monotonic()
        limiter.release(overloaded=True, retry_after=1.0)
        waiters = [asyncio.create_task(limiter.acquire()) for _ in range(3)]
        await settle()
        assert not any(w.done() for w in waiters)  # a free slot, but paused
        await asyncio.wait_for(waiters[0], timeout=60)
        woken_at = time.monotonic()
        await settle()
        # limit 4 -> 2 (half), one still in flight: the pause's end frees one slot only
        assert limiter.limit == 2.0 and limiter.in_flight == 2
        assert [w.done() for w in waiters] == [True, False, False]
        for w in waiters[1:]:
            w.cancel()
        await asyncio.gather(*waiters[1:], return_exceptions=True)
        return paused_at, woken_at

    paused_at, woken_at = run(main)
    assert woken_at - paused_at >= 1.0


def test_a_short_retry_after_does_not_pause() -> None:
    async def main() -> None:
        limiter = AdaptiveLimiter(4)
        await limiter.acquire()
        limiter.release(overloaded=True, retry_after=0.5)
        await asyncio.wait_for(limiter.acquire(), timeout=60)  # a slot is free, no pause

    run(main)


def test_the_limit_where_the_provider_refused_is_probed_slowly() -> None:
    limiter = AdaptiveLimiter(32)
    limiter.limit = 17.0
    limiter.in_flight = 17
    limiter.release(overloaded=True)  # refused at 17 with 16 still in flight: down to 16
    assert limiter.limit == 16.0
    for _ in range(16):  # one round of successes: a round's step was enough to reach 17
        limiter.on_success()
    assert 16.0 < limiter.limit < 17.0
    for _ in range(8 * 16):  # eight rounds: then it tries 17 again
        limiter.on_success()
    assert limiter.limit >= 17.0
    for _ in range(40 * 17):  # past the refused limit, it grows a step per round again
        limiter.on_success()
    assert limiter.limit == 32.0


# -- through the LM: which answers lower the limit ---------------------------------------------


@pytest.fixture()
def fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(sub=lambda req: f"echo: {req.prompt}") as server:
        yield server


def make_lm(fake: FakeAnthropic, **kwargs: Any) -> LM:
    options: dict[str, Any] = {
        "api_key": "test-key",
        "root_model": "fake-root",
        "sub_model": HAIKU,
        "base_url": fake.base_url,
        "max_retries": 2,
        "max_concurrency": 8,
    }
    return LM(**{**options, **kwargs})


async def sub_call(lm: LM, prompt: str) -> str:
    reply = await lm.acomplete(
        role="sub", model=HAIKU, system="s", messages=[{"role": "user", "content": prompt}]
    )
    return reply.text


@pytest.mark.parametrize(
    ("status", "overload"), [(429, True), (529, True), (500, False), (502, False), (503, False)]
)
def test_only_an_overload_answer_lowers_the_limit(
    fake: FakeAnthropic, status: int, overload: bool
) -> None:
    lm = make_lm(fake)
    try:
        fake.inject(Fault(status=status, retry_after_s=0.01))
        assert lm.run_async(lambda: sub_call(lm, "hello")) == "echo: hello"
    finally:
        lm.close()
    assert fake.count("sub", include_faulted=True) == 2  # retried once, then answered
    if overload:
        assert lm.limiter.overloads == 1 and lm.limiter.limit < 8
    else:
        assert lm.limiter.overloads == 0 and lm.limiter.limit == 8


def test_server_errors_in_a_fan_out_leave_the_limit_alone(fake: FakeAnthropic) -> None:
    lm = make_lm(fake, max_retries=4)
    try:
        fake.inject(Fault(status=500, retry_after_s=0.01), times=10)

        async def fan_out() -> list[str]:
            return await asyncio.gather(*(sub_call(lm, f"item {i}") for i in range(40)))

        replies = lm.run_async(fan_out)
    finally:
        lm.close()
    assert replies == [f"echo: item {i}" for i in range(40)]
    assert fake.count("sub", include_faulted=True) == 50
    assert lm.limiter.overloads == 0 and lm.limiter.limit == 8
    assert lm.limiter.in_flight == 0


def test_a_server_error_backs_off_alone(fake: FakeAnthropic) -> None:
    """A 500 with a long retry-after delays that request only: one sent after it goes at once."""
    lm = make_lm(fake)
    fake.inject(Fault(status=500, retry_after_s=30))

    async def scenario() -> tuple[bool, str]:
        first = asyncio.create_task(sub_call(lm, "first"))
        while fake.count("sub", include_faulted=True) == 0 or lm.limiter.in_flight:
            await asyncio.sleep(0.005)  # until the 500 is answered and its slot freed
        second = await asyncio.wait_for(sub_call(lm, "second"), timeout=60)
        waiting = not first.done()  # still in its own 30 s back-off
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        return waiting, second

    try:
        waiting, second = lm.run_async(scenario)
    finally:
        lm.close()
    assert second == "echo: second" and waiting
    assert lm.limiter.limit == 8 and lm.limiter.in_flight == 0


def test_a_long_retry_after_on_a_429_pauses_new_requests(fake: FakeAnthropic) -> None:
    lm = make_lm(fake)
    fake.inject(Fault(status=429, retry_after_s=1.0))

    async def scenario() -> float:
        started = time.monotonic()
        first = asyncio.create_task(sub_call(lm, "first"))
        while lm.limiter.overloads == 0:
            await asyncio.sleep(0.005)
        await asyncio.wait_for(sub_call(lm, "second"), timeout=60)
        second_done = time.monotonic() - started
        await asyncio.wait_for(first, timeout=60)
        return second_done

    try:
        second_done = lm.run_async(scenario)
    finally:
        lm.close()
    assert second_done >= 1.0  # held until the retry-after had passed
    assert fake.count("sub") == 2
