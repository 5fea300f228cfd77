"""The declared shape of a structured RLM answer (``output=`` on ``rlm_asset``).

>>> schema = OutputSchema.parse({"customer_id": "BIGINT", "reason": "VARCHAR"})
>>> schema.describe()
'customer_id BIGINT, reason VARCHAR'
>>> OutputSchema.parse({"reason": "TEXTT"})
Traceback (most recent call last):
...
rlm_dagster.errors.OutputSchemaError: output= column 'reason' has type 'TEXTT', which DuckDB does not know ...
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from rlm_dagster.errors import AnswerRejected, OutputSchemaError
from rlm_dagster.sql.warehouse import quote_ident

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class OutputSchema:
    """Ordered column names and DuckDB types."""

    columns: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, spec: Mapping[str, str]) -> OutputSchema:
        """Validate ``spec`` (column name -> DuckDB type) and normalise the types."""
        if not isinstance(spec, Mapping) or not spec:
            raise OutputSchemaError(
                "output= must be a non-empty dict of column name to DuckDB type, e.g. "
                '{"customer_id": "BIGINT", "reason": "VARCHAR"}; omit it for a free-text answer.'
            )
        con = duckdb.connect(":memory:")
        columns: list[tuple[str, str]] = []
        try:
            for name, type_ in spec.items():
                if not isinstance(name, str) or not _IDENT.match(name) or name.startswith("__"):
                    raise OutputSchemaError(
                        f"output= column name {name!r} is not a plain identifier; use letters, "
                        "digits and underscores, starting with a letter."
                    )
                if not isinstance(type_, str) or not type_.strip():
                    raise OutputSchemaError(
                        f"output= column {name!r} needs a DuckDB type as a string, got {type_!r}; "
                        "e.g. 'VARCHAR', 'BIGINT', 'DOUBLE', 'DATE', 'BOOLEAN'."
                    )
                if any(name.lower() == seen.lower() for seen, _ in columns):
                    raise OutputSchemaError(
                        f"output= column {name!r} repeats another column's name (names are "
                        "case-insensitive in DuckDB); give each column a distinct name."
                    )
                try:
                    normalised = con.sql(f"SELECT CAST(NULL AS {type_}) AS x").types[0]
                except duckdb.Error:
                    raise OutputSchemaError(
                        f"output= column {name!r} has type {type_!r}, which DuckDB does not know "
                        "(e.g. 'VARCHAR', 'BIGINT', 'DOUBLE', 'DATE', 'TIMESTAMP', 'BOOLEAN', "
                        "'VARCHAR[]')."
                    ) from None
                columns.append((name, str(normalised)))
        finally:
            con.close()
        return cls(tuple(columns))

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.columns]

    def describe(self) -> str:
        return ", ".join(f"{n} {t}" for n, t in self.columns)

    def as_dict(self) -> dict[str, str]:
        return dict(self.columns)

    def conform(self, data: pa.Table) -> pa.Table:
        """``data`` cast to the schema, columns in order; extra columns are dropped.

        Raises :class:`AnswerRejected` naming what is missing or does not cast.
        """
        by_lower = {c.lower(): c for c in data.column_names}
        missing = [n for n in self.names if n.lower() not in by_lower]
        if missing:
            raise AnswerRejected(
                f"FINAL rejected: the answer must be a table with columns ({self.describe()}); "
                f"missing {missing}. Got columns {data.column_names}. Rename or add them and "
                "call FINAL again."
            )
        select = ", ".join(
            f"CAST({quote_ident(by_lower[n.lower()])} AS {t}) AS {quote_ident(n)}"
            for n, t in self.columns
        )
        con = duckdb.connect(":memory:")
        try:
            con.register("answer", data)
            return con.sql(f"SELECT {select} FROM answer").to_arrow_table()
        except duckdb.Error as err:
            raise AnswerRejected(
                f"FINAL rejected: a column does not convert to the declared type "
                f"({self.describe()}): {str(err).splitlines()[0]}. Fix the values and call "
                "FINAL again."
            ) from None
        finally:
            con.close()
