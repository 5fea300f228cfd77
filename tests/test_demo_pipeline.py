"""The README's quick start: the sample pipeline runs offline with the labelled demo model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import duckdb

REPO = Path(__file__).resolve().parents[1]


def test_readme_main_command_runs_offline_with_demo_model(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    env["DAGSTER_HOME"] = str(tmp_path / "home")
    env["RLM_WAREHOUSE"] = str(tmp_path / "warehouse.duckdb")
    Path(env["DAGSTER_HOME"]).mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster",
            "asset",
            "materialize",
            "-f",
            "definitions.py",
            "--select",
            "*",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "ANTHROPIC_API_KEY is not set: RLM assets use the offline DEMO model" in log
    assert "Using the offline DEMO model" in log  # in each RLM asset's run log
    con = duckdb.connect(env["RLM_WAREHOUSE"], read_only=True)
    churn = con.sql(
        "SELECT customer_id, customer_name, ticket_id, reason FROM churn_reasons"
    ).fetchall()
    themes = con.sql("SELECT answer FROM urgent_ticket_themes").fetchall()
    con.close()
    assert churn and all(r[1] and r[3] for r in churn)
    assert "demo model" in themes[0][0]
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        for key in ("churn_reasons", "urgent_ticket_themes"):
            event = instance.get_latest_materialization_event(dg.AssetKey(key))
            assert event is not None and event.asset_materialization is not None
            meta = event.asset_materialization.metadata
            assert meta["rlm/provider"].value == "demo"
            assert "DEMO model" in str(meta["rlm/note"].value)
