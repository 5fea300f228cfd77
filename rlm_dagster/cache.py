"""Persistent cache of model results and the ledger of every call: SQLite in WAL mode.

    >>> cache = Cache(":memory:")
    >>> key = verdict_key("mentions a refund", "claude-haiku-5-5", '{"body": "refund please"}')
    >>> cache.put_verdicts([(key, True, "asks for a refund", "claude-haiku-5-5")])
    >>> cache.get_verdicts([key])[key]
    (True, 'asks for a refund')

Completed root and sub calls are keyed by the hash of the whole request (model, system,
messages, tools, parameters) and written as soon as they complete, so a run killed mid-way
and retried replays what it had and pays only for calls it never completed. Verdicts of
``llm_where`` are keyed by (predicate, model, prompt version, value): a value judged once is
never paid for again, whatever batch it arrives in. Only successes are stored; a failure is
retried next time. The ledger has one row per call, paid or replayed, with the run, asset,
partition, depth, role, tokens, USD and latency. Dagster may run several steps in separate
processes against one cache file: WAL mode lets readers and one writer proceed together, and
``busy_timeout`` waits out a concurrent write instead of failing.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlm_dagster.errors import CacheError
from rlm_dagster.prompts import PROMPT_VERSION

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    key      TEXT PRIMARY KEY,
    model    TEXT NOT NULL,
    response TEXT NOT NULL,
    created  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    id                          INTEGER PRIMARY KEY,
    run_id                      TEXT,
    asset                       TEXT,
    partition                   TEXT,
    depth                       INTEGER NOT NULL,
    role                        TEXT NOT NULL,
    model                       TEXT NOT NULL,
    input_tokens                INTEGER NOT NULL,
    output_tokens               INTEGER NOT NULL,
    thinking_tokens             INTEGER NOT NULL DEFAULT 0,
    cache_creation_input_tokens INTEGER NOT NULL,
    cache_read_input_tokens     INTEGER NOT NULL,
    cost_usd                    REAL,
    latency_s                   REAL NOT NULL,
    cache_hit                   INTEGER NOT NULL,
    created                     REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_run ON ledger (run_id);
CREATE TABLE IF NOT EXISTS leases (
    name    TEXT PRIMARY KEY,
    owner   TEXT NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS verdicts (
    key     TEXT PRIMARY KEY,
    match   INTEGER NOT NULL,
    reason  TEXT NOT NULL,
    model   TEXT NOT NULL,
    created REAL NOT NULL
);
"""
LEDGER_FIELDS = (
    "run_id",
    "asset",
    "partition",
    "depth",
    "role",
    "model",
    "input_tokens",
    "output_tokens",
    "thinking_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "cost_usd",
    "latency_s",
    "cache_hit",
)
_CHUNK = 5_000  # keys per IN (...) lookup, below SQLite's variable limit (32,766)


def default_cache_path() -> str:
    """``$RLM_CACHE_PATH``, else ``.rlm_dagster/cache.sqlite3`` in the project: the directory
    Dagster runs the code location from (``dagster dev`` / ``dagster asset materialize``'s
    working directory). The cache lives with the project, so two projects never replay each
    other's calls."""
    if explicit := os.environ.get("RLM_CACHE_PATH"):
        return explicit
    return str(Path.cwd() / ".rlm_dagster" / "cache.sqlite3")


def call_key(request: Mapping[str, Any]) -> str:
    """Content address of one Messages API request (every field that changes the reply)."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def verdict_key(predicate: str, model: str, value: str) -> str:
    """Content address of one verdict: predicate, model, prompt version and the row value."""
    digest = hashlib.sha256()
    for part in (predicate, model, PROMPT_VERSION, value):
        digest.update(part.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


class Cache:
    """A thread-safe handle on the cache file (one connection, one lock).

    Every SQLite failure (a corrupt, read-only or full file, a directory that cannot be made)
    is a :class:`CacheError` that names the file and what to do; nothing raises raw
    ``sqlite3`` errors.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        with self._guard("open"):
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._con = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
            self._con.execute("PRAGMA busy_timeout=30000")
            _retry_locked(lambda: self._con.execute("PRAGMA journal_mode=WAL"))
            self._con.execute("PRAGMA synchronous=NORMAL")
            _retry_locked(lambda: self._con.executescript(_SCHEMA))
            columns = {row[1] for row in self._con.execute("PRAGMA table_info(ledger)")}
            if "thinking_tokens" not in columns:  # a ledger written before thinking was kept
                with self._con:
                    self._con.execute(
                        "ALTER TABLE ledger ADD COLUMN thinking_tokens INTEGER NOT NULL DEFAULT 0"
                    )

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError) as err:
            raise CacheError(_cache_problem(self.path, action, err)) from err

    def get_verdicts(self, keys: Sequence[str]) -> dict[str, tuple[bool, str]]:
        """Cached verdicts among ``keys``: key -> (match, reason)."""
        found: dict[str, tuple[bool, str]] = {}
        with self._lock, self._guard("read verdicts from"):
            for start in range(0, len(keys), _CHUNK):
                chunk = keys[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                for key, match, reason in self._con.execute(
                    f"SELECT key, match, reason FROM verdicts WHERE key IN ({marks})", chunk
                ):
                    found[key] = (bool(match), reason)
        return found

    def put_verdicts(self, rows: Iterable[tuple[str, bool, str, str]]) -> None:
        """Store successful verdicts: (key, match, reason, model)."""
        self.commit(verdicts=rows)

    def commit(
        self,
        *,
        verdicts: Iterable[tuple[str, bool, str, str]] = (),
        ledger: Iterable[Mapping[str, Any]] = (),
    ) -> None:
        """Store verdicts ``(key, match, reason, model)`` and ledger rows in one transaction."""
        now = time.time()
        verdict_rows = [(k, int(m), r, model, now) for k, m, r, model in verdicts]
        ledger_rows = [_ledger_values(row, now) for row in ledger]
        if not verdict_rows and not ledger_rows:
            return
        with self._lock, self._guard("write to"), self._con:
            self._con.executemany(
                "INSERT OR REPLACE INTO verdicts (key, match, reason, model, created) "
                "VALUES (?, ?, ?, ?, ?)",
                verdict_rows,
            )
            self._con.executemany(_INSERT_LEDGER, ledger_rows)

    def try_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        """Take (or keep) the lease ``name`` for ``owner`` unless another owner holds an
        unexpired one; whether ``owner`` holds it now. Leases let concurrent runs, in any
        process sharing this file, avoid paying twice for the same work."""
        now = time.time()
        with self._lock, self._guard("take a lease in"), self._con:
            self._con.execute(
                "DELETE FROM leases WHERE name = ? AND (expires < ? OR owner = ?)",
                (name, now, owner),
            )
            self._con.execute(
                "INSERT OR IGNORE INTO leases (name, owner, expires) VALUES (?, ?, ?)",
                (name, owner, now + ttl_s),
            )
            row = self._con.execute("SELECT owner FROM leases WHERE name = ?", (name,)).fetchone()
        return bool(row) and row[0] == owner

    def release_lease(self, name: str, owner: str) -> None:
        with self._lock, self._guard("release a lease in"), self._con:
            self._con.execute("DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner))

    def get_call(self, key: str) -> dict[str, Any] | None:
        """The stored reply of a completed call (text, stop reason, tool calls, usage)."""
        with self._lock, self._guard("read a call from"):
            row = self._con.execute("SELECT response FROM calls WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put_call(self, key: str, model: str, response: Mapping[str, Any]) -> None:
        """Store a completed call at once (committed), so a crash right after keeps it."""
        with self._lock, self._guard("write a call to"), self._con:
            self._con.execute(
                "INSERT OR REPLACE INTO calls (key, model, response, created) VALUES (?, ?, ?, ?)",
                (key, model, json.dumps(response), time.time()),
            )

    def record(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append ledger rows (see the ``ledger`` table for the fields)."""
        self.commit(ledger=rows)

    def ledger(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Ledger rows, oldest first; of one run if ``run_id`` is given."""
        query = f"SELECT {', '.join(LEDGER_FIELDS)}, created FROM ledger"
        args: tuple[Any, ...] = ()
        if run_id is not None:
            query += " WHERE run_id = ?"
            args = (run_id,)
        with self._lock, self._guard("read the ledger from"):
            cursor = self._con.execute(query + " ORDER BY id", args)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_INSERT_LEDGER = (
    f"INSERT INTO ledger ({', '.join(LEDGER_FIELDS)}, created) "
    f"VALUES ({', '.join('?' * len(LEDGER_FIELDS))}, ?)"
)


def _ledger_values(row: Mapping[str, Any], now: float) -> tuple[Any, ...]:
    return (*(row.get(f, 0 if f == "thinking_tokens" else None) for f in LEDGER_FIELDS), now)


def _retry_locked(step: Any, timeout_s: float = 30.0) -> Any:
    """Run ``step``, retrying while another process holds the lock: switching a new file to
    WAL or creating its tables answers "database is locked" at once, without waiting for the
    busy timeout, when two processes open the same new cache together."""
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while True:
        try:
            return step()
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def _cache_problem(path: str, action: str, err: BaseException) -> str:
    text = str(err)
    if "not a database" in text or "malformed" in text:
        fix = "it is corrupt: move it aside (a new one is made) or point cache_path elsewhere"
    elif "readonly" in text or "read-only" in text or isinstance(err, PermissionError):
        fix = "it is read-only here: make it and its folder writable, or set cache_path"
    elif "full" in text or getattr(err, "errno", None) == 28:
        fix = "the disk is full: free space, or set cache_path to a volume with room"
    elif "unable to open" in text or isinstance(err, OSError):
        fix = "it cannot be opened: check that its folder exists and is writable, or set cache_path"
    else:
        fix = "check the file, or set RLMResource(cache_path=...) / RLM_CACHE_PATH elsewhere"
    return f"Could not {action} the rlm_dagster cache {path} ({text}): {fix}."
