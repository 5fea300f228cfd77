"""Answer quality, measured: the same questions through the RLM, a direct prompt and tools.

    python -m rlm_dagster.eval --base-url URL --root-model M --sub-model S --out eval-results

The product's claim is that a model which launches sub-calls *from code* answers questions
over large tables better and cheaper than the same model reading the data in its context
(``direct``) or calling the same functions as separate tools (``tools``). This package
measures it, for your model and endpoint, on tasks with known answers generated from a seed:

``suite``       which tasks, how many, how large (``build_suite``)
``sample``      questions over the repo's sample warehouse, scored by its ground truth
``needle``      one fact hidden in N office notes, paraphrased
``support``     OOLONG-style counts of tickets by a label only reading reveals (and the
                scale steps, 1k to 100k rows)
``pairs``       offers and requests on a give-away board that match by meaning (F1)
``strategies``  rlm, direct, tools: one client, one set of limits, one budget per question
``scoring``     reading answers; exact or within tolerance for scalars, F1 for sets
``runner``      the loop: caching, per-question and suite budgets, provenance
``report``      the table, ``results.json`` and ``results.md``
``fake``        a scripted fake that is told the answers: checks the harness, nothing else
``definitions`` the suite as a Dagster asset with checks

    >>> from rlm_dagster.eval import build_suite
    >>> [t.family for t in build_suite("small", seed=0, families=["needle", "aggregation"])]
    ['needle', 'aggregation', 'aggregation']
"""

from rlm_dagster.eval.report import FAKE_LABEL, Report, Result
from rlm_dagster.eval.runner import SuiteConfig, run_suite
from rlm_dagster.eval.scoring import parse_answer, score
from rlm_dagster.eval.suite import FAMILIES, SUITES, build_suite
from rlm_dagster.eval.task import Task

__all__ = [
    "FAKE_LABEL",
    "FAMILIES",
    "SUITES",
    "Report",
    "Result",
    "SuiteConfig",
    "Task",
    "build_suite",
    "parse_answer",
    "run_suite",
    "score",
]
