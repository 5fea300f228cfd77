"""The cache + ledger store, SQLite and PostgreSQL: one contract, and what holds across hosts.

The contract tests run against both stores. The PostgreSQL ones use a real server on
127.0.0.1 (``postgres_server`` in conftest.py); "hosts" are subprocesses with their own
working directory, HOME and TMPDIR, sharing only the database URL and the fake model server.
"""

from __future__ import annotations

import collections
import doctest
import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest
from dagster_duckdb import DuckDBResource
from postgres_server import PASSWORD, PostgresServer, free_port

import rlm_dagster.cache
from rlm_dagster import RLMResource, rlm_asset
from rlm_dagster.cache import (
    SPEND_SQL,
    Cache,
    CacheStore,
    open_cache,
    redact_location,
    value_hash,
    verdict_key,
    verdict_scope,
)
from rlm_dagster.cache_postgres import PostgresCache
from rlm_dagster.errors import CacheError, ConfigError
from rlm_dagster.prompts import PROMPT_VERSION
from rlm_dagster.testing import FakeAnthropic, FakeRequest

VALUES = [
    "refund please",
    "",
    "Kündigung zum Monatsende",
    "返金してください",
    "emoji 🚀 and \x00 nul",
]


@pytest.fixture(params=["sqlite", "postgres"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a store lives: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "cache.sqlite3")
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def store(location: str) -> Iterator[CacheStore]:
    cache = open_cache(location)
    yield cache
    cache.close()


@pytest.fixture
def other(location: str) -> Iterator[CacheStore]:
    """A second handle on the same store, as another process or host opens it."""
    cache = open_cache(location)
    yield cache
    cache.close()


def ledger_row(run_id: str, cache_hit: int, **extra: Any) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "asset": "answer",
        "depth": 0,
        "role": "sub",
        "model": "claude-haiku-4-5",
        "input_tokens": 100,
        "output_tokens": 10,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cost_usd": 0.0 if cache_hit else 0.25,
        "latency_s": 0.5,
        "cache_hit": cache_hit,
        **extra,
    }


def raw_rows(location: str, query: str) -> list[tuple[Any, ...]]:
    """``query`` run with the database's own client, not through the store."""
    if location.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(location) as con:
            return [tuple(row) for row in con.execute(query)]
    con = sqlite3.connect(location)
    try:
        return [tuple(row) for row in con.execute(query)]
    finally:
        con.close()


def verdict_write_order(store: CacheStore, location: str) -> Callable[[], list[bytes]]:
    """The keys in the order the store wrote them: SQLite's statement trace; in PostgreSQL,
    the heap order of a new table (``ctid``) is the insertion order."""
    if isinstance(store, Cache):
        log: list[str] = []
        store._con.set_trace_callback(log.append)
        return lambda: [
            bytes.fromhex(m.group(1))
            for s in log
            if "INTO verdicts" in s and (m := re.search(r"x'([0-9a-f]+)'", s))
        ]
    return lambda: [
        bytes(k) for (k,) in raw_rows(location, "SELECT key FROM verdicts ORDER BY ctid")
    ]


# -- keys and locations -------------------------------------------------------------------


def test_verdict_keys_follow_the_spec() -> None:
    predicate, model = "threatens to cancel", "claude-haiku-4-5"
    seed = predicate.encode() + b"\0" + model.encode() + b"\0" + PROMPT_VERSION.encode() + b"\0"
    assert verdict_scope(predicate, model) == hashlib.sha256(seed).digest()[:8]
    for value in VALUES:
        key = verdict_key(predicate, model, value)
        assert len(key) == 24 and key == verdict_scope(predicate, model) + value_hash(value)
        assert value_hash(value) == hashlib.sha256(value.encode("utf-8")).digest()[:16]
    assert verdict_scope(predicate, model) != verdict_scope(predicate, "claude-opus-4-1")
    assert verdict_scope(predicate, model) != verdict_scope(predicate + " ", model)
    assert len({value_hash(v) for v in VALUES}) == len(VALUES)


def test_duckdb_computes_the_same_value_hashes() -> None:
    """Keys are also computed inside DuckDB: the same bytes, non-ASCII values included."""
    got = duckdb.execute(
        "SELECT v, unhex(left(sha256(v), 32)) FROM unnest(?::VARCHAR[]) AS t(v)", [VALUES]
    ).fetchall()
    assert len(got) == len(VALUES)
    assert {v: bytes(h) for v, h in got} == {v: value_hash(v) for v in VALUES}


def test_the_module_doctests_run() -> None:
    result = doctest.testmod(rlm_dagster.cache)
    assert result.attempted >= 8 and result.failed == 0


def test_locations_are_printed_without_a_password() -> None:
    url = "postgresql://rlm:s3cr%40t-pw@db.internal:5432/rlm?sslmode=require"
    assert (
        redact_location(url) == "postgresql://rlm:[REDACTED]@db.internal:5432/rlm?sslmode=require"
    )
    assert "s3cr3t" not in redact_location("postgres://h/db?user=rlm&password=s3cr3t&x=1")
    assert redact_location("postgres://rlm@h/db") == "postgres://rlm@h/db"
    assert redact_location("/var/cache/rlm.sqlite3") == "/var/cache/rlm.sqlite3"
    assert RLMResource(provider="demo", cache_path=url).cache_location() == redact_location(url)


def test_open_cache_picks_the_store_from_the_location(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = open_cache(tmp_path / "c.sqlite3")
    assert isinstance(cache, Cache) and isinstance(cache, CacheStore)
    assert cache.location == str(tmp_path / "c.sqlite3")
    cache.close()
    with pytest.raises(ConfigError, match="postgresql://") as info:
        open_cache("mysql://rlm:hunter2@db/rlm")
    assert "hunter2" not in str(info.value)
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if psycopg were not installed
    with pytest.raises(ConfigError, match=r"pip install 'rlm-dagster\[postgres\]'") as info:
        open_cache("postgres://rlm:hunter2@db/rlm")
    assert "hunter2" not in str(info.value)


# -- the contract, on both stores ---------------------------------------------------------


def test_calls_round_trip(store: CacheStore, other: CacheStore) -> None:
    reply = {"text": "hi ✓", "stop_reason": "end_turn", "tool_calls": [], "usage": {"x": 3}}
    assert store.get_call("k1") is None
    store.put_call("k1", "claude-haiku-4-5", reply)
    assert other.get_call("k1") == reply
    other.put_call("k1", "claude-haiku-4-5", {**reply, "text": "again"})
    assert (store.get_call("k1") or {})["text"] == "again"
    assert store.get_call("k2") is None


def test_verdicts_are_written_in_key_order_with_their_ledger_rows(
    store: CacheStore, other: CacheStore, location: str
) -> None:
    keys = [verdict_key("p", "claude-haiku-4-5", v) for v in VALUES]
    rows = [(k, i % 2 == 0, f"reason {i} ✓", "claude-haiku-4-5") for i, k in enumerate(keys)]
    order = verdict_write_order(store, location)
    store.commit(verdicts=list(reversed(rows)), ledger=[ledger_row("r1", 0)])
    assert order() == sorted(keys) != keys
    found = other.get_verdicts([*keys, verdict_key("p", "claude-haiku-4-5", "never judged")])
    assert found == {k: (match, reason) for k, match, reason, _ in rows}
    assert all(type(k) is bytes and type(v[0]) is bool for k, v in found.items())
    assert len(other.ledger("r1")) == 1  # committed with the verdicts
    store.put_verdicts([(keys[0], False, "changed", "claude-haiku-4-5")])
    assert other.get_verdicts([keys[0]]) == {keys[0]: (False, "changed")}
    assert other.get_verdicts([]) == {}


def test_many_verdicts_in_one_commit_and_one_lookup(store: CacheStore, other: CacheStore) -> None:
    keys = [verdict_key("p", "m", f"value {i}") for i in range(12_000)]  # several chunks
    store.put_verdicts([(k, i % 3 == 0, "r", "m") for i, k in enumerate(keys)])
    found = other.get_verdicts(keys)
    assert len(found) == len(keys)
    assert sum(match for match, _ in found.values()) == 4_000


def test_leases_are_exclusive_renewable_and_expire(store: CacheStore, other: CacheStore) -> None:
    assert store.lease_holder("llm_where:x") is None
    assert store.try_lease("llm_where:x", "host-a", 30)
    assert not other.try_lease("llm_where:x", "host-b", 30)
    assert other.lease_holder("llm_where:x") == "host-a"  # who to wait for (or take over from)
    assert store.try_lease("llm_where:x", "host-a", 30)  # the owner renews it
    other.release_lease("llm_where:x", "host-b")  # not host-b's: nothing happens
    assert not other.try_lease("llm_where:x", "host-b", 30)
    assert other.try_lease("llm_where:y", "host-b", 30)  # another name is another lease
    store.release_lease("llm_where:x", "host-a")
    assert other.try_lease("llm_where:x", "host-b", 0.3)
    assert not store.try_lease("llm_where:x", "host-a", 30)
    time.sleep(0.5)  # host-b's lease expires: host-a takes it over
    assert store.lease_holder("llm_where:x") is None  # an expired lease has no holder
    assert store.try_lease("llm_where:x", "host-a", 30)
    assert not other.try_lease("llm_where:x", "host-b", 30)


def test_the_ledger_keeps_every_field_and_the_batch_id(
    store: CacheStore, other: CacheStore
) -> None:
    store.record([ledger_row("r1", 0), ledger_row("r1", 0, batch_id="msgbatch_01")])
    store.commit(ledger=[ledger_row("r2", 1, thinking_tokens=7, partition="2026-01-01")])
    rows = other.ledger("r1")
    assert [r["batch_id"] for r in rows] == [None, "msgbatch_01"]
    first = rows[0]
    expected = {**ledger_row("r1", 0), "partition": None, "thinking_tokens": 0, "batch_id": None}
    assert {k: first[k] for k in expected} == expected
    assert isinstance(first["created"], float)
    assert [(r["run_id"], r["thinking_tokens"]) for r in other.ledger()] == [
        ("r1", 0),
        ("r1", 0),
        ("r2", 7),
    ]
    assert other.ledger("r2")[0]["partition"] == "2026-01-01"


def test_submitted_batches_are_kept_until_finished(store: CacheStore, other: CacheStore) -> None:
    blob = verdict_key("p", "m", "a") + verdict_key("p", "m", "b")
    store.put_batch("where:job1", "msgbatch_1", "m", {"r1": blob[:24], "r0": blob})
    store.put_batch("where:job2", "msgbatch_2", "m", {"r0": b"\x00" * 24})
    store.put_batch("where:job1", "msgbatch_3", "m", {})
    assert other.open_batches("where:job1") == [
        ("msgbatch_1", {"r0": blob, "r1": blob[:24]}),
        ("msgbatch_3", {}),
    ]
    other.finish_batch("msgbatch_1")
    assert store.open_batches("where:job1") == [("msgbatch_3", {})]
    assert store.open_batches("where:job2") == [("msgbatch_2", {"r0": b"\x00" * 24})]
    assert store.open_batches("where:nothing") == []


def test_spend_per_run_is_one_query(store: CacheStore, location: str) -> None:
    store.record([ledger_row("r1", 0), ledger_row("r1", 0, output_tokens=30)])
    store.record([ledger_row("r1", 1)])
    time.sleep(0.01)
    store.record([ledger_row("r2", 1), ledger_row("r2", 1)])
    expected = [
        {"run_id": "r1", "calls": 3, "paid_calls": 2, "replayed_calls": 1}
        | {"input_tokens": 200, "output_tokens": 40, "usd": 0.5},
        {"run_id": "r2", "calls": 2, "paid_calls": 0, "replayed_calls": 2}
        | {"input_tokens": 0, "output_tokens": 0, "usd": 0.0},
    ]
    assert store.spend() == expected
    assert store.spend("r2") == expected[1:]
    # the SQL the docstring shows is the query, and the database's own client runs it
    assert " ".join(SPEND_SQL.format(where="").split()) in " ".join(
        (type(store).spend.__doc__ or "").split()
    )
    assert raw_rows(location, SPEND_SQL.format(where="")) == [tuple(r.values()) for r in expected]


def test_the_readme_shows_the_spend_query() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert " ".join(SPEND_SQL.format(where="").split()) in " ".join(readme.split())


# -- SQLite files -------------------------------------------------------------------------

_OLD_SCHEMA = """
CREATE TABLE calls (key TEXT PRIMARY KEY, model TEXT NOT NULL, response TEXT NOT NULL,
                    created REAL NOT NULL);
CREATE TABLE ledger (id INTEGER PRIMARY KEY, run_id TEXT, asset TEXT, partition TEXT,
    depth INTEGER NOT NULL, role TEXT NOT NULL, model TEXT NOT NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
    cache_creation_input_tokens INTEGER NOT NULL, cache_read_input_tokens INTEGER NOT NULL,
    cost_usd REAL, latency_s REAL NOT NULL, cache_hit INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE leases (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE verdicts (key TEXT PRIMARY KEY, match INTEGER NOT NULL, reason TEXT NOT NULL,
                       model TEXT NOT NULL, created REAL NOT NULL);
INSERT INTO calls VALUES ('k', 'm', '{"text": "kept"}', 1.0);
INSERT INTO ledger VALUES (1, 'old-run', 'a', NULL, 0, 'root', 'm', 5, 1, 0, 0, 0.1, 0.2, 0, 1.0);
INSERT INTO verdicts VALUES ('9f86d081884c7d65', 1, 'old', 'm', 1.0);
"""


def verdict_table(path: Path) -> tuple[str, list[str]]:
    """The verdicts table's definition and its indexes."""
    con = sqlite3.connect(path)
    try:
        (sql,) = con.execute("SELECT sql FROM sqlite_master WHERE name = 'verdicts'").fetchone()
        indexes = [
            name
            for (name,) in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'verdicts'"
            )
        ]
    finally:
        con.close()
    return sql, indexes


def test_a_new_sqlite_file_keeps_verdicts_in_one_b_tree(tmp_path: Path) -> None:
    Cache(tmp_path / "c.sqlite3").close()
    sql, indexes = verdict_table(tmp_path / "c.sqlite3")
    assert "key     BLOB PRIMARY KEY" in sql and "WITHOUT ROWID" in sql and indexes == []


def test_an_older_sqlite_file_is_brought_up_to_date_on_open(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    con = sqlite3.connect(path)
    con.executescript(_OLD_SCHEMA)
    con.close()
    with Cache(path) as cache:
        assert cache.get_call("k") == {"text": "kept"}
        (row,) = cache.ledger()
        assert (row["run_id"], row["thinking_tokens"], row["batch_id"]) == ("old-run", 0, None)
        key = verdict_key("p", "m", "v")
        cache.commit(verdicts=[(key, True, "new", "m")], ledger=[ledger_row("r", 0, batch_id="b")])
        assert cache.get_verdicts([key]) == {key: (True, "new")}
    sql, indexes = verdict_table(path)
    assert "BLOB" in sql and "WITHOUT ROWID" in sql and indexes == []
    assert raw_rows(str(path), "SELECT count(*) FROM verdicts") == [(1,)]  # the old key is gone
    with Cache(path) as again:  # opening a current file changes nothing
        assert len(again.ledger()) == 2


# -- PostgreSQL ---------------------------------------------------------------------------


def test_postgres_failures_name_the_server_and_the_fix_never_the_password(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    dbname = postgres_url.rsplit("/", 1)[1]
    wrong = "wrong-pw-41c2"
    cases = [
        (postgres_server.url(dbname, password=wrong), "check the user and password"),
        (postgres_server.url(dbname, port=free_port()), "unreachable: check the host and port"),
        (postgres_server.url("no_such_db"), "does not exist: create it"),
        (f"postgresql://rlm:{PASSWORD}@127.0.0.1:notaport/{dbname}", "URL is malformed"),
        (f"postgresql://rlm:{PASSWORD}@[127.0.0.1/{dbname}", "URL is malformed"),
    ]
    for url, fix in cases:
        with pytest.raises(CacheError) as info:
            open_cache(url)
        message = str(info.value)
        assert fix in message, message
        assert redact_location(url) in message and "127.0.0.1" in message
        assert PASSWORD not in message and wrong not in message


def test_postgres_reconnects_once_after_losing_its_connection(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    cache = open_cache(postgres_url)
    assert isinstance(cache, PostgresCache)
    cache.put_call("k", "m", {"text": "kept"})
    assert cache._con is not None
    before = cache._con.info.backend_pid
    postgres_server.admin(f"SELECT pg_terminate_backend({before})")
    assert cache.get_call("k") == {"text": "kept"}  # reconnected and retried, no error
    assert cache._con is not None and cache._con.info.backend_pid != before
    cache.close()


def test_postgres_leases_use_the_database_clock(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host whose clock runs an hour ahead must not take a lease another host holds."""
    holder, skewed = open_cache(postgres_url), open_cache(postgres_url)
    assert holder.try_lease("llm_where:x", "host-a", 60)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3_600)
    assert not skewed.try_lease("llm_where:x", "host-b", 60)
    monkeypatch.setattr(time, "time", lambda: real_time() - 3_600)
    assert holder.try_lease("llm_where:x", "host-a", 60)  # and a clock behind renews it
    holder.close()
    skewed.close()


def test_postgres_hosts_creating_the_tables_together_all_succeed(postgres_url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def start() -> None:
        barrier.wait()
        try:
            open_cache(postgres_url).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []


def test_a_dagster_run_on_postgres_replays_and_never_prints_the_password(
    postgres_url: str, warehouse_file: str
) -> None:
    asset = rlm_asset(name="plans", question="How many customers per plan?", tables=["customers"])
    final = "```repl\nFINAL(sql('SELECT plan, count(*) AS n FROM customers GROUP BY 1'))\n```"
    with FakeAnthropic(root=lambda r: final) as fake, dg.DagsterInstance.ephemeral() as instance:
        resources = {
            "rlm": RLMResource(
                api_key="k", base_url=fake.base_url, root_model="fake-root", cache_path=postgres_url
            ),
            "duckdb": DuckDBResource(database=warehouse_file),
        }
        runs = [dg.materialize([asset], instance=instance, resources=resources) for _ in range(2)]
        paid = fake.count("root")
        logs = [entry for run in runs for entry in instance.all_logs(run.run_id)]
    assert all(run.success for run in runs) and paid == 1  # the second run replayed
    text = "\n".join(f"{e.user_message} {e.dagster_event!r}" for e in logs)
    assert PASSWORD not in text
    assert f"every call is in the ledger at {redact_location(postgres_url)}" in text
    store = open_cache(postgres_url)
    spend = store.spend()
    store.close()
    assert [(s["calls"], s["paid_calls"], s["replayed_calls"]) for s in spend] == [
        (1, 1, 0),
        (1, 0, 1),
    ]


# -- across hosts -------------------------------------------------------------------------

TURNS = [
    "```repl\nanswers = llm_query_batched([f'Summarise ticket {i}' for i in range(5)])\n"
    "print(sql('SELECT count(*) AS n FROM tickets'))\n```",
    "```repl\nverdict = llm_query('Which answer matters most? ' + ' | '.join(answers))\n"
    "print(verdict)\n```",
    "```repl\nFINAL(verdict + ' / ' + str(len(answers)))\n```",
]

RUN_HOST = """
import json, os, sys
import pandas as pd
from rlm_dagster import Warehouse, run_rlm
from rlm_dagster.cache import open_cache
from rlm_dagster.models.client import LM

lm = LM(api_key="k", base_url=os.environ["FAKE_URL"], root_model="fake-root",
        sub_model="claude-haiku-4-5", max_retries=0, cache=open_cache(os.environ["RLM_CACHE_PATH"]))
tickets = Warehouse.from_frames({"tickets": pd.DataFrame({"id": [1, 2, 3]})})
result = run_rlm("What matters most?", warehouse=tickets, lm=lm, tags={"run_id": sys.argv[1]})
print(json.dumps({"answer": result.answer_text}))
lm.close()
"""

WHERE_HOST = """
import json, os, sys
import pandas as pd
from rlm_dagster import Limits, Warehouse
from rlm_dagster.cache import open_cache
from rlm_dagster.engine.budget import Budget
from rlm_dagster.models.client import LM
from rlm_dagster.semantic import Semantic, WhereConfig

lm = LM(api_key="k", base_url=os.environ["FAKE_URL"], root_model="fake-root",
        sub_model="claude-haiku-4-5", max_concurrency=2)
rows = pd.DataFrame({"text": [f"ticket {i}: we may cancel" for i in range(120)]})
events = []
sem = Semantic(lm, Warehouse.from_frames({"t": rows}), Budget(Limits(), lm.accounting),
               cache=open_cache(os.environ["RLM_CACHE_PATH"]), config=WhereConfig(batch_rows=10),
               on_event=events.append)
print("ready", flush=True)
sys.stdin.readline()
info, _, stats = sem.where("t", "threatens to cancel")
waited = any(getattr(e, "waiting", False) for e in events)
print(json.dumps({"rows": info.rows, "waited": waited}), flush=True)
lm.close()
"""

SPEND_HOST = """
import json, os
import psycopg
from rlm_dagster.cache import SPEND_SQL, open_cache

with psycopg.connect(os.environ["RLM_CACHE_PATH"]) as con:
    cursor = con.execute(SPEND_SQL.format(where=""))
    raw = [dict(zip([d.name for d in cursor.description], row)) for row in cursor]
print(json.dumps({"raw": raw, "store": open_cache(os.environ["RLM_CACHE_PATH"]).spend()}))
"""


def host(
    tmp_path: Path, name: str, url: str, fake: FakeAnthropic, script: str, *args: str
) -> subprocess.Popen[str]:
    """A "host": a Python process with its own working directory, HOME and TMPDIR, sharing
    only the cache's URL and the model server with the others."""
    root = tmp_path / name
    dirs = {d: root / d for d in ("work", "home", "tmp")}
    for path in dirs.values():
        path.mkdir(parents=True)
    (dirs["work"] / "host.py").write_text(textwrap.dedent(script))
    env = {k: v for k, v in os.environ.items() if k not in ("ANTHROPIC_API_KEY", "RLM_CACHE_PATH")}
    env |= {
        "HOME": str(dirs["home"]),
        "TMPDIR": str(dirs["tmp"]),
        "RLM_CACHE_PATH": url,
        "FAKE_URL": fake.base_url,
    }
    return subprocess.Popen(
        [sys.executable, "host.py", *args],
        cwd=dirs["work"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return dict(json.loads(out.strip().splitlines()[-1]))


def turn_of(request: FakeRequest) -> int:
    return sum(1 for m in request.body["messages"] if m["role"] == "assistant")


def test_a_run_killed_on_one_host_resumes_on_another(tmp_path: Path, postgres_url: str) -> None:
    """Host A is SIGKILLed while its third root turn is in flight; host B retries the run with
    nothing but the database in common: it replays A's two turns and six sub-calls and pays
    only for the turn A never completed. The spend of both attempts is one query away, from
    a third process."""
    in_turn_3, release = threading.Event(), threading.Event()
    killed = [False]
    replies: dict[str, str] = {}

    def root(request: FakeRequest) -> str:
        turn = turn_of(request)
        if turn == 2 and not killed[0]:
            in_turn_3.set()
            release.wait(60)  # never answered: host A is killed meanwhile
        return TURNS[turn]

    def sub(request: FakeRequest) -> str:
        replies[request.prompt] = f"sub:{request.prompt[-9:]}"
        return replies[request.prompt]

    with FakeAnthropic(root=root, sub=sub) as fake:
        a = host(tmp_path, "host-a", postgres_url, fake, RUN_HOST, "attempt-1")
        try:
            assert in_turn_3.wait(120), a.stderr.read() if a.poll() is not None else "hung"
        finally:
            os.killpg(a.pid, signal.SIGKILL)
            a.wait(30)
            killed[0] = True
            release.set()
        first = {k: fake.count(k) for k in ("root", "sub")}
        fake.reset()
        b = finish(host(tmp_path, "host-b", postgres_url, fake, RUN_HOST, "attempt-2"))
        second = {k: fake.count(k) for k in ("root", "sub")}
        spent = finish(host(tmp_path, "reporter", postgres_url, fake, SPEND_HOST))

    assert first == {"root": 3, "sub": 6}  # turns 1-3 sent (3 unanswered), 5 + 1 sub-calls
    assert second == {"root": 1, "sub": 0}  # B paid only for the turn A never completed
    (question,) = [p for p in replies if p.startswith("Which answer matters most?")]
    assert b["answer"] == replies[question] + " / 5"
    calls = [(s["run_id"], s["calls"], s["paid_calls"], s["replayed_calls"]) for s in spent["raw"]]
    assert calls == [("attempt-1", 8, 8, 0), ("attempt-2", 9, 1, 8)]
    assert spent["store"] == spent["raw"]


def test_hosts_judging_the_same_values_at_once_pay_once(tmp_path: Path, postgres_url: str) -> None:
    """Two hosts run the same llm_where at the same moment: the lease in the shared database
    makes one wait for the other's verdicts, so every value is judged exactly once."""
    with FakeAnthropic(where=lambda p, r: "cancel" in r["text"], latency_s=0.4) as fake:
        hosts = [host(tmp_path, f"host-{n}", postgres_url, fake, WHERE_HOST) for n in "ab"]
        for proc in hosts:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for proc in hosts:  # both start judging together
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outcomes = [finish(proc) for proc in hosts]
        judged = collections.Counter(
            row["text"] for r in fake.requests if r.kind == "where" for _, row in r.rows or []
        )
    assert [o["rows"] for o in outcomes] == [120, 120]
    assert len(judged) == 120 and set(judged.values()) == {1}  # each value judged exactly once
    assert sorted(o["waited"] for o in outcomes) == [False, True]  # they did overlap
