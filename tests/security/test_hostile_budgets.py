"""Hostile programs against the run's limits, at every sandbox level this machine has.

Each program tries to spend past a limit from model code (big prompts, fan-outs, child runs,
other models, sleeping past the wall clock) and each test asserts what the fake server saw
and what the run counted: spend within the reservation, no request past a limit, the run
ended by the limit it hit. The limits are counted in the host, so the level should not
matter; running every level shows that confinement does not change them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rlm_dagster import Limits, Warehouse, run_rlm
from rlm_dagster.errors import BudgetExceeded, RLMError
from rlm_dagster.models.client import LM, Accounting
from rlm_dagster.testing import FakeAnthropic, FakeRequest

from .conftest import each_level

at_every_level = pytest.mark.parametrize("level", each_level())
SUB_MODEL = "claude-haiku-4-5"  # priced: $1 / $5 per million tokens
CHILD_MARK = "CHILD-QUESTION"


@dataclass
class Spent:
    """What one hostile run cost and what the fake server saw."""

    accounting: Accounting
    requests: list[FakeRequest]
    error: RLMError | None
    seconds: float

    def sent(self, kind: str) -> list[FakeRequest]:
        return [r for r in self.requests if r.kind == kind]

    def observation(self, turn: int = 1) -> str:
        roots = [r for r in self.sent("root") if CHILD_MARK not in _first_user_text(r)]
        return roots[turn].last_user_text if len(roots) > turn else ""


def _first_user_text(request: FakeRequest) -> str:
    return json.dumps(request.body.get("messages", [{}])[0])


@pytest.fixture(scope="module")
def budget_server() -> Iterator[tuple[FakeAnthropic, list[str]]]:
    script: list[str] = []

    def root(request: FakeRequest) -> str:
        if CHILD_MARK in _first_user_text(request):
            # a child that never answers: every turn is a root call plus a sub-call
            return "```repl\nprint(llm_query('more work'))\n```"
        return script.pop(0) if script else "```repl\nFINAL('done')\n```"

    with FakeAnthropic(root=root, sub=lambda r: "sub answer") as fake:
        yield fake, script


@pytest.fixture
def spend(budget_server: tuple[FakeAnthropic, list[str]], warehouse: Path) -> Iterator[object]:
    fake, script = budget_server

    def run(level: str, code: str, limits: Limits) -> Spent:
        fake.reset()
        script[:] = [f"```repl\n{code}\n```", "```repl\nFINAL('done')\n```"]
        wh = Warehouse.snapshot(str(warehouse), ["tickets"])
        lm = LM(
            api_key="test",
            base_url=fake.base_url,
            root_model="fake-root",
            sub_model=SUB_MODEL,
            max_retries=0,
        )
        error: RLMError | None = None
        t0 = time.monotonic()
        try:
            result = run_rlm("q", warehouse=wh, lm=lm, limits=limits, sandbox=level)
            accounting = result.accounting
        except RLMError as exc:
            error = exc
            accounting = exc.partial.accounting  # type: ignore[attr-defined]
        finally:
            lm.close()
            wh.close()
        assert not fake.errors, fake.errors
        return Spent(accounting, list(fake.requests), error, time.monotonic() - t0)

    yield run


BIG = 40_000  # characters per prompt: about 10K input tokens, ~$0.01 at the sub model's price


@at_every_level
def test_big_prompts_never_spend_past_max_cost_usd(spend, level: str) -> None:  # type: ignore[no-untyped-def]
    limits = Limits(max_cost_usd=0.05, max_iterations=3, cell_timeout_s=60)
    out: Spent = spend(
        level,
        f"big = 'x' * {BIG}\nsent = 0\n"
        "try:\n    llm_query_batched([f'{i} ' + big for i in range(100)])\n"
        "except BudgetExceeded as e:\n    print('batch refused:', str(e)[:40])\n"
        "for i in range(100):\n"
        "    try:\n        llm_query(f'{i} ' + big); sent += 1\n"
        "    except BudgetExceeded:\n        break\n"
        "print('single calls sent:', sent)",
        limits,
    )
    assert out.error is None
    assert "batch refused: llm_query_batched would cost" in out.observation()
    singles = len(out.sent("sub"))
    assert 1 <= singles < 100
    assert f"single calls sent: {singles}" in out.observation()
    assert 0 < out.accounting.cost_usd <= 0.05  # the root here is unpriced: this is the subs


@at_every_level
def test_max_tokens_is_never_passed(spend, level: str) -> None:  # type: ignore[no-untyped-def]
    limits = Limits(max_tokens=60_000, max_cost_usd=None, max_iterations=3, cell_timeout_s=60)
    out: Spent = spend(
        level,
        f"big = 'y' * {BIG}\nsent = 0\n"
        "for i in range(50):\n"
        "    try:\n        llm_query(f'{i} ' + big); sent += 1\n"
        "    except BudgetExceeded as e:\n        print('refused:', e.limit); break\n"
        "print('sent', sent)",
        limits,
    )
    # the root's next turn may itself be refused: then the run ends on max_tokens
    assert out.error is None or isinstance(out.error, BudgetExceeded)
    assert out.accounting.usage.total_tokens <= 60_000
    assert 1 <= len(out.sent("sub")) < 50


@at_every_level
def test_sleeping_past_max_wall_time_ends_the_run_on_time(spend, level: str) -> None:  # type: ignore[no-untyped-def]
    limits = Limits(max_wall_time_s=4, cell_timeout_s=120, max_iterations=3)
    out: Spent = spend(level, "import time\ntime.sleep(60)\nprint('woke up')", limits)
    assert isinstance(out.error, BudgetExceeded) and out.error.limit == "max_wall_time_s"
    assert out.seconds < 20  # the cell is stopped at the run's deadline, not after 60 s
    assert len(out.sent("root")) == 1


@at_every_level
def test_other_and_unpriced_models_are_refused(spend, level: str) -> None:  # type: ignore[no-untyped-def]
    out: Spent = spend(
        level,
        "for m in ('claude-unpriced-9', 'claude-opus-4-1'):\n"
        "    try:\n        llm_query('x' * 1000, model=m)\n"
        "    except Exception as e:\n        print(m, type(e).__name__)\n"
        "print(llm_query('ok', model=" + repr(SUB_MODEL) + "))",
        Limits(max_iterations=3),
    )
    assert out.error is None
    assert {r.body["model"] for r in out.sent("sub")} == {SUB_MODEL}
    for model in ("claude-unpriced-9", "claude-opus-4-1"):
        assert f"{model} " in out.observation()
    assert "sub answer" in out.observation()


@at_every_level
def test_child_runs_root_calls_count_against_max_sub_calls(spend, level: str) -> None:  # type: ignore[no-untyped-def]
    limits = Limits(max_depth=2, max_sub_calls=3, max_iterations=5, max_cost_usd=None)
    out: Spent = spend(
        level,
        "n = 0\nlast = None\n"
        "for i in range(20):\n"
        f"    try:\n        rlm_query('{CHILD_MARK} ' + str(i)); n += 1\n"
        "    except Exception as e:\n        last = e\n"
        "print('children', n, type(last).__name__)",
        limits,
    )
    child_roots = [r for r in out.sent("root") if CHILD_MARK in _first_user_text(r)]
    assert len(child_roots) + len(out.sent("sub")) <= limits.max_sub_calls
    assert child_roots, "no child run started"
    assert "BudgetExceeded" in out.observation()
