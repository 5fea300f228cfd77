"""Reading answers and scoring them: exact or within tolerance for scalars, F1 for sets.

    >>> parse_answer("integer", "There are 42 tickets.\\nFINAL(42)")
    42
    >>> score("integer", 41, 42)
    0.0
    >>> sorted(parse_answer("pairs", "FINAL(3-17\\n9-5)"))
    [(3, 17), (5, 9)]
    >>> round(score("set", frozenset({1, 2, 3}), frozenset({2, 3, 4, 5})), 3)
    0.571

An answer that cannot be read as the question asked (no number where a number was asked
for) raises :class:`Unparseable`: the runner records it as a failure, never as a zero that
looks like a wrong answer.
"""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa

from rlm_dagster.eval.task import AnswerKind, Truth

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_INT = re.compile(r"\d+")
_PAIR = re.compile(r"(\d+)\s*(?:-|–|,|/|&|\band\b|<->|->)\s*(\d+)")
_NONE = re.compile(r"\b(none|no (pairs|customers|matches|such)|empty)\b", re.I)


class Unparseable(ValueError):
    """The reply holds no answer of the asked form."""


def answer_span(text: str) -> str:
    """The part of a reply that is the answer: the inside of its last ``FINAL(...)``, else
    the whole reply.

    >>> answer_span("I counted.\\nFINAL('12 tickets')")
    '12 tickets'
    """
    start = text.rfind("FINAL(")
    if start < 0:
        return text.strip()
    body = text[start + len("FINAL(") :]
    close = body.rfind(")")
    body = (body[:close] if close >= 0 else body).strip()
    if len(body) >= 2 and body[0] == body[-1] and body[0] in "\"'":
        body = body[1:-1]
    return body.strip()


def parse_answer(kind: AnswerKind, text: str, table: pa.Table | None = None) -> Any:
    """The value of a reply (or of a table answer) for an answer of ``kind``."""
    if table is not None and table.num_rows and kind in ("set", "pairs"):
        return _from_table(kind, table)
    if table is not None and table.num_rows == 1 and table.num_columns == 1:
        text = str(table.column(0)[0].as_py())
    span = answer_span(text)
    if not span:
        raise Unparseable("the reply is empty")
    if kind in ("integer", "number"):
        match = _NUMBER.search(span)
        if match is None:
            raise Unparseable(f"no number in the answer: {span[:120]!r}")
        value = float(match.group().replace(",", ""))
        if kind == "number":
            return value
        if value != int(value):
            raise Unparseable(f"{match.group()} is not a whole number")
        return int(value)
    ids: frozenset[Any]
    if kind == "set":
        ids = frozenset(int(x) for x in _INT.findall(span))
    else:
        ids = frozenset(_pair(a, b) for a, b in _PAIR.findall(span))
    if not ids and not _NONE.search(span):
        raise Unparseable(f"no ids in the answer: {span[:120]!r}")
    return ids


def _pair(a: Any, b: Any) -> tuple[int, int]:
    x, y = int(a), int(b)
    return (x, y) if x <= y else (y, x)


def _from_table(kind: AnswerKind, table: pa.Table) -> Any:
    columns = [table.column(i).to_pylist() for i in range(table.num_columns)]
    try:
        if kind == "set":
            return frozenset(int(v) for v in columns[0] if v is not None)
        if table.num_columns < 2:
            raise Unparseable("a pairs answer needs two id columns")
        return frozenset(
            _pair(a, b) for a, b in zip(columns[0], columns[1], strict=True) if None not in (a, b)
        )
    except (TypeError, ValueError) as err:
        raise Unparseable(f"the answer table's id columns are not integers: {err}") from None


def normalise_truth(kind: AnswerKind, truth: Truth) -> Truth:
    """Pairs are unordered: the truth's pairs sorted within, as answers are."""
    if kind == "pairs" and isinstance(truth, frozenset):
        return frozenset(_pair(*p) for p in truth)  # type: ignore[misc]
    return truth


def score(kind: AnswerKind, predicted: Any, truth: Truth, tolerance: float = 0.0) -> float:
    """1.0 or 0.0 for a scalar (exact, or within ``tolerance`` for numbers); F1 for sets."""
    if kind == "integer":
        return float(predicted == truth)
    if kind == "number":
        assert isinstance(truth, int | float)
        return float(abs(float(predicted) - float(truth)) <= tolerance + 1e-9)
    expected = normalise_truth(kind, truth)
    assert isinstance(expected, frozenset)
    got = frozenset(predicted)
    if not got and not expected:
        return 1.0
    hits = len(got & expected)
    if not hits:
        return 0.0
    precision, recall = hits / len(got), hits / len(expected)
    return 2 * precision * recall / (precision + recall)


def to_json(value: Any) -> Any:
    """A parsed answer as JSON (sets sorted, pairs as lists)."""
    if isinstance(value, frozenset):
        return [list(v) if isinstance(v, tuple) else v for v in sorted(value)]
    return value
