"""llm_where(recall=...): most values decided by the local embedding proxy, the model judging
a seeded sample and the values the proxy is unsure of, with the recall target certified —
or a fallback to judging everything, or a failure before more is paid, as the user chose."""

from __future__ import annotations

import random
from typing import Any

import pandas as pd
import pytest

from rlm_dagster import CascadeTargetMissed, Limits, Warehouse
from rlm_dagster.engine.budget import Budget
from rlm_dagster.engine.events import Event, WhereCascaded
from rlm_dagster.models.client import LM
from rlm_dagster.semantic import Semantic, WhereConfig
from rlm_dagster.testing import FakeAnthropic

pytest.importorskip("wordllama", reason="the embedding proxy: pip install 'rlm-dagster[proxy]'")

PREDICATE = "The customer says they will cancel or move to a competitor"
CHURN = [
    "we are cancelling our subscription at the end of the month",
    "honestly thinking of switching to a competitor, this is the last straw",
    "please close our account, we found another vendor",
    "if this is not fixed by Friday we will terminate the contract",
]
ROUTINE = [
    "how do I export last month's invoices to CSV",
    "the dashboard chart labels overlap on small screens",
    "can you add two more seats to our team plan",
    "password reset emails arrive after ten minutes",
    "is there an API endpoint for listing projects",
    "the mobile app logs me out every morning",
]


def tickets(n: int, churn_every: int, seed: int = 7) -> pd.DataFrame:
    rng = random.Random(seed)
    bodies = []
    for i in range(n):
        pool = CHURN if i % churn_every == 0 else ROUTINE
        bodies.append(f"Ticket {i}: {rng.choice(pool)} (customer {rng.randint(1, 999)})")
    return pd.DataFrame({"id": range(n), "body": bodies})


def judge(predicate: str, row: dict[str, Any]) -> tuple[bool, str]:
    hit = any(text in row["body"] for text in CHURN)
    return hit, "churn" if hit else "routine"


def run(
    fake: FakeAnthropic, frame: pd.DataFrame, **config: Any
) -> tuple[Any, Any, Semantic, list[Event]]:
    lm = LM(
        api_key="k", base_url=fake.base_url, root_model="fake-root", sub_model="claude-haiku-4-5"
    )
    wh = Warehouse.from_frames({"t": frame})
    events: list[Event] = []
    sem = Semantic(
        lm,
        wh,
        Budget(Limits(max_cost_usd=None, max_sub_calls=10**6), lm.accounting),
        config=WhereConfig(batch_rows=40, **config),
        on_event=events.append,
    )
    _, prov, stats = sem.where("t", PREDICATE, columns=["body"])
    return prov, stats, sem, events


def test_the_proxy_decides_most_values_and_the_recall_target_holds() -> None:
    frame = tickets(3_000, churn_every=5)
    truth = {i for i, b in enumerate(frame["body"]) if judge("", {"body": b})[0]}
    with FakeAnthropic(where=judge) as fake:
        prov, stats, sem, events = run(fake, frame, recall=0.9, cascade_sample=400)
        judged_by_model = sum(len(r.rows or []) for r in fake.requests)
    wh = sem.warehouse
    counts = wh.trusted_arrow(f'SELECT _decided_by, count(*) AS n FROM "{prov.name}" GROUP BY 1')
    decided = dict(zip(*counts.to_pydict().values(), strict=True))
    matched = set(
        wh.trusted_arrow(f'SELECT id FROM "{prov.name}" WHERE _verdict').column(0).to_pylist()
    )
    assert stats.cascade["action"] == "cascade", stats.cascade
    assert decided.get("proxy", 0) > 0 and stats.proxy_decided > 0
    # Fewer model verdicts than values, and recall over rows at least the target.
    assert judged_by_model < stats.distinct
    assert len(matched & truth) / len(truth) >= 0.9
    # Nothing the proxy decided reached the verdict cache as a model verdict, and the run
    # log and the summary say what happened.
    assert any(isinstance(e, WhereCascaded) for e in events)
    assert "decided by the proxy" in stats.describe()
    assert "recall >= 0.9" in stats.describe()


def test_too_rare_matches_fall_back_to_judging_everything_or_fail() -> None:
    frame = tickets(1_000, churn_every=250)  # 4 matches: a sample cannot certify recall
    with FakeAnthropic(where=judge) as fake:
        _, stats, _, _ = run(fake, frame, recall=0.9, cascade_sample=200)
        assert stats.cascade["action"] == "fallback"
        assert sum(len(r.rows or []) for r in fake.requests) == stats.distinct  # all judged
        assert stats.matches == 4
        fake.reset()
        with pytest.raises(CascadeTargetMissed, match="recall"):
            run(fake, frame, recall=0.9, cascade_sample=200, on_miss="fail")
        # It failed after the sample, before paying for the rest.
        assert sum(len(r.rows or []) for r in fake.requests) < stats.distinct


def test_loading_the_proxy_leaves_the_hosts_logging_alone() -> None:
    """wordllama configures the root logger at import; the proxy undoes it."""
    import logging
    import subprocess
    import sys

    code = (
        "import logging\n"
        "from rlm_dagster.cascade import EmbeddingProxy\n"
        "EmbeddingProxy().score('x', ['y'])\n"
        "root = logging.getLogger()\n"
        "print(root.level, len(root.handlers))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(logging.WARNING), "0"]


def test_the_dry_run_plan_shows_the_cascade_against_judging_everything() -> None:
    frame = tickets(2_000, churn_every=5)
    with FakeAnthropic(where=judge) as fake:
        lm = LM(
            api_key="k",
            base_url=fake.base_url,
            root_model="fake-root",
            sub_model="claude-haiku-4-5",
        )
        sem = Semantic(lm, Warehouse.from_frames({"t": frame}), Budget(Limits(), lm.accounting))
        plan = sem.plan("t", PREDICATE, columns=["body"], recall=0.95)
        assert not fake.requests
    assert plan.cascade is not None
    assert "recall >= 0.95" in plan.cascade and "judging everything: 2,000" in plan.cascade
    assert "With recall=" in plan.describe()
