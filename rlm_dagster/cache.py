"""Persistent cache of model results: SQLite in WAL mode, safe across processes.

    >>> cache = Cache(":memory:")
    >>> key = verdict_key("mentions a refund", "claude-haiku-5-5", '{"body": "refund please"}')
    >>> cache.put_verdicts([(key, True, "asks for a refund", "claude-haiku-5-5")])
    >>> cache.get_verdicts([key])[key]
    (True, 'asks for a refund')

Verdicts of ``llm_where`` are keyed by (predicate, model, prompt version, value): a value
judged once is never paid for again, whatever batch it arrives in. Only successful verdicts
are stored; a failure is retried next time. Dagster may run several steps in separate
processes against one cache file: WAL mode lets readers and one writer proceed together, and
``busy_timeout`` waits out a concurrent write instead of failing.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from rlm_dagster.prompts import PROMPT_VERSION

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    key     TEXT PRIMARY KEY,
    match   INTEGER NOT NULL,
    reason  TEXT NOT NULL,
    model   TEXT NOT NULL,
    created REAL NOT NULL
);
"""
_CHUNK = 5_000  # keys per IN (...) lookup, below SQLite's variable limit (32,766)


def default_cache_path() -> str:
    """``$RLM_CACHE_PATH``, else ``$XDG_CACHE_HOME/rlm_dagster/cache.sqlite3`` (~/.cache)."""
    if explicit := os.environ.get("RLM_CACHE_PATH"):
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "rlm_dagster" / "cache.sqlite3")


def verdict_key(predicate: str, model: str, value: str) -> str:
    """Content address of one verdict: predicate, model, prompt version and the row value."""
    digest = hashlib.sha256()
    for part in (predicate, model, PROMPT_VERSION, value):
        digest.update(part.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


class Cache:
    """A thread-safe handle on the cache file (one connection, one lock)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._con = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("PRAGMA synchronous=NORMAL")
        self._con.execute("PRAGMA busy_timeout=30000")
        self._con.executescript(_SCHEMA)

    def get_verdicts(self, keys: Sequence[str]) -> dict[str, tuple[bool, str]]:
        """Cached verdicts among ``keys``: key -> (match, reason)."""
        found: dict[str, tuple[bool, str]] = {}
        with self._lock:
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
        now = time.time()
        with self._lock, self._con:
            self._con.executemany(
                "INSERT OR REPLACE INTO verdicts (key, match, reason, model, created) "
                "VALUES (?, ?, ?, ?, ?)",
                [(k, int(m), r, model, now) for k, m, r, model in rows],
            )

    def close(self) -> None:
        with self._lock:
            self._con.close()
