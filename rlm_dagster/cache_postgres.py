"""The cache and ledger in PostgreSQL: one store shared by every executor, on any host.

    >>> cache = open_cache("postgresql://rlm:secret@db.internal:5432/rlm")  # doctest: +SKIP
    >>> cache.location  # doctest: +SKIP
    'postgresql://rlm:[REDACTED]@db.internal:5432/rlm'

The same tables and semantics as the SQLite :class:`~rlm_dagster.cache.Cache`, so what holds
across the processes of one machine holds across hosts: a step retried on another pod
replays every call and verdict the first attempt completed; an ``llm_where`` lease taken on
one host makes the others wait (leases are timed by the database's clock, so hosts with
skewed clocks agree); and the ledger of every host's calls is one table (``spend()``).

Needs psycopg 3 (``pip install 'rlm-dagster[postgres]'``), imported only when a URL is
used. Every method is one transaction on one connection guarded by a lock; a connection lost
mid-run is reopened once and the statement retried. Every failure is a
:class:`~rlm_dagster.errors.CacheError` that names the server (never its password) and what
to do.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

from rlm_dagster.cache import (
    LEDGER_FIELDS,
    SPEND_SQL,
    _group_batches,
    _ledger_values,
    redact_location,
)
from rlm_dagster.errors import CacheError, ConfigError
from rlm_dagster.redact import REDACTED, redact

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")

# Taken (per transaction) while creating the tables: two hosts starting together would
# otherwise race on CREATE TABLE IF NOT EXISTS, which is not atomic in PostgreSQL.
_SCHEMA_LOCK = 0x726C6D5F64616773  # "rlm_dags"
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS calls (
        key      TEXT PRIMARY KEY,
        model    TEXT NOT NULL,
        response TEXT NOT NULL,
        created  DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS ledger (
        id                          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
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
        cost_usd                    DOUBLE PRECISION,
        latency_s                   DOUBLE PRECISION NOT NULL,
        cache_hit                   INTEGER NOT NULL,
        batch_id                    TEXT,
        created                     DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS ledger_run ON ledger (run_id)",
    """CREATE TABLE IF NOT EXISTS leases (
        name    TEXT PRIMARY KEY,
        owner   TEXT NOT NULL,
        expires TIMESTAMPTZ NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS verdicts (
        key     BYTEA PRIMARY KEY,
        match   BOOLEAN NOT NULL,
        reason  TEXT NOT NULL,
        model   TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS batches (
        id       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        batch_id TEXT NOT NULL UNIQUE,
        job      TEXT NOT NULL,
        model    TEXT NOT NULL,
        created  DOUBLE PRECISION NOT NULL,
        finished DOUBLE PRECISION
    )""",
    "CREATE INDEX IF NOT EXISTS batches_open ON batches (job) WHERE finished IS NULL",
    """CREATE TABLE IF NOT EXISTS batch_requests (
        batch_id  TEXT NOT NULL,
        custom_id TEXT NOT NULL,
        keys      BYTEA NOT NULL,
        PRIMARY KEY (batch_id, custom_id)
    )""",
)
_INSERT_LEDGER = (
    f"INSERT INTO ledger ({', '.join(LEDGER_FIELDS)}, created) "
    f"VALUES ({', '.join(['%s'] * len(LEDGER_FIELDS))}, %s)"
)
_UPSERT_VERDICT = (
    "INSERT INTO verdicts (key, match, reason, model, created) VALUES (%s, %s, %s, %s, %s) "
    "ON CONFLICT (key) DO UPDATE SET match = EXCLUDED.match, reason = EXCLUDED.reason, "
    "model = EXCLUDED.model, created = EXCLUDED.created"
)
# Expiry is compared on the database's clock, never a host's: hosts whose clocks disagree
# still agree on who holds a lease. A row comes back only when ``owner`` holds it now.
_TAKE_LEASE = """
INSERT INTO leases (name, owner, expires)
VALUES (%s, %s, clock_timestamp() + %s * interval '1 second')
ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner, expires = EXCLUDED.expires
WHERE leases.expires < clock_timestamp() OR leases.owner = EXCLUDED.owner
RETURNING owner
"""
_CHUNK = 10_000  # keys per ``key = ANY(...)`` lookup
_CONNECT_TIMEOUT_S = "10"


class PostgresCache:
    """A thread-safe handle on the cache in a PostgreSQL database (one connection, one
    lock), created from a ``postgresql://user:password@host:port/database`` URL. Prefer
    :func:`~rlm_dagster.cache.open_cache`, which picks the store from the location."""

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError as err:
            raise ConfigError(
                f"cache_path {redact_location(url)!r} is a PostgreSQL URL, but psycopg is not "
                "installed: pip install 'rlm-dagster[postgres]'."
            ) from err
        self._psycopg = psycopg
        self._url = url
        self.location = redact_location(url)
        self._secrets = _secrets_of(url)
        self._lock = threading.Lock()
        self._con: psycopg.Connection[Any] | None = None
        self._run("open", self._create_schema)

    # -- connection and failures ----------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        if self._con is None or self._con.closed:
            conninfo = self._psycopg.conninfo
            given = conninfo.conninfo_to_dict(self._url)
            defaults = {"connect_timeout": _CONNECT_TIMEOUT_S, "application_name": "rlm_dagster"}
            extra = {k: v for k, v in defaults.items() if k not in given}
            self._con = self._psycopg.connect(
                conninfo.make_conninfo(self._url, **extra), autocommit=False
            )
        return self._con

    def _run(self, action: str, work: Callable[[psycopg.Cursor[Any]], T]) -> T:
        """``work`` in one transaction. A connection lost since the last call (a restarted
        server, a dropped idle connection) is reopened once and ``work`` run again; every
        other failure is a :class:`CacheError`."""
        with self._lock:
            for attempt in (1, 2):
                had_connection = self._con is not None and not self._con.closed
                try:
                    con = self._connect()
                    with con.transaction(), con.cursor() as cursor:
                        return work(cursor)
                except self._psycopg.Error as err:
                    lost = self._con is not None and (self._con.broken or self._con.closed)
                    if attempt == 1 and had_connection and lost:
                        self._discard()
                        continue
                    raise CacheError(self._problem(action, err)) from err
        raise AssertionError("unreachable")  # the loop returns or raises

    def _discard(self) -> None:
        if self._con is not None:
            with suppress(self._psycopg.Error):  # already broken: nothing to close cleanly
                self._con.close()
        self._con = None

    def _problem(self, action: str, err: BaseException) -> str:
        text = " ".join(self._scrub(str(err)).split())
        state = getattr(err, "sqlstate", None) or ""
        lowered = text.lower()
        if state.startswith("28") or "authentication failed" in lowered or "password" in lowered:
            fix = "the server refused the login: check the user and password in the URL"
        elif state == "3D000" or ("database" in lowered and "does not exist" in lowered):
            fix = (
                "the database does not exist: create it (createdb -h HOST -p PORT -U USER NAME) "
                "or name an existing one in the URL"
            )
        elif state == "42501":
            fix = "the user lacks privileges: grant it CREATE, SELECT, INSERT, UPDATE, DELETE there"
        elif not state and (
            isinstance(err, self._psycopg.ProgrammingError)
            or ("invalid" in lowered and ("option" in lowered or "uri" in lowered))
        ):
            fix = "the URL is malformed: use postgresql://user:password@host:port/database"
        elif isinstance(err, self._psycopg.OperationalError) and (
            not state or state.startswith("08") or state.startswith("57")
        ):
            fix = (
                "the server is unreachable: check the host and port in the URL, that PostgreSQL "
                "is running there, and that it accepts connections from this host"
            )
        else:
            fix = "check the server's log, or set RLMResource(cache_path=...) / RLM_CACHE_PATH"
        return f"Could not {action} the rlm_dagster cache at {self.location} ({text}): {fix}."

    def _scrub(self, text: str) -> str:
        """``text`` with the URL and its password hidden, whatever the driver echoed."""
        text = text.replace(self._url, self.location)
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return redact(text)

    def _create_schema(self, cursor: psycopg.Cursor[Any]) -> None:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        for statement in _SCHEMA:
            cursor.execute(statement)

    # -- calls ----------------------------------------------------------------------------

    def get_call(self, key: str) -> dict[str, Any] | None:
        """The stored reply of a completed call (text, stop reason, tool calls, usage)."""

        def work(cursor: psycopg.Cursor[Any]) -> Any:
            return cursor.execute("SELECT response FROM calls WHERE key = %s", (key,)).fetchone()

        row = self._run("read a call from", work)
        return json.loads(row[0]) if row else None

    def put_call(self, key: str, model: str, response: Mapping[str, Any]) -> None:
        """Store a completed call at once (committed), so a crash right after keeps it."""
        args = (key, model, json.dumps(response), time.time())
        self._run(
            "write a call to",
            lambda cursor: cursor.execute(
                "INSERT INTO calls (key, model, response, created) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (key) DO UPDATE SET model = EXCLUDED.model, "
                "response = EXCLUDED.response, created = EXCLUDED.created",
                args,
            ),
        )

    # -- verdicts and the ledger ----------------------------------------------------------

    def get_verdicts(self, keys: Sequence[bytes]) -> dict[bytes, tuple[bool, str]]:
        """Cached verdicts among ``keys``: key -> (match, reason)."""

        def work(cursor: psycopg.Cursor[Any]) -> dict[bytes, tuple[bool, str]]:
            found: dict[bytes, tuple[bool, str]] = {}
            for start in range(0, len(keys), _CHUNK):
                chunk = [bytes(k) for k in keys[start : start + _CHUNK]]
                cursor.execute(
                    "SELECT key, match, reason FROM verdicts WHERE key = ANY(%s)", (chunk,)
                )
                for key, match, reason in cursor:
                    found[bytes(key)] = (bool(match), reason)
            return found

        return self._run("read verdicts from", work) if keys else {}

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
        Verdicts are written in key order: fewer index pages touched, and two hosts writing
        overlapping keys lock them in the same order, so they never deadlock."""
        now = time.time()
        verdict_rows = sorted((bytes(k), bool(m), r, model, now) for k, m, r, model in verdicts)
        ledger_rows = [_ledger_values(row, now) for row in ledger]
        if not verdict_rows and not ledger_rows:
            return

        def work(cursor: psycopg.Cursor[Any]) -> None:
            if verdict_rows:
                cursor.executemany(_UPSERT_VERDICT, verdict_rows)
            if ledger_rows:
                cursor.executemany(_INSERT_LEDGER, ledger_rows)

        self._run("write to", work)

    def record(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append ledger rows (see the ``ledger`` table for the fields)."""
        self.commit(ledger=rows)

    def ledger(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Ledger rows, oldest first; of one run if ``run_id`` is given."""
        query = f"SELECT {', '.join(LEDGER_FIELDS)}, created FROM ledger"
        if run_id is not None:
            query += " WHERE run_id = %s"
        args = (run_id,) if run_id is not None else ()
        return self._run("read the ledger from", lambda c: _dicts(c, query + " ORDER BY id", args))

    def spend(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """What each run spent, oldest run first (of one run if ``run_id`` is given): calls,
        paid calls, replayed calls, input and output tokens of paid calls, and USD, from
        every host's calls. One query over the ledger, which ``psql`` runs as well::

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
        where, args = ("WHERE run_id = %s", (run_id,)) if run_id is not None else ("", ())
        query = SPEND_SQL.format(where=where)
        return self._run("read the ledger from", lambda c: _dicts(c, query, args))

    # -- leases ---------------------------------------------------------------------------

    def try_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        """Take (or keep) the lease ``name`` for ``owner`` unless another owner holds an
        unexpired one; whether ``owner`` holds it now. Expiry is on the database's clock."""

        def work(cursor: psycopg.Cursor[Any]) -> bool:
            return cursor.execute(_TAKE_LEASE, (name, owner, ttl_s)).fetchone() is not None

        return self._run("take a lease in", work)

    def lease_holder(self, name: str) -> str | None:
        """The owner of the unexpired lease ``name``, if anyone holds it."""

        def work(cursor: psycopg.Cursor[Any]) -> str | None:
            row = cursor.execute(
                "SELECT owner FROM leases WHERE name = %s AND expires >= clock_timestamp()",
                (name,),
            ).fetchone()
            return None if row is None else str(row[0])

        return self._run("read a lease in", work)

    def release_lease(self, name: str, owner: str) -> None:
        self._run(
            "release a lease in",
            lambda cursor: cursor.execute(
                "DELETE FROM leases WHERE name = %s AND owner = %s", (name, owner)
            ),
        )

    # -- Message Batches ------------------------------------------------------------------

    def put_batch(self, job: str, batch_id: str, model: str, requests: Mapping[str, bytes]) -> None:
        """Record a submitted Message Batch of ``job``, with each request's ``custom_id`` and
        its blob (the verdict keys of its rows), committed at once: a run killed after
        submitting resumes the batch, on any host, instead of paying for it again."""
        rows = [(batch_id, custom_id, bytes(blob)) for custom_id, blob in requests.items()]

        def work(cursor: psycopg.Cursor[Any]) -> None:
            cursor.execute(
                "INSERT INTO batches (batch_id, job, model, created) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (batch_id) DO UPDATE SET job = EXCLUDED.job, model = EXCLUDED.model",
                (batch_id, job, model, time.time()),
            )
            if rows:
                cursor.executemany(
                    "INSERT INTO batch_requests (batch_id, custom_id, keys) VALUES (%s, %s, %s) "
                    "ON CONFLICT (batch_id, custom_id) DO UPDATE SET keys = EXCLUDED.keys",
                    rows,
                )

        self._run("record a batch in", work)

    def open_batches(self, job: str) -> list[tuple[str, dict[str, bytes]]]:
        """The batches of ``job`` not finished yet, oldest first: (batch id, custom_id ->
        blob)."""

        def work(cursor: psycopg.Cursor[Any]) -> list[Any]:
            return cursor.execute(
                "SELECT b.batch_id, r.custom_id, r.keys FROM batches b "
                "LEFT JOIN batch_requests r ON r.batch_id = b.batch_id "
                "WHERE b.job = %s AND b.finished IS NULL ORDER BY b.id, r.custom_id",
                (job,),
            ).fetchall()

        return _group_batches(self._run("read batches from", work))

    def finish_batch(self, batch_id: str) -> None:
        """Mark a batch finished (its results are stored); its request blobs are dropped."""

        def work(cursor: psycopg.Cursor[Any]) -> None:
            cursor.execute(
                "UPDATE batches SET finished = %s WHERE batch_id = %s", (time.time(), batch_id)
            )
            cursor.execute("DELETE FROM batch_requests WHERE batch_id = %s", (batch_id,))

        self._run("finish a batch in", work)

    def close(self) -> None:
        with self._lock:
            self._discard()

    def __enter__(self) -> PostgresCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dicts(cursor: psycopg.Cursor[Any], query: str, args: Sequence[Any]) -> list[dict[str, Any]]:
    cursor.execute(query, args)
    names = [d.name for d in cursor.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _secrets_of(url: str) -> list[str]:
    """The password of ``url`` as written and decoded (in the user part or a parameter)."""
    found: list[str] = []
    try:
        parts = urlsplit(url)
        if parts.password:
            found.append(parts.password)
        for pair in parts.query.split("&"):
            name, _, value = pair.partition("=")
            if name.lower() == "password" and value:
                found.append(value)
    except ValueError:  # a URL urlsplit cannot read (a bad IPv6 host): take the user part
        user = url.partition("://")[2].rpartition("@")[0]
        if ":" in user:
            found.append(user.split(":", 1)[1])
    return sorted({s for v in found for s in (v, unquote(v))}, key=len, reverse=True)
