"""Tests for ``OutputSchema``: parsing ``output=`` specs and conforming FINAL answers."""

from __future__ import annotations

import pyarrow as pa
import pytest

from rlm_dagster.errors import OutputSchemaError
from rlm_dagster.sql.output import AnswerRejected, OutputSchema

# -- parse ---------------------------------------------------------------------------------


def test_parse_normalises_types_and_keeps_order() -> None:
    schema = OutputSchema.parse(
        {"customer_id": "int", "reason": "text", "score": "double", "tags": "varchar[]"}
    )
    assert schema.columns == (
        ("customer_id", "INTEGER"),
        ("reason", "VARCHAR"),
        ("score", "DOUBLE"),
        ("tags", "VARCHAR[]"),
    )
    assert schema.names == ["customer_id", "reason", "score", "tags"]
    assert schema.describe() == "customer_id INTEGER, reason VARCHAR, score DOUBLE, tags VARCHAR[]"
    assert schema.as_dict() == {
        "customer_id": "INTEGER",
        "reason": "VARCHAR",
        "score": "DOUBLE",
        "tags": "VARCHAR[]",
    }


def test_parse_keeps_precision_of_parameterised_types() -> None:
    schema = OutputSchema.parse({"amount": "decimal(10, 2)", "day": "date"})
    assert schema.as_dict() == {"amount": "DECIMAL(10,2)", "day": "DATE"}


def test_parse_unknown_type_names_the_column_and_the_type() -> None:
    with pytest.raises(OutputSchemaError) as info:
        OutputSchema.parse({"customer_id": "BIGINT", "reason": "TEXTT"})
    message = str(info.value)
    assert "'reason'" in message
    assert "'TEXTT'" in message
    assert "customer_id" not in message


@pytest.mark.parametrize("bad_name", ["bad name", "1st", "a-b", "__hidden", ""])
def test_parse_non_identifier_name_is_named(bad_name: str) -> None:
    with pytest.raises(OutputSchemaError) as info:
        OutputSchema.parse({"ok": "VARCHAR", bad_name: "VARCHAR"})
    assert repr(bad_name) in str(info.value)
    assert "identifier" in str(info.value)


def test_parse_non_string_name_is_refused() -> None:
    with pytest.raises(OutputSchemaError, match="not a plain identifier"):
        OutputSchema.parse({1: "VARCHAR"})  # type: ignore[dict-item]


@pytest.mark.parametrize("spec", [{}, None, ["a", "b"], "a VARCHAR"])
def test_parse_empty_or_non_dict_is_refused(spec: object) -> None:
    with pytest.raises(OutputSchemaError, match="non-empty dict"):
        OutputSchema.parse(spec)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad_type", [5, None, "", "   ", str])
def test_parse_non_string_type_names_the_column(bad_type: object) -> None:
    with pytest.raises(OutputSchemaError) as info:
        OutputSchema.parse({"reason": bad_type})  # type: ignore[dict-item]
    assert "'reason'" in str(info.value)
    assert "needs a DuckDB type as a string" in str(info.value)


def test_parse_refuses_names_that_collide_case_insensitively() -> None:
    with pytest.raises(OutputSchemaError, match=r"(?i)\bid\b"):
        OutputSchema.parse({"id": "BIGINT", "ID": "VARCHAR"})


# -- conform -------------------------------------------------------------------------------

SCHEMA = OutputSchema.parse({"customer_id": "BIGINT", "reason": "VARCHAR"})


def test_conform_casts_reorders_and_drops_extra_columns() -> None:
    data = pa.table(
        {
            "extra": [True, False],
            "reason": ["angry", "price"],
            "customer_id": ["7", "42"],
        }
    )
    out = SCHEMA.conform(data)
    assert out.column_names == ["customer_id", "reason"]
    assert out.schema.field("customer_id").type == pa.int64()
    assert out.schema.field("reason").type == pa.string()
    assert out.to_pydict() == {"customer_id": [7, 42], "reason": ["angry", "price"]}


def test_conform_matches_column_names_case_insensitively() -> None:
    data = pa.table({"Customer_ID": [1], "REASON": ["x"]})
    out = SCHEMA.conform(data)
    assert out.column_names == ["customer_id", "reason"]
    assert out.to_pydict() == {"customer_id": [1], "reason": ["x"]}


def test_conform_keeps_nulls_and_empty_tables() -> None:
    out = SCHEMA.conform(pa.table({"customer_id": [1, None], "reason": [None, "y"]}))
    assert out.to_pydict() == {"customer_id": [1, None], "reason": [None, "y"]}
    empty = SCHEMA.conform(
        pa.table({"customer_id": pa.array([], pa.int32()), "reason": pa.array([], pa.string())})
    )
    assert empty.num_rows == 0
    assert empty.schema.field("customer_id").type == pa.int64()


def test_conform_missing_columns_are_named() -> None:
    with pytest.raises(AnswerRejected) as info:
        SCHEMA.conform(pa.table({"id": [1], "why": ["x"]}))
    message = str(info.value)
    assert "missing ['customer_id', 'reason']" in message
    assert "['id', 'why']" in message  # the columns it got


def test_conform_one_missing_column_is_named_alone() -> None:
    with pytest.raises(AnswerRejected) as info:
        SCHEMA.conform(pa.table({"customer_id": [1]}))
    assert "missing ['reason']" in str(info.value)


def test_conform_uncastable_value_is_rejected() -> None:
    with pytest.raises(AnswerRejected) as info:
        SCHEMA.conform(pa.table({"customer_id": ["7", "not a number"], "reason": ["a", "b"]}))
    message = str(info.value)
    assert "not a number" in message
    assert "customer_id BIGINT" in message


def test_conform_bad_date_is_rejected() -> None:
    schema = OutputSchema.parse({"day": "DATE"})
    assert schema.conform(pa.table({"day": ["2024-02-29"]})).column("day").type == pa.date32()
    with pytest.raises(AnswerRejected):
        schema.conform(pa.table({"day": ["2024-13-45"]}))


def test_answer_rejected_is_an_rlm_error() -> None:
    # The engine shows AnswerRejected to the model; like every error, it is an RLMError.
    from rlm_dagster.errors import RLMError

    assert issubclass(AnswerRejected, RLMError) and not issubclass(AnswerRejected, ValueError)
