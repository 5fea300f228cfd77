"""Harness for hostile programs: each runs as root-model code through the real engine.

One fake Anthropic server serves the whole module (its root "model" replies with the
current test's script), one DuckDB warehouse file is shared and its bytes are hashed
around every test, and the host's environment holds fake secrets that must never reach
what the model sees nor the trajectory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pwd
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest

from rlm_dagster import Limits, RLMResult, Warehouse, run_rlm
from rlm_dagster.models.client import LM
from rlm_dagster.repl import host as host_module
from rlm_dagster.repl.sandbox import LEVELS, WorkerLimits, available_levels
from rlm_dagster.testing import FakeAnthropic, FakeRequest

SECRET_MARK = "do-not-leak"
HOST_SECRETS = {
    "ANTHROPIC_API_KEY": f"sk-ant-test-{SECRET_MARK}-0123456789abcdef",
    "AWS_SECRET_ACCESS_KEY": f"aws/{SECRET_MARK}/0123456789abcdefABCDEF",
    "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
    "GITHUB_TOKEN": f"ghp_{SECRET_MARK}0123456789abcdefABCDEF0123",
}
# Files the hostile programs try to create outside their scratch directory.
PWNED = [Path("/tmp/rlm-pwned"), Path("/tmp/rlm-pwned.txt"), Path("/tmp/rlm-out.csv")]
SSH_KEY_TEXT = f"-----BEGIN OPENSSH PRIVATE KEY-----\n{SECRET_MARK}-ssh\n"
LIMITS = Limits(max_iterations=4, max_sub_calls=5, cell_timeout_s=4.0, max_cost_usd=None)
# Small enough that an allocation bomb ends fast, large enough for a 1 GiB string.
TEST_WORKER_LIMITS = WorkerLimits(memory_bytes=2 * 1024**3, cpu_seconds=120)


def each_level() -> list[object]:
    """Every level, skipped with the reason when this machine cannot provide it."""
    missing = available_levels()
    return [
        pytest.param(
            level,
            id=level,
            marks=[pytest.mark.skip(reason=f"{level} unavailable: {missing[level]}")]
            if level in missing
            else [],
        )
        for level in LEVELS
    ]


@dataclass
class Outcome:
    """What happened when a hostile program ran."""

    result: RLMResult
    requests: list[FakeRequest]
    observation: str  # what the model was shown after its hostile turn

    @property
    def trajectory(self) -> str:
        return self.result.trajectory_markdown(max_chars=100_000)

    def bodies(self) -> str:
        return "\n".join(json.dumps(r.body) for r in self.requests)


class Hostile:
    """Runs scripted root-model turns against the shared fake server and warehouse."""

    def __init__(self, fake: FakeAnthropic, script: list[str], warehouse: Path) -> None:
        self.fake = fake
        self.script = script
        self.warehouse = warehouse

    def run(
        self, level: str, *cells: str, limits: Limits = LIMITS, final: str | None = None
    ) -> Outcome:
        """Run ``cells`` (one turn each; ``{WAREHOUSE}`` is the warehouse path's repr), then
        a turn that calls ``FINAL('done')``, and check the run ended cleanly: with that
        answer after every turn, or with ``final`` if the cells themselves end the run."""
        self.fake.reset()
        self.script[:] = [
            f"Trying something.\n```repl\n{c.replace('{WAREHOUSE}', repr(str(self.warehouse)))}\n```"
            for c in cells
        ] + ["```repl\nFINAL('done')\n```"]
        wh = Warehouse.snapshot(str(self.warehouse), ["tickets", "customers"])
        lm = LM(
            api_key="test",
            base_url=self.fake.base_url,
            root_model="fake-root",
            sub_model="claude-haiku-4-5",
            max_retries=0,
        )
        try:
            result = run_rlm(
                "Which customers threatened to cancel?",
                warehouse=wh,
                lm=lm,
                limits=limits,
                sandbox=level,
            )
        finally:
            lm.close()
            wh.close()
        assert not self.fake.errors, self.fake.errors
        roots = [r for r in self.fake.requests if r.kind == "root"]
        assert result.answer_text == (final or "done"), result.trajectory_markdown()
        if final is None:
            assert len(roots) == len(cells) + 1, "the run did not continue turn by turn"
        observation = roots[1].last_user_text if len(roots) > 1 else ""
        outcome = Outcome(result, list(self.fake.requests), observation)
        assert SECRET_MARK not in outcome.bodies(), "a host secret reached the model"
        assert SECRET_MARK not in outcome.trajectory, "a host secret reached the trajectory"
        return outcome


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("warehouse") / "warehouse.duckdb"
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE tickets AS SELECT * FROM (VALUES (1, 10, 'We will cancel next month.'), "
        "(2, 20, 'How do I export?'), (3, 10, 'Moving to a competitor.')) t(ticket_id, customer_id, body)"
    )
    con.execute(
        "CREATE TABLE customers AS SELECT * FROM (VALUES (10, 'enterprise'), (20, 'pro')) "
        "c(customer_id, plan)"
    )
    con.close()
    return path


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[FakeAnthropic, list[str]]]:
    script: list[str] = []

    def root(request: FakeRequest) -> str:
        return script.pop(0) if script else "```repl\nFINAL('done')\n```"

    with FakeAnthropic(root=root, sub=lambda r: "sub answer") as fake:
        yield fake, script


@pytest.fixture
def hostile(
    fake_server: tuple[FakeAnthropic, list[str]],
    warehouse: Path,
    fake_home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Hostile]:
    """A runner; the warehouse file must be byte-for-byte the same after the test."""
    for name, value in HOST_SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(
        host_module, "WorkerLimits", functools.partial(WorkerLimits, **vars(TEST_WORKER_LIMITS))
    )
    before = _sha256(warehouse)
    for path in PWNED:
        path.unlink(missing_ok=True)
    yield Hostile(*fake_server, warehouse)
    assert _sha256(warehouse) == before, "the warehouse file was modified"
    assert not [p for p in PWNED if p.exists()], "a hostile program wrote outside its scratch"


@pytest.fixture
def fake_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The host user's home for this test, holding a private key (as ``~/.ssh/id_rsa``)."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text(SSH_KEY_TEXT)
    (home / ".aws").mkdir()
    (home / ".aws" / "credentials").write_text(f"aws_secret_access_key = {SECRET_MARK}\n")
    monkeypatch.setenv("HOME", str(home))
    return home


def real_home() -> str:
    """The home directory of the user running the tests, from the password database."""
    return pwd.getpwuid(__import__("os").getuid()).pw_dir
