"""llm_where online against llm_where through message batches, side by side in one process.

    python bench/where_batch_bench.py            # 2,000, 20,000 and 200,000 rows
    python bench/where_batch_bench.py --quick    # 2,000 rows

Both modes judge the same rows with the same predicate against the same FakeAnthropic (a
fake Messages API on 127.0.0.1, through the real SDK): online requests are answered after
``LATENCY_S`` with at most ``SERVER_LIMIT`` in flight (429 beyond); a message batch ends
``BATCH_DELAY_S`` after it was created (the real API takes minutes to hours: "most within an
hour"). Prices are the sub model's list prices (claude-haiku-4-5) for the tokens the fake
bills; batches at 50%. Rows have 10x duplication (10% distinct), 10% match.

Columns: requests and USD as billed; wall time; "bound" is what the fake allows: for online,
``ceil(requests / SERVER_LIMIT) x LATENCY_S``; for batches, the batch delay; "same verdicts"
checks the batch result against the online one row by row.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd

from rlm_dagster import Limits, Warehouse
from rlm_dagster.cache import Cache
from rlm_dagster.engine.budget import Budget
from rlm_dagster.models.client import LM
from rlm_dagster.semantic import Semantic, WhereConfig
from rlm_dagster.testing import FakeAnthropic

LATENCY_S = 0.2
SERVER_LIMIT = 16
BATCH_DELAY_S = 10.0
SUB_MODEL = "claude-haiku-4-5"
PREDICATE = "The ticket reports a problem that should be escalated."


def judge(predicate: str, row: dict[str, Any]) -> tuple[bool, str]:
    hit = "outage" in row["body"]
    return hit, "an outage" if hit else "routine"


def tickets(n: int) -> pd.DataFrame:
    distinct = max(1, n // 10)
    bodies = [
        f"ticket {i % distinct}: "
        + (
            "the whole workspace is down, outage since noon"
            if i % distinct % 10 == 0
            else "how do I export the monthly invoice as CSV"
        )
        for i in range(n)
    ]
    return pd.DataFrame({"id": range(n), "body": bodies})


def run(fake: FakeAnthropic, frame: pd.DataFrame, batches: bool, cache_dir: Path) -> dict[str, Any]:
    cache = Cache(cache_dir / f"{'batch' if batches else 'online'}.sqlite3")
    lm = LM(
        api_key="bench",
        base_url=fake.base_url,
        root_model="fake-root",
        sub_model=SUB_MODEL,
        max_concurrency=SERVER_LIMIT,
        max_retries=10,
        cache=cache,
    )
    wh = Warehouse.from_frames({"t": frame})
    sem = Semantic(
        lm,
        wh,
        Budget(Limits(max_cost_usd=None, max_sub_calls=10**7), lm.accounting, ledger=cache),
        cache=cache,
        config=WhereConfig(batch_poll_s=0.5),
    )
    started = time.monotonic()
    _, prov, stats = sem.where("t", PREDICATE, columns=["body"], batches=batches)
    wall = time.monotonic() - started
    verdicts = wh.trusted_arrow(f'SELECT _verdict FROM "{prov.name}"').column(0).to_pylist()
    lm.close()
    wh.close()
    cache.close()
    return {
        "requests": stats.requests,
        "usd": stats.cost_usd,
        "wall": wall,
        "verdicts": verdicts,
        "distinct": stats.distinct,
        "matches": stats.matches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes = [2_000] if args.quick else [2_000, 20_000, 200_000]
    lines = [
        f"# where_batch_bench, {date.today()}, {platform.machine()}, {os.cpu_count()} cores",
        f"# {' '.join(sys.argv)}; fake: {LATENCY_S} s per online request, {SERVER_LIMIT} in "
        f"flight; a batch ends {BATCH_DELAY_S:g} s after creation",
        "",
        "| rows | distinct | mode | requests | USD | wall s | bound s | matches | same verdicts |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for n in sizes:
        frame = tickets(n)
        with (
            tempfile.TemporaryDirectory() as tmp,
            FakeAnthropic(
                where=judge,
                latency_s=LATENCY_S,
                max_concurrency=SERVER_LIMIT,
                batch_delay_s=BATCH_DELAY_S,
            ) as fake,
        ):
            online = run(fake, frame, False, Path(tmp))
            batch = run(fake, frame, True, Path(tmp))
        for mode, m in (("online", online), ("message batches", batch)):
            bound = (
                -(-m["requests"] // SERVER_LIMIT) * LATENCY_S if mode == "online" else BATCH_DELAY_S
            )
            same = "yes" if m["verdicts"] == online["verdicts"] else "NO"
            lines.append(
                f"| {n:,} | {m['distinct']:,} | {mode} | {m['requests']:,} | {m['usd']:.4f} | "
                f"{m['wall']:.1f} | {bound:.1f} | {m['matches']:,} | {same} |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    (Path(__file__).parent / "results" / "where_batch_bench.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
