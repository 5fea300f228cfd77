"""The run's llm_where verdicts table, collected in memory (before) against spooled to a file.

    python bench/verdicts_memory_bench.py            # 1M and 4M judged rows (~3 minutes)
    python bench/verdicts_memory_bench.py --quick    # 1M rows

An asset whose run called ``llm_where`` writes every judged row to ``<asset>_llm_where_verdicts``
in the user's warehouse. Before, ``Semantic.verdicts`` fetched them from the run's engine into
one Arrow table (``collect``, reimplemented here as it was) and the sink wrote that table; now
they stream from the engine into a Parquet file a record batch at a time and the sink reads
the file as a stream (``spool``). Both plans run in this process, one after the other, each
measurement in a fresh child (its own peak RSS), on the same data: N rows with 1,000 distinct
texts judged by an in-process instant model (no HTTP: the judging itself is not measured).
"peak MB" is the child's VmHWM minus its RSS just before the verdicts are made: once they
are made (collected, or spooled), and after the sink has written them (which adds what the
output DuckDB keeps of the written table in its own buffer pool, outside rlm_dagster: the
sink's connection is the user's ``DuckDBResource``, with its own memory limit).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from datetime import date
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
from dagster_duckdb import DuckDBResource
from sqlglot import exp

sys.path.insert(0, str(Path(__file__).parent))

from where_bench import PREDICATE, InstantLM

from rlm_dagster import Limits, Warehouse
from rlm_dagster.engine.budget import Budget
from rlm_dagster.semantic import VERDICT_REASON, Semantic, WhereStats
from rlm_dagster.sql.tables import DuckDBSink

VERDICT_COLUMNS = ["_verdict", VERDICT_REASON, "_decided_by", "_model", "_cost_usd", "_error"]


def collect(sem: Semantic, stats: list[WhereStats]) -> pa.Table:
    """The verdicts as Semantic.verdicts built them before: one Arrow table in memory."""
    parts = []
    for s in stats:
        name = f"{s.name}_provenance"
        added = {*VERDICT_COLUMNS, "_batch", "_clipped"}
        columns = [c for c in sem.warehouse.info(name).columns if c not in added]
        row = exp.Struct(
            expressions=[
                exp.PropertyEQ(this=exp.to_identifier(c), expression=exp.column(c, quoted=True))
                for c in columns
            ]
        )
        query = exp.select(
            exp.alias_(exp.Literal.string(s.name), "llm_where"),
            exp.alias_(exp.Literal.string(s.predicate), "predicate"),
            exp.alias_(exp.cast(exp.func("to_json", row), "VARCHAR"), "row"),
            *(exp.column(c, quoted=True) for c in [*VERDICT_COLUMNS, "_clipped"]),
        ).from_(exp.to_identifier(name, quoted=True))
        parts.append(sem.warehouse.trusted_arrow(query.sql(sem.warehouse.dialect)))
    return pa.concat_tables(parts)


def rss_mb(field: str = "VmRSS:") -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def child(conn: Connection, plan: str, n: int, out: str) -> None:
    frame = pd.DataFrame(
        {
            "id": range(n),
            "text": [f"Ticket about {i % 1_000} and more words " * 3 for i in range(n)],
        }
    )
    wh = Warehouse.from_frames({"t": frame})
    del frame
    lm = InstantLM(api_key="bench", root_model="fake-root", sub_model="claude-haiku-5-5")
    sem = Semantic(lm, wh, Budget(Limits(max_sub_calls=10**7, max_cost_usd=None), lm.accounting))
    _, _, stats = sem.where("t", PREDICATE, columns=["text"])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS: the peak from here on
    base = rss_mb()
    started = time.perf_counter()
    sink = DuckDBSink(DuckDBResource(database=out))
    if plan == "collect":
        table = collect(sem, [stats])
        rows = table.num_rows
        before_write = rss_mb("VmHWM:") - base
        sink.write(["main", "verdicts"], table, None)
        del table
    else:
        spooled = sem.verdicts([stats])
        assert spooled is not None
        rows = spooled.num_rows
        before_write = rss_mb("VmHWM:") - base
        sink.write(["main", "verdicts"], spooled.reader(), None)
        spooled.close()
    seconds = time.perf_counter() - started
    conn.send({"rows": rows, "made": before_write, "peak": rss_mb("VmHWM:") - base, "s": seconds})
    lm.close()
    wh.close()


def measure(plan: str, n: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    parent, child_end = ctx.Pipe()
    with tempfile.TemporaryDirectory() as tmp:
        proc = ctx.Process(target=child, args=(child_end, plan, n, os.path.join(tmp, "o.duckdb")))
        proc.start()
        result: dict[str, Any] = parent.recv()
        proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    sizes = [1_000_000] if parser.parse_args().quick else [1_000_000, 4_000_000]
    print(f"# verdicts_memory_bench, {date.today()}, {platform.machine()}, {os.cpu_count()} cores")
    print(f"# {' '.join(sys.argv)}; verdicts of one llm_where call written to a DuckDB file")
    print()
    print("| judged rows | plan | peak MB, verdicts made | peak MB, after the write | seconds |")
    print("|---:|---|---:|---:|---:|")
    for n in sizes:
        for plan in ("collect", "spool"):
            r = measure(plan, n)
            label = "collect in memory (before)" if plan == "collect" else "spool to a file"
            print(
                f"| {r['rows']:,} | {label} | {r['made']:,.0f} | {r['peak']:,.0f} | {r['s']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
