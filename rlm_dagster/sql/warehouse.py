"""The tables an RLM run reasons over: a read-only DuckDB snapshot in a temporary file.

    >>> import pandas as pd
    >>> wh = Warehouse.from_frames({"tickets": pd.DataFrame({"id": [1, 2], "body": ["a", "b"]})})
    >>> wh.query("SELECT count(*) AS n FROM tickets").to_pydict()
    {'n': [2]}

``Warehouse.snapshot`` attaches the warehouse file READ_ONLY, copies the bound tables into a
database of its own, detaches, and then switches off DuckDB's external access for good
(``enable_external_access=false`` + ``lock_configuration``). So the file lock is held for
seconds rather than for the whole run (other assets can write the file meanwhile), the run
sees one consistent snapshot, and model SQL has no path to any file even if it slipped past
the sqlglot policy in :mod:`rlm_dagster.sql.policy`.

That database is a file in a private temporary directory (removed on :meth:`Warehouse.close`),
run under a memory limit (``memory_limit_mb``, 1 GB by default): tables larger than memory
are bound, queried and judged by ``llm_where`` with DuckDB's buffer manager paging them and
spilling what does not fit (at most ``spill_limit_mb``) to that directory, never the host's
RAM. Model SQL cannot name files, so the directory is reachable only through the tables.
"""

from __future__ import annotations

import itertools
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa

from rlm_dagster.errors import ConfigError, QueryError, UnknownTableError, WarehouseBusy
from rlm_dagster.sql.policy import check_sql

_BARE_NAME = re.compile(r"^[A-Za-z_][\w.]*$")
_LOCK_MARKERS = ("Could not set lock", "Conflicting lock", "lock on file")
# What DuckDB may hold in the host's memory (bound data, scratch results, model SQL); beyond
# it, pages go to the snapshot file and intermediates spill to its directory.
DEFAULT_MEMORY_LIMIT_MB = 1_024
DEFAULT_SPILL_LIMIT_MB = 16_384
QUERY_THREADS = 2


def quote_ident(name: str) -> str:
    """``name`` as a double-quoted DuckDB identifier."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class TableInfo:
    """Name, schema and size of a table the REPL can see."""

    name: str
    columns: tuple[str, ...]
    types: tuple[str, ...]
    rows: int
    scratch: bool = False

    def describe(self) -> str:
        cols = ", ".join(f"{c} {t}" for c, t in zip(self.columns, self.types, strict=True))
        kind = "scratch result" if self.scratch else "table"
        return f"{self.name} ({kind}, {self.rows:,} rows): {cols}"


class Warehouse:
    """A DuckDB database in a temporary file holding the bound tables and scratch results:
    the :class:`~rlm_dagster.sql.tables.TableSource` of today."""

    dialect = "duckdb"

    def __init__(
        self, con: duckdb.DuckDBPyConnection, source: str, *, workdir: Path | None = None
    ) -> None:
        self._con = con
        self._workdir = workdir
        # Child RLMs (rlm_query_batched) run in threads; a DuckDB connection is used by one
        # thread at a time.
        self._lock = threading.RLock()
        self.source = source
        self._tables: dict[str, TableInfo] = {}
        self._scratch_ids = itertools.count(1)

    # -- construction -------------------------------------------------------------------

    @classmethod
    def snapshot(
        cls,
        database: str,
        tables: Sequence[str],
        *,
        filters: Mapping[str, str] | None = None,
        lock_timeout_s: float = 60.0,
        memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB,
        spill_limit_mb: int = DEFAULT_SPILL_LIMIT_MB,
    ) -> Warehouse:
        """Copy ``tables`` out of the DuckDB file ``database``; ``filters`` maps a table to a
        trusted SQL predicate applied while copying (e.g. a partition filter). The copy is
        made and queried within ``memory_limit_mb`` of memory, whatever the tables' size."""
        names = [t.rpartition(".")[2].lower() for t in tables]
        clashes = sorted({n for n in names if names.count(n) > 1})
        if clashes:
            raise ConfigError(
                f"tables= binds the name(s) {clashes} twice ({', '.join(tables)}); each table is a "
                "REPL variable named after its table, so bind only one of them."
            )
        con, workdir = _open_database(memory_limit_mb, spill_limit_mb)
        try:
            _attach_read_only(con, database, lock_timeout_s)
        except BaseException:
            _close(con, workdir)
            raise
        try:
            existing = con.sql(
                "SELECT schema_name, table_name FROM duckdb_tables() WHERE database_name = '__wh' "
                "UNION ALL SELECT schema_name, view_name FROM duckdb_views() "
                "WHERE database_name = '__wh' AND NOT internal"
            ).fetchall()
            wh = cls(con, source=database, workdir=workdir)
            for requested in tables:
                schema, table = _resolve(requested, existing, database)
                predicate = (filters or {}).get(requested) or (filters or {}).get(table)
                where = f" WHERE {predicate}" if predicate else ""
                try:
                    con.execute(
                        f"CREATE TABLE {quote_ident(table)} AS SELECT * FROM "
                        f"__wh.{quote_ident(schema)}.{quote_ident(table)}{where}"
                    )
                except duckdb.Error as err:
                    raise ConfigError(
                        f"Filtering table {requested!r} with {predicate!r} failed: {_short(err)}. "
                        "Check partition_column= on the asset."
                    ) from None
                wh._register(table, scratch=False)
        except BaseException:
            _close(con, workdir)
            raise
        else:
            con.execute("DETACH __wh")
        wh._lock_down()
        return wh

    @classmethod
    def from_frames(
        cls,
        frames: Mapping[str, pd.DataFrame | pa.Table],
        *,
        memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB,
        spill_limit_mb: int = DEFAULT_SPILL_LIMIT_MB,
    ) -> Warehouse:
        """A warehouse from in-memory frames (the plain-Python API and tests)."""
        con, workdir = _open_database(memory_limit_mb, spill_limit_mb)
        wh = cls(con, source="memory", workdir=workdir)
        for name, frame in frames.items():
            con.register("__frame", frame)
            con.execute(f"CREATE TABLE {quote_ident(name)} AS SELECT * FROM __frame")
            con.unregister("__frame")
            wh._register(name, scratch=False)
        wh._lock_down()
        return wh

    def _lock_down(self) -> None:
        # Model SQL runs here: no files or network, a bounded number of threads, memory and
        # spill space (a cross join spills, then fails; never the host).
        self._con.execute("CHECKPOINT")
        self._con.execute("SET enable_progress_bar = false")  # never drawn on the run's stdout
        self._con.execute("SET enable_external_access = false")
        self._con.execute("SET lock_configuration = true")

    def _register(self, name: str, *, scratch: bool) -> TableInfo:
        rel = self._con.table(quote_ident(name))
        rows = self._con.sql(f"SELECT count(*) FROM {quote_ident(name)}").fetchall()[0][0]
        info = TableInfo(
            name=name,
            columns=tuple(rel.columns),
            types=tuple(str(t) for t in rel.types),
            rows=int(rows),
            scratch=scratch,
        )
        self._tables[name] = info
        return info

    # -- reading ------------------------------------------------------------------------

    @property
    def tables(self) -> dict[str, TableInfo]:
        return dict(self._tables)

    def bound_tables(self) -> list[TableInfo]:
        return [t for t in self._tables.values() if not t.scratch]

    def info(self, name: str) -> TableInfo:
        try:
            return self._tables[name]
        except KeyError:
            raise UnknownTableError(
                f"No table named {name!r} in this run. Tables: {', '.join(sorted(self._tables))}."
            ) from None

    def fingerprints(self) -> dict[str, str]:
        """Per bound table, a content fingerprint (row count and an order-independent sum of
        row hashes): what a data version is computed from."""
        out = {}
        for t in self.bound_tables():
            n, h = self._con.sql(
                f"SELECT count(*), coalesce(sum(hash(t)::HUGEINT), 0) FROM {quote_ident(t.name)} AS t"
            ).fetchall()[0]
            out[t.name] = f"{n}:{h}"
        return out

    def describe(self) -> str:
        """One line per bound table, for the root model's prompt."""
        return "\n".join(f"- {t.describe()}" for t in self.bound_tables())

    def query(
        self, sql: str, *, max_rows: int = 100_000, timeout_s: float | None = None
    ) -> pa.Table:
        """Run model-written ``sql`` under the read-only policy; at most ``max_rows`` rows,
        interrupted after ``timeout_s`` seconds."""
        check_sql(sql, allowed_tables=self._tables.keys(), dialect=self.dialect)
        with self._lock:
            timer = None
            if timeout_s is not None:
                timer = threading.Timer(max(timeout_s, 0.0), self._con.interrupt)
                timer.daemon = True
                timer.start()
            try:
                table = self._con.sql(sql).limit(max_rows + 1).to_arrow_table()
            except duckdb.InterruptException:
                raise QueryError(
                    f"sql() was stopped after {timeout_s:g} s, the time left in this cell. "
                    "Filter or aggregate first, avoid cross joins and unbounded recursive CTEs."
                ) from None
            except duckdb.OutOfMemoryException as err:
                raise QueryError(
                    f"sql() needed more memory than the run allows ({_short(err)}). Filter or "
                    "aggregate first, or avoid joins that multiply rows."
                ) from None
            except duckdb.Error as err:
                raise QueryError(f"sql() failed: {_short(err)}") from None
            finally:
                if timer is not None:
                    timer.cancel()
        if table.num_rows > max_rows:
            raise QueryError(
                f"sql() result has more than {max_rows:,} rows. Aggregate in SQL, add a LIMIT, "
                "or pass the table handle to llm_where() instead of fetching rows."
            )
        return table

    def trusted_arrow(self, sql: str) -> pa.Table:
        """Run host-built SQL (no policy): for engines that compose their own queries."""
        with self._lock, self._host_errors():
            return self._con.sql(sql).to_arrow_table()

    def trusted_columns(self, sql: str) -> list[str]:
        """The column names of a host-built query, from binding it: nothing is executed."""
        with self._cursor() as cur:
            return list(cur.sql(sql).columns)

    def input_query(self, source: str) -> str:
        """A bound/scratch table name or a model-written query as a policy-checked subquery."""
        if source in self._tables:
            return f"SELECT * FROM {quote_ident(source)}"
        if _BARE_NAME.match(source.strip()):
            raise UnknownTableError(
                f"{source.strip()!r} is not a table of this run. Tables: "
                f"{', '.join(sorted(self._tables))}."
            )
        # Normalised by sqlglot: no trailing ';', comments made safe for wrapping in (...).
        checked = check_sql(source, allowed_tables=self._tables.keys(), dialect=self.dialect)
        return checked.sql(dialect=self.dialect)

    # -- scratch results (written by the host only) ---------------------------------------

    def create_scratch(self, prefix: str, data: pa.Table, *, name: str | None = None) -> TableInfo:
        """Store ``data`` as a new scratch table (``name``, or ``{prefix}_{n}``); return its info."""
        with self._lock:
            return self._create_scratch(prefix, data, name)

    def _scratch_name(self, prefix: str, name: str | None) -> str:
        if name is None or name in self._tables:
            name = f"{prefix}_{next(self._scratch_ids)}"
            while name in self._tables:
                name = f"{prefix}_{next(self._scratch_ids)}"
        return name

    def _create_scratch(self, prefix: str, data: pa.Table, name: str | None) -> TableInfo:
        name = self._scratch_name(prefix, name)
        self._con.register("__scratch", data)
        try:
            self._con.execute(f"CREATE TABLE {quote_ident(name)} AS SELECT * FROM __scratch")
        finally:
            self._con.unregister("__scratch")
        return self._register(name, scratch=True)

    def trusted_execute(self, sql: str) -> None:
        """Run a host-built statement (no policy): the working tables of the semantic layer.
        On a connection of its own, so it runs beside other threads' queries."""
        with self._cursor() as cur:
            cur.execute(sql)

    def trusted_batches(self, sql: str, rows: int = 10_000) -> Iterator[pa.RecordBatch]:
        """Stream a host-built query's result in record batches of at most ``rows`` rows:
        memory holds one batch, whatever the result's size."""
        with self._cursor() as cur:
            reader = cur.sql(sql).to_arrow_reader(rows)
            yield from reader

    def insert_arrow(self, table: str, data: pa.Table) -> None:
        """Append host-made ``data`` to the working table ``table`` (columns by position)."""
        with self._cursor() as cur:
            cur.register("__rows", data)
            try:
                cur.execute(f"INSERT INTO {quote_ident(table)} SELECT * FROM __rows")
            finally:
                cur.unregister("__rows")

    @contextmanager
    def _cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        cur = self._con.cursor()
        try:
            with self._host_errors():
                yield cur
        finally:
            cur.close()

    @contextmanager
    def _host_errors(self) -> Iterator[None]:
        """Host-built SQL running out of the engine's memory is a :class:`QueryError` that
        names the limit and what to change, not DuckDB's own exception."""
        try:
            yield
        except duckdb.OutOfMemoryException as err:
            limit = self._con.sql("SELECT current_setting('memory_limit')").fetchall()[0][0]
            raise QueryError(
                f"DuckDB ran out of memory in a query rlm_dagster built (llm_where's working "
                f"or result tables, or a verdicts export) under its {limit} limit: "
                f"{str(err).strip().splitlines()[0]}. Raise duckdb_memory_limit_mb on the RLM resource "
                "(memory_limit_mb= on a Warehouse), or judge fewer rows or columns at once "
                "(where=, columns=)."
            ) from None

    def create_scratch_from(self, prefix: str, query: str, *, name: str | None = None) -> TableInfo:
        """Store the result of the host-built ``query`` as a new scratch table, inside DuckDB
        (nothing passes through Python, whatever its size)."""
        with self._lock, self._host_errors():
            name = self._scratch_name(prefix, name)
            self._con.execute(f"CREATE TABLE {quote_ident(name)} AS {query}")
            return self._register(name, scratch=True)

    def adopt_scratch(self, working: str, prefix: str, *, name: str | None = None) -> TableInfo:
        """Make the host's working table ``working`` (an unquoted name the host chose) the new
        scratch table ``name`` (or ``{prefix}_{n}``): a rename in the catalog, no copy."""
        with self._lock:
            name = self._scratch_name(prefix, name)
            self._con.execute(f"ALTER TABLE {working} RENAME TO {quote_ident(name)}")
            return self._register(name, scratch=True)

    def close(self) -> None:
        _close(self._con, self._workdir)


def _open_database(
    memory_limit_mb: int, spill_limit_mb: int
) -> tuple[duckdb.DuckDBPyConnection, Path]:
    """A new DuckDB database file in a private temporary directory, with its memory, threads
    and spill space bounded from the start (the copy itself runs under them)."""
    for name, value in (("memory_limit_mb", memory_limit_mb), ("spill_limit_mb", spill_limit_mb)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 64:
            raise ConfigError(f"{name} must be a whole number of MB, at least 64; got {value!r}.")
    workdir = Path(tempfile.mkdtemp(prefix="rlm-warehouse-"))
    try:
        con = duckdb.connect(
            str(workdir / "snapshot.duckdb"),
            config={
                "memory_limit": f"{memory_limit_mb}MB",
                "max_temp_directory_size": f"{spill_limit_mb}MB",
                "temp_directory": str(workdir / "spill"),
                "threads": QUERY_THREADS,
                # The file is this run's private scratch, removed at close and never reopened:
                # a commit need not wait for the disk (a statement's fdatasync was most of
                # what a small working-table statement cost).
                "fsync_mode": "NONE",
            },
        )
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return con, workdir


def _close(con: duckdb.DuckDBPyConnection, workdir: Path | None) -> None:
    try:
        con.close()
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def is_lock_error(err: BaseException) -> bool:
    """Whether ``err`` is DuckDB saying another process holds the file's lock."""
    return isinstance(err, duckdb.IOException) and any(m in str(err) for m in _LOCK_MARKERS)


def _attach_read_only(con: duckdb.DuckDBPyConnection, database: str, timeout_s: float) -> None:
    path = database.replace("'", "''")
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            con.execute(f"ATTACH '{path}' AS __wh (READ_ONLY)")
            return
        except duckdb.IOException as err:
            locked = any(m in str(err) for m in _LOCK_MARKERS)
            if locked and time.monotonic() > deadline:
                raise WarehouseBusy(
                    f"The warehouse {database!r} stayed locked by another writer for "
                    f"{timeout_s:g} s: {_short(err)}. The run can be retried; to avoid the wait, "
                    "put the assets that write this file in one Dagster pool."
                ) from None
            if not locked:
                raise QueryError(
                    f"Could not open the warehouse {database!r} read-only: {_short(err)}."
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def _resolve(requested: str, existing: list[tuple[str, str]], database: str) -> tuple[str, str]:
    wanted_schema, _, wanted_table = requested.rpartition(".")
    hits = [
        (s, t)
        for s, t in existing
        if t.lower() == wanted_table.lower()
        and (not wanted_schema or s.lower() == wanted_schema.lower())
    ]
    if len(hits) > 1:
        hits = [h for h in hits if h[0] == "main"] or hits
    if len(hits) == 1:
        return hits[0]
    names = sorted(t if s == "main" else f"{s}.{t}" for s, t in existing)
    if not hits:
        raise UnknownTableError(
            f"Table {requested!r} does not exist in the warehouse {database!r}. Tables that exist: "
            f"{', '.join(names) or '(none)'}. Fix tables= on the RLM asset, or materialize the "
            "asset that creates it first."
        )
    raise UnknownTableError(
        f"Table name {requested!r} is ambiguous in {database!r} ({', '.join(f'{s}.{t}' for s, t in hits)}); "
        "qualify it as schema.table in tables=."
    )


def _short(err: BaseException, limit: int = 500) -> str:
    text = str(err).strip()
    return text if len(text) <= limit else text[:limit] + "..."
