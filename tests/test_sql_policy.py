"""Tests for the read-only SQL policy behind the REPL's ``sql()`` helper."""

from __future__ import annotations

from collections.abc import Iterator

import duckdb
import pytest
from sqlglot import exp

from rlm_dagster.errors import SQLPolicyError
from rlm_dagster.sql.policy import RULES, check_sql

TABLES = ("tickets", "customers")


@pytest.fixture(scope="module")
def con() -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect(":memory:")
    connection.execute(
        "CREATE TABLE tickets(ticket_id INTEGER, customer_id INTEGER, body VARCHAR, "
        "created_at TIMESTAMP)"
    )
    connection.execute("CREATE TABLE customers(customer_id INTEGER, plan VARCHAR)")
    connection.execute(
        """
        INSERT INTO tickets VALUES
            (1, 10, 'Refund for order #123 please', TIMESTAMP '2024-01-02 09:00:00'),
            (2, 10, 'App crashes on login', TIMESTAMP '2024-01-09 10:30:00'),
            (3, 20, 'Where is my REFUND? order #456', TIMESTAMP '2024-02-01 12:00:00'),
            (4, 30, 'Love the product', TIMESTAMP '2024-02-15 08:15:00')
        """
    )
    connection.execute("INSERT INTO customers VALUES (10, 'pro'), (20, 'free'), (40, 'pro')")
    yield connection
    connection.close()


ALLOWED: list[str] = [
    "SELECT count(*) AS n FROM tickets",
    "FROM tickets SELECT customer_id, count(*) AS n GROUP BY ALL ORDER BY n DESC",
    "FROM tickets",
    "SELECT * FROM TICKETS WHERE ticket_id = 1;",
    "-- newest first\nSELECT * FROM tickets ORDER BY created_at DESC LIMIT 2",
    "SELECT * EXCLUDE (body) FROM tickets ORDER BY ticket_id",
    "SELECT COLUMNS('.*_id') FROM tickets",
    "SELECT ticket_id FROM tickets WHERE body ILIKE '%refund%'",
    "SELECT ticket_id, regexp_matches(body, 'order #[0-9]+') AS has_order FROM tickets",
    "SELECT regexp_extract(body, '#([0-9]+)', 1) AS order_no FROM tickets",
    "SELECT date_trunc('week', created_at) AS week, count(*) AS n FROM tickets GROUP BY 1 ORDER BY 1",
    "SELECT strftime(created_at, '%Y-%m') AS month, count(*) AS n FROM tickets GROUP BY month",
    "SELECT list_aggregate(list(ticket_id), 'max') AS top FROM tickets",
    "SELECT list_transform(string_split(body, ' '), lambda w: upper(w)) AS words FROM tickets",
    "SELECT list_filter([1, 2, 3], lambda x: x > 1) AS xs",
    "WITH per_customer AS (SELECT customer_id, count(*) AS n FROM tickets GROUP BY customer_id) "
    "SELECT c.plan, avg(p.n) AS avg_n FROM per_customer AS p JOIN customers AS c USING (customer_id) "
    "GROUP BY c.plan",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r",
    "SELECT ticket_id, row_number() OVER (PARTITION BY customer_id ORDER BY created_at) AS rn "
    "FROM tickets",
    "SELECT * FROM tickets "
    "QUALIFY row_number() OVER (PARTITION BY customer_id ORDER BY created_at DESC) = 1",
    "SELECT * FROM tickets USING SAMPLE 2 ROWS",
    "SELECT * FROM tickets USING SAMPLE 50 PERCENT (bernoulli)",
    "SELECT customer_id FROM tickets UNION SELECT customer_id FROM customers",
    "SELECT customer_id FROM customers EXCEPT SELECT customer_id FROM tickets",
    "SELECT ticket_id, (SELECT plan FROM customers AS c WHERE c.customer_id = t.customer_id) "
    "AS plan FROM tickets AS t",
    "SELECT * FROM tickets WHERE customer_id IN (SELECT customer_id FROM customers WHERE plan = 'pro')",
    "SELECT c.plan, count(t.ticket_id) AS n FROM customers AS c "
    "LEFT JOIN tickets AS t ON t.customer_id = c.customer_id GROUP BY ALL",
    "SELECT t.ticket_id, u.word FROM tickets AS t, unnest(string_split(t.body, ' ')) AS u(word)",
    "SELECT * FROM tickets AS t, LATERAL (SELECT length(t.body) AS len)",
    "SELECT i FROM range(3) AS r(i)",
    "SELECT * FROM generate_series(1, 3)",
    'SELECT key, value FROM json_each(\'{"a": 1, "b": 2}\')',
    "SELECT json_extract_string('{\"plan\": \"pro\"}', '$.plan') AS plan",
    "SELECT s.id FROM (SELECT {'id': ticket_id, 'len': length(body)} AS s FROM tickets)",
    "VALUES (1, 'a'), (2, 'b')",
    "SELECT * FROM (VALUES (1, 'x')) AS v(id, label)",
    "SELECT 'docs at https://example.com/a.csv' AS link",
    "PIVOT customers ON plan USING count(*)",
    "DESCRIBE tickets",
    "DESCRIBE SELECT ticket_id, body FROM tickets",
    "SUMMARIZE tickets",
    "SUMMARIZE SELECT customer_id FROM tickets",
]


@pytest.mark.parametrize("query", ALLOWED)
def test_allowed_queries_pass_and_run_in_duckdb(query: str, con: duckdb.DuckDBPyConnection) -> None:
    statement = check_sql(query, TABLES)
    assert isinstance(statement, exp.Expr)
    con.execute(query).fetchall()  # the policy must not refuse valid DuckDB SQL


REFUSED: list[tuple[str, str]] = [
    # parse
    ("", "parse"),
    ("  ; -- nothing here", "parse"),
    ("SELEC 1", "parse"),
    ("SELECT * FROM tickets WHERE", "parse"),
    # single-statement
    ("SELECT 1; SELECT 2", "single-statement"),
    ("SELECT 1; DROP TABLE tickets", "single-statement"),
    ("SELECT 1; EXPORT DATABASE 'dump'", "single-statement"),
    # read-only
    ("INSERT INTO tickets VALUES (5, 10, 'x', now())", "read-only"),
    ("INSERT OR REPLACE INTO customers VALUES (10, 'free')", "read-only"),
    ("UPDATE customers SET plan = 'pro'", "read-only"),
    ("DELETE FROM tickets", "read-only"),
    (
        "MERGE INTO customers USING customers AS s ON customers.customer_id = s.customer_id "
        "WHEN MATCHED THEN DELETE",
        "read-only",
    ),
    ("CREATE TABLE t2 AS SELECT * FROM tickets", "read-only"),
    ("CREATE OR REPLACE VIEW v AS SELECT 1", "read-only"),
    ("CREATE MACRO m(x) AS x + 1", "read-only"),
    ("DROP TABLE tickets", "read-only"),
    ("ALTER TABLE tickets ADD COLUMN c INTEGER", "read-only"),
    ("TRUNCATE tickets", "read-only"),
    ("VACUUM", "read-only"),
    ("CHECKPOINT", "read-only"),
    ("CALL pragma_version()", "read-only"),
    ("BEGIN TRANSACTION", "read-only"),
    ("EXPLAIN SELECT * FROM tickets", "read-only"),
    ("WITH d AS (DELETE FROM tickets RETURNING *) SELECT * FROM d", "read-only"),
    ("SELECT * INTO t2 FROM tickets", "read-only"),
    ("SELECT nextval('seq')", "read-only"),
    # attach
    ("ATTACH 'other.duckdb' AS other", "attach"),
    ("DETACH other", "attach"),
    ("USE other", "attach"),
    # copy
    ("COPY tickets TO 'out.csv'", "copy"),
    ("COPY tickets FROM 'in.csv'", "copy"),
    ("COPY (SELECT * FROM tickets) TO 'out.parquet' (FORMAT parquet)", "copy"),
    ("EXPORT DATABASE 'dump'", "copy"),
    ("IMPORT DATABASE 'dump'", "copy"),
    # extension
    ("INSTALL httpfs", "extension"),
    ("FORCE INSTALL httpfs", "extension"),
    ("LOAD httpfs", "extension"),
    # settings
    ("PRAGMA enable_profiling", "settings"),
    ("SET threads = 1", "settings"),
    ("RESET threads", "settings"),
    ("SELECT current_setting('threads')", "settings"),
    ("SELECT * FROM duckdb_settings()", "settings"),
    ("SELECT * FROM duckdb_secrets()", "settings"),
    ("SELECT which_secret('s3://bucket/x', 's3')", "settings"),
    ("CREATE SECRET (TYPE s3, KEY_ID 'k', SECRET 's')", "settings"),
    # file-access
    ("SELECT * FROM read_csv('/etc/passwd')", "file-access"),
    ("SELECT * FROM read_csv_auto('x.csv')", "file-access"),
    ("SELECT * FROM read_parquet('s3://bucket/x.parquet')", "file-access"),
    ("SELECT * FROM parquet_scan('x.parquet')", "file-access"),
    ("SELECT * FROM parquet_metadata('x.parquet')", "file-access"),
    ("SELECT * FROM read_json_auto('x.json')", "file-access"),
    ("SELECT * FROM read_ndjson_objects('x.ndjson')", "file-access"),
    ("SELECT * FROM read_text('/etc/hosts')", "file-access"),
    ("SELECT read_text('/etc/hosts')", "file-access"),
    ("SELECT * FROM read_blob('x.bin')", "file-access"),
    ("SELECT * FROM read_xlsx('x.xlsx')", "file-access"),
    ("SELECT * FROM glob('/home/*')", "file-access"),
    ("SELECT * FROM sniff_csv('x.csv')", "file-access"),
    ("SELECT * FROM iceberg_scan('s3://lake/t')", "file-access"),
    ("SELECT * FROM delta_scan('s3://lake/t')", "file-access"),
    ("SELECT * FROM sqlite_scan('x.db', 't')", "file-access"),
    ("SELECT * FROM postgres_scan('dsn', 'public', 't')", "file-access"),
    ("SELECT * FROM '/etc/passwd'", "file-access"),
    ("FROM 'data.parquet'", "file-access"),
    ("SELECT * FROM 's3://bucket/key.csv'", "file-access"),
    ("SELECT * FROM 'https://example.com/data.csv'", "file-access"),
    ('SELECT * FROM "data.csv"', "file-access"),
    ("SELECT * FROM 'tickets'", "file-access"),
    ("SELECT * FROM tickets JOIN 'file:///tmp/x.csv' AS f USING (ticket_id)", "file-access"),
    ("SELECT * FROM tickets, LATERAL (SELECT read_text('x'))", "file-access"),
    ("SELECT (SELECT count(*) FROM read_csv('x.csv')) AS n", "file-access"),
    ("WITH x AS (SELECT * FROM read_parquet('x.parquet')) SELECT * FROM x", "file-access"),
    ("SELECT 1 UNION ALL SELECT count(*) FROM read_json('x.json')", "file-access"),
    # environment
    ("SELECT getenv('HOME')", "environment"),
    ("SELECT current_user", "environment"),
    ("SELECT version()", "environment"),
    ("SELECT * FROM duckdb_extensions()", "environment"),
    ("SELECT * FROM duckdb_databases()", "environment"),
    ("SELECT * FROM duckdb_tables", "environment"),
    ("SELECT * FROM pragma_table_info('tickets')", "environment"),
    ("SELECT * FROM information_schema.tables", "environment"),
    ("SELECT * FROM pg_catalog.pg_class", "environment"),
    ("SELECT * FROM sqlite_master", "environment"),
    ("SHOW TABLES", "environment"),
    ("SELECT ticket_id FROM tickets WHERE getenv('USER') IS NOT NULL", "environment"),
    # table-function
    ("SELECT * FROM query('SELECT 1')", "table-function"),
    ("SELECT * FROM query_table('tickets')", "table-function"),
    ("SELECT * FROM summary(tickets)", "table-function"),
    ("SELECT * FROM my_macro(1)", "table-function"),
    # found by auditing every DuckDB function against the policy (issue #5)
    ("SUMMARIZE '/etc/passwd'", "file-access"),
    ("SUMMARIZE 'https://example.com/x.csv'", "file-access"),
    ("SELECT write_log('x')", "read-only"),
    ("SELECT copy_database('a', 'b')", "copy"),
    ("SELECT import_database('dump')", "copy"),
    ("SELECT load_extension('httpfs')", "extension"),
    ("SELECT enable_profile()", "settings"),
    ("SELECT * FROM extension_versions()", "environment"),
    ("SELECT * FROM arrow_scan_dumb(0, 0, 0)", "table-function"),
    ("SELECT * FROM \"read_csv\"('/etc/passwd')", "file-access"),
    ("SELECT * FROM main.read_csv('/etc/passwd')", "file-access"),
    ("SELECT * FROM read_csv(['/etc/passwd'])", "file-access"),
    ("SELECT list_transform([1], x -> getenv('HOME'))", "environment"),
    ("FROM tickets SELECT * REPLACE (getenv('X') AS body)", "environment"),
    ("SELECT 1;\nDROP TABLE tickets;", "single-statement"),
    ("SELECT * FROM memory.main.tickets", "unbound-table"),
    # unbound-table
    ("SELECT * FROM orders", "unbound-table"),
    ("SELECT * FROM tickets JOIN invoices USING (customer_id)", "unbound-table"),
    (
        "SELECT * FROM tickets WHERE customer_id IN (SELECT customer_id FROM secrets)",
        "unbound-table",
    ),
    ("SELECT * FROM wh.main.tickets", "unbound-table"),
    ("SELECT * FROM main.tickets", "unbound-table"),
    ("SELECT * FROM memory.tickets", "unbound-table"),
    ("DESCRIBE orders", "unbound-table"),
    ("SUMMARIZE orders", "unbound-table"),
]


@pytest.mark.parametrize(("query", "rule"), REFUSED)
def test_refused_queries_name_the_rule(query: str, rule: str) -> None:
    with pytest.raises(SQLPolicyError) as info:
        check_sql(query, TABLES)
    assert info.value.rule == rule, str(info.value)
    assert str(info.value).startswith(f"[{rule}] ")


@pytest.mark.parametrize(("query", "rule"), REFUSED)
def test_refusal_messages_are_actionable(query: str, rule: str) -> None:
    with pytest.raises(SQLPolicyError) as info:
        check_sql(query, TABLES)
    message = str(info.value)
    assert "sql()" in message
    assert len(message) < 400, message
    assert "\x1b" not in message  # no terminal colour codes from sqlglot


def test_every_rule_is_exercised() -> None:
    assert {rule for _, rule in REFUSED} == set(RULES)


def test_unbound_table_message_lists_sorted_allowed_tables() -> None:
    with pytest.raises(SQLPolicyError) as info:
        check_sql("SELECT * FROM orders", ["tickets", "customers", "accounts"])
    message = str(info.value)
    assert info.value.rule == "unbound-table"
    assert "'orders'" in message
    assert "accounts, customers, tickets" in message


def test_qualified_table_message_says_to_drop_the_prefix() -> None:
    with pytest.raises(SQLPolicyError) as info:
        check_sql("SELECT * FROM wh.main.tickets", TABLES)
    assert "wh.main.tickets" in str(info.value)
    assert "customers, tickets" in str(info.value)


def test_read_only_message_says_what_to_do_instead() -> None:
    with pytest.raises(SQLPolicyError) as info:
        check_sql("INSERT INTO tickets VALUES (1, 1, 'x', now())", TABLES)
    message = str(info.value)
    assert "INSERT is not allowed" in message
    assert "SELECT" in message and "FINAL(df)" in message


def test_parse_message_includes_sqlglot_reason() -> None:
    with pytest.raises(SQLPolicyError) as info:
        check_sql("SELECT (1", TABLES)
    assert "Expecting )" in str(info.value)


def test_arrow_lambda_passes_the_policy() -> None:
    # DuckDB 2.0 rejects ``x -> x + 1`` at bind time unless lambda_syntax is changed;
    # the policy itself has no reason to refuse it.
    check_sql("SELECT list_transform([1, 2], x -> x + 1) AS xs", TABLES)


def test_table_names_are_case_insensitive() -> None:
    check_sql("SELECT * FROM Tickets", ["TICKETS"])


def test_a_single_string_is_one_table_name() -> None:
    check_sql("SELECT * FROM tickets", "tickets")
    with pytest.raises(SQLPolicyError):
        check_sql("SELECT * FROM t", "tickets")


def test_cte_names_are_readable_but_only_in_their_query() -> None:
    check_sql("WITH recent AS (SELECT * FROM tickets) SELECT * FROM recent", TABLES)
    with pytest.raises(SQLPolicyError) as info:
        check_sql("SELECT * FROM recent", TABLES)
    assert info.value.rule == "unbound-table"


@pytest.mark.parametrize(
    "query",
    [
        # q is only defined inside the subquery; the outer q would fall through to DuckDB's
        # replacement scans (files, Python variables).
        "SELECT * FROM (WITH q AS (SELECT 1) SELECT * FROM q) AS s, q",
        # a CTE cannot see the CTEs defined after it
        "WITH a AS (SELECT * FROM b), b AS (SELECT 1 AS x) SELECT * FROM a",
    ],
)
def test_cte_scope_is_respected(query: str) -> None:
    with pytest.raises(SQLPolicyError) as info:
        check_sql(query, TABLES)
    assert info.value.rule == "unbound-table"


def test_long_table_lists_keep_messages_short() -> None:
    many = [f"table_with_a_rather_long_name_{i:03d}" for i in range(200)]
    with pytest.raises(SQLPolicyError) as info:
        check_sql("SELECT * FROM nope", many)
    assert len(str(info.value)) < 1000
    assert "more)" in str(info.value)


def test_no_tables_bound() -> None:
    check_sql("SELECT 42 AS answer", [])
    with pytest.raises(SQLPolicyError) as info:
        check_sql("SELECT * FROM tickets", [])
    assert "none are bound" in str(info.value)


def test_every_duckdb_table_function_outside_the_allowlist_is_refused(
    con: duckdb.DuckDBPyConnection,
) -> None:
    # An audit that follows DuckDB upgrades: a new file reader or system table function
    # must not become reachable just because the policy does not know its name yet.
    allowlist = {"range", "generate_series", "unnest", "json_each", "json_tree"}
    names = [
        name
        for (name,) in con.sql(
            "SELECT DISTINCT function_name FROM duckdb_functions() "
            "WHERE function_type IN ('table', 'table_macro') ORDER BY 1"
        ).fetchall()
        if name.isidentifier() and name not in allowlist
    ]
    assert len(names) > 50
    allowed = []
    for name in names:
        try:
            check_sql(f"SELECT * FROM {name}('x')", TABLES)
        except SQLPolicyError:
            continue
        allowed.append(name)
    assert allowed == []


def test_the_policy_parses_with_the_sources_dialect() -> None:
    """Another engine's dialect is parsed by sqlglot alone, under the same rules."""
    statement = check_sql("SELECT TOP 3 a FROM t", ["t"], dialect="tsql")
    assert statement.sql("duckdb") == "SELECT a FROM t LIMIT 3"
    with pytest.raises(SQLPolicyError) as info:
        check_sql("DELETE FROM t", ["t"], dialect="tsql")
    assert info.value.rule == "read-only"
    with pytest.raises(SQLPolicyError) as info:
        check_sql("SELECT * FROM secrets", ["t"], dialect="snowflake")
    assert info.value.rule == "unbound-table"
