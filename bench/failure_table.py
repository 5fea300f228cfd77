"""What a run does when the provider or the cache fails: one Markdown table.

    python bench/failure_table.py

Each scenario runs once through the real engine (``run_rlm``: REPL worker, host, SDK, cache)
against a loopback endpoint that fails one way: a ``FakeAnthropic`` whose root script calls the
failing function while only that kind of request fails, or a failing server
(``tests/failing_servers.py``) for every request. Columns:

* outcome — the error class the run raised, or ``success`` (with its answer);
* retryable — the error's ``retryable`` (what the orchestrator's retry policy acts on);
* seconds — wall time of the run;
* requests — HTTP requests the endpoint received (failed ones included);
* kept — ledger rows and cached verdicts in the cache file after the run (what a retry
  does not pay for again, and what the spend report can see).

Settings are small so that every scenario ends in seconds (``max_retries=1``,
``request_timeout_s=2``, ``max_wall_time_s=10``) except "nothing listening", which uses the
library's default ``LM`` settings. A scenario that raises anything is reported, not fatal; one
still running after ``SCENARIO_LIMIT_S`` is reported as hung. The whole table takes well under
three minutes. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

ROOT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT_DIR / "tests"))

from failing_servers import closed_port, reset_server, trickle_server  # noqa: E402

from rlm_dagster import Limits, Warehouse, run_rlm  # noqa: E402
from rlm_dagster.cache import Cache  # noqa: E402
from rlm_dagster.models.client import LM  # noqa: E402
from rlm_dagster.semantic import WhereConfig  # noqa: E402
from rlm_dagster.testing import FakeAnthropic, FakeReply, FakeRequest, Fault  # noqa: E402

ROOT = "fake-root"
SUB = "claude-haiku-4-5"
PREDICATE = "the customer asks for help"
SCENARIO_LIMIT_S = 40.0
TOTAL_LIMIT_S = 160.0
ROWS = 40


@dataclass
class Row:
    scenario: str
    outcome: str = "not run"
    retryable: str = "—"
    seconds: float | None = None
    requests: str = "—"
    kept: str = "—"


@dataclass
class Setup:
    """What a scenario ran against, for the table."""

    lm: LM | None = None
    cache_path: Path | None = None
    count_requests: Callable[[], int] | None = None


def code(src: str) -> str:
    return f"Working on it.\n```repl\n{src}\n```"


def catching(expr: str) -> list[str]:
    """A root script whose first cell calls ``expr`` inside try/except (as a careful model
    would), then answers."""
    return [
        code(
            f"try:\n    r = {expr}\nexcept Exception as e:\n    r = 'caught ' + repr(e)[:200]\n"
            "print(r)"
        ),
        code("FINAL('answered anyway')"),
        "FINAL(answered anyway)",
    ]


def plain(expr: str) -> list[str]:
    return [code(f"r = {expr}\nprint(r)"), code("FINAL('answered anyway')"), "FINAL(done)"]


WHERE = f"llm_where(tickets, {PREDICATE!r}, columns=['body'])"


def warehouse() -> Warehouse:
    frame = pd.DataFrame(
        {
            "ticket_id": list(range(ROWS)),
            "body": [f"ticket {i}: please help with item {i}" for i in range(ROWS)],
        }
    )
    return Warehouse.from_frames({"tickets": frame})


def make_lm(base_url: str, cache: Cache | None, *, defaults: bool = False, **kwargs: Any) -> LM:
    """An LM with small retries and timeouts, or with the library's defaults for them."""
    options: dict[str, Any] = {
        "api_key": "bench-key",
        "base_url": base_url,
        "root_model": ROOT,
        "sub_model": SUB,
        "cache": cache,
    }
    if not defaults:
        options.update(max_retries=1, request_timeout_s=2.0, max_concurrency=2)
    options.update(kwargs)
    return LM(**options)


def run(lm: LM) -> Any:
    return run_rlm(
        "Which tickets ask for help?",
        warehouse=warehouse(),
        lm=lm,
        limits=Limits(max_iterations=3, max_wall_time_s=10),
        sandbox="process",
        where_config=WhereConfig(batch_rows=5),
    )


def verdicts(req: FakeRequest) -> FakeReply:
    items = [{"id": k, "match": True, "reason": "asks"} for k, _ in req.rows or []]
    return FakeReply(text=json.dumps({"verdicts": items}))


# -- scenarios: each is a context manager yielding (setup, the run to time) -------------------

Scenario = Callable[[Path], contextlib.AbstractContextManager[tuple[Setup, Callable[[], Any]]]]


def fake_scenario(
    script: list[str],
    *,
    sub: Callable[[FakeRequest], Any] | str = "a summary",
    where_reply: Callable[[FakeRequest], Any] | None = None,
    cache_hook: Callable[[Path], Cache] | None = None,
    **lm_kwargs: Any,
) -> Scenario:
    @contextlib.contextmanager
    def scenario(tmp: Path) -> Iterator[tuple[Setup, Callable[[], Any]]]:
        path = tmp / "cache.sqlite3"
        setup = Setup(cache_path=path)
        with FakeAnthropic(
            root=script,
            sub=sub,
            where=lambda p, r: (True, "asks"),
            where_reply=where_reply,
        ) as fake:
            setup.count_requests = lambda: fake.count(include_faulted=True)

            def go() -> Any:
                cache = cache_hook(path) if cache_hook else Cache(path)
                setup.lm = make_lm(fake.base_url, cache, **lm_kwargs)
                return run(setup.lm)

            yield setup, go

    return scenario


def endpoint_scenario(server: Callable[[], Any], **lm_kwargs: Any) -> Scenario:
    @contextlib.contextmanager
    def scenario(tmp: Path) -> Iterator[tuple[Setup, Callable[[], Any]]]:
        path = tmp / "cache.sqlite3"
        setup = Setup(cache_path=path)
        with server() as endpoint:
            setup.count_requests = lambda: endpoint.requests

            def go() -> Any:
                setup.lm = make_lm(endpoint.base_url, Cache(path), **lm_kwargs)
                return run(setup.lm)

            yield setup, go

    return scenario


def fails_with(status: int) -> Callable[[FakeRequest], Fault]:
    fault = Fault(status=status, retry_after_s=0.01, message=f"injected HTTP {status}")
    return lambda req: fault


def where_then_overloaded(answered: int) -> Callable[[FakeRequest], Any]:
    counter = itertools.count()
    lock = threading.Lock()

    def reply(req: FakeRequest) -> Any:
        with lock:
            n = next(counter)
        return verdicts(req) if n < answered else Fault(status=529, retry_after_s=0.01)

    return reply


def corrupt_cache(path: Path) -> Cache:
    path.write_bytes(b"this is not a SQLite database \x00\xff" * 512)
    return Cache(path)


def read_only_mid_run() -> tuple[Callable[[Path], Cache], Callable[[FakeRequest], str]]:
    """A cache that stops accepting writes once the first sub-call is being answered (as a
    file turned read-only or a full disk would): ``PRAGMA query_only`` on its connection."""
    connections: list[sqlite3.Connection] = []

    def open_cache(path: Path) -> Cache:
        real = sqlite3.connect

        def spy(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            con = real(*args, **kwargs)
            connections.append(con)
            return con

        sqlite3.connect = spy  # type: ignore[assignment]
        try:
            return Cache(path)
        finally:
            sqlite3.connect = real  # type: ignore[assignment]

    def sub(req: FakeRequest) -> str:
        for con in connections:
            with contextlib.suppress(Exception):
                con.execute("PRAGMA query_only = ON")
        return "a summary"

    return open_cache, sub


def scenarios() -> list[tuple[str, Scenario]]:
    ro_open, ro_sub = read_only_mid_run()
    return [
        (
            "401 in llm_query (caught by the code)",
            fake_scenario(catching("llm_query('hi')"), sub=fails_with(401)),
        ),
        (
            "403 in llm_query_batched (caught)",
            fake_scenario(catching("llm_query_batched(['a', 'b'])"), sub=fails_with(403)),
        ),
        (
            "404 sub model in llm_where (caught)",
            fake_scenario(catching(WHERE), where_reply=fails_with(404)),
        ),
        (
            "400 in llm_query (caught)",
            fake_scenario(catching("llm_query('hi')"), sub=fails_with(400)),
        ),
        (
            "529 on every llm_where request",
            fake_scenario(plain(WHERE), where_reply=fails_with(529)),
        ),
        (
            "529 after 2 answered llm_where batches",
            fake_scenario(plain(WHERE), where_reply=where_then_overloaded(2), max_concurrency=1),
        ),
        ("connection reset (every request)", endpoint_scenario(reset_server)),
        (
            "nothing listening (LM defaults)",
            endpoint_scenario(closed_port, defaults=True),
        ),
        ("trickling server (timeout 2 s, wall 10 s)", endpoint_scenario(lambda: trickle_server(4))),
        ("corrupt cache file", fake_scenario(plain("llm_query('hi')"), cache_hook=corrupt_cache)),
        (
            "read-only cache (writes refused mid-run)",
            fake_scenario(plain("llm_query('hi')"), sub=ro_sub, cache_hook=ro_open),
        ),
    ]


# -- running and reporting -------------------------------------------------------------------


def kept(path: Path | None) -> str:
    """Ledger rows and cached verdicts in the cache file, read with a separate connection."""
    if path is None or not path.exists():
        return "no cache file"
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            ledger = con.execute("SELECT count(*) FROM ledger").fetchone()[0]
            cached = con.execute("SELECT count(*) FROM verdicts").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error as err:
        return f"unreadable ({err})"
    return f"{ledger} ledger, {cached} verdicts"


def run_one(name: str, scenario: Scenario) -> Row:
    row = Row(name)
    box: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rlm-failure-table-") as tmp:
        setup = Setup()
        try:
            with scenario(Path(tmp)) as (setup, go):

                def target() -> None:
                    started = time.monotonic()
                    try:
                        box["value"] = go()
                    except BaseException as err:
                        box["error"] = err
                    box["seconds"] = time.monotonic() - started

                thread = threading.Thread(target=target, name=f"scenario {name}", daemon=True)
                started = time.monotonic()
                thread.start()
                thread.join(SCENARIO_LIMIT_S)
                row.seconds = box.get("seconds", time.monotonic() - started)
                if setup.count_requests is not None:
                    row.requests = str(setup.count_requests())
                if thread.is_alive():
                    row.outcome = f"HUNG (still running after {SCENARIO_LIMIT_S:g} s)"
        except BaseException as err:  # the scenario's own setup failed
            row.outcome = f"setup failed: {type(err).__name__}: {_short(err)}"
            return row
        if "error" in box:
            err = box["error"]
            row.outcome = f"{type(err).__name__}: {_short(err)}"
            row.retryable = str(getattr(err, "retryable", "—"))
        elif "value" in box:
            answer = getattr(box["value"], "answer_text", box["value"])
            row.outcome = f"success ({_short(str(answer), 40)!r})"
        if setup.lm is not None:
            with contextlib.suppress(BaseException):
                setup.lm.close()
        if row.outcome.startswith("HUNG"):
            time.sleep(0.5)  # let the stuck thread see its server go away
        row.kept = kept(setup.cache_path)
    return row


def _short(err: object, n: int = 90) -> str:
    text = " ".join(str(err).split()).replace("|", "/")
    return text if len(text) <= n else text[: n - 1] + "…"


def markdown(rows: list[Row]) -> str:
    lines = [
        "| scenario | outcome | retryable | seconds | requests sent | rows/ledger rows kept |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        seconds = "—" if r.seconds is None else f"{r.seconds:.1f}"
        lines.append(
            f"| {r.scenario} | {r.outcome} | {r.retryable} | {seconds} | {r.requests} | {r.kept} |"
        )
    return "\n".join(lines)


def main() -> int:
    logging.getLogger("rlm_dagster").setLevel(logging.CRITICAL)
    started = time.monotonic()
    rows: list[Row] = []
    for name, scenario in scenarios():
        if time.monotonic() - started > TOTAL_LIMIT_S:
            rows.append(Row(name, outcome="not run (time budget of the table used up)"))
            continue
        try:
            rows.append(run_one(name, scenario))
        except BaseException as err:  # never let one scenario stop the table
            if isinstance(err, KeyboardInterrupt):
                raise
            rows.append(Row(name, outcome=f"bench error: {type(err).__name__}: {_short(err)}"))
    print(markdown(rows))
    print(f"\n{len(rows)} scenarios in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
