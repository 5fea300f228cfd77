"""A run's REPL started while the root model thinks, against started at the first cell.

    python bench/run_start_bench.py

A two-turn run (a cell, then FINAL) against the fake Messages API answering every root call
after ``LATENCY_S``, with the real sandboxed worker (level "auto"). Two plans side by side in
this process, alternating: the worker started when the first cell needs it (before), and
started in the background as the run begins (``FramedREPL.prestart``, after). The least a
run can take is two root calls, 2 x ``LATENCY_S``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

from rlm_dagster import Limits
from rlm_dagster.engine.loop import run
from rlm_dagster.models.client import LM
from rlm_dagster.repl.host import FramedREPL
from rlm_dagster.testing import FakeAnthropic, FakeRequest

LATENCY_S = 0.5
RUNS = 5
SCRIPT = ["```repl\nx = 6 * 7\nprint(x)\n```", "```repl\nFINAL(str(x))\n```"]


def root(request: FakeRequest) -> str:
    turns = sum(1 for m in request.body["messages"] if m["role"] == "assistant")
    return SCRIPT[min(turns, 1)]


def main() -> None:
    prestart = FramedREPL.prestart
    plans: dict[str, Callable[[FramedREPL], None]] = {
        "started at the first cell (before)": lambda self: None,
        "started as the run begins (after)": prestart,
    }
    walls: dict[str, list[float]] = {name: [] for name in plans}
    with FakeAnthropic(root=root, latency_s=LATENCY_S) as fake:
        lm = LM(
            api_key="bench",
            base_url=fake.base_url,
            root_model=fake.root_model,
            sub_model="claude-haiku-4-5",
        )
        try:
            for _ in range(RUNS):
                for name, plan in plans.items():
                    FramedREPL.prestart = plan  # type: ignore[method-assign]
                    started = time.perf_counter()
                    result = run("bench", lm=lm, limits=Limits(max_iterations=3, max_cost_usd=None))
                    walls[name].append(time.perf_counter() - started)
                    assert result.answer_text == "42", result.answer_text
        finally:
            FramedREPL.prestart = prestart  # type: ignore[method-assign]
            lm.close()
    lines = [
        f"# run_start_bench, {date.today()}, {platform.machine()}, {os.cpu_count()} cores",
        f"# fake root latency {LATENCY_S} s; a two-turn run; {RUNS} runs per plan, alternating",
        "",
        "| REPL worker | median wall s | min s | least possible s |",
        "|---|---:|---:|---:|",
    ]
    for name, values in walls.items():
        lines.append(
            f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {2 * LATENCY_S:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    (Path(__file__).parent / "results" / "run_start_bench.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
