"""llm_where at 1M and 10M rows: host memory, wall time and cache disk writes, before vs after.

    python bench/where_scale.py                  # 1M rows / 1M distinct and 10M rows / 1M distinct
    python bench/where_scale.py --quick          # 100k / 100k and 1M / 1M
    python bench/where_scale.py --only after     # one version only (before | after)

"before" is git revision ``BASELINE`` (in-memory warehouse, dedupe and join-back in Python
lists, 64-character hex verdict keys), extracted with ``git archive`` into a temporary
directory and imported from there; "after" is the working tree's ``rlm_dagster/`` (next to
``bench/``), copied when the bench starts so that edits made while it runs reach none of its
children (the results name HEAD and the files changed from it). The targets:

* 10M rows with 1M distinct values judged with the process's peak RSS under 1 GB;
* cache disk writes at most 3x the cache's growth.

Data. Per scenario the parent process writes a table ``tickets(id, plan, body)`` into a DuckDB
file once, inside DuckDB (``range()``, ``hash()``, list indexing; nothing passes through
Python), and makes it read-only. ``body`` is a support ticket of about 60-120 characters built
from a fixed vocabulary by seeded hashes of the value number ``d``, with a ticket number made
from ``d``: row ``i`` gets ``d = i mod distinct``, rows are shuffled by ``hash(i)``, so every
distinct value occurs ``rows / distinct`` times, scattered, and the distinct count is exact.
About 10% of values carry the marker ``ESCALATE``, which the in-process judge reads (the idea
of where_bench's ``MATCH``). The ground truth (matching rows) is counted in SQL.

Runs. Each (version, scenario) runs in a child process of its own (this script with
``--child``), one at a time, so its peak RSS (``ru_maxrss``) is that configuration's alone.
The child takes ``Warehouse.snapshot(file, ["tickets"], memory_limit_mb=512)`` (the baseline's
snapshot has no memory limit parameter and is called without it), then
``Semantic(lm, wh, Budget(Limits(max_sub_calls=10**9, max_cost_usd=None), lm.accounting),
cache=Cache(<new file>)).where("tickets", PREDICATE, columns=["body"])``, then the same call
with a fresh ``Semantic`` on the warm cache ("rerun"), checks both results against the ground
truth, closes the cache and prints one JSON line. The model is ``InstantLM``: where_bench's
in-process judge (no HTTP, no latency; its reply takes the shape of the request's schema with
the version's own ``verdicts_in_schema`` where it has one), so wall time is the engine's own.

Bytes written are counted by a second child of the same configuration, started after the
first one ends, under ``strace -f -ff -y -e trace=write,pwrite64,pwritev,pwritev2
--seccomp-bpf``: the parent sums the return values of the writes whose file descriptor is the
cache file or its -wal/-journal/-shm (and, apart, the warehouse's temporary files). Times and
memory come from the first, untraced child: every traced write stops the process, and the
baseline writes its cache in millions of calls (strace makes its llm_where about 4x slower,
the new code's about 1.3x; the details below the table give each factor). ``--strace same`` counts in the timed child itself (faster,
times inflated; the details then show it), ``--strace off`` not at all. A parent watchdog
kills a child whose process tree passes ``--mem-cap-gb`` of RSS (or that leaves the host
under 1.5 GB available) or that runs past ``--timeout-min`` (``--strace-timeout-min`` for the
strace child, whose slowness is strace's); it is reported as "did not finish" with the
reason. A child that raises is reported with its traceback below the table.

Columns:

* rows, distinct: of the input table; version: before (``BASELINE``) or after (working tree);
* snap s: ``Warehouse.snapshot`` wall time; where s: the first ``llm_where`` call's wall time;
* req: requests the instant model answered in the first call (40 values a request);
* RSS MB: the child's peak RSS (``ru_maxrss``) after the first call, then after the rerun
  (``/`` separated; peak so far, so the second is never lower);
* rerun req / s: requests and wall time of the same call on the warm cache (0 expected);
* matches: matching rows of the first call, ``=`` when equal to the SQL ground truth (as are
  the rerun's, with no failed verdicts in either), else ``!= truth``;
* cache MB: size of the cache file plus its -wal right after the first call;
* growth MB: size of the cache file once the child closed it (SQLite checkpoints the WAL and
  removes it on close), i.e. what the cache grew by, starting from no file;
* cache written MB: bytes written to the cache file, -wal, -journal and -shm by the whole
  child (open, first call, rerun, close and its checkpoint);
* write amp: cache written / growth (the target is at most 3);
* wh written MB: bytes written to the warehouse's files: the "after" snapshot database and
  its spill directory; for the baseline's in-memory warehouse, what DuckDB spilled to its
  default ``.tmp`` directory (the child runs in a private working directory).

Below the table, per configuration: where rlm_dagster was imported from, the checks, the
process's VmHWM (its own peak RSS, which Linux does not inherit across exec as it does
``ru_maxrss``; the parent generates data in a subprocess and stays small, so the two agree),
the watchdog's view of peak RSS (sampled every 0.25 s), and the strace child's time, write calls and cache bytes per
phase (open + first call, rerun, close).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASELINE = "a2c8288"
STRACE = "/usr/bin/strace"
RESULTS = REPO / "bench" / "results" / "where_scale.txt"
RESULT_TAG = "WHERE_SCALE_RESULT "
PREDICATE = "The ticket asks for the issue to be escalated."
MARKER = "ESCALATE"
MEMORY_LIMIT_MB = 512
LM_LIMIT = 32
SEED = 7
HOST_MIN_AVAILABLE_GB = 1.5
CACHE_SUFFIXES = ("", "-wal", "-journal", "-shm")

# The vocabulary of the generated tickets; no entry contains MARKER.
PRODUCTS = [
    "billing",
    "sso",
    "export",
    "dashboard",
    "api",
    "mobile app",
    "webhooks",
    "reports",
    "search",
    "integrations",
    "admin console",
    "notifications",
]
OPENERS = [
    "Customer says",
    "User reports that",
    "Since this morning",
    "After the last update",
    "Admin writes:",
    "Hi support,",
    "Client mentions",
    "Via chat:",
]
ISSUES = [
    "the invoice total is wrong",
    "login fails with a 500 error",
    "CSV export times out",
    "charts fail to load",
    "webhook deliveries are delayed",
    "seats not updated after upgrade",
    "the password reset email never arrives",
    "search returns stale results",
    "the app crashes on startup",
    "API calls get 429 too often",
    "a refund has not been processed",
    "two-factor codes are rejected",
]
DETAILS = [
    "for the whole team",
    "on Safari only",
    "for about 40 users",
    "since Tuesday",
    "in the EU region",
    "now and then",
    "after switching plans",
    "on every page load",
    "for the largest workspace",
    "again",
]
PLANS = ["free", "starter", "pro", "business", "enterprise"]


@dataclass(frozen=True)
class Scenario:
    name: str
    rows: int
    distinct: int


SCENARIOS = {
    "100k": Scenario("100k", 100_000, 100_000),
    "a": Scenario("a", 1_000_000, 1_000_000),
    "b": Scenario("b", 10_000_000, 1_000_000),
}


# -- data ------------------------------------------------------------------------------------


def _sql_list(items: list[str]) -> str:
    return "[" + ", ".join("'" + s.replace("'", "''") + "'" for s in items) + "]"


def _pick(items: list[str], key: str, salt: int) -> str:
    """A seeded choice among ``items`` by ``hash(key, salt)``, in DuckDB."""
    return f"{_sql_list(items)}[(hash({key}, {salt}) % {len(items)})::BIGINT + 1]"


def generate(path: Path, scenario: Scenario, spill: Path) -> dict[str, int]:
    """Write ``tickets`` into the DuckDB file ``path`` inside DuckDB (in a process of its own,
    so the parent stays small: a child's ``ru_maxrss`` starts at its parent's peak RSS);
    return the data's facts and ground truth."""
    done = subprocess.run(
        [
            sys.executable, str(Path(__file__).resolve()), "--generate", "--db", str(path),
            "--rows", str(scenario.rows), "--distinct", str(scenario.distinct),
            "--workdir", str(spill),
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"generating {scenario.name} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def _generate(path: Path, scenario: Scenario, spill: Path) -> dict[str, int]:
    import duckdb

    con = duckdb.connect(
        str(path),
        config={"memory_limit": "2GB", "threads": 2, "temp_directory": str(spill)},
    )
    try:
        body = (
            f"'Ticket #' || (1000000 + d)::VARCHAR || ' [' || {_pick(PRODUCTS, 'd', SEED + 1)} "
            f"|| '] ' || {_pick(OPENERS, 'd', SEED + 2)} || ' ' || {_pick(ISSUES, 'd', SEED + 3)} "
            f"|| ' ' || {_pick(DETAILS, 'd', SEED + 4)} "
            f"|| CASE WHEN hash(d, {SEED + 5}) % 10 = 0 THEN ', please {MARKER}' "
            "ELSE '' END || '.'"
        )
        con.execute(
            f"CREATE TABLE tickets AS SELECT id, {_pick(PLANS, 'id', SEED + 6)} AS plan, "
            f"{body} AS body FROM (SELECT row_number() OVER (ORDER BY hash(i, {SEED})) - 1 AS id, "
            f"i % {scenario.distinct} AS d FROM range({scenario.rows}) AS t(i)) ORDER BY id"
        )
        rows, distinct, matching, min_len, avg_len, max_len = con.sql(
            f"SELECT count(*), count(DISTINCT body), count(*) FILTER (WHERE body LIKE "
            f"'%{MARKER}%'), min(length(body)), avg(length(body)), max(length(body)) FROM tickets"
        ).fetchall()[0]
        con.execute("CHECKPOINT")
    finally:
        con.close()
    assert rows == scenario.rows and distinct == scenario.distinct, (rows, distinct)
    path.chmod(0o444)
    return {
        "rows": int(rows),
        "distinct": int(distinct),
        "truth": int(matching),
        "min_len": int(min_len),
        "avg_len": round(float(avg_len)),
        "max_len": int(max_len),
        "file_mb": round(path.stat().st_size / 2**20),
    }


# -- child -----------------------------------------------------------------------------------


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def _hwm_mb() -> float:
    """VmHWM: the peak RSS of this process's own address space. Linux carries a parent's
    peak into ``ru_maxrss`` across fork + exec; VmHWM starts afresh at exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _cache_mb(path: Path) -> float:
    return sum(p.stat().st_size for s in ("", "-wal") if (p := Path(f"{path}{s}")).exists()) / 2**20


def child(args: argparse.Namespace) -> None:
    """One configuration; prints one ``RESULT_TAG`` JSON line."""
    marks: dict[str, float] = {"start": time.time()}
    sys.path.insert(0, args.src)
    import inspect

    import rlm_dagster
    from rlm_dagster import Limits, Warehouse
    from rlm_dagster.cache import Cache
    from rlm_dagster.engine.budget import Budget
    from rlm_dagster.models.client import LM, CallRecord, Completion, Usage
    from rlm_dagster.semantic import Semantic

    origin = str(Path(rlm_dagster.__file__).resolve().parent)
    assert origin.startswith(str(Path(args.src).resolve())), (origin, args.src)
    try:  # the fake API's reply shaping, where the version has it
        from rlm_dagster.testing.fake_server import verdicts_in_schema
    except ImportError:  # the baseline: one schema, {"verdicts": [...]}

        def verdicts_in_schema(verdicts: list[dict[str, Any]], schema: Any) -> dict[str, Any]:
            return {"verdicts": verdicts}

    class InstantLM(LM):
        """Answers llm_where requests in-process with the bench judge (no HTTP, no latency):
        where_bench's InstantLM, counting requests and metering through the caller's meter."""

        requests = 0

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
            self.requests += 1
            text = request["messages"][-1]["content"]
            verdicts = []
            for line in text.splitlines():
                head, _, rest = line.partition('">')
                row = json.loads(rest[: -len("</row>")])
                hit = MARKER in str(row.get("body", ""))
                verdicts.append(
                    {
                        "id": int(head[len('<row id="') :]),
                        "match": hit,
                        "reason": "asks to escalate" if hit else "no escalation asked",
                    }
                )
            usage = Usage(input_tokens=len(text) // 4, output_tokens=25 * len(verdicts))
            record = CallRecord(kwargs["role"], kwargs["model"], usage, 0.0, 0.0, "end_turn")
            meter = kwargs.get("meter")
            if meter is not None:
                meter.record(record)
            else:
                self.accounting.add(record)
            # claude-haiku-5-5 answers through structured outputs in both versions; the reply
            # takes the shape the request's schema asks for, as the API's constrained output
            # does (the after-version's default asks for reasons on matches only).
            schema = (kwargs.get("output_format") or {}).get("schema") or {}
            return Completion(
                text=json.dumps(verdicts_in_schema(verdicts, schema)),
                stop_reason="end_turn",
                record=record,
            )

    snapshot_kwargs: dict[str, Any] = {}
    if "memory_limit_mb" in inspect.signature(Warehouse.snapshot).parameters:
        snapshot_kwargs["memory_limit_mb"] = args.memory_limit_mb
    t0 = time.perf_counter()
    wh = Warehouse.snapshot(args.db, ["tickets"], **snapshot_kwargs)
    snapshot_s = time.perf_counter() - t0
    rss_snapshot, hwm_snapshot = _rss_mb(), _hwm_mb()
    marks["snapshot"] = time.time()

    lm = InstantLM(
        api_key="bench", root_model="fake-root", sub_model="claude-haiku-5-5",
        max_concurrency=LM_LIMIT,
    )  # fmt: skip
    cache_path = Path(args.workdir) / "cache.sqlite3"
    cache = Cache(cache_path)

    def where() -> tuple[Any, Any, float, int]:
        limits = Limits(max_sub_calls=10**9, max_cost_usd=None)
        sem = Semantic(lm, wh, Budget(limits, lm.accounting), cache=cache)
        before = lm.requests
        t = time.perf_counter()
        info, _, stats = sem.where("tickets", PREDICATE, columns=["body"])
        return info, stats, time.perf_counter() - t, lm.requests - before

    info, stats, where_s, requests = where()
    rss_first, hwm_first = _rss_mb(), _hwm_mb()
    cache_mb = _cache_mb(cache_path)
    marks["first"] = time.time()
    info2, stats2, rerun_s, rerun_requests = where()
    rss_rerun, hwm_rerun = _rss_mb(), _hwm_mb()
    marks["rerun"] = time.time()
    cache.close()
    marks["closed"] = time.time()
    lm.close()
    wh.close()
    with open("/proc/self/io") as f:  # all write calls of the process: strace's cross-check
        wchar = next(int(line.split()[1]) for line in f if line.startswith("wchar:"))
    result = {
        "rlm_dagster": origin,
        "snapshot_kwargs": snapshot_kwargs,
        "rows": int(stats.rows_in),
        "distinct": int(stats.distinct),
        "requests": requests,
        "stats_requests": int(stats.requests),
        "matches": int(info.rows),
        "stats_matches": int(stats.matches),
        "rerun_matches": int(info2.rows),
        "truth": args.truth,
        "failed": int(stats.failed) + int(stats2.failed),
        "correct": info.rows == stats.matches == info2.rows == args.truth
        and stats.failed == stats2.failed == 0,
        "rerun_requests": rerun_requests,
        "rerun_cached": int(stats2.cached),
        "snapshot_s": snapshot_s,
        "where_s": where_s,
        "rerun_s": rerun_s,
        "rss_snapshot_mb": rss_snapshot,
        "rss_first_mb": rss_first,
        "rss_rerun_mb": rss_rerun,
        "hwm_mb": [hwm_snapshot, hwm_first, hwm_rerun],
        "cache_mb": cache_mb,
        "marks": marks,
        "wchar": wchar,
    }
    print(
        f"{args.version} {args.rows:,} rows: {info.rows:,} matching rows, ground truth "
        f"{args.truth:,} ({'equal' if result['correct'] else 'DIFFERENT'}); rerun "
        f"{info2.rows:,} rows, {rerun_requests} requests",
        flush=True,
    )
    print(RESULT_TAG + json.dumps(result), flush=True)


# -- parent ----------------------------------------------------------------------------------


_SYSCALL = re.compile(r"^(\d+\.\d+) (\w+)\(\d+<([^>]*)>.*\) = (-?\d+)")


def written_bytes(
    trace_dir: Path, cache_path: Path, wh_roots: tuple[Path, ...], marks: dict[str, float]
) -> dict[str, Any]:
    """Bytes written per file class from the ``strace -ff`` logs in ``trace_dir``, and the
    cache's per phase of the child (by strace's timestamps against the child's ``marks``);
    streamed, so the parent stays small whatever the logs' size."""
    cache_files = {f"{cache_path}{s}" for s in CACHE_SUFFIXES}
    totals: dict[str, int] = defaultdict(int)
    calls: dict[str, int] = defaultdict(int)
    phases = {"open + first call": 0, "rerun": 0, "close": 0}
    for log in trace_dir.iterdir():
        with log.open(errors="replace") as lines:
            for line in lines:
                m = _SYSCALL.match(line)
                if m is None:
                    continue
                n = int(m.group(4))
                if n <= 0:
                    continue
                path = m.group(3).removesuffix(" (deleted)")
                if path in cache_files:
                    kind = "cache"
                    ts = float(m.group(1))
                    phase = (
                        "open + first call"
                        if ts <= marks["first"]
                        else "rerun"
                        if ts <= marks["rerun"]
                        else "close"
                    )
                    phases[phase] += n
                elif path.startswith(tuple(f"{r}/" for r in wh_roots)):
                    kind = "warehouse"
                else:
                    kind = "other"
                totals[kind] += n
                calls[kind] += 1
    return {"bytes": dict(totals), "calls": dict(calls), "cache_phases": phases}


def _tree_rss_kb(root: int) -> int:
    """RSS of ``root`` and its descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        parents[int(entry)] = int(stat.rpartition(")")[2].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child_pid, parent in parents.items():
            if parent == pid and child_pid not in tree:
                tree.add(child_pid)
                frontier.append(child_pid)
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def _available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


@dataclass
class ChildRun:
    """One child process: its JSON result, or why it has none."""

    traced: bool
    result: dict[str, Any] | None = None
    failure: str | None = None
    detail: str = ""
    watch_peak_mb: float = 0.0
    wall_s: float = 0.0
    growth_mb: float | None = None
    writes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """One (version, scenario): the untraced child (times, memory) and the strace child
    (bytes written); one child does both under ``--strace same``."""

    version: str
    scenario: Scenario
    timed: ChildRun | None = None
    traced: ChildRun | None = None


def run_child(
    version: str,
    src: Path,
    scenario: Scenario,
    data: Path,
    truth: int,
    root: Path,
    args: argparse.Namespace,
    *,
    traced: bool,
) -> ChildRun:
    """Run one configuration in its own process tree under the watchdog."""
    out = ChildRun(traced)
    what = "under strace" if traced else "untraced"
    print(f"  {version} on {scenario.name} {what} ...", file=sys.stderr, flush=True)
    work = root / f"run-{version}-{scenario.name}-{'traced' if traced else 'timed'}"
    tmp = work / "tmp"
    trace = work / "trace"
    for d in (tmp, trace):
        d.mkdir(parents=True)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--version", version,
        "--src", str(src),
        "--db", str(data),
        "--rows", str(scenario.rows),
        "--truth", str(truth),
        "--workdir", str(work),
        "--memory-limit-mb", str(args.memory_limit_mb),
    ]  # fmt: skip
    if traced:
        # -ff: one log per thread, so no call is split into unfinished/resumed halves;
        # --seccomp-bpf: only the traced calls stop the child.
        command = [
            STRACE, "-f", "-ff", "-qq", "-y", "-ttt", "-s", "0", "--seccomp-bpf",
            "-e", "trace=write,pwrite64,pwritev,pwritev2", "-e", "signal=none",
            "-o", str(trace / "w"), *command,
        ]  # fmt: skip
    timeout_min = (
        args.strace_timeout_min if traced and args.strace == "separate" else args.timeout_min
    )
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    stdout, stderr = work / "stdout.txt", work / "stderr.txt"
    started = time.monotonic()
    with stdout.open("w") as so, stderr.open("w") as se:
        # cwd: a private directory, so nothing (e.g. DuckDB's default ".tmp" spill directory
        # of an in-memory database) lands in the repository.
        proc = subprocess.Popen(
            command, cwd=work, env=env, stdout=so, stderr=se, start_new_session=True
        )
        killed = None
        try:
            while proc.poll() is None:
                rss_mb = _tree_rss_kb(proc.pid) / 1024
                out.watch_peak_mb = max(out.watch_peak_mb, rss_mb)
                elapsed = time.monotonic() - started
                if rss_mb > args.mem_cap_gb * 1024:
                    killed = f"RSS passed the {args.mem_cap_gb:g} GB cap"
                elif (available := _available_gb()) < HOST_MIN_AVAILABLE_GB:
                    killed = (
                        f"host memory low: {available:.1f} GB available at "
                        f"{rss_mb / 1024:.1f} GB RSS"
                    )
                elif elapsed > timeout_min * 60:
                    killed = f"still running after the {timeout_min:g} min timeout"
                if killed:
                    break
                time.sleep(0.25)
        finally:
            if proc.poll() is None:
                # The child's own session: strace and the Python process, nothing else.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    out.wall_s = time.monotonic() - started
    text = stdout.read_text()
    err = stderr.read_text()
    found = [line for line in text.splitlines() if line.startswith(RESULT_TAG)]
    if killed:
        out.failure = (
            f"did not finish ({killed}; killed after {out.wall_s / 60:.1f} min, "
            f"peak RSS seen {out.watch_peak_mb:,.0f} MB)"
        )
    elif proc.returncode != 0 or not found:
        tail = [line for line in err.strip().splitlines() if line.strip()]
        last = tail[-1] if tail else f"exit {proc.returncode}"
        out.failure = f"failed (exit {proc.returncode}: {last[:200]})"
        out.detail = err.strip()
    else:
        out.result = json.loads(found[-1][len(RESULT_TAG) :])
        cache = work / "cache.sqlite3"
        out.growth_mb = _cache_mb(cache)
        if traced:
            # The warehouse's files: the after-version's temporary directory (TMPDIR), and
            # the spill directory of an in-memory DuckDB (".tmp" in the working directory).
            out.writes = written_bytes(trace, cache, (tmp, work / ".tmp"), out.result["marks"])
    shutil.rmtree(work, ignore_errors=True)
    print(f"    {out.wall_s:.0f} s: {out.failure or 'ok'}", file=sys.stderr, flush=True)
    return out


COLUMNS = [
    ("rows", 10),
    ("distinct", 9),
    ("version", 7),
    ("snap s", 6),
    ("where s", 7),
    ("req", 6),
    ("RSS MB first / rerun", 20),
    ("rerun req", 9),
    ("rerun s", 7),
    ("matches", 16),
    ("cache MB", 8),
    ("growth MB", 9),
    ("cache written MB", 16),
    ("write amp", 9),
    ("wh written MB", 13),
]


def _cells(values: list[str]) -> str:
    return "| " + " | ".join(f"{v:>{w}}" for v, (_, w) in zip(values, COLUMNS, strict=True)) + " |"


HEADER = _cells([name for name, _ in COLUMNS]) + "\n|" + "---|" * len(COLUMNS)


def table_row(o: Outcome) -> str:
    s = o.scenario
    lead = [f"{s.rows:,}", f"{s.distinct:,}", f"{o.version:<7}"]
    timed = o.timed
    if timed is None or timed.result is None:
        why = timed.failure if timed is not None else "not run"
        return (
            "| "
            + " | ".join([f"{v:>{w}}" for v, (_, w) in zip(lead, COLUMNS, strict=False)])
            + (f" | {why} |")
        )
    r = timed.result
    ok = "=" if r["correct"] else "!= truth"
    written = ["", "", ""]
    traced = o.traced
    if traced is not None and traced.result is not None:
        cache_w = traced.writes["bytes"].get("cache", 0) / 2**20
        wh_w = traced.writes["bytes"].get("warehouse", 0) / 2**20
        amp = f"{cache_w / traced.growth_mb:.2f}" if traced.growth_mb else ""
        written = [f"{cache_w:,.1f}", amp, f"{wh_w:,.0f}"]
    elif traced is not None:
        written = ["see below", "", ""]
    return _cells(
        [
            *lead,
            f"{r['snapshot_s']:.1f}",
            f"{r['where_s']:.1f}",
            f"{r['requests']:,}",
            f"{r['rss_first_mb']:,.0f} / {r['rss_rerun_mb']:,.0f}",
            f"{r['rerun_requests']:,}",
            f"{r['rerun_s']:.1f}",
            f"{r['matches']:,} {ok:<8}",
            f"{r['cache_mb']:,.1f}",
            f"{timed.growth_mb:,.1f}" if timed.growth_mb is not None else "",
            *written,
        ]
    )


def details(o: Outcome) -> list[str]:
    """What the table leaves out: where the code came from, checks, the strace child."""
    name = f"{o.version} {o.scenario.name} ({o.scenario.rows:,} rows)"
    out = []
    timed, traced = o.timed, o.traced
    if timed is not None and timed.result is not None:
        r = timed.result
        out.append(
            f"{name}: rlm_dagster from {r['rlm_dagster']}; snapshot "
            f"{r['snapshot_kwargs'] or '(no memory limit parameter)'}; peak RSS after snapshot "
            f"{r['rss_snapshot_mb']:,.0f} MB; VmHWM after snapshot / first call / rerun "
            + " / ".join(f"{v:,.0f}" for v in r["hwm_mb"])
            + f" MB; parent's ru_maxrss {_rss_mb():,.0f} MB; watchdog's peak of the process tree "
            f"{timed.watch_peak_mb:,.0f} MB; matching rows {r['matches']:,} (stats "
            f"{r['stats_matches']:,}, rerun {r['rerun_matches']:,}, SQL truth {r['truth']:,}; "
            f"failed verdicts {r['failed']:,}); "
            f"requests {r['requests']:,} (stats {r['stats_requests']:,}); child wall "
            f"{timed.wall_s:.0f} s"
        )
    elif timed is not None:
        out.append(f"{name}: {timed.failure}" + (f"\n{timed.detail}" if timed.detail else ""))
    if traced is not None and traced is not timed:
        if traced.result is not None:
            t = traced.result
            slower = (
                f" ({t['where_s'] / timed.result['where_s']:.1f}x the untraced run)"
                if timed is not None and timed.result is not None and timed.result["where_s"]
                else ""
            )
            out.append(
                f"{name} under strace: where s {t['where_s']:.1f}{slower}, matching rows "
                f"{t['matches']:,} ({'=' if t['correct'] else '!='} truth), cache growth "
                f"{traced.growth_mb:,.1f} MB, child wall {traced.wall_s:.0f} s; "
                + _write_note(traced.writes, t)
            )
        else:
            out.append(
                f"{name} under strace: {traced.failure}"
                + (f"\n{traced.detail}" if traced.detail else "")
            )
    elif traced is not None and traced.result is not None:
        out.append(f"{name}: " + _write_note(traced.writes, traced.result))
    return out


def _write_note(writes: dict[str, Any], result: dict[str, Any]) -> str:
    """Write calls per file class, and cache bytes per phase of the child (by strace's
    timestamps)."""
    calls, written = writes["calls"], writes["bytes"]
    seen = sum(written.values())
    phases = writes["cache_phases"]
    return (
        f"write calls: cache {calls.get('cache', 0):,}, warehouse {calls.get('warehouse', 0):,}, "
        f"other {calls.get('other', 0):,} ({written.get('other', 0) / 2**20:,.1f} MB); cache MB "
        "written by phase: "
        + ", ".join(f"{k} {v / 2**20:,.2f}" for k, v in phases.items())
        + f"; all writes seen by strace {seen / 2**20:,.1f} MB, the process's /proc wchar "
        f"{result['wchar'] / 2**20:,.1f} MB"
    )


def working_tree() -> str:
    """HEAD and the files of rlm_dagster/ that differ from it: what "after" ran."""
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    status = subprocess.run(
        [*git, "status", "--porcelain", "--", "rlm_dagster"], capture_output=True, text=True
    )
    changed = [line[3:] for line in status.stdout.splitlines()]
    return f"the working tree's rlm_dagster/ copied at start: HEAD {head.stdout.strip()}" + (
        f"; changed or new: {', '.join(changed)}" if changed else "; no local changes"
    )


def machine() -> str:
    with open("/proc/meminfo") as f:
        total_kb = int(f.readline().split()[1])
    return (
        f"{platform.node()}: {os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), "
        f"{total_kb / 2**20:.1f} GB RAM; Python {platform.python_version()}; "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k / 100k and 1M / 1M only")
    parser.add_argument("--only", choices=["after", "before"], help="run one version only")
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                        help="run these scenarios instead (100k, a, b); repeatable")  # fmt: skip
    parser.add_argument(
        "--strace", choices=["separate", "same", "off"], default="separate",
        help="count writes in a second child under strace (default), in the timed child "
        "itself (faster, times inflated), or not at all",
    )  # fmt: skip
    parser.add_argument("--timeout-min", type=float, default=15.0, help="per untraced child")
    parser.add_argument("--strace-timeout-min", type=float, default=30.0,
                        help="per strace child under --strace separate")  # fmt: skip
    parser.add_argument("--mem-cap-gb", type=float, default=18.0, help="per child's RSS")
    parser.add_argument("--memory-limit-mb", type=int, default=MEMORY_LIMIT_MB)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--version", help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--truth", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--distinct", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.generate:
        scenario = Scenario("data", args.rows, args.distinct)
        print(json.dumps(_generate(Path(args.db), scenario, Path(args.workdir))))
        return
    # A SIGTERM ends the parent through its finally blocks: the running child is killed and
    # the temporary directory removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.strace != "off" and not Path(STRACE).exists():
        print(f"{STRACE} not found: running without write counts", file=sys.stderr)
        args.strace = "off"
    names = args.scenario or (["100k", "a"] if args.quick else ["a", "b"])
    scenarios = [SCENARIOS[n] for n in names]
    versions = ["before", "after"] if args.only is None else [args.only]
    command_line = "python " + " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]])
    started = dt.datetime.now().astimezone()
    host = machine()
    tree = working_tree()
    outcomes: list[Outcome] = []
    notes: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="where-scale-"))
    try:
        # "after": the working tree's rlm_dagster/ as it is now, copied, so that edits made
        # while the bench runs reach none of its children.
        after = root / "after"
        shutil.copytree(
            REPO / "rlm_dagster",
            after / "rlm_dagster",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        sources = {"after": after}
        if "before" in versions:
            base = root / "baseline"
            base.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(REPO), "archive", BASELINE, "rlm_dagster"],
                check=True, capture_output=True,
            )  # fmt: skip
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
            sources["before"] = base
        for scenario in scenarios:
            data = root / f"tickets-{scenario.name}.duckdb"
            t = time.perf_counter()
            facts = generate(data, scenario, root / "gen-spill")
            notes.append(
                f"data {scenario.name}: {facts['rows']:,} rows, {facts['distinct']:,} distinct "
                f"bodies of {facts['min_len']}-{facts['max_len']} chars (mean {facts['avg_len']}), "
                f"{facts['truth']:,} matching rows (SQL); {facts['file_mb']:,} MB DuckDB file, "
                f"generated in {time.perf_counter() - t:.0f} s"
            )
            print(notes[-1], file=sys.stderr, flush=True)
            for version in versions:
                o = Outcome(version, scenario)
                outcomes.append(o)

                child_args = (sources[version], scenario, data, facts["truth"], root, args)
                o.timed = run_child(version, *child_args, traced=args.strace == "same")
                if args.strace == "same":
                    o.traced = o.timed
                elif args.strace == "separate" and o.timed.result is not None:
                    # Never two heavy children at once: the strace child starts after.
                    o.traced = run_child(version, *child_args, traced=True)
                print(table_row(o), file=sys.stderr, flush=True)
            data.unlink()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    how = {
        "separate": "times and RSS from an untraced child; bytes written from a second child "
        "of the same configuration under strace --seccomp-bpf",
        "same": "one child per configuration under strace --seccomp-bpf (times inflated)",
        "off": "no strace (no write counts)",
    }[args.strace]
    lines = [
        f"# bench/where_scale.py, {started:%Y-%m-%d %H:%M %Z}",
        f"# machine: {host}",
        f"# command: {command_line}",
        f"# after = {tree}",
        f"# before = git {BASELINE} (git archive); Warehouse.snapshot memory_limit_mb="
        f"{args.memory_limit_mb} where the parameter exists; InstantLM (in-process judge, no "
        f"HTTP), max_concurrency {LM_LIMIT}, default packing (40 rows a request); {how}",
        *(f"# {n}" for n in notes),
        "",
        HEADER,
        *(table_row(o) for o in outcomes),
    ]
    extra = [line for o in outcomes for line in details(o)]
    if extra:
        lines += ["", *extra]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(f"\nwritten to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
