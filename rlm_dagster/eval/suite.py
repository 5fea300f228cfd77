"""The suites: which tasks, how many, how large. Generated from a seed; nothing downloaded.

>>> tasks = build_suite("small", seed=0, families=["needle", "pairs"])
>>> [(t.id, t.group) for t in tasks]
[('needle-1', 'needle@500'), ('pairs-1', 'pairs')]
>>> SUITES["full"].scale
(1000, 10000, 100000)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rlm_dagster.errors import ConfigError
from rlm_dagster.eval.needle import needle_task
from rlm_dagster.eval.pairs import pairs_task
from rlm_dagster.eval.sample import DATA_DIR, warehouse_tasks
from rlm_dagster.eval.support import aggregation_task
from rlm_dagster.eval.task import Task

FAMILIES = ("warehouse", "needle", "aggregation", "pairs", "scale")


@dataclass(frozen=True)
class SuiteSpec:
    """How many questions of each family, and how many rows each."""

    warehouse: int  # questions over the sample data (its size is fixed)
    needle: tuple[int, ...]  # one needle question per row count
    aggregation: tuple[int, int]  # (questions, rows each)
    pairs: tuple[int, ...]  # one pairs question per row count
    scale: tuple[int, ...]  # the aggregation question at each row count


SUITES = {
    "small": SuiteSpec(
        warehouse=2, needle=(500,), aggregation=(2, 300), pairs=(30,), scale=(1_000,)
    ),
    "full": SuiteSpec(
        warehouse=5,
        needle=(1_000, 10_000, 50_000),
        aggregation=(5, 2_000),
        pairs=(30, 50, 80),
        scale=(1_000, 10_000, 100_000),
    ),
}


def size_label(rows: int) -> str:
    """``1_000`` -> ``"1k"``, ``100_000`` -> ``"100k"``."""
    return f"{rows // 1000}k" if rows % 1000 == 0 else str(rows)


def build_suite(
    suite: str = "small",
    *,
    seed: int = 0,
    families: Iterable[str] | None = None,
    data_dir: Path | None = None,
) -> list[Task]:
    """The tasks of ``suite`` ("small" or "full") for ``seed``, limited to ``families``.

    ``warehouse`` questions need the repo's ``data/`` folder (``data_dir``); without it they
    are an error naming the folder, not silently left out."""
    if suite not in SUITES:
        raise ConfigError(f"--suite must be one of {sorted(SUITES)}, not {suite!r}.")
    wanted = list(families or FAMILIES)
    unknown = [f for f in wanted if f not in FAMILIES]
    if unknown:
        raise ConfigError(f"unknown task families {unknown}; choose from {list(FAMILIES)}.")
    spec = SUITES[suite]
    tasks: list[Task] = []
    for family in FAMILIES:
        if family not in wanted:
            continue
        if family == "warehouse":
            folder = data_dir or DATA_DIR
            if not (folder / "ground_truth" / "ticket_labels.csv").is_file():
                raise ConfigError(
                    f"the warehouse tasks need the sample data in {folder} (data/source and "
                    "data/ground_truth of the rlm_dagster repo); pass --data-dir, or leave "
                    "the family out with --tasks."
                )
            tasks += warehouse_tasks(seed, spec.warehouse, folder)
        elif family == "needle":
            tasks += [
                needle_task(seed, rows, index=i, group=f"needle@{size_label(rows)}")
                for i, rows in enumerate(spec.needle)
            ]
        elif family == "aggregation":
            count, rows = spec.aggregation
            tasks += [aggregation_task(seed, rows, index=i) for i in range(count)]
        elif family == "pairs":
            tasks += [pairs_task(seed, rows, index=i) for i, rows in enumerate(spec.pairs)]
        else:
            tasks += [
                aggregation_task(seed, rows, family="scale", group=f"scale@{size_label(rows)}")
                for rows in spec.scale
            ]
    return tasks
