"""llm_where against the naive plan (one request per row, as LOTUS and FlockMTL do by default).

    python bench/where_bench.py            # N = 1k, 10k, 100k (about 10 minutes on 2 cores)
    python bench/where_bench.py --quick    # N = 1k, 10k
    python bench/where_bench.py --sweep    # by number of requests: 12 ... 1,000 (about 4 minutes)

Both plans run in this process, one after the other, against the same fake Messages API,
which runs in a separate process so that this process's CPU time is the engine's own. The
fake answers each request after ``FIXED_S + PER_TOKEN_S x output tokens`` and answers 429
(retry-after 50 ms) when more than ``SERVER_LIMIT`` requests are in flight; the LM is allowed
twice that (``LM_LIMIT``), so it must find the limit itself. A row matches when its text
contains ``MATCH``; the fake judges from the row's content only.

Columns: requests and tokens as billed by the fake; wall time; rows/s; "% of bound" is the
wall time the fake's latency and concurrency limit allow (see ``bound_s``) over the measured
wall time; "floor s" is the wall time of the very request bodies llm_where sent, sent again
by the bare SDK with exactly SERVER_LIMIT in flight and no engine (``transport_floor_s``):
what the fake, the SDK and this machine allow for the workload; "(% of it)" is that floor
over llm_where's wall time; "before/after ms" is the engine's time on the call's critical
path: from the call to its first request (input staging, dedupe, cache lookup, packing,
plan) and from its last answer to the call's return (verdict tables, provenance, matches);
"CPU us/row" is this process's CPU time per input row (planning, dedupe, the SDK's HTTP
client, parsing, result tables) and "engine us/row" the same pipeline's CPU time per row
with an in-process instant model instead of HTTP (what the engine itself costs: planning,
dedupe, packing, verdict parsing, cache, result tables); "rerun req" is the requests of
the same call repeated with the warm verdict cache. The rlm row is the median (by wall
time) of ``REPEATS[N]`` runs (5 at 1k, 3 at 10k, 1 at 100k). Each measurement's client is
warmed by one unmeasured request first (see ``lm_for``). The naive plan at 100k rows runs
on the first 10k rows and its wall time is scaled by 10 (marked "est."); its requests and
tokens scale exactly.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pandas as pd

from rlm_dagster import Limits, Warehouse
from rlm_dagster.cache import Cache
from rlm_dagster.engine.budget import Budget
from rlm_dagster.models.client import LM, Accounting, CallRecord, Completion, Usage, cached_system
from rlm_dagster.prompts import render
from rlm_dagster.semantic import VERDICTS_SCHEMA, Semantic, parse_verdicts
from rlm_dagster.testing.fake_server import verdicts_in_schema

FIXED_S = 0.2
PER_TOKEN_S = 0.00002
SERVER_LIMIT = 16
LM_LIMIT = 32
NAIVE_MAX_ROWS = 2_000
REPEATS = {1_000: 5, 10_000: 3}  # runs of the rlm plan per N; the median is reported
PREDICATE = "The ticket reports a problem that should be escalated."
WORDS = [
    "invoice",
    "export",
    "dashboard",
    "login",
    "sync",
    "api",
    "seats",
    "outage",
    "refund",
    "report",
    "chart",
    "token",
]


def judge(predicate: str, row: dict[str, Any]) -> tuple[bool, str]:
    hit = "MATCH" in str(row.get("text", ""))
    return hit, "marker present" if hit else "no marker"


def serve(conn: Connection, fault_rate: float, fixed_s: float = FIXED_S) -> None:
    from rlm_dagster.testing import FakeAnthropic

    fake = FakeAnthropic(
        where=judge,
        latency_s=fixed_s,
        latency_per_output_token_s=PER_TOKEN_S,
        max_concurrency=SERVER_LIMIT,
        rate_limit_retry_after_s=0.05,
        fault_rate=fault_rate,
        seed=11,
    )
    with fake:
        conn.send(fake.base_url)
        conn.recv()  # until told to stop


class Server:
    def __init__(self, fault_rate: float = 0.0) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child, fault_rate, FIXED_S), daemon=True)
        self.proc.start()
        self.base_url: str = self.conn.recv()

    def close(self) -> None:
        self.conn.send("stop")
        self.proc.join(timeout=30)


def make_rows(n: int, dup_rate: float, selectivity: float, seed: int = 1) -> pd.DataFrame:
    rng = random.Random(seed)
    texts: list[str] = []
    for i in range(n):
        if texts and rng.random() < dup_rate:
            texts.append(texts[rng.randrange(len(texts))])
            continue
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40)))
        marker = " MATCH" if rng.random() < selectivity else ""
        texts.append(f"Ticket {i}: {words}{marker}.")
    return pd.DataFrame({"id": range(n), "text": texts})


@dataclass
class Measure:
    rows: int
    requests: int
    input_tokens: int
    output_tokens: int
    wall_s: float
    cpu_s: float
    bound_s: float
    matches: frozenset[int]
    rerun_requests: int | None = None
    engine_cpu_s: float | None = None
    floor_s: float | None = None
    # the engine's time before the first send and after the last answer
    edges_s: tuple[float, float] | None = None
    scaled: float = 1.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / (self.wall_s * self.scaled)


def lm_for(base_url: str) -> LM:
    """A client for one measurement, warmed by one request that is not measured: in a run,
    llm_where is called after the root's turns, through a client whose event loop, SDK
    client and connection exist (a cold client costs a few ms, the process's first one
    35-70 ms more for its TLS context, and the fake's first request about 130 ms, which
    would weigh on the 0.4 s bound of 1,000 rows). Both plans are warmed alike."""
    lm = LM(
        api_key="bench",
        base_url=base_url,
        root_model="fake-root",
        sub_model="claude-haiku-5-5",
        max_concurrency=LM_LIMIT,
        max_retries=10,
    )
    lm.complete(
        role="sub",
        model=lm.sub_model,
        system="warm-up",
        messages=[{"role": "user", "content": "warm-up"}],
        max_tokens=16,
    )
    lm.accounting = Accounting()  # the warm-up is not part of the measurement
    return lm


class InstantLM(LM):
    """Answers llm_where requests in-process with the bench judge: no HTTP, no latency."""

    async def acomplete(self, **kwargs: Any) -> Completion:  # type: ignore[override]
        request = self._request(
            kwargs["role"],
            kwargs["model"],
            kwargs["system"],
            kwargs["messages"],
            kwargs.get("max_tokens"),
            kwargs.get("tools"),
            kwargs.get("tool_choice"),
            kwargs.get("output_format"),
        )
        text = request["messages"][-1]["content"]
        verdicts = []
        for line in text.splitlines():
            head, _, rest = line.partition('">')
            match, reason = judge(PREDICATE, json.loads(rest[: -len("</row>")]))
            verdicts.append({"id": int(head[len('<row id="') :]), "match": match, "reason": reason})
        usage = Usage(input_tokens=len(text) // 4, output_tokens=25 * len(verdicts))
        record = CallRecord(kwargs["role"], kwargs["model"], usage, 0.0, 0.0, "end_turn")
        self.accounting.add(record)
        return Completion(
            text=json.dumps(verdicts_in_schema(verdicts, kwargs["output_format"]["schema"])),
            stop_reason="end_turn",
            record=record,
        )


def engine_cpu_s(frame: pd.DataFrame) -> float:
    """CPU seconds of the whole llm_where pipeline with the instant model (no HTTP)."""
    wh = Warehouse.from_frames({"t": frame})
    lm = InstantLM(
        api_key="bench",
        root_model="fake-root",
        sub_model="claude-haiku-5-5",
        max_concurrency=LM_LIMIT,
    )
    sem = Semantic(
        lm, wh, Budget(Limits(max_sub_calls=10_000_000, max_cost_usd=None), lm.accounting)
    )
    cpu0 = time.process_time()
    sem.where("t", PREDICATE, columns=["text"])
    cpu = time.process_time() - cpu0
    lm.close()
    wh.close()
    return cpu


def bound_s(lm: LM) -> float:
    """The least wall time the fake allows for these requests: their summed latency spread
    over SERVER_LIMIT slots, but no less than the slowest request or ceil(n / limit) waves."""
    latencies = [
        FIXED_S + PER_TOKEN_S * r.usage.output_tokens
        for r in lm.accounting.records
        if r.role == "where"
    ]
    if not latencies:
        return 0.0
    waves = -(-len(latencies) // SERVER_LIMIT)
    return max(sum(latencies) / SERVER_LIMIT, max(latencies), waves * min(latencies))


def record_requests(lm: LM) -> tuple[list[dict[str, Any]], list[float]]:
    """The request bodies ``lm`` gets answers to from now on (a 429'd attempt is not one),
    and when the first attempt was sent and the last one answered (perf_counter seconds)."""
    client = lm._aclient
    assert client is not None, "warm the LM first (lm_for does)"
    create = client.messages.create
    answered: list[dict[str, Any]] = []
    edges: list[float] = []

    async def recording(**kwargs: Any) -> Any:
        if not edges:
            edges.append(time.perf_counter())
        try:
            message = await create(**kwargs)
        finally:
            edges[1:] = [time.perf_counter()]
        answered.append(kwargs)
        return message

    client.messages.create = recording  # type: ignore[method-assign]
    return answered, edges


def transport_floor_s(base_url: str, bodies: list[dict[str, Any]]) -> float:
    """Wall time of the same request bodies sent by the bare SDK (a warmed client, exactly
    SERVER_LIMIT in flight, so no 429), with no engine at all: what this fake, the SDK and
    this machine allow for the workload, below which no client can go."""
    import asyncio

    import anthropic

    async def send() -> float:
        client = anthropic.AsyncAnthropic(api_key="bench", base_url=base_url, max_retries=5)
        await client.messages.create(
            model="claude-haiku-5-5",
            max_tokens=16,
            messages=[{"role": "user", "content": "warm-up"}],
        )
        slots = asyncio.Semaphore(SERVER_LIMIT)

        async def one(body: dict[str, Any]) -> None:
            async with slots:
                await client.messages.create(**body)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - t0
        await client.close()
        return wall

    return asyncio.run(send())


def run_ours(base_url: str, frame: pd.DataFrame, cache_dir: Path) -> Measure:
    wh = Warehouse.from_frames({"t": frame})
    lm = lm_for(base_url)
    cache = Cache(cache_dir / f"bench-{time.monotonic_ns()}.sqlite3")
    limits = Limits(max_sub_calls=10_000_000, max_cost_usd=None)
    sem = Semantic(lm, wh, Budget(limits, lm.accounting), cache=cache)
    bodies, edges = record_requests(lm)
    cpu0, t0 = time.process_time(), time.perf_counter()
    info, _, stats = sem.where("t", PREDICATE, columns=["text"])
    t1 = time.perf_counter()
    wall, cpu = t1 - t0, time.process_time() - cpu0
    matches = frozenset(wh.query(f"SELECT id FROM {info.name}", max_rows=10**7).to_pydict()["id"])
    usage = lm.accounting.usage
    measure = Measure(
        len(frame),
        stats.requests,
        usage.input_tokens,
        usage.output_tokens,
        wall,
        cpu,
        bound_s(lm),
        matches,
    )
    _, _, rerun = Semantic(lm, wh, Budget(limits, lm.accounting), cache=cache).where(
        "t", PREDICATE, columns=["text"]
    )
    measure.edges_s = (edges[0] - t0, t1 - edges[1])
    measure.rerun_requests = rerun.requests
    measure.engine_cpu_s = engine_cpu_s(frame)
    measure.floor_s = transport_floor_s(base_url, bodies)
    lm.close()
    cache.close()
    wh.close()
    return measure


def median_run(base_url: str, frame: pd.DataFrame, cache_dir: Path, repeats: int) -> Measure:
    """The median (by wall time) of ``repeats`` runs of llm_where, each checked to find the
    same matches as the first."""
    runs = [run_ours(base_url, frame, cache_dir) for _ in range(repeats)]
    assert all(m.matches == runs[0].matches for m in runs), "runs differ"
    return sorted(runs, key=lambda m: m.wall_s)[len(runs) // 2]


def run_naive(base_url: str, frame: pd.DataFrame) -> Measure:
    """One request per row, every row, no cache: the default plan of LOTUS and FlockMTL."""
    import asyncio

    sample = frame.iloc[:NAIVE_MAX_ROWS]
    lm = lm_for(base_url)
    answer_format = render(
        "where_answer_json.md", shape=render("where_shape_all.md").strip()
    ).strip()
    system = cached_system(
        render("where_system.md", predicate=PREDICATE, answer_format=answer_format)
    )
    matches: set[int] = set()

    async def one(row_id: int, text: str) -> None:
        reply = await lm.acomplete(
            role="where",
            model=lm.sub_model,
            system=system,
            messages=[
                {"role": "user", "content": f'<row id="0">{json.dumps({"text": text})}</row>'}
            ],
            max_tokens=260,
            output_format={"type": "json_schema", "schema": VERDICTS_SCHEMA},
        )
        verdicts, _ = parse_verdicts(json.loads(reply.text), 1)
        if verdicts.get(0) and verdicts[0].match:
            matches.add(row_id)

    async def run() -> None:
        await asyncio.gather(
            *(one(i, t) for i, t in zip(sample["id"], sample["text"], strict=True))
        )

    cpu0, t0 = time.process_time(), time.perf_counter()
    lm.run_async(run)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    usage = lm.accounting.usage
    scale = len(frame) / len(sample)
    lm.close()
    return Measure(
        len(frame),
        round(len(sample) * scale),
        round(usage.input_tokens * scale),
        round(usage.output_tokens * scale),
        wall,
        cpu,
        bound_s(lm) * scale,
        frozenset(matches),
        scaled=scale,
    )


def row(n: int, dup: float, sel: float, plan: str, m: Measure) -> str:
    est = " est." if m.scaled != 1.0 else ""
    wall = m.wall_s * m.scaled
    pct = 100 * m.bound_s / wall if wall else 0.0
    rerun = "" if m.rerun_requests is None else f"{m.rerun_requests:,}"
    engine = "" if m.engine_cpu_s is None else f"{1e6 * m.engine_cpu_s / m.rows:,.1f}"
    floor = "" if m.floor_s is None else f"{m.floor_s:.2f} ({100 * m.floor_s / wall:.0f}%)"
    edges = "" if m.edges_s is None else f"{1e3 * m.edges_s[0]:.0f} / {1e3 * m.edges_s[1]:.0f}"
    return (
        f"| {n:>7,} | {dup:>4.0%} | {sel:>4.0%} | {plan:<9} | {m.requests:>8,} | {m.input_tokens:>11,} | "
        f"{m.output_tokens:>10,} | {wall:>7.1f}{est:<5} | {m.rows / wall:>8,.0f} | {pct:>5.0f}% | "
        f"{floor:>12} | {edges:>9} | {1e6 * m.cpu_s / (m.rows / m.scaled):>7,.0f} | {engine:>6} | {rerun:>9} |"
    )


SWEEP = [480, 1_000, 2_000, 4_000, 10_000, 40_000]  # distinct rows: 12 ... 1,000 requests


def sweep() -> None:
    """llm_where by the number of requests it sends (distinct rows, 5% matching), each
    against the fake's bound and the bare SDK's floor for the same bodies: where the engine's
    fixed cost (the before/after ms) and the transport's weigh, and from where on neither does."""
    print(
        f"fake server: {FIXED_S * 1000:.0f} ms + {PER_TOKEN_S * 1e6:.0f} us/output token per "
        f"request, 429 above {SERVER_LIMIT} in flight; LM max_concurrency {LM_LIMIT}; distinct "
        "rows, 5% matching; median of 5 runs (3 from 250 requests on)\n"
    )
    print(
        "|    rows | requests | bound s | floor s (% of bound) | wall s | % of bound | "
        "% of floor | before/after ms |"
    )
    print("|" + "---|" * 8)
    server = Server()
    with tempfile.TemporaryDirectory() as tmp:
        for n in SWEEP:
            frame = make_rows(n, 0.0, 0.05)
            m = median_run(server.base_url, frame, Path(tmp), 5 if n < 10_000 else 3)
            assert m.floor_s is not None and m.edges_s is not None
            print(
                f"| {n:>7,} | {m.requests:>8,} | {m.bound_s:>7.2f} | "
                f"{m.floor_s:>7.2f} ({100 * m.bound_s / m.floor_s:>3.0f}%) | {m.wall_s:>6.2f} | "
                f"{100 * m.bound_s / m.wall_s:>9.0f}% | {100 * m.floor_s / m.wall_s:>9.0f}% | "
                f"{1e3 * m.edges_s[0]:>5.0f} / {1e3 * m.edges_s[1]:<5.0f} |",
                flush=True,
            )
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 1k and 10k only")
    parser.add_argument(
        "--sweep", action="store_true", help="by number of requests (12 ... 1,000), rlm only"
    )
    args = parser.parse_args()
    if args.sweep:
        sweep()
        return
    sizes = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000]
    print(
        f"fake server: {FIXED_S * 1000:.0f} ms + {PER_TOKEN_S * 1e6:.0f} us/output token per request, "
        f"429 above {SERVER_LIMIT} in flight; LM max_concurrency {LM_LIMIT}; default packing "
        "(40 rows, 4,000 tokens per request)\n"
    )
    print(
        "|       N |  dup |  sel | plan      | requests | input tokens | output tok | wall s       |   rows/s | "
        "bound | floor s (% of it) | before/after ms | CPU us/row | engine us/row | rerun req |"
    )
    print("|" + "---|" * 15)
    server = Server()
    clean: frozenset[int] = frozenset()
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            for dup in (0.0, 0.5):
                for sel in (0.05, 0.30):
                    frame = make_rows(n, dup, sel)
                    truth = frozenset(
                        int(i)
                        for i, t in zip(frame["id"], frame["text"], strict=True)
                        if "MATCH" in t
                    )
                    # Run-to-run noise is 50-100 ms, more than a tenth of a call of a few
                    # waves: the median of REPEATS[n] runs (by wall time) is reported.
                    ours = median_run(server.base_url, frame, Path(tmp), REPEATS.get(n, 1))
                    assert ours.matches == truth, "rlm_dagster result differs"
                    print(row(n, dup, sel, "rlm", ours), flush=True)
                    naive = run_naive(server.base_url, frame)
                    naive_truth = frozenset(i for i in truth if i < NAIVE_MAX_ROWS)
                    assert naive.matches == naive_truth, "naive result differs from ground truth"
                    print(row(n, dup, sel, "naive", naive), flush=True)
                    if n == 10_000 and dup == 0.5 and sel == 0.30:
                        clean = ours.matches
        server.close()
        # The same filter with 10% of requests answered 429/529/500 must give the same rows.
        faulty = Server(fault_rate=0.10)
        frame = make_rows(10_000, 0.5, 0.30)
        measure = run_ours(faulty.base_url, frame, Path(tmp))
        faulty.close()
    same = measure.matches == clean if clean else None
    print(
        f"\n10k rows, 50% dup, 30% sel, 10% of requests faulted (429/529/500): "
        f"{len(measure.matches):,} matches, identical to the clean run: {same}; wall {measure.wall_s:.1f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
