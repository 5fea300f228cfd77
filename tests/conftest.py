"""Shared fixtures: the sample data, a DuckDB warehouse file, and LMs on the fake server."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
from postgres_server import INSTALL, PostgresServer, find_bin_dir

from rlm_dagster.models.client import LM
from rlm_dagster.repl.inprocess import InProcessREPL
from rlm_dagster.repl.seam import REPLFactory
from rlm_dagster.testing import FakeAnthropic

DATA = Path(__file__).resolve().parents[1] / "data"
SOURCE_TABLES = ("customers", "orders", "tickets")


def load_sample(con: duckdb.DuckDBPyConnection) -> None:
    for table in SOURCE_TABLES:
        con.execute(
            f"CREATE OR REPLACE TABLE {table} AS SELECT * FROM read_csv(?, header = true)",
            [str(DATA / "source" / f"{table}.csv")],
        )


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test (and any subprocess it starts) gets its own result cache."""
    path = tmp_path / "rlm-cache.sqlite3"
    monkeypatch.setenv("RLM_CACHE_PATH", str(path))
    return path


@pytest.fixture
def warehouse_file(tmp_path: Path) -> str:
    """A DuckDB file holding the sample tables (as definitions.py loads them)."""
    path = tmp_path / "warehouse.duckdb"
    con = duckdb.connect(str(path))
    load_sample(con)
    con.close()
    return str(path)


@pytest.fixture(scope="session")
def churn_labels() -> dict[int, bool]:
    """Ground truth kept outside the warehouse: ticket_id -> threatens to cancel."""
    with open(DATA / "ground_truth" / "ticket_labels.csv", newline="") as f:
        return {int(r["ticket_id"]): r["threatens_cancel"] == "true" for r in csv.DictReader(f)}


@pytest.fixture(scope="session")
def churn_by_body(churn_labels: dict[int, bool]) -> dict[str, bool]:
    """Ground truth by ticket body, for fake judges that see only projected columns."""
    with open(DATA / "source" / "tickets.csv", newline="") as f:
        return {r["body"]: churn_labels[int(r["ticket_id"])] for r in csv.DictReader(f)}


@pytest.fixture
def make_lm() -> Iterator[Callable[..., LM]]:
    """Build LMs pointed at a fake server; all are closed after the test."""
    made: list[LM] = []

    def make(fake: FakeAnthropic, **kwargs: object) -> LM:
        options: dict[str, object] = {
            "api_key": "test-key",
            "base_url": fake.base_url,
            "root_model": fake.root_model,
            "sub_model": "claude-haiku-4-5",
            "max_retries": 2,
        }
        options.update(kwargs)
        lm = LM(**options)  # type: ignore[arg-type]
        made.append(lm)
        return lm

    yield make
    for lm in made:
        lm.close()


@pytest.fixture
def inprocess_repl() -> Iterator[REPLFactory]:
    """A REPL factory for ``run_rlm(..., repl=inprocess_repl)``: cells run in a thread of the
    test process (:mod:`rlm_dagster.repl.inprocess`), with no worker process to start.

    For engine tests whose cells are the test's own code and that do not test the worker:
    timeouts, restarts, crashes, memory, stdout caps of the worker and sandbox levels keep
    the real ``Worker``. Every REPL it made is closed after the test."""
    made: list[InProcessREPL] = []

    def make(*args: Any, **kwargs: Any) -> InProcessREPL:
        repl = InProcessREPL(*args, **kwargs)
        made.append(repl)
        return repl

    yield make
    for repl in made:
        repl.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server on 127.0.0.1 for the whole session (:mod:`postgres_server`).
    Skipped, saying how to install it, when PostgreSQL or psycopg is missing; a failure
    instead under CI (``$CI`` set), which must run these tests."""
    bin_dir = find_bin_dir()
    missing = None
    if bin_dir is None:
        missing = f"PostgreSQL's server binaries (initdb, pg_ctl) are not installed: {INSTALL}"
    else:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            missing = "psycopg is not installed: pip install -e '.[test]'"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL cache tests: {missing}")
        pytest.skip(missing)
    assert bin_dir is not None
    server = PostgresServer(bin_dir)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL (password included) of a new empty database on the session's server."""
    return postgres_server.database()
