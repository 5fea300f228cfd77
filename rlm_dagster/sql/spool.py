"""A table spooled to a private Parquet file, written and read a record batch at a time.

A result that must outlive the engine that computed it (the verdicts of a run's ``llm_where``
calls, written to the user's warehouse after the run's own snapshot is closed) crosses over
through a file instead of through memory, so its size does not bound what a run can do::

    >>> import pyarrow as pa
    >>> batches = (pa.record_batch({"n": list(range(i, i + 3))}) for i in (0, 3))
    >>> spooled = SpooledTable(batches)
    >>> spooled.num_rows, spooled.head(2).to_pydict()
    (6, {'n': [0, 1]})
    >>> sum(batch.num_rows for batch in spooled.reader())
    6
    >>> spooled.close()
    >>> spooled.path.exists()
    False

The file lives in a directory of its own under ``$TMPDIR``, removed by :meth:`close` or, at
the latest, when the object is garbage-collected.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


class SpooledTable:
    """Record batches written to a Parquet file as they come (one batch in memory at a
    time); :meth:`reader` streams them back, :meth:`head` reads the first rows only. At
    least one batch is needed: it gives the file its schema."""

    def __init__(self, batches: Iterable[pa.RecordBatch], *, prefix: str = "rlm-spool-") -> None:
        self._dir = Path(tempfile.mkdtemp(prefix=prefix))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, ignore_errors=True)
        self.path = self._dir / "table.parquet"
        self.num_rows = 0
        writer: pq.ParquetWriter | None = None
        try:
            for batch in batches:
                if writer is None:
                    writer = pq.ParquetWriter(self.path, batch.schema)
                writer.write_batch(batch)
                self.num_rows += batch.num_rows
            if writer is None:
                raise ValueError("SpooledTable needs at least one record batch (its schema)")
        except BaseException:
            if writer is not None:
                writer.close()
            self.close()
            raise
        writer.close()
        self.schema: pa.Schema = pq.read_schema(self.path)

    def reader(self, batch_rows: int = 65_536) -> pa.RecordBatchReader:
        """The rows as a stream of record batches of at most ``batch_rows`` rows."""
        return pa.RecordBatchReader.from_batches(self.schema, self._batches(batch_rows))

    def head(self, rows: int) -> pa.Table:
        """The first ``rows`` rows (what a preview needs), without reading the rest."""
        taken: list[pa.RecordBatch] = []
        count = 0
        for batch in self._batches(max(1, rows)):
            if count >= rows:
                break
            taken.append(batch)
            count += batch.num_rows
        return pa.Table.from_batches(taken, schema=self.schema).slice(0, rows)

    def read_all(self) -> pa.Table:
        """Every row in memory: for small results and tests."""
        return pq.read_table(self.path)

    def close(self) -> None:
        """Delete the file (idempotent)."""
        self._cleanup()

    def _batches(self, batch_rows: int) -> Iterator[pa.RecordBatch]:
        with pq.ParquetFile(self.path) as file:
            yield from file.iter_batches(batch_size=batch_rows)

    def __repr__(self) -> str:
        return f"SpooledTable({self.num_rows:,} rows, {self.path})"
