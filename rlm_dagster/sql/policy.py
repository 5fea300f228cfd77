"""Read-only SQL policy for the ``sql()`` helper of the sandboxed REPL.

Model-written Python calls ``sql(query)``; before the host runs the query on DuckDB it
passes it through :func:`check_sql`, which parses it with sqlglot (dialect ``"duckdb"``),
cross-checks the statement count and kind with DuckDB's own parser, and refuses anything
that is not one read-only query over the tables bound to the run. A refusal raises
:class:`~rlm_dagster.errors.SQLPolicyError` whose ``rule`` names the rule that fired (see
:data:`RULES`) and whose message tells the model what to do instead::

    >>> from rlm_dagster.sql.policy import check_sql
    >>> from rlm_dagster.errors import SQLPolicyError
    >>> stmt = check_sql("FROM tickets SELECT customer_id, count(*) GROUP BY ALL", ["tickets"])
    >>> stmt.sql("duckdb")
    'SELECT customer_id, COUNT(*) FROM tickets GROUP BY ALL'
    >>> try:
    ...     check_sql("SELECT * FROM read_csv('/etc/passwd')", ["tickets"])
    ... except SQLPolicyError as err:
    ...     print(err.rule)
    file-access

Rules:

``parse``            the query is empty or cannot be parsed.
``single-statement`` more than one statement.
``read-only``        anything that is not a query (DML, DDL, CALL, EXPLAIN, transactions,
                     data-modifying CTEs, sequence/checkpoint functions, sqlglot ``Command``
                     fallbacks...).
``attach``           ATTACH / DETACH / USE.
``copy``             COPY, EXPORT DATABASE, IMPORT DATABASE.
``extension``        INSTALL / LOAD / FORCE INSTALL / UPDATE EXTENSIONS.
``settings``         PRAGMA, SET, RESET and functions that read settings or secrets.
``file-access``      file/URL readers (``read_*``, ``*_scan``, ``glob``...) and string or
                     path-like names used as tables (``FROM 'data.parquet'``).
``environment``      ``getenv``, ``current_user``, ``version``, ``duckdb_*``, ``pragma_*``,
                     ``pg_*``, ``information_schema``, ``pg_catalog``, ``sqlite_master``, SHOW.
``table-function``   a table function in FROM that is not ``range``, ``generate_series``,
                     ``unnest``, ``json_each`` or ``json_tree``.
``unbound-table``    a table that is neither bound to the run nor a CTE in scope, or a
                     schema/catalog-qualified table name.

The policy is deliberately conservative: it is one layer of defence. The host should also
run the query on a connection that only holds the bound tables (ideally read-only and with
``enable_external_access = false``).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Collection, Iterator

import duckdb
import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, SqlglotError

from rlm_dagster.errors import SQLPolicyError

__all__ = ["RULES", "check_sql"]

RULES: tuple[str, ...] = (
    "parse",
    "single-statement",
    "read-only",
    "attach",
    "copy",
    "extension",
    "settings",
    "file-access",
    "environment",
    "table-function",
    "unbound-table",
)
"""Every ``rule`` a :class:`SQLPolicyError` raised by :func:`check_sql` can carry."""

_DIALECT = "duckdb"
_MAX_ERROR_CHARS = 160
_MAX_NAME_CHARS = 60
_MAX_LISTED_TABLES = 12

# --------------------------------------------------------------------------------------
# Statement level
# --------------------------------------------------------------------------------------

# Top-level statements that are read-only queries. Subquery covers "(SELECT ...)", Query
# covers SELECT / FROM-first / set operations; Pivot is DuckDB's PIVOT/UNPIVOT statement.
_ALLOWED_STATEMENTS: tuple[type[exp.Expr], ...] = (
    exp.Query,
    exp.Values,
    exp.Describe,
    exp.Summarize,
    exp.Pivot,
)

# Statement classes that must not appear anywhere in the tree (e.g. a DELETE inside a CTE).
_FORBIDDEN_NODE_NAMES = (
    "Insert", "Update", "Delete", "Merge", "Create", "Drop", "Alter", "TruncateTable",
    "Command", "Copy", "Attach", "Detach", "Use", "Install", "Pragma", "Set", "Transaction",
    "Commit", "Rollback", "Show", "LoadData", "Grant", "Revoke", "Analyze", "Cache",
    "Uncache", "Refresh", "Comment", "Export", "Kill", "Execute", "Declare", "Into",
)  # fmt: skip
_FORBIDDEN_NODES: tuple[type[exp.Expr], ...] = tuple(
    cls for name in _FORBIDDEN_NODE_NAMES if isinstance(cls := getattr(exp, name, None), type)
)

# Leading keyword(s) of a refused statement -> rule. Used for sqlglot Command fallbacks,
# statements sqlglot cannot parse (EXPORT DATABASE) or misparses (CHECKPOINT -> Column).
_KEYWORD_RULES: dict[str, str] = {
    "ATTACH": "attach",
    "DETACH": "attach",
    "USE": "attach",
    "COPY": "copy",
    "EXPORT": "copy",
    "IMPORT": "copy",
    "INSTALL": "extension",
    "LOAD": "extension",
    "FORCE INSTALL": "extension",
    "UPDATE EXTENSIONS": "extension",
    "PRAGMA": "settings",
    "SET": "settings",
    "RESET": "settings",
    "SHOW": "environment",
    "CREATE SECRET": "settings",
    "DROP SECRET": "settings",
}

# sqlglot class -> rule, for refused statements whose leading keyword is not in the map.
_CLASS_RULES: tuple[tuple[type[exp.Expr], str], ...] = (
    (exp.Attach, "attach"),
    (exp.Detach, "attach"),
    (exp.Use, "attach"),
    (exp.Copy, "copy"),
    (exp.Install, "extension"),
    (exp.Pragma, "settings"),
    (exp.Set, "settings"),
    (exp.Show, "environment"),
)

# --------------------------------------------------------------------------------------
# Function names
# --------------------------------------------------------------------------------------

_TABLE_FUNCTION_ALLOWLIST = frozenset(
    {"range", "generate_series", "unnest", "json_each", "json_tree"}
)
_ALLOWED_TABLE_FUNCTION_NODES: tuple[type[exp.Expr], ...] = (
    exp.GenerateSeries,
    exp.Unnest,
    exp.Explode,
)

_STATE_CHANGING_FUNCTIONS = frozenset(
    {
        "nextval", "setval", "checkpoint", "force_checkpoint", "truncate_duckdb_logs", "write_log",
        "create_external_resource", "register_external_resource",
        "register_external_resource_type", "deregister_external_resource",
        "destroy_external_resource", "python_map_function",
    }
)  # fmt: skip
_DYNAMIC_SQL_FUNCTIONS = frozenset({"query", "query_table", "json_execute_serialized_sql"})
_COPY_FUNCTIONS = frozenset({"copy_database", "import_database", "export_database"})
_EXTENSION_FUNCTIONS = frozenset({"load_extension", "install_extension"})
_SETTINGS_FUNCTIONS = frozenset(
    {
        "enable_profile", "disable_profile", "enable_checkpoint_on_shutdown",
        "disable_checkpoint_on_shutdown",
        "current_setting", "duckdb_settings", "duckdb_secrets", "duckdb_secret_types",
        "duckdb_secret_type_parameters", "which_secret", "load_aws_credentials",
        "enable_logging", "disable_logging", "enable_profiling", "disable_profiling",
        "set_config",
    }
)  # fmt: skip
_FILE_FUNCTIONS = frozenset(
    {
        "glob", "sniff_csv", "read_text", "read_blob", "parquet_scan", "st_read",
        "sqlite_attach", "postgres_attach", "mysql_attach",
    }
)  # fmt: skip
_FILE_PREFIXES = (
    "read_", "parquet_", "iceberg_", "delta_", "st_read", "http_", "sqlite_", "postgres_",
    "mysql_", "ducklake_", "ftp_", "s3_", "gcs_", "azure_",
)  # fmt: skip
_FILE_SUFFIXES = ("_scan",)
_ENVIRONMENT_FUNCTIONS = frozenset(
    {
        "getenv", "current_user", "session_user", "user", "current_role", "current_database",
        "current_catalog", "current_schema", "current_schemas", "current_query",
        "current_query_id", "current_connection_id", "current_transaction_id",
        "txid_current", "version", "current_version", "user_agent", "in_search_path",
        "system", "shell", "sys_exec", "sys_eval", "test_all_types", "test_vector_types",
        "extension_versions",
    }
)  # fmt: skip
_ENVIRONMENT_PREFIXES = ("duckdb_", "pragma_", "pg_")

# --------------------------------------------------------------------------------------
# Table names
# --------------------------------------------------------------------------------------

_SYSTEM_SCHEMAS = frozenset({"information_schema", "pg_catalog", "system"})
_SYSTEM_TABLES = frozenset(
    {"sqlite_master", "sqlite_schema", "sqlite_temp_master", "sqlite_temp_schema", "show"}
    | _SYSTEM_SCHEMAS
)
_SYSTEM_TABLE_PREFIXES = ("duckdb_", "pragma_", "pg_")
# Characters that never occur in a bare table name but do in paths, URLs and globs.
_PATH_CHARS = frozenset("./\\:*?{}[]~")

_QUERY_KEYWORDS = frozenset({"SELECT", "WITH", "FROM", "VALUES", "TABLE", "DESCRIBE", "SUMMARIZE"})
_LEADING_NOISE = re.compile(r"\A(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/|;)*", re.DOTALL)
_WORD = re.compile(r"[A-Za-z_]+")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TOKEN_REPR = re.compile(r"<Token token_type: TokenType\.(\w+), text: (.*?), line: .*?>")
_CLASS_REPR = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>")
_CALL_NAME = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\(")

# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def check_sql(query: str, allowed_tables: Collection[str], *, dialect: str = "duckdb") -> exp.Expr:
    """Parse ``query``, enforce the read-only policy, return the parsed statement.

    ``dialect`` is the sqlglot dialect of the engine that will run the query (the
    :class:`~rlm_dagster.sql.tables.TableSource`'s). For ``duckdb`` DuckDB's own parser is a
    second opinion (one statement, and of the same kind sqlglot saw); other dialects rely on
    sqlglot alone.

    ``allowed_tables`` are the tables bound to the run (compared case-insensitively; a
    single ``str`` is taken as one table name). CTE names defined in the query are also
    readable. Raises :class:`~rlm_dagster.errors.SQLPolicyError` whose ``rule`` is one of
    :data:`RULES` and whose message starts with ``sql()`` and says what to do instead.
    """
    tables = _normalise_tables(allowed_tables)
    if not isinstance(query, str) or not _strip_leading_noise(query).strip(" \t\r\n;"):
        example = f"SELECT * FROM {tables[0]} LIMIT 5" if tables else "SELECT 42 AS answer"
        raise SQLPolicyError(
            "parse",
            f"sql() got an empty query. Pass one SELECT statement as a string, "
            f"e.g. sql({example!r}).",
        )

    statements = _parse(query, tables, dialect)
    if len(statements) != 1:
        raise _too_many(len(statements))
    duck_types = _duckdb_statement_types(query) if dialect == _DIALECT else None
    if isinstance(duck_types, list) and len(duck_types) != 1:
        raise _too_many(len(duck_types))

    statement = statements[0]
    if not isinstance(statement, _ALLOWED_STATEMENTS):
        raise _refuse_statement(query, statement, tables)

    _check_nested_statements(statement)
    _check_functions(statement, tables)
    _check_described(statement, tables)
    _check_tables(statement, query, tables)

    if duck_types is None:
        return statement  # another engine: sqlglot's reading is the only one
    # Backstop against sqlglot/DuckDB parser differences: DuckDB itself must see one query.
    if isinstance(duck_types, str):
        raise SQLPolicyError(
            "parse",
            f"sql() could not parse the query with DuckDB: {duck_types}. Fix the syntax and "
            f"send one DuckDB SELECT statement.",
        )
    if not _duckdb_agrees(duck_types[0], statement):
        raise _read_only(duck_types[0].upper())
    return statement


# --------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------


def _normalise_tables(allowed_tables: Collection[str]) -> list[str]:
    names = [allowed_tables] if isinstance(allowed_tables, str) else list(allowed_tables)
    return sorted({name.lower() for name in names})


def _parse(query: str, tables: list[str], dialect: str = _DIALECT) -> list[exp.Expr]:
    try:
        parsed = sqlglot.parse(query, read=dialect)
    except SqlglotError as err:
        # sqlglot cannot parse some refused statements at all (EXPORT DATABASE, CREATE
        # SECRET...): name the rule they break rather than blaming the syntax.
        duck_types = _duckdb_statement_types(query)
        if isinstance(duck_types, list) and len(duck_types) > 1:
            raise _too_many(len(duck_types)) from None
        keywords = _leading_keywords(query)
        if isinstance(duck_types, list) and keywords and keywords[0] not in _QUERY_KEYWORDS:
            rule = _rule_for_keywords(keywords)
            if rule is not None or duck_types[0] != "select":
                raise _refuse(rule or "read-only", _statement_label(keywords), tables) from None
        table_hint = f" over {', '.join(tables[:3])}" if tables else ""
        raise SQLPolicyError(
            "parse",
            f"sql() could not parse the query: {_short_error(err)}. Fix the syntax and send "
            f"one DuckDB SELECT statement{table_hint}.",
        ) from None
    return [statement for statement in parsed if statement is not None]


def _short_error(err: SqlglotError) -> str:
    text = ""
    if isinstance(err, ParseError) and err.errors:
        first = err.errors[0]
        near = str(first.get("highlight") or "").strip()
        text = str(first.get("description") or "")
        text += f" near {near!r}" if near else ""
        text += f" (line {first.get('line')}, col {first.get('col')})"
    if not text.strip():
        text = str(err)
    text = " ".join(_ANSI.sub("", text).split())
    text = _TOKEN_REPR.sub(
        lambda m: "end of query" if m.group(1) == "SENTINEL" else repr(m.group(2)), text
    )
    text = _CLASS_REPR.sub(r"\1", text)
    return _truncate(text, _MAX_ERROR_CHARS)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _strip_leading_noise(query: str) -> str:
    match = _LEADING_NOISE.match(query)
    return query[match.end() :] if match else query


def _leading_keywords(query: str) -> list[str]:
    words: list[str] = []
    rest = _strip_leading_noise(query)
    for _ in range(2):
        match = _WORD.match(rest)
        if not match:
            break
        words.append(match.group(0).upper())
        rest = _strip_leading_noise(rest[match.end() :])
    return words


def _rule_for_keywords(keywords: list[str]) -> str | None:
    if len(keywords) >= 2 and (rule := _KEYWORD_RULES.get(" ".join(keywords[:2]))):
        return rule
    return _KEYWORD_RULES.get(keywords[0]) if keywords else None


def _statement_label(keywords: list[str]) -> str:
    if not keywords:
        return "this statement"
    if " ".join(keywords[:2]) in _KEYWORD_RULES or keywords[:2] in (
        ["EXPORT", "DATABASE"],
        ["IMPORT", "DATABASE"],
    ):
        return " ".join(keywords[:2])
    return keywords[0]


# --------------------------------------------------------------------------------------
# DuckDB cross-check (guards against sqlglot/DuckDB parser differences)
# --------------------------------------------------------------------------------------

_duck_lock = threading.Lock()
_duck_state: dict[str, object] = {}


def _duckdb_statement_types(query: str) -> list[str] | str:
    """Statement kinds DuckDB's parser sees (lower-case), or its error message."""
    with _duck_lock:
        con = _duck_state.get("con")
        if not isinstance(con, duckdb.DuckDBPyConnection) or _duck_state.get("pid") != os.getpid():
            con = duckdb.connect(":memory:")
            _duck_state.update(con=con, pid=os.getpid())
        try:
            statements = con.extract_statements(query)
        except duckdb.Error as err:
            return _truncate(" ".join(str(err).split()), _MAX_ERROR_CHARS)
    return [_statement_type(statement) for statement in statements]


def _statement_type(statement: duckdb.Statement) -> str:
    try:
        return str(statement.type).rsplit(".", 1)[-1].lower()
    except ValueError:  # a kind the Python enum does not know (e.g. UPDATE EXTENSIONS)
        return "unknown"


def _duckdb_agrees(duck_type: str, statement: exp.Expr) -> bool:
    if duck_type == "select":
        return True
    # A PIVOT without an IN list is planned by DuckDB as several SELECTs ("multi").
    return duck_type == "multi" and statement.find(exp.Pivot) is not None


# --------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------


def _too_many(count: int) -> SQLPolicyError:
    return SQLPolicyError(
        "single-statement",
        f"sql() runs exactly one statement, got {count}. Send each SELECT in its own sql() "
        f"call and combine the results in Python.",
    )


def _tables_text(tables: list[str]) -> str:
    if not tables:
        return "(none are bound to this run)"
    shown = [_truncate(name, 40) for name in tables[:_MAX_LISTED_TABLES]]
    more = len(tables) - len(shown)
    return ", ".join(shown) + (f" (+{more} more)" if more > 0 else "")


def _read_only(label: str) -> SQLPolicyError:
    if label == "EXPLAIN":
        return SQLPolicyError(
            "read-only",
            "sql() does not run EXPLAIN. To see columns and types use "
            "sql('DESCRIBE <table>') or sql('DESCRIBE SELECT ...'), then run the SELECT itself.",
        )
    return SQLPolicyError(
        "read-only",
        f"sql() is read-only: {label} is not allowed. Compute results with SELECT and keep "
        f"them in Python variables, or return them with FINAL(df).",
    )


def _refuse(rule: str, label: str, tables: list[str]) -> SQLPolicyError:
    bound = _tables_text(tables)
    if rule == "attach":
        return SQLPolicyError(
            "attach",
            f"sql() cannot run {label}: databases and catalogs are fixed. Query the bound "
            f"tables by their bare names: {bound}.",
        )
    if rule == "copy":
        return SQLPolicyError(
            "copy",
            f"sql() cannot run {label}: no data moves to or from files. SELECT the rows you "
            f"need and work with the result in Python.",
        )
    if rule == "extension":
        return SQLPolicyError(
            "extension",
            f"sql() cannot run {label}: extensions cannot be installed or loaded. Use "
            f"DuckDB's built-in functions over the bound tables.",
        )
    if rule == "settings":
        return SQLPolicyError(
            "settings",
            f"sql() cannot read or change settings ({label}). The connection is already "
            f"configured; write a plain SELECT over the bound tables: {bound}.",
        )
    if rule == "environment":
        return SQLPolicyError(
            "environment",
            f"sql() cannot inspect the system or catalog ({label}). The bound tables are "
            f"{bound}; use sql('DESCRIBE <table>') to see their columns.",
        )
    return _read_only(label)


def _refuse_statement(query: str, statement: exp.Expr, tables: list[str]) -> SQLPolicyError:
    keywords = _leading_keywords(query)
    label = _statement_label(keywords)
    rule = _rule_for_keywords(keywords)
    if rule is None:
        rule = next((r for cls, r in _CLASS_RULES if isinstance(statement, cls)), "read-only")
    if isinstance(statement, exp.Create | exp.Drop) and keywords:
        kind = statement.args.get("kind")
        if isinstance(kind, str) and kind:
            label = f"{keywords[0]} {kind.upper()}"
    return _refuse(rule, label, tables)


# --------------------------------------------------------------------------------------
# Tree walks
# --------------------------------------------------------------------------------------


def _check_nested_statements(statement: exp.Expr) -> None:
    for node in statement.walk():
        if isinstance(node, _FORBIDDEN_NODES):
            label = "SELECT ... INTO" if isinstance(node, exp.Into) else node.key.upper()
            raise _read_only(f"{label} inside a query")


def _check_described(statement: exp.Expr, tables: list[str]) -> None:
    """``SUMMARIZE 'file.csv'`` reads the file: a string literal is never a table."""
    target = statement.this if isinstance(statement, exp.Describe | exp.Summarize) else None
    if isinstance(target, exp.Literal) and target.is_string:
        raise SQLPolicyError(
            "file-access",
            f"sql() cannot read files or URLs: {_truncate(target.name, _MAX_NAME_CHARS)!r} is "
            f"used as a table. Write a bound table's bare name, unquoted: {_tables_text(tables)}.",
        )


def _function_names(func: exp.Func) -> Iterator[str]:
    if isinstance(func, exp.Anonymous):
        yield str(func.name).lower()
        return
    yield func.sql_name().lower()
    for name in getattr(type(func), "_sql_names", ()) or ():
        yield str(name).lower()


def _classify_function(name: str) -> str | None:
    name = name.rsplit(".", 1)[-1].strip('"').lower()
    if name in _STATE_CHANGING_FUNCTIONS:
        return "read-only"
    if name in _DYNAMIC_SQL_FUNCTIONS:
        return "table-function"
    if name in _COPY_FUNCTIONS:
        return "copy"
    if name in _EXTENSION_FUNCTIONS:
        return "extension"
    if name in _SETTINGS_FUNCTIONS or name.startswith("duckdb_secret"):
        return "settings"
    if name in _FILE_FUNCTIONS or name.startswith(_FILE_PREFIXES) or name.endswith(_FILE_SUFFIXES):
        return "file-access"
    if (
        name in _ENVIRONMENT_FUNCTIONS
        or name.startswith(_ENVIRONMENT_PREFIXES)
        or (name.startswith("has_") and name.endswith("_privilege"))
    ):
        return "environment"
    return None


def _function_refusal(name: str, rule: str, tables: list[str]) -> SQLPolicyError:
    label = f"{_truncate(name, _MAX_NAME_CHARS)}()"
    bound = _tables_text(tables)
    if rule == "file-access":
        return SQLPolicyError(
            "file-access",
            f"sql() cannot read files or URLs: {label} is not allowed. Query the bound "
            f"tables instead: {bound}.",
        )
    if rule == "table-function":
        if name in _DYNAMIC_SQL_FUNCTIONS:
            return SQLPolicyError(
                "table-function",
                f"sql() does not allow {label}: it runs SQL text that bypasses this check. "
                f"Write the query itself, over the bound tables: {bound}.",
            )
        return SQLPolicyError(
            "table-function",
            f"sql() does not allow the table function {label}. In FROM use the bound "
            f"tables ({bound}) or range(), generate_series(), unnest().",
        )
    if rule == "read-only":
        return _read_only(label)
    return _refuse(rule, label, tables)


def _display_name(func: exp.Func, name: str) -> str:
    """The DuckDB spelling of a typed function (``version`` for ``CurrentVersion``)."""
    if isinstance(func, exp.Anonymous):
        return name
    match = _CALL_NAME.match(func.sql(_DIALECT))
    spelled = match.group(1).lower() if match else ""
    return spelled if spelled and _classify_function(spelled) == _classify_function(name) else name


def _check_functions(statement: exp.Expr, tables: list[str]) -> None:
    for func in statement.find_all(exp.Func):
        for name in _function_names(func):
            rule = _classify_function(name)
            if rule is not None:
                raise _function_refusal(_display_name(func, name), rule, tables)


def _visible_ctes(table: exp.Expr) -> set[str]:
    """CTE names in scope at ``table``.

    Scoping matters: a name DuckDB cannot resolve as a CTE falls through to the catalog and
    then to replacement scans (files, or Python variables in the DuckDB client's frame).
    A CTE sees the CTEs defined before it in its WITH (and itself if RECURSIVE); a query
    body sees all CTEs of its own WITH and of enclosing queries.
    """
    names: set[str] = set()
    child, parent = table, table.parent
    while parent is not None:
        if isinstance(parent, exp.With):
            recursive = bool(parent.args.get("recursive"))
            for cte in parent.expressions:
                if cte is child:
                    if recursive:
                        names.add(cte.alias_or_name.lower())
                    break
                names.add(cte.alias_or_name.lower())
        else:
            with_ = parent.args.get("with_") or parent.args.get("with")
            if isinstance(with_, exp.With) and with_ is not child:
                names.update(cte.alias_or_name.lower() for cte in with_.expressions)
        child, parent = parent, parent.parent
    return names


def _is_table_function(node: exp.Expr) -> bool:
    parent = node.parent
    return isinstance(parent, exp.Table | exp.Lateral | exp.From | exp.Join) and parent.this is node


def _check_table_functions(statement: exp.Expr, tables: list[str]) -> None:
    for func in statement.find_all(exp.Func):
        if not _is_table_function(func) or isinstance(func, _ALLOWED_TABLE_FUNCTION_NODES):
            continue
        names = list(_function_names(func))
        if not any(name in _TABLE_FUNCTION_ALLOWLIST for name in names):
            raise _function_refusal(names[0], "table-function", tables)


def _from_string_literal(identifier: exp.Expr, query: str) -> bool:
    start = identifier.meta.get("start") if isinstance(identifier, exp.Identifier) else None
    return isinstance(start, int) and 0 <= start < len(query) and query[start] in "'$"


def _check_tables(statement: exp.Expr, query: str, tables: list[str]) -> None:
    _check_table_functions(statement, tables)
    allowed = set(tables)
    bound = _tables_text(tables)
    for table in statement.find_all(exp.Table):
        if isinstance(table.this, exp.Func):
            continue  # table functions were checked above
        ctes = _visible_ctes(table)
        parts = [part.name for part in table.parts]
        full = _truncate(".".join(parts), _MAX_NAME_CHARS)
        name = parts[-1].lower() if parts else ""
        qualifiers = {part.lower() for part in parts[:-1]}
        if _from_string_literal(table.this, query) or (
            not qualifiers and name not in allowed | ctes and _PATH_CHARS & set(name)
        ):
            raise SQLPolicyError(
                "file-access",
                f"sql() cannot read files or URLs: {full!r} is used as a table. Write a bound "
                f"table's bare name, unquoted: {bound}.",
            )
        if qualifiers:
            if qualifiers & _SYSTEM_SCHEMAS or name in _SYSTEM_SCHEMAS:
                raise _refuse("environment", full, tables)
            raise SQLPolicyError(
                "unbound-table",
                f"sql() only reads the tables bound to this run, by bare name: {full!r} has a "
                f"schema or catalog prefix. Allowed tables: {bound}.",
            )
        if name in allowed or name in ctes:
            continue
        if name in _SYSTEM_TABLES or name.startswith(_SYSTEM_TABLE_PREFIXES):
            rule = _classify_function(name)
            raise _refuse(rule if rule == "settings" else "environment", full, tables)
        raise SQLPolicyError(
            "unbound-table",
            f"sql() only reads the tables bound to this run: {full!r} is not one of them. "
            f"Allowed tables: {bound}. Use one of these names (or a CTE defined earlier).",
        )
