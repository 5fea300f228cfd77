"""Checks on the synthetic sample warehouse source written by ``data/generate.py``."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
GENERATOR = DATA_DIR / "generate.py"

FILES = {
    "source/customers.csv": "customer_id,name,plan,country,signup_date,seats,mrr_usd",
    "source/orders.csv": "order_id,customer_id,order_date,product,amount_usd,status",
    "source/tickets.csv": "ticket_id,customer_id,created_at,channel,priority,subject,body",
    "ground_truth/ticket_labels.csv": "ticket_id,threatens_cancel,churn_reason,category,sentiment",
}
ROW_RANGES = {
    "source/customers.csv": (100, 150),
    "source/orders.csv": (1200, 1800),
    "source/tickets.csv": (500, 700),
    "ground_truth/ticket_labels.csv": (500, 700),
}
CATEGORIES = {
    "billing",
    "bug",
    "feature_request",
    "outage",
    "onboarding",
    "account",
    "praise",
    "how_to",
}
CHURN_REASONS = {"pricing", "outage", "missing_feature", "competitor", "support_quality", "bugs"}


def read_rows(rel: str) -> list[dict[str, str]]:
    with (DATA_DIR / rel).open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tickets_with_labels() -> list[tuple[dict[str, str], dict[str, str]]]:
    tickets = {t["ticket_id"]: t for t in read_rows("source/tickets.csv")}
    labels = {row["ticket_id"]: row for row in read_rows("ground_truth/ticket_labels.csv")}
    assert tickets.keys() == labels.keys()
    return [(tickets[k], labels[k]) for k in tickets]


@pytest.mark.parametrize("rel", list(FILES))
def test_files_exist_with_expected_columns_and_row_counts(rel: str) -> None:
    path = DATA_DIR / rel
    assert path.is_file(), f"{path} missing - run `python data/generate.py`"
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    assert header == FILES[rel].split(",")
    assert all(len(row) == len(header) for row in rows)
    lo, hi = ROW_RANGES[rel]
    assert lo <= len(rows) <= hi


def test_generated_data_is_small() -> None:
    # Only the committed files; a locally built warehouse.duckdb (gitignored) does not count.
    files = [GENERATOR, *(DATA_DIR / rel for rel in FILES)]
    assert sum(p.stat().st_size for p in files) < 2_000_000


def test_ticket_ids_unique_and_match_labels_one_to_one() -> None:
    ticket_ids = [t["ticket_id"] for t in read_rows("source/tickets.csv")]
    label_ids = [row["ticket_id"] for row in read_rows("ground_truth/ticket_labels.csv")]
    assert len(ticket_ids) == len(set(ticket_ids))
    assert len(label_ids) == len(set(label_ids))
    assert set(ticket_ids) == set(label_ids)


def test_referential_integrity_and_value_domains() -> None:
    customers = {c["customer_id"]: c for c in read_rows("source/customers.csv")}
    assert {c["plan"] for c in customers.values()} == {"free", "starter", "pro", "enterprise"}
    for order in read_rows("source/orders.csv"):
        customer = customers[order["customer_id"]]
        assert "2025-06-01" <= order["order_date"] <= "2026-11-15"
        assert order["order_date"] >= customer["signup_date"]
        assert order["status"] in {"paid", "refunded", "pending", "failed"}
        assert float(order["amount_usd"]) > 0
    for ticket in read_rows("source/tickets.csv"):
        assert ticket["customer_id"] in customers
        assert "2026-05-01 00:00:00" <= ticket["created_at"] <= "2026-11-15 23:59:59"
        assert ticket["channel"] in {"email", "chat", "phone", "web"}
        assert ticket["priority"] in {"low", "normal", "high", "urgent"}
        assert ticket["body"].strip()


def test_labels_are_consistent(
    tickets_with_labels: list[tuple[dict[str, str], dict[str, str]]],
) -> None:
    for _, label in tickets_with_labels:
        assert label["threatens_cancel"] in {"true", "false"}
        assert label["category"] in CATEGORIES
        assert label["sentiment"] in {"negative", "neutral", "positive"}
        if label["threatens_cancel"] == "true":
            assert label["churn_reason"] in CHURN_REASONS
        else:
            assert label["churn_reason"] == ""


def test_churn_share_and_hard_cases(
    tickets_with_labels: list[tuple[dict[str, str], dict[str, str]]],
) -> None:
    churn = [t for t, lab in tickets_with_labels if lab["threatens_cancel"] == "true"]
    non_churn = [t for t, lab in tickets_with_labels if lab["threatens_cancel"] == "false"]
    share = len(churn) / len(tickets_with_labels)
    assert 0.08 <= share <= 0.20, share

    implicit = [t for t in churn if "cancel" not in t["body"].lower()]
    assert len(implicit) >= 20, len(implicit)

    hard_negatives = [t for t in non_churn if "cancel" in t["body"].lower()]
    assert len(hard_negatives) >= 10, len(hard_negatives)


def test_duplicate_body_share(
    tickets_with_labels: list[tuple[dict[str, str], dict[str, str]]],
) -> None:
    bodies = [t["body"] for t, _ in tickets_with_labels]
    duplicate_share = 1 - len(set(bodies)) / len(bodies)
    assert 0.03 <= duplicate_share <= 0.15, duplicate_share


def test_generator_is_deterministic(tmp_path: Path) -> None:
    out = tmp_path / "regenerated"
    subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(out)],
        cwd=tmp_path,  # must not depend on the working directory
        check=True,
    )
    for rel in FILES:
        assert (out / rel).read_bytes() == (DATA_DIR / rel).read_bytes(), rel
