"""llm_query_batched at the physical limit: the limiter against the one it replaced, side by side.

    python bench/fanout_bench.py            # 100, 1,000, 10,000, 100,000 prompts (~1 h on 2 cores)
    python bench/fanout_bench.py --quick    # up to 10,000 prompts (~12 min)

Every row sends n distinct prompts through ``Semantic.query_batched`` (what the REPL's
``llm_query_batched`` calls) on an LM with ``max_concurrency=16``, to a fake Messages API
that answers each request after ``LATENCY_S`` and takes at most ``SERVER_LIMIT`` at once (429
beyond), clean or with ``FAULT_RATE`` of requests answered 500 at once (with a retry-after of
``RETRY_AFTER_S``, as the fake sends). The fake runs in a separate process, a fresh one per
row, so that this process's CPU time is the engine's own (the semantic layer, the LM, the
limiter and the SDK's HTTP client). Both limiters run in this process, on the same LM code:
"old" is the ``AdaptiveLimiter`` this one replaced, kept below as :class:`OldLimiter` and
swapped in with ``lm.limiter = OldLimiter(16)``; "new" is :class:`AdaptiveLimiter`. The old
one wakes every waiting task on every release, so its CPU grows with the square of the
queue; it is not run past ``OLD_MAX_PROMPTS``. Since ``query_batched`` pulls its prompts
through a fixed pool of ``max_concurrency`` workers, at most that many tasks wait on the
limiter, so the old one no longer shows that cost here: ``results/fanout_bench.txt`` was
measured before the pool (its old rows are the old limiter under a gather of every prompt),
``results/fanout_bench_quick.txt`` after it (both limiters now within a few points).

Columns: requests sent (answered and faulted, as the fake counted them); wall s; "bound s" is
the least wall time the fake allows, ``ceil(n / 16) x LATENCY_S`` for the n answered
requests, plus the retried requests' share: the faulted attempts' time in a slot, which is
nothing here, as the fake answers a 500 at once (their retries are among the n answered);
"% of bound" is bound over wall; engine CPU s is this process's CPU time for the whole call,
and CPU us/prompt that over n.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing as mp
import os
import platform
import resource
import time
from dataclasses import dataclass
from datetime import date
from multiprocessing.connection import Connection
from pathlib import Path

from rlm_dagster import Limits, Warehouse
from rlm_dagster.engine.budget import Budget
from rlm_dagster.models.client import LM
from rlm_dagster.semantic import Semantic
from rlm_dagster.testing import FakeRequest

LATENCY_S = 0.2
SERVER_LIMIT = 16
LM_LIMIT = 16
FAULT_RATE = 0.1
RETRY_AFTER_S = 0.05
OLD_MAX_PROMPTS = 10_000
SUB_MODEL = "claude-haiku-4-5"
RESULT = Path(__file__).parent / "results" / "fanout_bench.txt"


class OldLimiter:
    """The ``AdaptiveLimiter`` of ``rlm_dagster/models/client.py`` before issue 16, verbatim
    but for ``acquire``'s ``retry`` keyword, which it accepts and ignores (it has no queue):
    one ``asyncio.Event``, set on every release, on which every waiting task loops."""

    def __init__(self, max_limit: int) -> None:
        self.max_limit = max_limit
        self.limit = float(max_limit)
        self.in_flight = 0
        self.peak_in_flight = 0
        self.overloads = 0
        self._paused_until = 0.0
        self._changed: asyncio.Event | None = None

    async def acquire(self, *, retry: bool = False) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        while True:
            pause = self._paused_until - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            elif self.in_flight < max(1, int(self.limit)):
                self.in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                return
            else:
                self._changed.clear()
                await self._changed.wait()

    def release(self, *, overloaded: bool = False, retry_after: float | None = None) -> bool:
        self.in_flight -= 1
        lowered = False
        if overloaded:
            self.overloads += 1
            before = self.limit
            self.limit = max(1.0, min(self.limit - 1.0, max(float(self.in_flight), self.limit / 2)))
            lowered = self.in_flight > 0 and int(self.limit) < int(before)
            if retry_after is not None and retry_after >= 1.0:
                self._paused_until = max(self._paused_until, time.monotonic() + retry_after)
        if self._changed is not None:
            self._changed.set()
        return lowered

    def on_success(self) -> None:
        self.limit = min(float(self.max_limit), self.limit + 1.0 / self.limit)


def answer(request: FakeRequest) -> str:
    return f"re: {request.prompt}"


def serve(conn: Connection, fault_rate: float) -> None:
    from rlm_dagster.testing import FakeAnthropic

    fake = FakeAnthropic(
        sub=answer,
        latency_s=LATENCY_S,
        max_concurrency=SERVER_LIMIT,
        rate_limit_retry_after_s=RETRY_AFTER_S,
        fault_rate=fault_rate,
        fault_statuses=(500,),
        seed=16,
    )
    with fake:
        conn.send(fake.base_url)
        while conn.recv() == "count":
            conn.send((fake.count("sub", include_faulted=True), fake.count("sub")))


class Server:
    """A FakeAnthropic in its own process."""

    def __init__(self, fault_rate: float) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child, fault_rate), daemon=True)
        self.proc.start()
        self.base_url: str = self.conn.recv()

    def counts(self) -> tuple[int, int]:
        """Requests received, and of those answered."""
        self.conn.send("count")
        sent, answered = self.conn.recv()
        return int(sent), int(answered)

    def close(self) -> None:
        self.conn.send("stop")
        self.proc.join(timeout=30)


@dataclass
class Row:
    limiter: str
    prompts: int
    fault_rate: float
    sent: int = 0
    faults: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    run: bool = True

    @property
    def bound_s(self) -> float:
        return math.ceil(self.prompts / SERVER_LIMIT) * LATENCY_S

    def line(self) -> str:
        head = f"| {self.limiter} | {self.prompts:,} | {self.fault_rate:.0%} |"
        if not self.run:
            return head + " not run (quadratic) | | | | | |"
        return (
            f"{head} {self.sent:,} ({self.faults:,} faulted) | {self.wall_s:.1f} | "
            f"{self.bound_s:.1f} | {100 * self.bound_s / self.wall_s:.0f}% | {self.cpu_s:.1f} | "
            f"{1e6 * self.cpu_s / self.prompts:,.0f} |"
        )


HEADER = (
    "| limiter | prompts | faults | requests sent | wall s | bound s | % of bound | "
    "engine CPU s | CPU us/prompt |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def measure(limiter: str, n: int, fault_rate: float) -> Row:
    server = Server(fault_rate)
    lm = LM(
        api_key="bench",
        base_url=server.base_url,
        root_model="fake-root",
        sub_model=SUB_MODEL,
        max_concurrency=LM_LIMIT,
        max_retries=10,
    )
    if limiter == "old":
        lm.limiter = OldLimiter(LM_LIMIT)  # type: ignore[assignment]
    prompts = [f"prompt {i}: summarise ticket {i}" for i in range(n)]
    sem = Semantic(
        lm,
        Warehouse.from_frames({}),
        Budget(Limits(max_sub_calls=10**7, max_cost_usd=None), lm.accounting),
    )
    cpu0, t0 = time.process_time(), time.perf_counter()
    replies = sem.query_batched(prompts)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert replies == [f"re: {p}" for p in prompts], "replies out of order or missing"
    assert lm.limiter.in_flight == 0 and lm.limiter.peak_in_flight <= LM_LIMIT
    sent, answered = server.counts()
    lm.close()
    server.close()
    return Row(limiter, n, fault_rate, sent, sent - answered, wall, cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="up to 10,000 prompts")
    args = parser.parse_args()
    sizes = [100, 1_000, 10_000] if args.quick else [100, 1_000, 10_000, 100_000]
    command = "python bench/fanout_bench.py" + (" --quick" if args.quick else "")
    lines = [
        f"# fanout_bench, {date.today()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        f"# {command}; fake: {LATENCY_S * 1000:.0f} ms per request, {SERVER_LIMIT} in flight "
        f"(429 beyond), faulted rows: {FAULT_RATE:.0%} of requests answered 500 at once "
        f"(retry-after {RETRY_AFTER_S * 1000:.0f} ms); LM max_concurrency {LM_LIMIT}",
        "",
        HEADER,
    ]
    print("\n".join(lines), flush=True)
    for n in sizes:
        for fault_rate in (0.0, FAULT_RATE):
            for limiter in ("old", "new"):
                if limiter == "old" and n > OLD_MAX_PROMPTS:
                    row = Row(limiter, n, fault_rate, run=False)
                else:
                    row = measure(limiter, n, fault_rate)
                lines.append(row.line())
                print(lines[-1], flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines += ["", f"peak RSS of the engine process: {peak_mb:,.0f} MB"]
    print(lines[-1])
    # A quick run does not overwrite the full table.
    result = RESULT.with_name("fanout_bench_quick.txt") if args.quick else RESULT
    result.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
