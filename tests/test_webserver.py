"""An RLM asset seen as a user sees it: launched from the Dagster webserver, read back over GraphQL.

The test starts ``python -m dagster_webserver`` on a free port of 127.0.0.1 (its own temporary
``DAGSTER_HOME``, a definitions file whose RLM resource points at :class:`FakeAnthropic` running
in this process), launches the asset's job through the GraphQL ``launchPipelineExecution``
mutation — what the UI's *Materialize* button sends — polls the run until it ends, then reads
the latest materialization's metadata back through GraphQL, as the asset page does.

Run it with::

    pytest tests/test_webserver.py -q

It needs ``dagster-webserver`` (in the ``test`` extra; the test is skipped without it) and no
browser. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rlm_dagster.testing import FakeAnthropic, FakeRequest

pytest.importorskip(
    "dagster_webserver", reason="dagster-webserver is not installed (pip install -e '.[test]')"
)

ASSET = "webserver_churn"
SUB_MODEL = "claude-haiku-4-5"
READY_TIMEOUT_S = 45.0
RUN_TIMEOUT_S = 60.0

# The fake root model's two turns. The marker names make the code easy to find in the
# trajectory the UI shows.
ROOT_SCRIPT = [
    "Let me count the tickets and ask the sub-model.\n```repl\n"
    'ui_ticket_count = int(sql("SELECT count(*) AS n FROM tickets")["n"][0])\n'
    "ui_threats = llm_where(tickets, 'The customer threatens to cancel', columns=['body'], "
    'where="ticket_id <= 40")\n'
    "ui_why = llm_query('Why are customers unhappy?')\n"
    "print(ui_ticket_count, len(ui_threats), ui_why)\n```",
    "```repl\n"
    'FINAL(f"{ui_ticket_count} tickets, {len(ui_threats)} threats; themes: {ui_why}")\n```',
]

DEFS = """
import dagster as dg
from dagster_duckdb import DuckDBResource
from rlm_dagster import RLMResource, rlm_asset

asset = rlm_asset(
    name={asset!r},
    question="How many tickets are there, and why are customers unhappy?",
    tables=["tickets"],
    max_iterations=4,
    retry_policy=None,
)
defs = dg.Definitions(
    assets=[asset],
    resources={{
        "duckdb": DuckDBResource(database={database!r}),
        "rlm": RLMResource(api_key="test-key", base_url={base_url!r},
                           root_model="fake-root", sub_model={sub_model!r}),
    }},
)
"""

# Without the daemon, the default QueuedRunCoordinator would leave runs queued forever;
# telemetry is switched off so nothing is written or sent beyond the test's directory.
DAGSTER_YAML = """
run_coordinator:
  module: dagster._core.run_coordinator
  class: DefaultRunCoordinator
run_launcher:
  module: dagster
  class: DefaultRunLauncher
telemetry:
  enabled: false
"""

LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message stack }
    ... on Error { message }
  }
}
"""

WORKSPACE = """
{
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on RepositoryLocation { repositories { name } }
          ... on PythonError { message }
        }
      }
    }
    ... on PythonError { message }
  }
}
"""

RUN_STATUS = """
query Run($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { status } ... on Error { message } }
}
"""

RUN_LOGS = """
query Logs($runId: ID!) {
  logsForRun(runId: $runId) {
    ... on EventConnection { events { __typename ... on MessageEvent { message } } }
  }
}
"""

MATERIALIZATION = """
query Asset($path: [String!]!) {
  assetOrError(assetKey: {path: $path}) {
    __typename
    ... on Asset {
      assetMaterializations(limit: 1) {
        runId
        metadataEntries {
          __typename
          label
          ... on MarkdownMetadataEntry { mdStr }
          ... on TextMetadataEntry { text }
          ... on FloatMetadataEntry { floatValue }
          ... on IntMetadataEntry { intValue intRepr }
          ... on TableMetadataEntry { table { records } }
        }
      }
    }
  }
}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Loopback only: never route through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def graphql(base: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        f"{base}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with _OPENER.open(request, timeout=30) as response:
        payload: dict[str, Any] = json.loads(response.read())
    assert not payload.get("errors"), payload["errors"]
    data: dict[str, Any] = payload["data"]
    return data


def wait_for_repository(base: str, proc: subprocess.Popen[bytes], log: Path) -> tuple[str, str]:
    """Poll until the webserver answers and its code location has loaded: (location, repo)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the webserver exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with _OPENER.open(f"{base}/server_info", timeout=5) as response:
                assert response.status == 200
            workspace = graphql(base, WORKSPACE)["workspaceOrError"]
            for entry in workspace.get("locationEntries", []):
                location = entry["locationOrLoadError"] or {}
                if location.get("__typename") == "PythonError":
                    pytest.fail(f"the definitions did not load: {location['message']}")
                if location.get("repositories"):
                    return entry["name"], location["repositories"][0]["name"]
            last = workspace
        except (OSError, urllib.error.URLError) as err:
            last = err
        time.sleep(0.25)
    pytest.fail(
        f"the webserver was not ready within {READY_TIMEOUT_S} s (last: {last!r}):\n"
        f"{log.read_text()[-4000:]}"
    )


def wait_for_run(base: str, run_id: str) -> str:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    status = "UNKNOWN"
    while time.monotonic() < deadline:
        result = graphql(base, RUN_STATUS, {"runId": run_id})["runOrError"]
        assert result["__typename"] == "Run", result
        status = result["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return str(status)
        time.sleep(0.25)
    return f"{status} after {RUN_TIMEOUT_S} s"


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the webserver, then anything left in its process group (code server, run worker)."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group created by start_new_session=True


@contextlib.contextmanager
def webserver(defs_file: Path, dagster_home: Path, log: Path) -> Iterator[tuple[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    env["DAGSTER_HOME"] = str(dagster_home)
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dagster_webserver",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-f",
                str(defs_file),
            ],
            cwd=defs_file.parent,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop(proc)


def metadata_by_label(entries: list[dict[str, Any]]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for entry in entries:
        kind = entry["__typename"]
        if kind == "MarkdownMetadataEntry":
            values[entry["label"]] = entry["mdStr"]
        elif kind == "TextMetadataEntry":
            values[entry["label"]] = entry["text"]
        elif kind == "FloatMetadataEntry":
            values[entry["label"]] = entry["floatValue"]
        elif kind == "IntMetadataEntry":
            values[entry["label"]] = int(entry["intRepr"])
        elif kind == "TableMetadataEntry":
            values[entry["label"]] = [json.loads(r) for r in entry["table"]["records"]]
        else:
            values[entry["label"]] = kind
    return values


def test_materialize_from_the_webserver_and_read_metadata_over_graphql(
    tmp_path: Path, warehouse_file: str
) -> None:
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(DAGSTER_YAML)
    log = tmp_path / "webserver.log"

    def judge(predicate: str, row: dict[str, Any]) -> tuple[bool, str]:
        hit = "cancel" in row["body"].lower()
        return hit, "mentions cancelling" if hit else "no threat"

    def sub(request: FakeRequest) -> str:
        return "pricing and outages"

    with FakeAnthropic(root=ROOT_SCRIPT, sub=sub, where=judge) as fake:
        defs_file = tmp_path / "defs.py"
        defs_file.write_text(
            textwrap.dedent(DEFS).format(
                asset=ASSET,
                database=warehouse_file,
                base_url=fake.base_url,
                sub_model=SUB_MODEL,
            )
        )
        with webserver(defs_file, dagster_home, log) as (base, proc):
            location, repository = wait_for_repository(base, proc, log)
            params = {
                "selector": {
                    "repositoryLocationName": location,
                    "repositoryName": repository,
                    "pipelineName": "__ASSET_JOB",
                    "assetSelection": [{"path": [ASSET]}],
                },
                "mode": "default",
                "executionMetadata": {"tags": [{"key": "launched_by", "value": "test"}]},
            }
            launched = graphql(base, LAUNCH, {"params": params})["launchPipelineExecution"]
            assert launched["__typename"] == "LaunchRunSuccess", launched
            run_id = launched["run"]["runId"]
            status = wait_for_run(base, run_id)
            if status != "SUCCESS":
                events = graphql(base, RUN_LOGS, {"runId": run_id})["logsForRun"]["events"]
                messages = "\n".join(str(e.get("message")) for e in events)
                pytest.fail(f"run {run_id} ended {status}:\n{messages[-4000:]}")
            asset = graphql(base, MATERIALIZATION, {"path": [ASSET]})["assetOrError"]
        counts = {k: fake.count(k) for k in ("root", "sub", "where")}

    assert asset["__typename"] == "Asset", asset
    (materialization,) = asset["assetMaterializations"]
    assert materialization["runId"] == run_id
    meta = metadata_by_label(materialization["metadataEntries"])

    # The answer: 600 tickets, the sub-model's words, ended by FINAL.
    assert "600 tickets" in meta["rlm/answer"], meta["rlm/answer"]
    assert "themes: pricing and outages" in meta["rlm/answer"]
    # Usage: a few numeric keys, and one table with a row per role and model.
    usage = {(r["role"], r["model"]): r for r in meta["rlm/usage"]}
    assert usage[("root", "fake-root")]["input_tokens"] > 0
    assert usage[("sub", SUB_MODEL)]["input_tokens"] > 0
    assert meta["rlm/total_tokens"] > 0 and meta["rlm/input_tokens"] > 0
    # Cost: known for the sub model, reported as unknown (no made-up number) for fake-root.
    assert meta["rlm/cost_usd"] > 0
    assert usage[("sub", SUB_MODEL)]["paid_usd"] > 0
    assert usage[("root", "fake-root")].get("paid_usd") is None
    assert not [k for k in meta if k.startswith("anthropic.")]
    assert meta["rlm/cost_unknown_models"] == "fake-root"
    # The trajectory shows the model's code, turn by turn.
    trajectory = meta["rlm/trajectory"]
    assert "ui_why = llm_query('Why are customers unhappy?')" in trajectory
    assert "### Turn 2" in trajectory and "FINAL(" in trajectory
    # Who answered, and how many calls it took — matching what the fake served.
    assert meta["rlm/provider"] == "anthropic"
    assert meta["rlm/root_calls"] == counts["root"] == 2
    assert meta["rlm/sub_calls"] == counts["sub"] + counts["where"] >= 2
    assert meta["dagster/table_name"] == f"main.{ASSET}"
