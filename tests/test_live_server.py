"""Opt-in lane: a real Anthropic-compatible model server (llama.cpp's ``llama-server``).

Skipped unless ``RLM_LIVE_BASE_URL`` names a running server on loopback, e.g.::

    RLM_LIVE_BASE_URL=http://127.0.0.1:8089 RLM_LIVE_MODEL=smollm2 pytest -m live_server -s

(docs/local_model_server.md builds and serves one). Nothing here fakes the model: these
tests check that the root loop, ``llm_query`` and ``llm_where`` work against a real server's
quirks with the profile rlm_dagster gives a model it does not know (the conservative one),
and they print how well the small model's verdicts agree with the sample's ground truth.
A tiny model is expected to answer badly; it must never make the library answer wrongly
without saying so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from urllib.parse import urlsplit

import pandas as pd
import pytest

from rlm_dagster import Limits, NoFinalAnswer, Warehouse, run_rlm
from rlm_dagster.engine.budget import Budget
from rlm_dagster.models.client import LM
from rlm_dagster.models.profiles import ModelCatalog
from rlm_dagster.semantic import Semantic, WhereConfig

BASE_URL = os.environ.get("RLM_LIVE_BASE_URL", "")
MODEL = os.environ.get("RLM_LIVE_MODEL", "local-model")
SAMPLE = int(os.environ.get("RLM_LIVE_SAMPLE", "40"))
# What the served model supports (see docs/local_model_server.md), as RLMResource's
# model_profiles would declare it; without it the model runs on the conservative profile.
PROFILE = json.loads(
    os.environ.get(
        "RLM_LIVE_PROFILE", '{"tools": true, "max_output_tokens": 1024, "context_window": 16384}'
    )
)

pytestmark = [
    pytest.mark.live_server,
    pytest.mark.skipif(
        not BASE_URL,
        reason="no live model server: set RLM_LIVE_BASE_URL (see docs/local_model_server.md)",
    ),
]


@pytest.fixture
def live_lm() -> Iterator[LM]:
    host = urlsplit(BASE_URL).hostname or ""
    assert host in ("127.0.0.1", "localhost", "::1"), "the live lane only talks to loopback"
    lm = LM(
        api_key="not-needed",
        base_url=BASE_URL,
        root_model=MODEL,
        sub_model=MODEL,
        max_concurrency=2,
        request_timeout_s=300.0,
        max_retries=1,
        catalog=ModelCatalog({MODEL: PROFILE}),
    )
    yield lm
    lm.close()


def test_llm_query_gets_text(live_lm: LM) -> None:
    sem = Semantic(live_lm, Warehouse.from_frames({}), Budget(Limits(), live_lm.accounting))
    answer = sem.query("Reply with one word: the colour of the sky on a clear day.")
    print(f"\nllm_query -> {answer!r}")
    assert answer.strip()
    record = live_lm.accounting.records[-1]
    assert record.usage.input_tokens > 0 and record.usage.output_tokens > 0


def test_llm_where_decides_or_marks_every_row(
    live_lm: LM, warehouse_file: str, churn_labels: dict[int, bool]
) -> None:
    wh = Warehouse.snapshot(warehouse_file, ["tickets"])
    sem = Semantic(
        live_lm,
        wh,
        Budget(Limits(max_cost_usd=None), live_lm.accounting),
        config=WhereConfig(batch_rows=5),
    )
    sample = f"SELECT ticket_id, body FROM tickets ORDER BY ticket_id LIMIT {SAMPLE}"
    _, prov, stats = sem.where(
        sample,
        "The customer threatens to cancel, not renew, or move to a competitor.",
        columns=["body"],
    )
    rows = wh.query(f"SELECT ticket_id, _verdict, _decided_by, _error FROM {prov.name}").to_pylist()
    decided = [r for r in rows if r["_verdict"] is not None]
    null = [r for r in rows if r["_verdict"] is None]
    agree = sum(1 for r in decided if r["_verdict"] == churn_labels[r["ticket_id"]])
    truth = sum(1 for r in rows if churn_labels[r["ticket_id"]])
    print(
        f"\nllm_where on {len(rows)} sample tickets ({truth} truly threaten to cancel): "
        f"{len(decided)} decided, {len(null)} NULL, {stats.requests} requests, "
        f"{stats.reasked} re-asked; agreement with ground truth on decided rows: "
        f"{agree}/{len(decided)}" + (f" ({agree / len(decided):.0%})" if decided else "")
    )
    for r in null[:3]:
        print(f"  NULL row {r['ticket_id']}: {r['_error']}")
    assert len(rows) == SAMPLE
    # Every row is either decided by the model or NULL with the reason recorded: never a
    # silent default.
    assert all(r["_decided_by"] == "model" for r in decided)
    assert all(r["_decided_by"] in ("failed", "refused") and r["_error"] for r in null)
    assert stats.failed == len(null)


def test_root_loop_runs_to_an_answer_or_a_clear_error(live_lm: LM) -> None:
    tickets = pd.DataFrame({"ticket_id": [1, 2, 3], "body": ["refund please", "ok", "refund"]})
    try:
        result = run_rlm(
            "How many tickets mention a refund? Use sql().",
            warehouse=Warehouse.from_frames({"tickets": tickets}),
            lm=live_lm,
            limits=Limits(max_iterations=3, max_cost_usd=None),
            sandbox="process",
        )
    except NoFinalAnswer as err:
        print(f"\nroot loop: no final answer in 3 turns (expected of a 135M model): {err}")
        assert err.trajectory is not None and err.trajectory.turns
        return
    print(f"\nroot loop answered: {result.answer_text!r} in {result.iterations} turns")
    assert result.answer_text.strip()
