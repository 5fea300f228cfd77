"""Large results cross from the run's engine to the user's warehouse through a file, a record
batch at a time: SpooledTable, the sink's streamed writes, and the run's llm_where verdicts."""

from __future__ import annotations

import doctest
import gc
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from dagster_duckdb import DuckDBResource

import rlm_dagster.sql.spool as spool_module
from rlm_dagster import Limits, Warehouse
from rlm_dagster.engine.budget import Budget
from rlm_dagster.models.client import LM
from rlm_dagster.semantic import Semantic
from rlm_dagster.sql.spool import SpooledTable
from rlm_dagster.sql.tables import DuckDBSink
from rlm_dagster.testing import FakeAnthropic


def test_the_module_doctests_run() -> None:
    result = doctest.testmod(spool_module)
    assert result.attempted > 0 and result.failed == 0


def _batches(count: int, rows: int) -> Iterator[pa.RecordBatch]:
    for b in range(count):
        start = b * rows
        yield pa.record_batch(
            {"n": list(range(start, start + rows)), "s": [f"row {i}" for i in range(rows)]}
        )


def test_a_spooled_table_streams_back_what_was_written_and_deletes_its_file() -> None:
    spooled = SpooledTable(_batches(5, 1_000))
    assert spooled.num_rows == 5_000 and spooled.path.exists()
    assert spooled.read_all().column("n").to_pylist() == list(range(5_000))
    sizes = [b.num_rows for b in spooled.reader(batch_rows=2_000)]
    assert sum(sizes) == 5_000 and max(sizes) <= 2_000
    head = spooled.head(1_500)  # spans two of the written batches
    assert head.num_rows == 1_500 and head.column("n").to_pylist() == list(range(1_500))
    assert spooled.head(0).num_rows == 0 and spooled.head(0).schema == spooled.schema
    folder = spooled.path.parent
    spooled.close()
    spooled.close()  # idempotent
    assert not folder.exists()

    forgotten = SpooledTable(_batches(1, 10))
    folder = forgotten.path.parent
    del forgotten
    gc.collect()
    assert not folder.exists()  # garbage-collected: the file goes too


def test_a_spooled_table_needs_a_batch_and_leaves_nothing_when_it_fails(tmp_path: Path) -> None:
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("rlm-spool-*"))
    with pytest.raises(ValueError, match="at least one record batch"):
        SpooledTable(iter(()))

    def broken() -> Iterator[pa.RecordBatch]:
        yield from _batches(1, 10)
        raise RuntimeError("the engine failed mid-stream")

    with pytest.raises(RuntimeError, match="mid-stream"):
        SpooledTable(broken())
    assert set(Path(tempfile.gettempdir()).glob("rlm-spool-*")) == before


def test_the_duckdb_sink_writes_a_stream_once_whole_or_by_partition(tmp_path: Path) -> None:
    """A stream is written without being collected, including a partitioned write (whose
    table is created from the stream's schema, not by reading it twice)."""
    database = str(tmp_path / "out.duckdb")
    sink = DuckDBSink(DuckDBResource(database=database))
    spooled = SpooledTable(_batches(3, 1_000))
    written = sink.write(["analytics", "whole"], spooled.reader(batch_rows=500), None)
    assert written.table == "analytics.whole" and written.columns["n"] == "BIGINT"
    for partition in ("2026-01-01", "2026-01-02", "2026-01-01"):  # the last one replaces
        sink.write(["analytics", "parts"], spooled.reader(batch_rows=700), partition)
    with duckdb.connect(database) as con:
        assert con.sql("SELECT count(*), sum(n) FROM analytics.whole").fetchall() == [
            (3_000, sum(range(3_000)))
        ]
        counts = con.sql(
            "SELECT _partition, count(*) FROM analytics.parts GROUP BY 1 ORDER BY 1"
        ).fetchall()
    assert counts == [("2026-01-01", 3_000), ("2026-01-02", 3_000)]
    spooled.close()


def test_a_runs_verdicts_are_spooled_from_the_engine(
    make_lm: Callable[..., LM],
) -> None:
    """Every judged row of every llm_where call, in one shape, through a file: memory holds a
    batch of them at a time, whatever the number of rows."""
    rows = pd.DataFrame({"id": range(25_000), "text": [f"t{i % 700}" for i in range(25_000)]})
    wh = Warehouse.from_frames({"t": rows})
    with FakeAnthropic(where=lambda p, r: r["text"].endswith("7")) as fake:
        lm = make_lm(fake)
        sem = Semantic(lm, wh, Budget(Limits(), lm.accounting))
        _, _, first = sem.where("t", "ends in 7", columns=["text"])
        _, _, second = sem.where("t", "ends in 3", columns=["text"], where="id < 100")
    verdicts = sem.verdicts([first, second])
    assert verdicts is not None and verdicts.num_rows == 25_000 + 100
    # Written as it was streamed from the engine, a row group per record batch of the engine.
    assert pq.ParquetFile(verdicts.path).metadata.num_row_groups > 1
    table = verdicts.read_all()
    assert table.column_names[:3] == ["llm_where", "predicate", "row"]
    matched = table.filter(pc.equal(table.column("predicate"), "ends in 7"))
    assert pc.sum(matched.column("_verdict")).as_py() == sum(
        1 for i in range(25_000) if str(i % 700).endswith("7")
    )
    assert sem.verdicts([]) is None
    verdicts.close()
    wh.close()
