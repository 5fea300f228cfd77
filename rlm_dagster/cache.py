"""Persistent cache of model results and the ledger of every call: SQLite in WAL mode, or
PostgreSQL shared by every executor (:mod:`rlm_dagster.cache_postgres`).

    >>> cache = open_cache(":memory:")
    >>> key = verdict_key("mentions a refund", "claude-haiku-5-5", '{"body": "refund please"}')
    >>> len(key), key[:8] == verdict_scope("mentions a refund", "claude-haiku-5-5")
    (24, True)
    >>> cache.put_verdicts([(key, True, "asks for a refund", "claude-haiku-5-5")])
    >>> cache.get_verdicts([key])[key]
    (True, 'asks for a refund')

Completed root and sub calls are keyed by the hash of the whole request (model, system,
messages, tools, parameters) and written as soon as they complete, so a run killed mid-way
and retried replays what it had and pays only for calls it never completed. Verdicts of
``llm_where`` are keyed by (predicate, model, prompt version, value): a value judged once is
never paid for again, whatever batch it arrives in. Only successes are stored; a failure is
retried next time. The ledger has one row per call, paid or replayed, with the run, asset,
partition, depth, role, tokens, USD, latency and the Message Batches id it was paid through.
Dagster may run several steps in separate processes against one cache file: WAL mode lets
readers and one writer proceed together, and ``busy_timeout`` waits out a concurrent write
instead of failing. Executors on several hosts share a PostgreSQL database instead
(:func:`open_cache` with a ``postgresql://`` URL): the same tables, the same guarantees.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from rlm_dagster.errors import CacheError, ConfigError
from rlm_dagster.prompts import PROMPT_VERSION
from rlm_dagster.redact import REDACTED

_VERDICTS = """
CREATE TABLE IF NOT EXISTS verdicts (
    key     BLOB PRIMARY KEY,
    match   INTEGER NOT NULL,
    reason  TEXT NOT NULL,
    model   TEXT NOT NULL,
    created REAL NOT NULL
) WITHOUT ROWID
"""
_SCHEMA = f"""
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
    batch_id                    TEXT,
    created                     REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_run ON ledger (run_id);
CREATE TABLE IF NOT EXISTS leases (
    name    TEXT PRIMARY KEY,
    owner   TEXT NOT NULL,
    expires REAL NOT NULL
);
{_VERDICTS};
CREATE TABLE IF NOT EXISTS batches (
    id       INTEGER PRIMARY KEY,
    batch_id TEXT NOT NULL UNIQUE,
    job      TEXT NOT NULL,
    model    TEXT NOT NULL,
    created  REAL NOT NULL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS batches_job ON batches (job, finished);
CREATE TABLE IF NOT EXISTS batch_requests (
    batch_id  TEXT NOT NULL,
    custom_id TEXT NOT NULL,
    keys      BLOB NOT NULL,
    PRIMARY KEY (batch_id, custom_id)
) WITHOUT ROWID;
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
    "batch_id",
)
# The one query behind ``spend()``, the same text for SQLite and PostgreSQL: ``{where}`` is
# empty or ``WHERE run_id = <placeholder>``. Replayed calls cost nothing (their ledger
# cost_usd is 0), so tokens are counted for paid calls only.
SPEND_SQL = """
SELECT run_id,
       count(*)                                                   AS calls,
       sum(CASE WHEN cache_hit = 0 THEN 1 ELSE 0 END)             AS paid_calls,
       sum(CASE WHEN cache_hit = 0 THEN 0 ELSE 1 END)             AS replayed_calls,
       sum(CASE WHEN cache_hit = 0 THEN input_tokens ELSE 0 END)  AS input_tokens,
       sum(CASE WHEN cache_hit = 0 THEN output_tokens ELSE 0 END) AS output_tokens,
       sum(cost_usd)                                              AS usd
FROM ledger {where}
GROUP BY run_id
ORDER BY min(created)
"""
_CHUNK = 5_000  # keys per IN (...) lookup, below SQLite's variable limit (32,766)
_URL_SCHEMES = ("postgresql://", "postgres://")


def default_cache_path() -> str:
    """``$RLM_CACHE_PATH``, else ``.rlm_dagster/cache.sqlite3`` in the project: the directory
    Dagster runs the code location from (``dagster dev`` / ``dagster asset materialize``'s
    working directory). The cache lives with the project, so two projects never replay each
    other's calls. ``$RLM_CACHE_PATH`` may be a ``postgresql://`` URL (see :func:`open_cache`).
    """
    if explicit := os.environ.get("RLM_CACHE_PATH"):
        return explicit
    return str(Path.cwd() / ".rlm_dagster" / "cache.sqlite3")


def call_key(request: Mapping[str, Any]) -> str:
    """Content address of one Messages API request (every field that changes the reply)."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def verdict_scope(predicate: str, model: str, variant: str = "") -> bytes:
    """The first 8 bytes of every verdict key of one ``llm_where`` predicate and model (and
    this prompt version, and the verdict ``variant``: what the verdicts hold besides the
    match, e.g. which reasons): the keys of one call sort together.

        >>> scope = verdict_scope("is urgent", "claude-haiku-5-5")
        >>> len(scope), scope == verdict_scope("is urgent", "claude-opus-5-5")
        (8, False)
    """
    seed = predicate.encode() + b"\0" + model.encode() + b"\0" + PROMPT_VERSION.encode() + b"\0"
    if variant:
        seed += variant.encode() + b"\0"
    return hashlib.sha256(seed).digest()[:8]


def value_hash(value: str) -> bytes:
    """The last 16 bytes of a verdict key: the row value's hash. DuckDB computes the same
    bytes as ``unhex(left(sha256(value), 32))``.

        >>> value_hash("refund").hex()
        '1d630127108f1feaf1f7beee59b66dd6'
    """
    return hashlib.sha256(value.encode("utf-8")).digest()[:16]


def verdict_key(predicate: str, model: str, value: str) -> bytes:
    """Content address of one verdict, 24 bytes: :func:`verdict_scope` (predicate, model,
    prompt version) then :func:`value_hash` (the row value)."""
    return verdict_scope(predicate, model) + value_hash(value)


def is_database_url(location: str | Path) -> bool:
    """Whether ``location`` names a PostgreSQL database rather than a SQLite file."""
    return str(location).lower().startswith(_URL_SCHEMES)


def redact_location(location: str) -> str:
    """``location`` fit to print: a URL's password (in the user part or a ``password=``
    parameter) replaced by ``[REDACTED]``.

        >>> redact_location("postgresql://rlm:hunter2@db:5432/rlm?sslmode=require")
        'postgresql://rlm:[REDACTED]@db:5432/rlm?sslmode=require'
        >>> redact_location("/data/cache.sqlite3")
        '/data/cache.sqlite3'
    """
    scheme, sep, rest = location.partition("://")
    if not sep:
        return location
    authority = rest.split("?", 1)[0]
    user, at, _ = authority.rpartition("@")
    if at and ":" in user:
        rest = f"{user.split(':', 1)[0]}:{REDACTED}@{rest[len(user) + 1 :]}"
    rest = re.sub(r"(?i)([?&]password=)[^&]*", lambda m: m.group(1) + REDACTED, rest)
    return f"{scheme}://{rest}"


@runtime_checkable
class CacheStore(Protocol):
    """What the engine needs of the cache: completed calls, verdicts, leases, the ledger and
    submitted batches. :class:`Cache` (a SQLite file) and
    :class:`~rlm_dagster.cache_postgres.PostgresCache` (a database every host shares) are the
    two stores; :func:`open_cache` picks one from a location."""

    location: str
    """Where the store lives, fit to print (a URL's password redacted)."""

    def get_call(self, key: str) -> dict[str, Any] | None: ...

    def put_call(self, key: str, model: str, response: Mapping[str, Any]) -> None: ...

    def record(self, rows: Iterable[Mapping[str, Any]]) -> None: ...

    def get_verdicts(self, keys: Sequence[bytes]) -> dict[bytes, tuple[bool, str]]: ...

    def put_verdicts(self, rows: Iterable[tuple[bytes, bool, str, str]]) -> None: ...

    def commit(
        self,
        *,
        verdicts: Iterable[tuple[bytes, bool, str, str]] = (),
        ledger: Iterable[Mapping[str, Any]] = (),
    ) -> None: ...

    def try_lease(self, name: str, owner: str, ttl_s: float) -> bool: ...

    def lease_holder(self, name: str) -> str | None: ...

    def release_lease(self, name: str, owner: str) -> None: ...

    def ledger(self, run_id: str | None = None) -> list[dict[str, Any]]: ...

    def spend(self, run_id: str | None = None) -> list[dict[str, Any]]: ...

    def put_batch(
        self, job: str, batch_id: str, model: str, requests: Mapping[str, bytes]
    ) -> None: ...

    def open_batches(self, job: str) -> list[tuple[str, dict[str, bytes]]]: ...

    def finish_batch(self, batch_id: str) -> None: ...

    def close(self) -> None: ...


def open_cache(location: str | Path) -> CacheStore:
    """The store at ``location``: a ``postgresql://`` (or ``postgres://``) URL opens
    :class:`~rlm_dagster.cache_postgres.PostgresCache`, shared by executors on any host;
    anything else is the path of a SQLite file (:class:`Cache`).

        >>> open_cache(":memory:").location
        ':memory:'
    """
    text = str(location)
    if is_database_url(text):
        from rlm_dagster.cache_postgres import PostgresCache

        return PostgresCache(text)
    if re.match(r"[A-Za-z][A-Za-z0-9+.\-]*://", text):
        raise ConfigError(
            f"cache_path {redact_location(text)!r}: use a SQLite file path or a "
            "postgresql://user:password@host:port/database URL."
        )
    return Cache(text)


class Cache:
    """A thread-safe handle on the SQLite cache file (one connection, one lock).

    Every SQLite failure (a corrupt, read-only or full file, a directory that cannot be made)
    is a :class:`CacheError` that names the file and what to do; nothing raises raw
    ``sqlite3`` errors.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.location = self.path
        self._lock = threading.Lock()
        with self._guard("open"):
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._con = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
            self._con.execute("PRAGMA busy_timeout=30000")
            _retry_locked(lambda: self._con.execute("PRAGMA journal_mode=WAL"))
            self._con.execute("PRAGMA synchronous=NORMAL")
            _retry_locked(lambda: self._con.executescript(_SCHEMA))
            if self._outdated():
                _retry_locked(self._migrate)

    def _outdated(self) -> list[str]:
        """What a file written by an older version lacks (empty when it is current)."""
        ledger = {row[1] for row in self._con.execute("PRAGMA table_info(ledger)")}
        verdicts = {row[1]: row[2] for row in self._con.execute("PRAGMA table_info(verdicts)")}
        lacks = [c for c in ("thinking_tokens", "batch_id") if c not in ledger]
        if verdicts.get("key", "").upper() != "BLOB":
            lacks.append("verdicts")
        return lacks

    def _migrate(self) -> None:
        """Bring an older file up to this schema in one write transaction; two processes that
        open it together migrate it once (the second finds nothing left to do)."""
        self._con.execute("BEGIN IMMEDIATE")
        try:
            for lack in self._outdated():
                if lack == "thinking_tokens":
                    self._con.execute(
                        "ALTER TABLE ledger ADD COLUMN thinking_tokens INTEGER NOT NULL DEFAULT 0"
                    )
                elif lack == "batch_id":
                    self._con.execute("ALTER TABLE ledger ADD COLUMN batch_id TEXT")
                else:
                    # Verdicts keyed by the old TEXT hex digests are unreachable under the
                    # 24-byte keys (a different hash layout): drop them and start the table
                    # afresh; those values are judged once more.
                    self._con.execute("DROP TABLE verdicts")
                    self._con.execute(_VERDICTS)
        except BaseException:
            self._con.rollback()
            raise
        self._con.commit()

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError) as err:
            raise CacheError(_cache_problem(self.path, action, err)) from err

    def get_verdicts(self, keys: Sequence[bytes]) -> dict[bytes, tuple[bool, str]]:
        """Cached verdicts among ``keys``: key -> (match, reason)."""
        found: dict[bytes, tuple[bool, str]] = {}
        with self._lock, self._guard("read verdicts from"):
            for start in range(0, len(keys), _CHUNK):
                chunk = keys[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                for key, match, reason in self._con.execute(
                    f"SELECT key, match, reason FROM verdicts WHERE key IN ({marks})", chunk
                ):
                    found[key] = (bool(match), reason)
        return found

    def put_verdicts(self, rows: Iterable[tuple[bytes, bool, str, str]]) -> None:
        """Store successful verdicts: (key, match, reason, model)."""
        self.commit(verdicts=rows)

    def commit(
        self,
        *,
        verdicts: Iterable[tuple[bytes, bool, str, str]] = (),
        ledger: Iterable[Mapping[str, Any]] = (),
    ) -> None:
        """Store verdicts ``(key, match, reason, model)`` and ledger rows in one transaction.
        Verdicts are written in key order: sorted inserts touch fewer B-tree pages."""
        now = time.time()
        verdict_rows = sorted((k, int(m), r, model, now) for k, m, r, model in verdicts)
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

    def lease_holder(self, name: str) -> str | None:
        """The owner of the unexpired lease ``name``, if anyone holds it."""
        with self._lock, self._guard("read a lease in"):
            row = self._con.execute(
                "SELECT owner FROM leases WHERE name = ? AND expires >= ?", (name, time.time())
            ).fetchone()
        return None if row is None else str(row[0])

    def release_lease(self, name: str, owner: str) -> None:
        """Give up the lease ``name`` if ``owner`` holds it (a run's own, or one whose
        holder is known to be gone); another owner's lease is left alone."""
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

    def spend(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """What each run spent, oldest run first (of one run if ``run_id`` is given): calls,
        paid calls, replayed calls, input and output tokens of paid calls, and USD. One query
        over the ledger, which you can run yourself::

            SELECT run_id,
                   count(*)                                                   AS calls,
                   sum(CASE WHEN cache_hit = 0 THEN 1 ELSE 0 END)             AS paid_calls,
                   sum(CASE WHEN cache_hit = 0 THEN 0 ELSE 1 END)             AS replayed_calls,
                   sum(CASE WHEN cache_hit = 0 THEN input_tokens ELSE 0 END)  AS input_tokens,
                   sum(CASE WHEN cache_hit = 0 THEN output_tokens ELSE 0 END) AS output_tokens,
                   sum(cost_usd)                                              AS usd
            FROM ledger
            GROUP BY run_id
            ORDER BY min(created)
        """
        where, args = ("WHERE run_id = ?", (run_id,)) if run_id is not None else ("", ())
        with self._lock, self._guard("read the ledger from"):
            cursor = self._con.execute(SPEND_SQL.format(where=where), args)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def put_batch(self, job: str, batch_id: str, model: str, requests: Mapping[str, bytes]) -> None:
        """Record a submitted Message Batch of ``job``, with each request's ``custom_id`` and
        its blob (the verdict keys of its rows), committed at once: a run killed after
        submitting resumes the batch instead of paying for it again."""
        with self._lock, self._guard("record a batch in"), self._con:
            self._con.execute(
                "INSERT INTO batches (batch_id, job, model, created) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (batch_id) DO UPDATE SET job = excluded.job, model = excluded.model",
                (batch_id, job, model, time.time()),
            )
            self._con.executemany(
                "INSERT OR REPLACE INTO batch_requests (batch_id, custom_id, keys) "
                "VALUES (?, ?, ?)",
                [(batch_id, custom_id, bytes(blob)) for custom_id, blob in requests.items()],
            )

    def open_batches(self, job: str) -> list[tuple[str, dict[str, bytes]]]:
        """The batches of ``job`` not finished yet, oldest first: (batch id, custom_id ->
        blob)."""
        with self._lock, self._guard("read batches from"):
            rows = self._con.execute(
                "SELECT b.batch_id, r.custom_id, r.keys FROM batches b "
                "LEFT JOIN batch_requests r ON r.batch_id = b.batch_id "
                "WHERE b.job = ? AND b.finished IS NULL ORDER BY b.id, r.custom_id",
                (job,),
            ).fetchall()
        return _group_batches(rows)

    def finish_batch(self, batch_id: str) -> None:
        """Mark a batch finished (its results are stored); its request blobs are dropped."""
        with self._lock, self._guard("finish a batch in"), self._con:
            self._con.execute(
                "UPDATE batches SET finished = ? WHERE batch_id = ?", (time.time(), batch_id)
            )
            self._con.execute("DELETE FROM batch_requests WHERE batch_id = ?", (batch_id,))

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


def _group_batches(
    rows: Iterable[tuple[str, str | None, bytes | None]],
) -> list[tuple[str, dict[str, bytes]]]:
    """(batch id, custom id, blob) rows, in batch order, as one entry per batch."""
    batches: dict[str, dict[str, bytes]] = {}
    for batch_id, custom_id, blob in rows:
        requests = batches.setdefault(batch_id, {})
        if custom_id is not None and blob is not None:
            requests[custom_id] = bytes(blob)
    return list(batches.items())


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
