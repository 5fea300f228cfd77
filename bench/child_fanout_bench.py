"""rlm_query_batched: child RLMs fanned out, against what latency x concurrency allow.

    python bench/child_fanout_bench.py            # 8, 32 and 128 children
    python bench/child_fanout_bench.py --quick    # 8 and 32

One parent run (real sandboxed REPL worker, level "auto") whose first cell calls
``rlm_query_batched`` on N prompts; each child is an RLM of its own (its own sandboxed
worker) whose root answers FINAL in one turn. The fake Messages API answers every root
turn after ``LATENCY_S``. Children run at most ``min(N, max_concurrency, 4)`` at once (a
cap chosen for memory: each child holds a worker process).

Columns: children; wall s of the rlm_query_batched call; "latency bound" =
ceil(N / 4) x LATENCY_S (the model's latency alone); "% of latency bound"; "per child s" =
wall / ceil(N / 4), i.e. what one child costs in its slot (root latency plus starting and
stopping its sandboxed worker).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

from rlm_dagster import Limits
from rlm_dagster.engine.loop import run
from rlm_dagster.models.client import LM
from rlm_dagster.testing import FakeAnthropic, FakeRequest

LATENCY_S = 0.2
SLOTS = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes = [8, 32] if args.quick else [8, 32, 128]
    lines = [
        f"# child_fanout_bench, {date.today()}, {platform.machine()}, {os.cpu_count()} cores",
        f"# {' '.join(sys.argv)}; fake root latency {LATENCY_S} s; {SLOTS} children at once",
        "",
        "| children | wall s | latency bound s | % of latency bound | per child s | answers |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for n in sizes:

        def root(req: FakeRequest, n: int = n) -> str:
            text = json.dumps(req.body.get("messages"))
            if "PARENT" in text:
                return (
                    "```repl\nimport time\nt0 = time.monotonic()\n"
                    f"r = rlm_query_batched([f'child {{i}}' for i in range({n})])\n"
                    "elapsed = time.monotonic() - t0\n"
                    "FINAL(f'{len(r)} {sum(x.startswith(\"ok\") for x in r)} {elapsed:.3f}')\n```"
                )
            return "```repl\nFINAL('ok')\n```"

        with FakeAnthropic(root=root, latency_s=LATENCY_S) as fake:
            lm = LM(
                api_key="bench",
                base_url=fake.base_url,
                root_model=fake.root_model,
                sub_model="claude-haiku-4-5",
                max_concurrency=16,
            )
            started = time.monotonic()
            result = run(
                "PARENT: fan out to the children",
                lm=lm,
                limits=Limits(max_depth=2, max_iterations=3, max_cost_usd=None),
            )
            total = time.monotonic() - started
            lm.close()
        count, ok, elapsed = result.answer_text.split()
        waves = math.ceil(n / SLOTS)
        bound = waves * LATENCY_S
        lines.append(
            f"| {n} | {float(elapsed):.1f} | {bound:.1f} | {bound / float(elapsed):.0%} | "
            f"{float(elapsed) / waves:.2f} | {ok}/{count} ok (run {total:.1f} s) |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    (Path(__file__).parent / "results" / "child_fanout_bench.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
