"""Binding a table larger than memory: the temporary on-disk snapshot against the in-memory
copy it replaced.

    python bench/snapshot_scale.py            # 20M rows, DuckDB memory limit 1 GB
    python bench/snapshot_scale.py --rows 5000000 --limit-mb 256

The parent writes one warehouse file (``events``: id, a customer id, a plan and a ~70
character body; 20M rows by default), then runs each plan in a child process of its own, so
that "peak RSS" (the child's ``ru_maxrss``) is that plan's alone:

* ``in-memory (before)``: what ``Warehouse.snapshot`` did until this change — the bound
  table copied into an in-memory DuckDB database;
* ``on-disk snapshot``: ``Warehouse.snapshot(..., memory_limit_mb=LIMIT)`` — a temporary
  database file, paged and spilled under the limit.

Each child binds the table, then runs two queries a model would write: a group-by with
many groups (``count(DISTINCT body)``) and a top-10 by customer. "bind s" and "query s" are
wall times; "stored MB" is the size of the snapshot's directory (0 when in memory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import duckdb

QUERIES = (
    "SELECT count(DISTINCT body) AS n FROM events",
    "SELECT customer_id, count(*) AS c FROM events GROUP BY customer_id ORDER BY c DESC, "
    "customer_id LIMIT 10",
)


def make_warehouse(path: Path, rows: int) -> None:
    con = duckdb.connect(str(path))
    con.execute(
        f"CREATE TABLE events AS SELECT i AS id, (i % 250000) AS customer_id, "
        "['free', 'pro', 'enterprise'][1 + i % 3] AS plan, "
        "'ticket ' || i::VARCHAR || ': ' || md5(i::VARCHAR) || ' export failed' AS body "
        f"FROM range({rows}) AS t(i)"
    )
    con.close()


def child(plan: str, database: str, limit_mb: int) -> dict[str, object]:
    started = time.monotonic()
    if plan == "before":
        con = duckdb.connect(":memory:")
        con.execute(f"ATTACH '{database}' AS w (READ_ONLY)")
        con.execute("CREATE TABLE events AS SELECT * FROM w.events")
        con.execute("DETACH w")
        run = lambda sql: con.sql(sql).fetchall()  # noqa: E731
        stored = 0
        close = con.close
    else:
        from rlm_dagster.sql.warehouse import Warehouse

        wh = Warehouse.snapshot(database, ["events"], memory_limit_mb=limit_mb)
        run = lambda sql: [tuple(r.values()) for r in wh.query(sql).to_pylist()]  # noqa: E731
        workdir = wh._workdir
        assert workdir is not None
        stored = sum(p.stat().st_size for p in workdir.rglob("*") if p.is_file())
        close = wh.close
    bind_s = time.monotonic() - started
    started = time.monotonic()
    answers = [run(sql) for sql in QUERIES]
    query_s = time.monotonic() - started
    close()
    return {
        "bind_s": bind_s,
        "query_s": query_s,
        "stored_mb": stored / 2**20,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "answer": answers[0][0][0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--limit-mb", type=int, default=1024)
    parser.add_argument("--child", nargs=3, metavar=("PLAN", "DATABASE", "LIMIT_MB"))
    args = parser.parse_args()
    if args.child:
        plan, database, limit = args.child
        print(json.dumps(child(plan, database, int(limit))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        database = Path(tmp) / "warehouse.duckdb"
        make_warehouse(database, args.rows)
        size_mb = database.stat().st_size / 2**20
        lines = [
            f"# snapshot_scale, {date.today()}, {platform.machine()}, {os.cpu_count()} cores",
            f"# {' '.join(sys.argv)}",
            f"# events: {args.rows:,} rows, warehouse file {size_mb:,.0f} MB, "
            f"DuckDB memory limit {args.limit_mb:,} MB",
            "",
            "| plan | bind s | query s | peak RSS MB | stored MB | count(DISTINCT body) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for plan, label in (("before", "in-memory (before)"), ("after", "on-disk snapshot")):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", plan, str(database), str(args.limit_mb)],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode:
                lines.append(f"| {label} | failed: {proc.stderr.strip().splitlines()[-1]} |")
                continue
            m = json.loads(proc.stdout.strip().splitlines()[-1])
            lines.append(
                f"| {label} | {m['bind_s']:.1f} | {m['query_s']:.1f} | {m['peak_mb']:,.0f} | "
                f"{m['stored_mb']:,.0f} | {m['answer']:,} |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    out = Path(__file__).parent / "results" / "snapshot_scale.txt"
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
