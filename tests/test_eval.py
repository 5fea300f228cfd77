"""The eval suite (``python -m rlm_dagster.eval``) on the fake server, with scripted answers.

Nothing here measures a model: the fake is told what to answer (right, wrong, unreadable or
nothing), and the tests check that the harness scores, caps, caches, reports and labels
exactly that. The last test is the opt-in lane on a real local server.
"""

from __future__ import annotations

import doctest
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pytest

import rlm_dagster.eval as eval_package
from rlm_dagster.eval import FAKE_LABEL, Report, SuiteConfig, Task, build_suite, run_suite
from rlm_dagster.eval import needle as needle_module
from rlm_dagster.eval import pairs as pairs_module
from rlm_dagster.eval import prompts as prompts_module
from rlm_dagster.eval import report as report_module
from rlm_dagster.eval import scoring as scoring_module
from rlm_dagster.eval import strategies as strategies_module
from rlm_dagster.eval import suite as suite_module
from rlm_dagster.eval import support as support_module
from rlm_dagster.eval import task as task_module
from rlm_dagster.eval import text as text_module
from rlm_dagster.eval.__main__ import main, parser
from rlm_dagster.eval.definitions import eval_results
from rlm_dagster.eval.fake import (
    FAKE_PROFILES,
    FAKE_ROOT,
    FAKE_SUB,
    format_value,
    harness_fake,
    wrong_value,
)
from rlm_dagster.eval.needle import TARGETS, needle_task
from rlm_dagster.eval.pairs import ITEMS, pairs_task
from rlm_dagster.eval.scoring import Unparseable, parse_answer, score
from rlm_dagster.eval.strategies import check_tools_supported
from rlm_dagster.eval.support import TOPICS, aggregation_task
from rlm_dagster.models.client import LM
from rlm_dagster.prompts import PROMPT_VERSION
from rlm_dagster.repl.seam import REPLFactory
from rlm_dagster.testing import FakeAnthropic, ToolUse

REPO = Path(__file__).resolve().parents[1]


def small_tasks() -> list[Task]:
    """One needle, one aggregation and one pairs question, small enough to be quick."""
    return [needle_task(7, 40), aggregation_task(7, 60), pairs_task(7, 20)]


def config(fake: FakeAnthropic, out: Path | None = None, **options: Any) -> SuiteConfig:
    settings: dict[str, Any] = {
        "base_url": fake.base_url,
        "root_model": FAKE_ROOT,
        "sub_model": FAKE_SUB,
        "api_key": "test-key",
        "model_profiles": FAKE_PROFILES,
        "max_iterations": 2,
        "out": out,
        "sandbox": "process",
    }
    settings.update(options)
    return SuiteConfig(**settings)


def quiet(line: str) -> None:
    """Progress lines are not the test's business."""


# -- the tasks ----------------------------------------------------------------------------------


def test_the_modules_doctests_run() -> None:
    for module in (
        eval_package,
        task_module,
        suite_module,
        support_module,
        needle_module,
        pairs_module,
        scoring_module,
        strategies_module,
        report_module,
        prompts_module,
        text_module,
    ):
        result = doctest.testmod(module)
        assert result.failed == 0, module.__name__


def test_generators_are_deterministic_by_seed() -> None:
    families = ["needle", "aggregation", "pairs", "scale"]
    first, again = (build_suite("small", seed=11, families=families) for _ in range(2))
    other = build_suite("small", seed=12, families=families)
    assert [t.id for t in first] == [t.id for t in again] == [t.id for t in other]
    for a, b, c in zip(first, again, other, strict=True):
        assert (a.question, a.truth, a.params) == (b.question, b.truth, b.params)
        assert a.tables.keys() == b.tables.keys()
        assert all(a.tables[name].equals(b.tables[name]) for name in a.tables)
        assert not all(a.tables[name].equals(c.tables[name]) for name in a.tables)
    # The aggregation questions of one suite never ask the same thing twice.
    full = build_suite("full", seed=0, families=["aggregation"])
    assert len({t.question for t in full}) == len(full) == 5


def test_warehouse_questions_come_from_the_sample_ground_truth() -> None:
    tasks = build_suite("full", seed=0, families=["warehouse"])
    assert [t.params["question"] for t in tasks] == [
        "churn_count",
        "category_count",
        "churn_customers",
        "paid_total",
        "category_count",
    ]
    assert {t.kind for t in tasks} == {"integer", "set", "number"}
    assert sorted(tasks[0].tables) == ["customers", "orders", "tickets"]
    assert "threatens_cancel" not in tasks[0].tables["tickets"].columns  # labels stay hidden
    churned = tasks[2].truth
    assert isinstance(churned, frozenset) and churned and all(isinstance(c, int) for c in churned)


def test_generated_text_is_not_keyword_solvable() -> None:
    """A keyword rule per label, a grep for the question's subject or for "code" and a
    number, and noun matching for pairs all do poorly: reading is needed."""
    exact, errors = 0, []
    for seed in range(12):
        task = aggregation_task(seed, 300)
        topic, plan = task.params["topic"], task.params["plan"]
        words = re.compile("|".join(map(re.escape, TOPICS[topic].keywords)), re.I)
        customers = task.tables["customers"]
        plans = dict(zip(customers.customer_id, customers.plan, strict=True))
        guess = sum(
            1
            for customer, body in zip(
                task.tables["tickets"].customer_id, task.tables["tickets"].body, strict=True
            )
            if plans[customer] == plan and words.search(body)
        )
        exact += guess == task.truth
        errors.append(abs(guess - int(task.truth)) / max(1, int(task.truth)))
    assert exact <= 3 and sum(errors) / len(errors) > 0.15

    subject_hits = code_hits = 0
    for seed in range(20):
        task = needle_task(seed, 120)
        subject = re.compile(re.escape(TARGETS[task.params["target"]].keywords[0]), re.I)
        notes = list(task.tables["notes"].text)
        subject_hits += _first_code(notes, subject.search) == task.truth
        code_hits += (
            _first_code(
                notes, lambda t: re.search(r"code|combination|pin|combo", t, re.I) is not None
            )
            == task.truth
        )
    assert subject_hits <= 4 and code_hits <= 8

    offer = re.compile(r"free|giving away|up for grabs|passing on|yours if", re.I)
    f1 = []
    for seed in range(12):
        task = pairs_task(seed, 40)
        posts = list(zip(task.tables["posts"].post_id, task.tables["posts"].text, strict=True))
        guess = {
            (a, b)
            for a, ta in posts
            for b, tb in posts
            if a != b and offer.search(ta) and not offer.search(tb) and _kinds(ta) & _kinds(tb)
        }
        f1.append(score("pairs", frozenset(guess), task.truth))
    assert sum(f1) / len(f1) < 0.5

    bodies = list(aggregation_task(0, 1_000, family="scale").tables["tickets"].body)
    assert len(set(bodies)) > 0.9 * len(bodies)  # free text, not a handful of templates


def _first_code(notes: Sequence[str], wanted: Callable[[str], object]) -> int | None:
    for text in notes:
        if wanted(text) and (m := re.search(r"\b\d{4}\b", text)):
            return int(m.group())
    return None


def _kinds(text: str) -> set[str]:
    return {
        kind
        for kind, item in ITEMS.items()
        if any(re.search(r"\b" + re.escape(w), text, re.I) for w in item.keywords)
    }


# -- scoring --------------------------------------------------------------------------------


def test_scoring_of_known_right_and_wrong_answers() -> None:
    assert parse_answer("integer", "I counted them.\nFINAL(1,204 tickets)") == 1204
    assert score("integer", 1204, 1204) == 1.0 and score("integer", 1203, 1204) == 0.0
    assert score("number", parse_answer("number", "FINAL($222,095.18)"), 222095.18, 0.01) == 1.0
    assert score("number", 222096.0, 222095.18, 0.01) == 0.0
    # F1: 2 of 3 predicted are right (P = 2/3), 2 of 4 true ones found (R = 1/2).
    assert score("set", frozenset({1, 2, 9}), frozenset({1, 2, 3, 4})) == pytest.approx(4 / 7)
    assert score("set", frozenset(), frozenset()) == 1.0
    assert score("set", frozenset({5}), frozenset()) == 0.0
    # Pairs are unordered, whichever way round the model writes them.
    pairs = parse_answer("pairs", "FINAL(3-17\n9 - 5)")
    assert score("pairs", pairs, frozenset({(17, 3), (5, 9), (2, 8)})) == pytest.approx(0.8)
    assert parse_answer("set", "FINAL(none)") == frozenset()
    for kind, text in (("integer", "FINAL(I could not tell)"), ("set", "no idea"), ("integer", "")):
        with pytest.raises(Unparseable):
            parse_answer(kind, text)  # type: ignore[arg-type]
    with pytest.raises(Unparseable):
        parse_answer("integer", "FINAL(2.5)")


def test_table_answers_are_read_from_their_columns() -> None:
    ids = pa.table({"customer_id": [3, 1, 3]})
    assert parse_answer("set", "(preview)", ids) == frozenset({1, 3})
    pairs = pa.table({"offer": [4, 2], "request": [1, 7]})
    assert parse_answer("pairs", "(preview)", pairs) == frozenset({(1, 4), (2, 7)})
    assert parse_answer("integer", "n\n42", pa.table({"n": [42]})) == 42


# -- the suite on the fake ------------------------------------------------------------------


def scripted(task: Task, strategy: str, data_was_cut: bool) -> str | None:
    """rlm: right, but no answer on aggregation; direct: wrong everywhere; tools: right,
    but an unreadable answer on the needle."""
    if strategy == "rlm":
        return None if task.family == "aggregation" else format_value(task, task.truth)
    if strategy == "direct":
        return format_value(task, wrong_value(task))
    if task.family == "needle":
        return "the note did not say"
    return format_value(task, task.truth)


def test_suite_scores_scripted_right_wrong_and_missing_answers(tmp_path: Path) -> None:
    tasks = small_tasks()
    with harness_fake(tasks, scripted) as fake:
        report = run_suite(config(fake, tmp_path / "out"), tasks=tasks, log=quiet)
        endpoint = fake.base_url
    by = {(r.task_id, r.strategy): r for r in report.results}
    # Half the true pairs, written offer-request as the question asks: P = 1, R = 3/7.
    wrong_pairs = parse_answer("pairs", format_value(tasks[2], wrong_value(tasks[2])))
    pairs_wrong = score("pairs", wrong_pairs, tasks[2].truth)
    assert pairs_wrong == pytest.approx(0.6)
    expected = {
        ("needle-1", "rlm"): ("answered", 1.0),
        ("needle-1", "direct"): ("answered", 0.0),
        ("needle-1", "tools"): ("failed", 0.0),
        ("aggregation-1", "rlm"): ("failed", 0.0),
        ("aggregation-1", "direct"): ("answered", 0.0),
        ("aggregation-1", "tools"): ("answered", 1.0),
        ("pairs-1", "rlm"): ("answered", 1.0),
        ("pairs-1", "direct"): ("answered", pairs_wrong),
        ("pairs-1", "tools"): ("answered", 1.0),
    }
    assert {k: r.status for k, r in by.items()} == {k: v[0] for k, v in expected.items()}
    assert {k: r.score for k, r in by.items()} == pytest.approx(
        {k: v[1] for k, v in expected.items()}
    )
    assert by["needle-1", "tools"].error_type == "Unparseable"  # an answer, but no number
    assert by["aggregation-1", "rlm"].error_type == "NoFinalAnswer"
    assert by["needle-1", "direct"].predicted == tasks[0].truth + 1  # type: ignore[operator]
    # The table: one row per family and strategy; failures count as 0 and are listed.
    rows = {(row.group, row.strategy): row for row in report.rows}
    assert rows["pairs", "direct"].metric == "F1" and rows["needle", "rlm"].metric == "acc"
    assert rows["aggregation", "rlm"].failed == 1 and rows["aggregation", "rlm"].score == 0.0
    assert rows["pairs", "direct"].score == pytest.approx(pairs_wrong)
    assert all(row.root_tokens_per_question for row in rows.values())
    assert rows["needle", "rlm"].usd_per_question  # priced fake models: USD is counted

    # Written: JSON with every record's provenance, Markdown, and the same table printed.
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["fake_model"] is True and data["label"] == FAKE_LABEL
    assert data["prompt_version"] == PROMPT_VERSION and data["seed"] == 7
    assert len(data["results"]) == 9 and len(data["table"]) == 9
    for record in data["results"]:
        prov = record["provenance"]
        assert prov["endpoint"] == endpoint and prov["root_model"] == FAKE_ROOT
        assert prov["sub_model"] == FAKE_SUB and prov["seed"] == 7
        assert prov["prompt_version"] == PROMPT_VERSION and prov["model_kind"] == "fake"
        assert prov["strategy"] == record["strategy"] and prov["fake_model"] is True
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert markdown.startswith(f"# rlm_dagster eval: {FAKE_LABEL}")
    assert "| pairs | direct | 0.60 | F1 | 1 | 0 | 0 |" in markdown
    table = report.table()
    assert table.splitlines()[0] == f"rlm_dagster eval: {FAKE_LABEL}"
    assert "failures: rlm: NoFinalAnswer x1, tools: Unparseable x1" in table


def test_tools_strategy_speaks_valid_tool_use_turns(
    tmp_path: Path, inprocess_repl: REPLFactory
) -> None:
    task = aggregation_task(3, 40)
    root = [
        ToolUse("sql", {"query": "SELECT count(*) AS n FROM tickets"}),
        ToolUse(
            "llm_where", {"table": "tickets", "predicate": "about billing", "columns": ["body"]}
        ),
        ToolUse("llm_query", {"prompt": "Say yes."}),
        ToolUse("sql", {"query": "DROP TABLE tickets"}),
        f"Counted them.\nFINAL({task.truth})",
    ]
    with FakeAnthropic(root=root, sub="yes", where=lambda p, row: "hit" in row["body"]) as fake:
        report = run_suite(
            config(fake, strategies=("tools",), max_iterations=6), tasks=[task], log=quiet
        )
        roots = [r for r in fake.requests if r.kind == "root"]
        assert fake.count("where") >= 1 and fake.count("sub") == 1
    (result,) = report.results
    assert (result.status, result.score, result.turns) == ("answered", 1.0, 5)
    assert result.sub_calls == fake.count("where") + 1
    assert len(roots) == 5 and not fake.rejections
    assert {t["name"] for t in roots[0].body["tools"]} == {"sql", "llm_query", "llm_where"}
    messages = roots[-1].body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 4 + ["user"]
    for asked, answered in zip(messages[1::2], messages[2::2], strict=True):
        uses = [b for b in asked["content"] if b["type"] == "tool_use"]
        results = [b for b in answered["content"] if b["type"] == "tool_result"]
        assert uses and [r["tool_use_id"] for r in results] == [u["id"] for u in uses]
        assert answered["content"][: len(results)] == results  # results come first
    refused = messages[8]["content"][0]
    assert refused["is_error"] is True and "SQLPolicyError" in refused["content"]
    where_result = messages[4]["content"][0]["content"]
    assert where_result.startswith("table ") and "[llm_where:" in where_result


def test_tools_strategy_without_an_answer_is_a_failure() -> None:
    task = needle_task(2, 20)
    endless = ToolUse("sql", {"query": "SELECT count(*) AS n FROM notes"})
    with FakeAnthropic(root=lambda request: endless) as fake:
        report = run_suite(config(fake, strategies=("tools",)), tasks=[task], log=quiet)
        assert fake.count("root") == 3  # two turns, then the last one asking for the answer
    (result,) = report.results
    assert (result.status, result.error_type, result.score) == ("failed", "NoFinalAnswer", 0.0)
    assert result.root_tokens > 0 and result.turns == 3


def test_tools_strategy_refuses_a_root_that_thinks() -> None:
    """The client does not keep thinking blocks to send back with tool results, so a
    thinking root cannot run the tool loop: said before anything is paid."""

    def lm(model: str, thinking: str) -> LM:
        return LM(
            api_key="k", root_model=model, sub_model="claude-haiku-5-5", root_thinking=thinking
        )

    assert check_tools_supported(lm("claude-sonnet-5-5", "off")) is None
    assert "use --root-thinking off" in str(check_tools_supported(lm("claude-sonnet-5-5", "auto")))
    assert "cannot turn thinking off" in str(check_tools_supported(lm("claude-opus-5-5", "off")))
    task = needle_task(2, 20)
    with harness_fake([task], root_model="claude-opus-5-5") as fake:
        with pytest.raises(Exception, match="leave tools out"):
            run_suite(config(fake, root_model="claude-opus-5-5"), tasks=[task], log=quiet)
        assert not fake.requests


def test_direct_strategy_states_the_truncation(tmp_path: Path) -> None:
    task = aggregation_task(5, 400)
    small_window = {**FAKE_PROFILES[FAKE_ROOT], "context_window": 8_000}
    with harness_fake([task]) as fake:
        report = run_suite(
            config(
                fake,
                tmp_path / "out",
                strategies=("direct",),
                model_profiles={**FAKE_PROFILES, FAKE_ROOT: small_window},
            ),
            tasks=[task],
            log=quiet,
        )
        prompt = fake.requests[-1].last_user_text
    (result,) = report.results
    assert result.truncation is not None
    shown = result.truncation["tickets"]
    assert 0 < shown["shown"] < shown["total"] == 400
    assert result.truncation["customers"]["shown"] == result.truncation["customers"]["total"]
    assert f"table tickets shows the first {shown['shown']:,} of its 400 rows" in prompt
    assert "truncated to fit the model's context window (8,000 tokens)" in prompt
    assert prompt.count("\n") < 400  # the cut is real
    assert result.score == 0.0  # the fake answers wrong when its data was cut
    assert "direct: the data was truncated to the context window in 1 of 1" in report.table()
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["results"][0]["truncation"]["tickets"] == shown


def test_budgets_cap_each_question_and_stop_the_suite(tmp_path: Path) -> None:
    tasks = [needle_task(seed, 30 + seed) for seed in range(6)]  # sizes tell them apart
    # $30 per million tokens in: one direct prompt (about 1K tokens) costs about $0.03.
    dear = {
        FAKE_ROOT: {"input_usd_per_mtok": 30.0, "output_usd_per_mtok": 1.0},
        FAKE_SUB: FAKE_PROFILES[FAKE_SUB],
    }
    cap, budget = 0.1, 0.2
    with harness_fake(tasks) as fake:
        report = run_suite(
            config(
                fake,
                tmp_path / "out",
                strategies=("direct",),
                model_profiles=dear,
                max_cost_usd=cap,
                budget_usd=budget,
            ),
            tasks=tasks,
            log=quiet,
        )
        requests = fake.count("root")
    started = [r for r in report.results if r.status != "skipped"]
    skipped = [r for r in report.results if r.status == "skipped"]
    assert started and skipped and len(started) + len(skipped) == 6
    assert all(r.status == "answered" for r in started)
    assert requests == len(started)  # nothing was sent for a skipped question
    assert report.paid_usd <= budget
    # Stopped exactly when one more question's cap no longer fit in what was left.
    assert budget - report.paid_usd < cap <= budget - (report.paid_usd - started[-1].paid_usd)
    assert all(r.error_type == "SuiteBudget" for r in skipped)
    rows = {(row.group, row.strategy): row for row in report.rows}
    assert rows["needle", "direct"].skipped == len(skipped)
    assert "STOPPED BY THE SUITE BUDGET" in report.table()
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["stopped_by_budget"] and saved["budget_usd"] == budget

    # A question whose one call could pass its own cap is refused before it is sent, and
    # counts as a failure.
    with harness_fake(tasks[:1]) as fake:
        capped = run_suite(
            config(fake, strategies=("direct",), model_profiles=dear, max_cost_usd=0.001),
            tasks=tasks[:1],
            log=quiet,
        )
        assert fake.count("root") == 0
    (result,) = capped.results
    assert (result.status, result.error_type) == ("failed", "BudgetExceeded")


def test_rerun_replays_from_the_cache_and_pays_only_for_what_is_missing(
    tmp_path: Path, inprocess_repl: REPLFactory
) -> None:
    tasks = small_tasks()
    out = tmp_path / "out"
    with harness_fake(tasks) as fake:
        first = run_suite(config(fake, out), tasks=tasks[:2], repl=inprocess_repl, log=quiet)
        sent = len(fake.requests)
        # "A crash" after two questions: the re-run of the whole suite pays for the third.
        second = run_suite(config(fake, out), tasks=tasks, repl=inprocess_repl, log=quiet)
        resent = len(fake.requests) - sent
        third = run_suite(config(fake, out), tasks=tasks, repl=inprocess_repl, log=quiet)
        assert len(fake.requests) - sent == resent  # the third run sent nothing
    assert sent > 0 and first.paid_usd > 0
    replayed = [r for r in second.results if r.task_id != "pairs-1"]
    assert all(r.calls and r.cache_hits == r.calls and r.paid_usd == 0 for r in replayed)
    fresh = [r for r in second.results if r.task_id == "pairs-1"]
    assert resent == sum(r.calls for r in fresh) and all(r.cache_hits == 0 for r in fresh)
    assert third.paid_usd == 0 and all(r.cache_hits == r.calls for r in third.results)
    # Replayed answers score and cost (at list price) as they did.
    assert [(r.score, r.cost_usd) for r in third.results] == [
        (r.score, r.cost_usd) for r in second.results
    ]


def test_a_cache_filled_from_another_endpoint_is_refused(tmp_path: Path) -> None:
    task = needle_task(1, 20)
    out = tmp_path / "out"
    with harness_fake([task]) as fake:
        run_suite(config(fake, out, strategies=("direct",)), tasks=[task], log=quiet)
    with (
        harness_fake([task]) as other,
        pytest.raises(Exception, match=r"holds answers from .* not "),
    ):
        run_suite(config(other, out, strategies=("direct",)), tasks=[task], log=quiet)


def test_report_of_a_real_endpoint_is_not_labelled_fake() -> None:
    report = Report(provenance={"label": "claude-x (root) + claude-y (sub) at https://api"})
    assert FAKE_LABEL not in report.table() and not report.is_fake


# -- the CLI and the Dagster job ------------------------------------------------------------


def test_cli_prints_one_table_and_recognises_the_fake(tmp_path: Path) -> None:
    tasks = build_suite("small", seed=4, families=["needle", "pairs"])
    with harness_fake(tasks) as fake:
        env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "rlm_dagster.eval",
                "--base-url",
                fake.base_url,
                "--root-model",
                FAKE_ROOT,
                "--sub-model",
                FAKE_SUB,
                "--tasks",
                "needle,pairs",
                "--strategies",
                "direct,tools",
                "--seed",
                "4",
                "--out",
                str(tmp_path / "out"),
                "--model-profiles",
                json.dumps(FAKE_PROFILES),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    # No --fake flag: the endpoint was recognised as the fake by what it answers.
    assert done.stdout.splitlines()[0] == f"rlm_dagster eval: {FAKE_LABEL}"
    assert done.stdout.count("family ") == 1  # one table
    assert re.search(r"^pairs\s+tools\s+1\.00\s+F1\s+1\s+0\s+0", done.stdout, re.M)
    assert "[4/4] pairs-1 tools" in done.stderr  # progress on stderr, not in the table
    assert (tmp_path / "out" / "results.md").is_file()
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["fake_model"] is True and saved["seed"] == 4


def test_cli_fake_flag_and_key_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code = main(
        ["--fake", "--tasks", "needle", "--strategies", "direct", "--out", str(tmp_path / "o")]
    )
    printed = capsys.readouterr()
    assert code == 0 and printed.out.startswith(f"rlm_dagster eval: {FAKE_LABEL}")
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    code = main(["--base-url", "https://api.example.com", "--out", str(tmp_path / "p")])
    assert code == 2 and "set ANTHROPIC_API_KEY" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()  # refused before anything ran


def test_the_readme_commands_parse() -> None:
    """The README's eval commands use options the CLI has."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Evaluating on your data") :]
    section = section[: section.index("\n## ", 1)]
    commands = re.findall(
        r"^python -m rlm_dagster\.eval (.*?)(?:  #.*)?$", section.replace("\\\n", " "), re.M
    )
    assert len(commands) == 3
    for command in commands:
        args = parser().parse_args(shlex.split(command))
        assert args.out and args.strategies


def test_dagster_definitions_validate() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster",
            "definitions",
            "validate",
            "-m",
            "rlm_dagster.eval.definitions",
        ],
        cwd=REPO,
        env={**os.environ, "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Validation successful for code location rlm_dagster.eval.definitions" in (
        done.stdout + done.stderr
    )


def test_dagster_asset_materializes_the_table_with_checks(tmp_path: Path) -> None:
    run_config = {
        "ops": {
            "eval_results": {
                "config": {
                    "fake": True,
                    "tasks": ["needle", "pairs"],
                    "strategies": ["direct"],
                    "out": str(tmp_path / "out"),
                    "score_floor": 0.5,
                }
            }
        }
    }
    result = dg.materialize([eval_results], run_config=run_config)
    assert result.success
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["no_failures"].passed and checks["score_floor"].passed
    assert not checks["real_model"].passed  # a fake's numbers are never a quality result
    assert checks["real_model"].severity == dg.AssetCheckSeverity.WARN
    (materialization,) = result.asset_materializations_for_node("eval_results")
    meta = materialization.metadata
    assert meta["eval/label"].value == FAKE_LABEL
    assert FAKE_LABEL in str(meta["eval/table"].value)
    assert meta["eval/needle@500/direct/score"].value == 1.0

    run_config["ops"]["eval_results"]["config"]["score_floor"] = 1.01
    low = dg.materialize([eval_results], run_config=run_config, raise_on_error=False)
    checks = {c.check_name: c for c in low.get_asset_check_evaluations()}
    assert not checks["score_floor"].passed and checks["no_failures"].passed


# -- the opt-in live lane -------------------------------------------------------------------


LIVE_URL = os.environ.get("RLM_LIVE_BASE_URL", "")
LIVE_MODEL = os.environ.get("RLM_LIVE_MODEL", "local-model")


@pytest.mark.live_server
@pytest.mark.skipif(
    not LIVE_URL,
    reason="no live model server: set RLM_LIVE_BASE_URL (see docs/local_model_server.md)",
)
def test_live_server_runs_one_small_suite(tmp_path: Path) -> None:
    """One small suite on a real local server, labelled as a local model's run. A tiny model
    is expected to score badly; the run must end with every question scored or failed."""
    profile = json.loads(
        os.environ.get(
            "RLM_LIVE_PROFILE",
            '{"tools": true, "max_output_tokens": 1024, "context_window": 8192, '
            '"input_usd_per_mtok": 0, "output_usd_per_mtok": 0}',
        )
    )
    live = SuiteConfig(
        base_url=LIVE_URL,
        root_model=LIVE_MODEL,
        sub_model=LIVE_MODEL,
        families=("needle", "aggregation"),
        max_iterations=3,
        max_concurrency=2,
        request_timeout_s=300.0,
        model_profiles={LIVE_MODEL: profile},
        out=tmp_path / "out",
    )
    tasks = [needle_task(0, 60), aggregation_task(0, 60)]
    report = run_suite(live, tasks=tasks, log=print)
    print("\n" + report.table())
    assert report.provenance["model_kind"] == "local"
    assert report.table().splitlines()[0].startswith(f"rlm_dagster eval: LOCAL MODEL {LIVE_MODEL}")
    assert len(report.results) == 6
    assert all(r.status in ("answered", "failed") for r in report.results)
    assert all(r.error for r in report.results if r.status == "failed")
