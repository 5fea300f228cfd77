"""A task: a question over tables, with the answer known because the data was generated.

    >>> import pandas as pd
    >>> task = Task(
    ...     id="demo-1", family="demo", question="How many rows? Answer with a single integer.",
    ...     tables={"t": pd.DataFrame({"a": [1, 2, 3]})}, kind="integer", truth=3,
    ... )
    >>> task.rows, task.group
    (3, 'demo')

``kind`` says how an answer is read and scored (:mod:`rlm_dagster.eval.scoring`):
``"integer"`` (exact), ``"number"`` (within ``tolerance``), ``"set"`` (F1 over ids) and
``"pairs"`` (F1 over unordered id pairs). The question itself says which form to answer in,
so every strategy reads the same words.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd

AnswerKind = Literal["integer", "number", "set", "pairs"]
Truth = int | float | frozenset[int] | frozenset[tuple[int, int]]


@dataclass(frozen=True)
class Task:
    """One question with a known answer.

    ``group`` is the row of the results table the task counts in: its family, or
    ``family@size`` for the scale steps. ``params`` records how it was generated (seed,
    sizes, labels asked about), for the results file.
    """

    id: str
    family: str
    question: str
    tables: Mapping[str, pd.DataFrame]
    kind: AnswerKind
    truth: Truth
    tolerance: float = 0.0
    group: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.group:
            object.__setattr__(self, "group", self.family)

    @property
    def rows(self) -> int:
        """Rows over all bound tables."""
        return sum(len(frame) for frame in self.tables.values())

    @property
    def metric(self) -> str:
        """``"F1"`` for set answers, ``"acc"`` for scalars."""
        return "F1" if self.kind in ("set", "pairs") else "acc"

    def truth_json(self) -> Any:
        """The known answer as JSON (sets sorted, pairs as ``[a, b]`` lists)."""
        if isinstance(self.truth, frozenset):
            return [list(x) if isinstance(x, tuple) else x for x in sorted(self.truth)]
        return self.truth
