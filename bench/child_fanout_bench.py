"""rlm_query_batched: child RLMs fanned out, against what latency x concurrency allow.

    python bench/child_fanout_bench.py            # 8, 32 and 128 children
    python bench/child_fanout_bench.py --quick    # 8 and 32

One parent run (real sandboxed REPL worker, level "auto") whose first cell calls
``rlm_query_batched`` on N prompts; each child is an RLM of its own whose root answers FINAL
in one turn. The fake Messages API answers every root turn after ``LATENCY_S``. Children run
at most ``min(N, max_concurrency, 4)`` at once. Two plans, side by side in this process:

- ``worker per child``: every child starts its own sandboxed worker process (two
  interpreters and pandas, ~0.4 s of CPU), as before the fork server;
- ``forked``: every child's REPL is a fork of the run's fork server (started in the
  background as the parent run starts; each fork is made while the child's first model call
  is in flight).

Columns: children; plan; wall s of the rlm_query_batched call; "latency bound" =
ceil(N / 4) x LATENCY_S (the model's latency alone); "% of latency bound"; "per child s" =
wall / ceil(N / 4), i.e. what one child costs in its slot; host CPU s: this process's CPU
time during the whole run (the engine and the fake server's threads; the REPL processes'
own CPU is not in it).
"""

from __future__ import annotations

import argparse
import functools
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
from rlm_dagster.repl import Worker
from rlm_dagster.repl.seam import REPLFactory
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
        "| children | plan | wall s | latency bound s | % of latency bound | per child s | "
        "host CPU s | answers |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    plans: list[tuple[str, REPLFactory | None]] = [
        ("worker per child", functools.partial(Worker)),  # not `Worker`: no fork server
        ("forked", None),
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

        for plan, repl in plans:
            with FakeAnthropic(root=root, latency_s=LATENCY_S) as fake:
                lm = LM(
                    api_key="bench",
                    base_url=fake.base_url,
                    root_model=fake.root_model,
                    sub_model="claude-haiku-4-5",
                    max_concurrency=16,
                )
                started, cpu0 = time.monotonic(), time.process_time()
                result = run(
                    "PARENT: fan out to the children",
                    lm=lm,
                    limits=Limits(max_depth=2, max_iterations=3, max_cost_usd=None),
                    repl=repl,
                )
                total, cpu = time.monotonic() - started, time.process_time() - cpu0
                lm.close()
            count, ok, elapsed = result.answer_text.split()
            waves = math.ceil(n / SLOTS)
            bound = waves * LATENCY_S
            lines.append(
                f"| {n} | {plan} | {float(elapsed):.1f} | {bound:.1f} | "
                f"{bound / float(elapsed):.0%} | {float(elapsed) / waves:.2f} | {cpu:.1f} | "
                f"{ok}/{count} ok (run {total:.1f} s) |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    (Path(__file__).parent / "results" / "child_fanout_bench.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
