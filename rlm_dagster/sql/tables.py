"""Where a run's tables come from, and where its answers go: the two data seams.

* :class:`TableSource` — the tables a run binds and the SQL engine that queries them. Today's
  implementation is :class:`~rlm_dagster.sql.warehouse.Warehouse`, a read-only DuckDB snapshot
  (a copy of the bound tables in a temporary file plus the run's scratch results); another engine
  (pushdown to a warehouse that keeps the data) implements the same methods and names its
  SQL ``dialect``, which the SQL policy parses with.
* :class:`AnswerSink` — where an asset's answer table is written, once, at the end of a run.
  Today's implementation is :class:`DuckDBSink`, one short write transaction through a
  ``DuckDBResource``.

The engine and the semantic layer know only :class:`TableSource`; the Dagster layer only
:class:`AnswerSink`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from rlm_dagster.errors import WarehouseBusy
from rlm_dagster.sql.warehouse import TableInfo, is_lock_error, quote_ident


class TableSource(Protocol):
    """The tables of one run and the engine that queries them."""

    dialect: str
    """The sqlglot dialect of its SQL (``"duckdb"``)."""

    @property
    def tables(self) -> Mapping[str, TableInfo]:
        """Bound tables and scratch results, by name."""
        ...

    def info(self, name: str) -> TableInfo: ...

    def describe(self) -> str:
        """One line per bound table, for the root model's prompt."""
        ...

    def fingerprints(self) -> dict[str, str]:
        """A content fingerprint per bound table (what data versions are computed from)."""
        ...

    def query(self, sql: str, *, max_rows: int = ..., timeout_s: float | None = ...) -> pa.Table:
        """Model-written SQL, under the read-only policy, capped and interruptible."""
        ...

    def trusted_arrow(self, sql: str) -> pa.Table:
        """SQL the host built itself (no policy)."""
        ...

    def trusted_columns(self, sql: str) -> list[str]:
        """The column names of a host-built query, from binding it (nothing runs)."""
        ...

    def trusted_execute(self, sql: str) -> None:
        """A statement the host built: creates and drops its working tables."""
        ...

    def trusted_batches(self, sql: str, rows: int = ...) -> Iterator[pa.RecordBatch]:
        """A host-built query's result, streamed in record batches of at most ``rows``."""
        ...

    def insert_arrow(self, table: str, data: pa.Table) -> None:
        """Append host-made rows to a working table."""
        ...

    def input_query(self, source: str) -> str:
        """A table name or a model-written query as a policy-checked subquery."""
        ...

    def create_scratch(self, prefix: str, data: pa.Table, *, name: str | None = None) -> TableInfo:
        """Store host-made ``data`` as a scratch result the REPL can query."""
        ...

    def create_scratch_from(self, prefix: str, query: str, *, name: str | None = None) -> TableInfo:
        """Store a host-built query's result as a scratch result, inside the engine."""
        ...

    def adopt_scratch(self, working: str, prefix: str, *, name: str | None = None) -> TableInfo:
        """Make the host's working table ``working`` a scratch result (renamed, not copied)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Written:
    """Where an answer went: the qualified table name and its column types as stored."""

    table: str
    columns: dict[str, str]


class AnswerSink(Protocol):
    """Writes an asset's answer table."""

    def write(
        self, key_path: Sequence[str], table: pa.Table | pa.RecordBatchReader, partition: str | None
    ) -> Written:
        """Replace the answer table named by ``key_path`` (the asset key's path), or only the
        rows of ``partition`` in it; one transaction. ``table`` is in memory, or a stream of
        record batches (a large result: read once, never held whole)."""
        ...


class DuckDBConnections(Protocol):
    """What :class:`DuckDBSink` needs of a ``dagster_duckdb.DuckDBResource`` (this module
    does not import Dagster: the engine layer imports it)."""

    database: str

    def get_connection(self) -> AbstractContextManager[Any]: ...


class DuckDBSink:
    """Answers written to the ``DuckDBResource``'s file: the table is the key's last part,
    its schema the part before (``main`` without one); a partitioned answer gets a
    ``_partition`` column and replaces only that partition's rows."""

    def __init__(self, resource: DuckDBConnections) -> None:
        self.resource = resource

    def write(
        self, key_path: Sequence[str], table: pa.Table | pa.RecordBatchReader, partition: str | None
    ) -> Written:
        *schema_parts, name = key_path
        schema = schema_parts[-1] if schema_parts else "main"
        qualified = f"{quote_ident(schema)}.{quote_ident(name)}"
        if partition is not None:
            table = _with_partition(table, partition)
        stack = ExitStack()
        try:
            con = stack.enter_context(self.resource.get_connection())
        except Exception as err:
            if is_lock_error(err):
                raise WarehouseBusy(
                    f"Could not write the answer: the warehouse {self.resource.database!r} is "
                    f"locked by another writer ({err}). The run can be retried (its model calls "
                    "replay from the cache); put the assets that write this file in one Dagster "
                    "pool."
                ) from err
            raise
        with stack:
            con.execute("BEGIN TRANSACTION")
            try:
                con.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
                con.register("__rlm_answer", table)
                if partition is None:
                    con.execute(
                        f"CREATE OR REPLACE TABLE {qualified} AS SELECT * FROM __rlm_answer"
                    )
                else:
                    # the columns, for a table that does not exist yet (a stream is read once)
                    con.register("__rlm_columns", table.schema.empty_table())
                    con.execute(
                        f"CREATE TABLE IF NOT EXISTS {qualified} AS SELECT * FROM __rlm_columns"
                    )
                    con.unregister("__rlm_columns")
                    con.execute(f"DELETE FROM {qualified} WHERE _partition = ?", [partition])
                    con.execute(f"INSERT INTO {qualified} BY NAME SELECT * FROM __rlm_answer")
                con.unregister("__rlm_answer")
                columns = dict(
                    con.execute(
                        "SELECT column_name, data_type FROM information_schema.columns "
                        "WHERE table_schema = ? AND table_name = ?",
                        [schema, name],
                    ).fetchall()
                )
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
        return Written(f"{schema}.{name}", columns)


def _with_partition(
    table: pa.Table | pa.RecordBatchReader, partition: str
) -> pa.Table | pa.RecordBatchReader:
    """``table`` with a ``_partition`` column holding ``partition`` (a stream stays one)."""
    if isinstance(table, pa.Table):
        return table.append_column(
            "_partition", pa.array([partition] * table.num_rows, pa.string())
        )
    schema = table.schema.append(pa.field("_partition", pa.string()))

    def batches() -> Iterator[pa.RecordBatch]:
        for batch in table:
            column = pa.array([partition] * batch.num_rows, pa.string())
            yield pa.RecordBatch.from_arrays([*batch.columns, column], schema=schema)

    return pa.RecordBatchReader.from_batches(schema, batches())
