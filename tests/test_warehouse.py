"""Tests for ``Warehouse``: the locked-down DuckDB snapshot (a temporary file, under a memory
limit) a run reasons over."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pytest

from rlm_dagster.errors import QueryError, RLMError, SQLPolicyError, UnknownTableError
from rlm_dagster.sql.warehouse import Warehouse


def _make_db(path: Path) -> Path:
    con = duckdb.connect(str(path))
    try:
        con.execute(
            "CREATE TABLE tickets AS SELECT * FROM (VALUES "
            "(1::BIGINT, 10, 'refund please'), (2, 10, 'app crashes'), (3, 20, 'love it')) "
            "AS t(ticket_id, customer_id, body)"
        )
        con.execute(
            "CREATE TABLE customers AS SELECT * FROM (VALUES (10, 'pro'), (20, 'free')) "
            "AS t(customer_id, plan)"
        )
        con.execute("CREATE SCHEMA sales")
        con.execute(
            "CREATE TABLE sales.orders AS SELECT * FROM (VALUES (100, 10, 9.5::DOUBLE), "
            "(101, 20, 20.0)) AS t(order_id, customer_id, amount)"
        )
    finally:
        con.close()
    return path


@pytest.fixture(scope="module")
def db_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_db(tmp_path_factory.mktemp("wh") / "warehouse.duckdb")


@pytest.fixture()
def wh(db_path: Path) -> Iterator[Warehouse]:
    warehouse = Warehouse.snapshot(str(db_path), ["tickets", "customers", "sales.orders"])
    yield warehouse
    warehouse.close()


# -- snapshot ------------------------------------------------------------------------------


def test_snapshot_copies_tables_and_resolves_schema_qualified_names(wh: Warehouse) -> None:
    assert sorted(wh.tables) == ["customers", "orders", "tickets"]
    assert [t.name for t in wh.bound_tables()] == ["tickets", "customers", "orders"]
    orders = wh.info("orders")
    assert orders.columns == ("order_id", "customer_id", "amount")
    assert orders.rows == 2
    assert not orders.scratch
    assert wh.query("SELECT sum(amount) AS s FROM orders").to_pydict() == {"s": [29.5]}
    assert wh.query("SELECT count(*) AS n FROM tickets").to_pydict() == {"n": [3]}


def test_snapshot_resolves_a_unique_table_in_a_non_main_schema_without_qualifier(
    db_path: Path,
) -> None:
    wh = Warehouse.snapshot(str(db_path), ["ORDERS"])
    try:
        assert list(wh.tables) == ["orders"]
        assert wh.info("orders").rows == 2
    finally:
        wh.close()


def test_snapshot_unknown_table_lists_existing_tables(db_path: Path) -> None:
    with pytest.raises(UnknownTableError) as info:
        Warehouse.snapshot(str(db_path), ["tickets", "tikets"])
    message = str(info.value)
    assert "'tikets'" in message
    assert "customers, sales.orders, tickets" in message


def test_snapshot_wrong_schema_is_unknown(db_path: Path) -> None:
    with pytest.raises(UnknownTableError, match=r"'main\.orders'"):
        Warehouse.snapshot(str(db_path), ["main.orders"])


def test_snapshot_applies_filters(db_path: Path) -> None:
    wh = Warehouse.snapshot(
        str(db_path),
        ["tickets", "sales.orders"],
        filters={"tickets": "customer_id = 10", "sales.orders": "amount > 10"},
    )
    try:
        assert wh.info("tickets").rows == 2
        assert wh.query("SELECT ticket_id FROM tickets ORDER BY 1").to_pydict() == {
            "ticket_id": [1, 2]
        }
        assert wh.query("SELECT order_id FROM orders").to_pydict() == {"order_id": [101]}
    finally:
        wh.close()


def test_snapshot_filter_by_bound_name(db_path: Path) -> None:
    wh = Warehouse.snapshot(str(db_path), ["sales.orders"], filters={"orders": "order_id = 100"})
    try:
        assert wh.info("orders").rows == 1
    finally:
        wh.close()


def test_snapshot_missing_file_is_a_query_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "missing.duckdb"
    with pytest.raises(QueryError, match="read-only"):
        Warehouse.snapshot(str(missing), ["tickets"])


def test_snapshot_releases_the_file_and_keeps_its_own_copy(tmp_path: Path) -> None:
    path = _make_db(tmp_path / "live.duckdb")
    wh = Warehouse.snapshot(str(path), ["tickets"])
    try:
        writer = duckdb.connect(str(path))  # read-write: fails if the snapshot held the lock
        try:
            writer.execute("INSERT INTO tickets VALUES (4, 30, 'new ticket')")
            writer.execute("DELETE FROM tickets WHERE ticket_id = 1")
            assert writer.sql("SELECT count(*) FROM tickets").fetchall() == [(3,)]
        finally:
            writer.close()
        got = wh.query("SELECT ticket_id FROM tickets ORDER BY 1").to_pydict()
        assert got == {"ticket_id": [1, 2, 3]}
    finally:
        wh.close()


def test_the_private_copy_does_not_wait_for_the_disk(tmp_path: Path) -> None:
    # The copy is scratch removed at close: a commit (every working-table statement of
    # llm_where) need not fdatasync. The user's own database is only ever read.
    path = _make_db(tmp_path / "live.duckdb")
    for wh in (
        Warehouse.snapshot(str(path), ["tickets"]),
        Warehouse.from_frames({"t": pd.DataFrame({"x": [1]})}),
    ):
        try:
            setting = wh.trusted_arrow("SELECT current_setting('fsync_mode') AS m").to_pydict()
            assert setting == {"m": ["NONE"]}
        finally:
            wh.close()


@pytest.mark.parametrize("method", ["trusted_execute", "trusted_arrow", "trusted_batches"])
def test_host_sql_out_of_memory_is_a_query_error_naming_the_limit(method: str) -> None:
    # llm_where's staging and result tables are host-built SQL: past the engine's memory
    # limit they fail with what to change, not with DuckDB's own exception.
    wh = Warehouse.from_frames({"t": pd.DataFrame({"x": [1]})}, memory_limit_mb=64)
    select = "SELECT list(repeat('x', 100)) AS l FROM range(2000000)"
    run = {
        "trusted_execute": lambda: wh.trusted_execute(f"CREATE TABLE __x AS {select}"),
        "trusted_arrow": lambda: wh.trusted_arrow(select),
        "trusted_batches": lambda: list(wh.trusted_batches(select)),
    }[method]
    try:
        with pytest.raises(QueryError, match=r"ran out of memory.*duckdb_memory_limit_mb"):
            run()
    finally:
        wh.close()


def test_snapshot_same_table_name_from_two_schemas_is_a_clear_error(tmp_path: Path) -> None:
    path = _make_db(tmp_path / "two.duckdb")
    con = duckdb.connect(str(path))
    con.execute("CREATE SCHEMA archive")
    con.execute("CREATE TABLE archive.tickets AS SELECT 1 AS ticket_id")
    con.close()
    with pytest.raises(RLMError, match="tickets"):
        Warehouse.snapshot(str(path), ["tickets", "archive.tickets"])


# -- isolation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM '/etc/passwd'",
        "COPY tickets TO '/tmp/rlm-dagster-exfil.csv'",
        "ATTACH '/tmp/rlm-dagster-other.duckdb' AS other",
    ],
)
def test_external_access_is_off_even_without_the_policy(wh: Warehouse, sql: str) -> None:
    with pytest.raises(duckdb.Error):
        wh.trusted_arrow(sql)


def test_external_access_cannot_be_switched_back_on(wh: Warehouse) -> None:
    with pytest.raises(duckdb.Error, match="locked"):
        wh.trusted_arrow("SET enable_external_access = true")
    with pytest.raises(duckdb.Error):
        wh.trusted_arrow("SELECT * FROM read_csv('/etc/passwd')")


def test_from_frames_is_locked_down_too() -> None:
    wh = Warehouse.from_frames({"t": pd.DataFrame({"x": [1, 2]})})
    try:
        assert wh.query("SELECT sum(x) AS s FROM t").to_pydict() == {"s": [3]}
        with pytest.raises(duckdb.Error):
            wh.trusted_arrow("SELECT * FROM read_text('/etc/hostname')")
    finally:
        wh.close()


# -- query -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "DROP TABLE tickets",
        "INSERT INTO tickets VALUES (9, 9, 'x')",
        "UPDATE tickets SET body = 'x'",
        "DELETE FROM tickets",
        "CREATE TABLE t2 AS SELECT * FROM tickets",
    ],
)
def test_query_refuses_writes(wh: Warehouse, sql: str) -> None:
    with pytest.raises(SQLPolicyError) as info:
        wh.query(sql)
    assert info.value.rule == "read-only"
    assert wh.info("tickets").rows == 3
    assert wh.query("SELECT count(*) AS n FROM tickets").to_pydict() == {"n": [3]}


def test_query_refuses_tables_that_are_not_bound(wh: Warehouse) -> None:
    with pytest.raises(SQLPolicyError) as info:
        wh.query("SELECT * FROM sales.orders")
    assert info.value.rule == "unbound-table"


def test_query_database_error_is_a_query_error(wh: Warehouse) -> None:
    with pytest.raises(QueryError, match="no_such_column"):
        wh.query("SELECT no_such_column FROM tickets")


def test_query_over_max_rows_suggests_aggregating(wh: Warehouse) -> None:
    assert wh.query("SELECT * FROM tickets", max_rows=3).num_rows == 3
    with pytest.raises(QueryError) as info:
        wh.query("SELECT * FROM tickets", max_rows=2)
    message = str(info.value)
    assert "more than 2 rows" in message
    assert "Aggregate" in message


def test_query_joins_bound_tables(wh: Warehouse) -> None:
    got = wh.query(
        "SELECT c.plan, count(*) AS n FROM tickets t JOIN customers c USING (customer_id) "
        "GROUP BY ALL ORDER BY c.plan"
    ).to_pydict()
    assert got == {"plan": ["free", "pro"], "n": [1, 2]}


# -- scratch, describe, input_query --------------------------------------------------------


def test_create_scratch_is_queryable_and_not_described(wh: Warehouse) -> None:
    first = wh.create_scratch("matches", pa.table({"ticket_id": [1, 3], "why": ["a", "b"]}))
    second = wh.create_scratch("matches", pa.table({"ticket_id": [2]}))
    assert first.name == "matches_1"
    assert second.name == "matches_2"
    assert first.scratch
    assert first.rows == 2
    assert first.columns == ("ticket_id", "why")
    got = wh.query(
        f"SELECT t.body FROM tickets t JOIN {first.name} m USING (ticket_id) ORDER BY 1"
    ).to_pydict()
    assert got == {"body": ["love it", "refund please"]}
    assert "matches_1" in wh.tables
    assert "matches" not in wh.describe()
    assert [t.name for t in wh.bound_tables()] == ["tickets", "customers", "orders"]


def test_create_scratch_skips_names_already_taken() -> None:
    wh = Warehouse.from_frames({"r_1": pd.DataFrame({"x": [1]})})
    try:
        info = wh.create_scratch("r", pa.table({"y": [2]}))
        assert info.name == "r_2"
        assert wh.query("SELECT x FROM r_1").to_pydict() == {"x": [1]}
    finally:
        wh.close()


def test_describe_lists_tables_with_rows_and_types(wh: Warehouse) -> None:
    lines = wh.describe().splitlines()
    assert lines == [
        "- tickets (table, 3 rows): ticket_id BIGINT, customer_id INTEGER, body VARCHAR",
        "- customers (table, 2 rows): customer_id INTEGER, plan VARCHAR",
        "- orders (table, 2 rows): order_id INTEGER, customer_id INTEGER, amount DOUBLE",
    ]


def test_info_of_unknown_table_lists_tables(wh: Warehouse) -> None:
    with pytest.raises(UnknownTableError, match="customers, orders, tickets"):
        wh.info("nope")


def test_input_query_table_name_and_select(wh: Warehouse) -> None:
    assert wh.input_query("tickets") == 'SELECT * FROM "tickets"'
    select = "select ticket_id FROM tickets WHERE customer_id = 10"
    sub = wh.input_query(select)  # normalised by sqlglot, same meaning
    rows = wh.trusted_arrow(f"SELECT count(*) AS n FROM ({sub}) AS s").to_pydict()
    assert rows == {"n": [2]}


def test_input_query_unknown_name_lists_tables(wh: Warehouse) -> None:
    with pytest.raises(UnknownTableError) as info:
        wh.input_query("tikets")
    assert "'tikets'" in str(info.value)
    assert "customers, orders, tickets" in str(info.value)


def test_input_query_select_is_policy_checked(wh: Warehouse) -> None:
    with pytest.raises(SQLPolicyError) as info:
        wh.input_query("SELECT * FROM read_csv('/etc/passwd')")
    assert info.value.rule == "file-access"
    with pytest.raises(SQLPolicyError):
        wh.input_query("SELECT * FROM secrets")
    with pytest.raises(SQLPolicyError) as refused:
        wh.input_query("DROP TABLE tickets")
    assert refused.value.rule == "read-only"


@pytest.mark.parametrize(
    "source",
    [
        "WITH ten AS (SELECT * FROM tickets WHERE customer_id = 10) SELECT * FROM ten",
        "FROM tickets SELECT * WHERE customer_id = 10",
    ],
)
def test_input_query_accepts_with_and_from_first_selects(wh: Warehouse, source: str) -> None:
    sub = wh.input_query(source)
    assert wh.trusted_arrow(f"SELECT count(*) AS n FROM ({sub}) AS s").to_pydict() == {"n": [2]}


def test_input_query_accepts_a_select_after_a_comment(wh: Warehouse) -> None:
    sub = wh.input_query("-- tickets of customer 10\nSELECT * FROM tickets WHERE customer_id = 10")
    assert wh.trusted_arrow(f"SELECT count(*) AS n FROM ({sub}) AS s").to_pydict() == {"n": [2]}


@pytest.mark.parametrize(
    "source",
    ["SELECT * FROM tickets WHERE customer_id = 10;", "SELECT * FROM tickets -- all of them"],
)
def test_input_query_result_is_usable_as_a_subquery(wh: Warehouse, source: str) -> None:
    sub = wh.input_query(source)
    wh.trusted_arrow(f"SELECT count(*) AS n FROM ({sub}) AS __in")


# -- tables larger than the memory limit -------------------------------------------------

_BIG_CHILD = r"""
import json, resource, sys, time
from rlm_dagster.sql.warehouse import Warehouse

db, limit_mb = sys.argv[1], int(sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
wh = Warehouse.snapshot(db, ["events"], memory_limit_mb=limit_mb)
workdir = wh._workdir
stored = sum(p.stat().st_size for p in workdir.rglob("*") if p.is_file())
groups = wh.query(
    "SELECT count(*) AS n FROM (SELECT body, count(*) FROM events GROUP BY body)"
).column("n")[0].as_py()
top = wh.query(
    "SELECT body, count(*) AS c FROM events GROUP BY body ORDER BY c DESC, body LIMIT 1"
).to_pylist()
rows = wh.info("events").rows
wh.close()
print(json.dumps({
    "before_mb": before,
    "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    "stored_mb": stored // 2**20,
    "groups": groups,
    "rows": rows,
    "top": top,
    "removed": not workdir.exists(),
}))
"""


def test_a_table_larger_than_the_memory_limit_binds_and_is_queried(tmp_path: Path) -> None:
    """5M rows (~400 MB of text) bound and grouped under a 128 MB DuckDB limit: the snapshot
    lives in a temporary file, the group-by spills, the process never holds the table, and
    the file is removed on close."""
    import json
    import subprocess
    import sys

    db = tmp_path / "big.duckdb"
    con = duckdb.connect(str(db))
    con.execute(
        "CREATE TABLE events AS SELECT i AS id, 'event ' || (i % 2000000)::VARCHAR || ' ' || "
        "md5(i::VARCHAR) || md5((i % 7)::VARCHAR) AS body FROM range(5000000) AS t(i)"
    )
    con.close()
    child = subprocess.run(
        [sys.executable, "-c", _BIG_CHILD, str(db), "128"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout.strip().splitlines()[-1])
    assert out["rows"] == 5_000_000
    assert out["groups"] == 5_000_000  # every body is distinct: the md5 of i
    assert out["removed"]
    # The data does not fit in the limit, and the process did not hold it: the peak grew by
    # the limit plus working memory, far less than the table.
    assert out["stored_mb"] > 128
    assert out["peak_mb"] - out["before_mb"] < 128 + 256, out
