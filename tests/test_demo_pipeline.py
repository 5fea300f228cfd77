"""The README's quick start: the sample pipeline runs offline with the labelled demo model."""

from __future__ import annotations

import importlib
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import dagster as dg
import duckdb
import pytest
from cli import cli_env, materialize_cli

REPO = Path(__file__).resolve().parents[1]


def test_readme_main_command_runs_offline_with_demo_model(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home", RLM_WAREHOUSE=str(tmp_path / "warehouse.duckdb"))
    proc = materialize_cli("definitions.py", "*", cwd=REPO, env=env, timeout=600)
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
    # the plain downstream asset read the RLM's output table
    con = duckdb.connect(env["RLM_WAREHOUSE"], read_only=True)
    by_reason = con.sql("SELECT sum(threats) FROM churn_by_reason").fetchall()[0][0]
    con.close()
    assert by_reason == len(churn)
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        for key in ("churn_reasons", "urgent_ticket_themes"):
            event = instance.get_latest_materialization_event(dg.AssetKey(key))
            assert event is not None and event.asset_materialization is not None
            meta = event.asset_materialization.metadata
            assert meta["rlm/provider"].value == "demo"
            assert "DEMO model" in str(meta["rlm/note"].value)


def load_definitions(monkeypatch: pytest.MonkeyPatch, warehouse: Path) -> ModuleType:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.setenv("RLM_WAREHOUSE", str(warehouse))
    monkeypatch.syspath_prepend(str(REPO))
    sys.modules.pop("definitions", None)
    return importlib.import_module("definitions")


def test_schedule_refreshes_the_rlm_answers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    definitions = load_definitions(monkeypatch, tmp_path / "w.duckdb")
    job = definitions.defs.resolve_job_def("rlm_answers")
    assert job.asset_layer.selected_asset_keys == {
        dg.AssetKey("churn_reasons"),
        dg.AssetKey("urgent_ticket_themes"),
    }
    schedule = definitions.morning_refresh
    assert schedule.cron_schedule == "0 6 * * *" and schedule.job_name == "rlm_answers"
    context = dg.build_schedule_context(
        scheduled_execution_time=datetime(2026, 11, 22, 6, tzinfo=UTC)
    )
    requests = schedule.evaluate_tick(context).run_requests
    assert requests is not None and len(requests) == 1


def test_sensor_fires_when_tickets_are_reloaded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    definitions = load_definitions(monkeypatch, tmp_path / "w.duckdb")
    sensor = definitions.tickets_reloaded
    with dg.instance_for_test() as instance:
        idle = list(
            sensor(dg.build_sensor_context(instance=instance, definitions=definitions.defs)) or []
        )
        loaders = [a for a in definitions.defs.assets if a.key == dg.AssetKey("tickets")]
        resources = {"duckdb": definitions.defs.resources["duckdb"]}
        assert dg.materialize(loaders, resources=resources, instance=instance).success
        fired = list(
            sensor(dg.build_sensor_context(instance=instance, definitions=definitions.defs)) or []
        )
    assert [type(r) for r in idle] == [dg.SkipReason]
    assert len(fired) == 1 and isinstance(fired[0], dg.RunRequest)
    assert sensor.job_name == "rlm_answers"
