"""Tokens and USD per verdict: llm_where's verdict formats against a hand-packed ids-only
program and against one row per request, side by side in one process.

    python bench/verdict_cost_bench.py

Plans (all against the same FakeAnthropic on 127.0.0.1, through the real SDK; tokens are
what the fake bills: ~4 characters a token for the request and the reply's JSON; USD at
claude-haiku-4-5 list prices, prompt-cache writes and reads included):

* ``llm_where reasons=all|matches|none``: llm_where with 40 rows per request, dedupe and
  the prompt cache; the three verdict formats (``matches`` is the default).
* ``hand-packed ids``: what a careful REPL program does instead of llm_where —
  ``llm_query_batched`` of prompts packing 40 rows each, asking only for the matching ids
  (comma-separated); every row is sent (no dedupe), and nothing checks that every id was
  considered.
* ``one row per request``: llm_where with 1 row per request and per-row reasons (LOTUS's
  default plan), dedupe kept.

Data: support-ticket texts, 10% match. "2k distinct": 2,000 rows, all distinct. "20k rows":
20,000 rows, each of 2,000 distinct texts repeated 10 times. "correct" compares the matching
row ids with the truth.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd

from rlm_dagster import Limits, Warehouse
from rlm_dagster.engine.budget import Budget
from rlm_dagster.models.client import LM
from rlm_dagster.semantic import Semantic, WhereConfig
from rlm_dagster.testing import FakeAnthropic, FakeRequest

SUB_MODEL = "claude-haiku-4-5"
PREDICATE = "The customer reports an outage or data loss that needs escalation."
ROWS_PER_PROMPT = 40
TOPICS = [
    "the CSV export of last month's invoices",
    "adding two seats to our team plan",
    "the dashboard chart labels overlapping",
    "resetting the password for a contractor",
    "the API token that expires too early",
    "the mobile app asking to log in every day",
]
URGENT = [
    "since this morning nothing loads and the whole team is blocked",
    "half of yesterday's records are gone from the project",
]


def tickets(distinct: int, repeat: int) -> tuple[pd.DataFrame, set[int]]:
    texts = []
    for i in range(distinct):
        topic = TOPICS[i % len(TOPICS)]
        if i % 10 == 0:
            texts.append(f"#{i} Hello, about {topic}: {URGENT[i // 10 % 2]}. Please help fast.")
        else:
            texts.append(f"#{i} Hello, a question about {topic}; no rush, thanks a lot.")
    bodies = [texts[i % distinct] for i in range(distinct * repeat)]
    frame = pd.DataFrame({"id": range(len(bodies)), "body": bodies})
    truth = {i for i, b in enumerate(bodies) if any(u in b for u in URGENT)}
    return frame, truth


def judge(predicate: str, row: dict[str, Any]) -> tuple[bool, str]:
    hit = any(u in row["body"] for u in URGENT)
    return hit, "the team is blocked or data is lost" if hit else "a routine question"


def ids_only(request: FakeRequest) -> str:
    """The fake sub model of the hand-packed program: the ids of matching rows."""
    rows = re.findall(r"^(\d+)\t(.*)$", request.prompt or "", re.M)
    return ", ".join(k for k, body in rows if judge("", {"body": body})[0]) or "none"


def make_lm(fake: FakeAnthropic) -> LM:
    return LM(
        api_key="bench",
        base_url=fake.base_url,
        root_model="fake-root",
        sub_model=SUB_MODEL,
        max_concurrency=16,
    )


def measure(lm: LM) -> dict[str, Any]:
    acc = lm.accounting
    records = acc.records
    return {
        "requests": len(records),
        "input": sum(
            r.usage.input_tokens
            + r.usage.cache_creation_input_tokens
            + r.usage.cache_read_input_tokens
            for r in records
        ),
        "output": sum(r.usage.output_tokens for r in records),
        "usd": sum(r.cost_usd or 0.0 for r in records),
    }


def run_where(
    fake: FakeAnthropic, frame: pd.DataFrame, **config: Any
) -> tuple[dict[str, Any], set[int]]:
    lm = make_lm(fake)
    wh = Warehouse.from_frames({"t": frame})
    sem = Semantic(
        lm,
        wh,
        Budget(Limits(max_cost_usd=None, max_sub_calls=10**7), lm.accounting),
        config=WhereConfig(**config),
    )
    info, _, _ = sem.where("t", PREDICATE, columns=["body"])
    found = set(wh.query(f'SELECT id FROM "{info.name}"', max_rows=10**7).column("id").to_pylist())
    out = measure(lm)
    lm.close()
    wh.close()
    return out, found


def run_hand_packed(fake: FakeAnthropic, frame: pd.DataFrame) -> tuple[dict[str, Any], set[int]]:
    lm = make_lm(fake)
    sem = Semantic(
        lm,
        Warehouse.from_frames({}),
        Budget(Limits(max_cost_usd=None, max_sub_calls=10**7), lm.accounting),
    )
    ids = list(frame["id"])
    bodies = list(frame["body"])
    prompts = []
    for start in range(0, len(ids), ROWS_PER_PROMPT):
        lines = "\n".join(
            f"{k}\t{b}"
            for k, b in zip(
                ids[start : start + ROWS_PER_PROMPT],
                bodies[start : start + ROWS_PER_PROMPT],
                strict=True,
            )
        )
        prompts.append(
            f"Predicate: {PREDICATE}\nRows (id<TAB>text):\n{lines}\n"
            "Reply with the ids of the rows for which the predicate holds, comma-separated, "
            "or 'none'. Nothing else."
        )
    replies = sem.query_batched(prompts)
    found = {int(x) for reply in replies for x in re.findall(r"\d+", reply)}
    out = measure(lm)
    lm.close()
    return out, found


def main() -> None:
    lines = [
        f"# verdict_cost_bench, {date.today()}, {platform.machine()}, {os.cpu_count()} cores",
        f"# {' '.join(sys.argv)}; sub model {SUB_MODEL} list prices; tokens as the fake bills them",
        "",
        "| data | plan | requests | input tok | output tok | output tok/verdict | USD | USD vs matches | correct |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, distinct, repeat in (("2k distinct", 2_000, 1), ("20k rows, 10x dup", 2_000, 10)):
        frame, truth = tickets(distinct, repeat)
        with FakeAnthropic(where=judge, sub=ids_only) as fake:
            results = {
                "llm_where reasons=matches (default)": run_where(fake, frame, reasons="matches"),
                "llm_where reasons=none": run_where(fake, frame, reasons="none"),
                "llm_where reasons=all": run_where(fake, frame, reasons="all"),
                "hand-packed ids (llm_query_batched)": run_hand_packed(fake, frame),
                "one row per request (reasons=all)": run_where(
                    fake, frame, reasons="all", batch_rows=1
                ),
            }
        base = results["llm_where reasons=matches (default)"][0]["usd"]
        for plan, (m, found) in results.items():
            verdicts = distinct if plan.startswith(("llm_where", "one row")) else len(frame)
            lines.append(
                f"| {label} | {plan} | {m['requests']:,} | {m['input']:,} | {m['output']:,} | "
                f"{m['output'] / verdicts:.1f} | {m['usd']:.4f} | {m['usd'] / base:.2f}x | "
                f"{'yes' if found == truth else 'NO'} |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    (Path(__file__).parent / "results" / "verdict_cost_bench.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
