"""Warehouse questions over the repo's sample data (``data/``), answered by its ground truth.

    >>> tasks = warehouse_tasks(seed=0, count=2)  # doctest: +SKIP
    >>> [t.kind for t in tasks]  # doctest: +SKIP
    ['integer', 'integer']

The warehouse is ``data/source/*.csv`` (customers, orders, support tickets; see
``data/generate.py``); the answers come from ``data/ground_truth/ticket_labels.csv``, which
the strategies never see. Churn threats often never say "cancel", and some tickets say
"cancel" without threatening anything: the questions need reading, joined with SQL.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import duckdb
import pandas as pd

from rlm_dagster.eval.task import Task

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
TABLES = ("customers", "orders", "tickets")
CATEGORIES = {
    "billing": "billing or invoices",
    "outage": "an outage or downtime",
    "feature_request": "a feature request",
    "how_to": "how to do something in the product",
    "onboarding": "getting started with the product (onboarding)",
}
CHURN = "threaten to cancel, not renew, or move to a competitor"


def load(data_dir: Path) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """The warehouse tables and the ground-truth labels joined to the tickets."""
    con = duckdb.connect()
    try:
        frames = {
            name: con.execute(
                "SELECT * FROM read_csv(?, header = true)",
                [str(data_dir / "source" / f"{name}.csv")],
            ).df()
            for name in TABLES
        }
        labels = con.execute(
            "SELECT * FROM read_csv(?, header = true)",
            [str(data_dir / "ground_truth" / "ticket_labels.csv")],
        ).df()
    finally:
        con.close()
    truth = (
        frames["tickets"]
        .merge(labels, on="ticket_id")
        .merge(frames["customers"][["customer_id", "plan"]], on="customer_id")
    )
    return frames, truth


def _churn_count(rng: random.Random, truth: pd.DataFrame) -> tuple[str, int, dict[str, str]]:
    plan = rng.choice(("enterprise", "pro", "starter"))
    rows = truth[(truth.plan == plan) & truth.threatens_cancel]
    question = (
        f"How many support tickets from customers on the {plan} plan {CHURN}? "
        "Answer with a single integer."
    )
    return question, len(rows), {"plan": plan}


def _category_count(rng: random.Random, truth: pd.DataFrame) -> tuple[str, int, dict[str, str]]:
    category = rng.choice(sorted(CATEGORIES))
    plan = rng.choice(("enterprise", "pro", "starter"))
    rows = truth[(truth.plan == plan) & (truth.category == category)]
    question = (
        f"How many support tickets from customers on the {plan} plan are about "
        f"{CATEGORIES[category]}? Answer with a single integer."
    )
    return question, len(rows), {"plan": plan, "category": category}


def _churn_customers(
    rng: random.Random, truth: pd.DataFrame
) -> tuple[str, frozenset[int], dict[str, str]]:
    plan = rng.choice(("enterprise", "pro"))
    start, end = "2026-08-17", "2026-11-15"
    recent = truth[
        (truth.plan == plan)
        & truth.threatens_cancel
        & (truth.created_at >= pd.Timestamp(start))
        & (truth.created_at < pd.Timestamp(end) + pd.Timedelta(days=1))
    ]
    question = (
        f"Which customers on the {plan} plan sent at least one support ticket between {start} "
        f"and {end} (inclusive) in which they {CHURN}? Answer with their customer_id values, "
        "comma-separated."
    )
    return question, frozenset(int(c) for c in recent.customer_id), {"plan": plan}


def _paid_total(
    rng: random.Random, frames: dict[str, pd.DataFrame]
) -> tuple[str, float, dict[str, str]]:
    orders = frames["orders"]
    months = sorted({d.strftime("%Y-%m") for d in pd.to_datetime(orders.order_date)})
    month = rng.choice(months)
    dates = pd.to_datetime(orders.order_date).dt.strftime("%Y-%m")
    total = float(orders[(dates == month) & (orders.status == "paid")].amount_usd.sum())
    label = pd.Timestamp(month + "-01").strftime("%B %Y")
    question = (
        f"What was the total amount_usd of orders with status 'paid' placed in {label}? "
        "Answer with a number rounded to 2 decimal places."
    )
    return question, round(total, 2), {"month": month}


def warehouse_tasks(seed: int, count: int, data_dir: Path | None = None) -> list[Task]:
    """``count`` questions over the sample warehouse, drawn by ``seed`` from a fixed rota
    (churn counts, topic counts, churned customers, a SQL-only total)."""
    frames, truth = load(data_dir or DATA_DIR)
    rng = random.Random(f"warehouse:{seed}")
    rota: list[tuple[str, Callable[[], tuple[str, object, dict[str, str]]]]] = [
        ("churn_count", lambda: _churn_count(rng, truth)),
        ("category_count", lambda: _category_count(rng, truth)),
        ("churn_customers", lambda: _churn_customers(rng, truth)),
        ("paid_total", lambda: _paid_total(rng, frames)),
        ("category_count", lambda: _category_count(rng, truth)),
    ]
    tasks = []
    for i in range(count):
        name, make = rota[i % len(rota)]
        question, answer, params = make()
        kind = {"churn_customers": "set", "paid_total": "number"}.get(name, "integer")
        tasks.append(
            Task(
                id=f"warehouse-{i + 1}",
                family="warehouse",
                question=question,
                tables=frames,
                kind=kind,  # type: ignore[arg-type]
                truth=answer,  # type: ignore[arg-type]
                tolerance=0.01 if kind == "number" else 0.0,
                params={"seed": seed, "question": name, **params},
            )
        )
    return tasks
