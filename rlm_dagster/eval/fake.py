"""A scripted fake model that is told the answers: it checks the harness, never the product.

    >>> from rlm_dagster.eval.suite import build_suite
    >>> tasks = build_suite("small", seed=0, families=["needle"])
    >>> with harness_fake(tasks) as fake:  # doctest: +SKIP
    ...     report = run_suite(SuiteConfig(base_url=fake.base_url, root_model=FAKE_ROOT,
    ...                                    sub_model=FAKE_SUB, fake=True), tasks=tasks)

It runs on :class:`~rlm_dagster.testing.FakeAnthropic` and answers each strategy in its own
form: the ``rlm`` root writes a ``repl`` block that runs ``sql()``, then ``FINAL(...)`` in
code; the ``tools`` root calls the ``sql`` tool, then answers ``FINAL(...)``; ``direct``
answers at once. What it answers comes from an :data:`AnswerPolicy` (the known answer by
default, a wrong one where the direct prompt says its data was cut), so scoring, failures,
budgets, caching and the table can be checked against numbers known in advance. Its results
are labelled ``FAKE MODEL — harness check, not a quality result`` everywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rlm_dagster.eval.runner import SuiteConfig
from rlm_dagster.eval.suite import build_suite
from rlm_dagster.eval.task import Task
from rlm_dagster.testing import FakeAnthropic, FakeReply, FakeRequest, ToolUse

FAKE_ROOT = "fake-root"
FAKE_SUB = "fake-sub"
# Prices for the fake models (a Sonnet-like root, a Haiku-like sub), so that the USD columns
# and the budgets are exercised; like every number from the fake, they are not a result.
FAKE_PROFILES: dict[str, dict[str, Any]] = {
    FAKE_ROOT: {"input_usd_per_mtok": 3.0, "output_usd_per_mtok": 15.0, "tools": True},
    FAKE_SUB: {"input_usd_per_mtok": 1.0, "output_usd_per_mtok": 5.0, "tools": True},
}
_RLM_MARK = "persistent Python REPL"
_TABLE = re.compile(r"(\w+) \((?:table, )?([\d,]+) rows\)")

#: ``(task, strategy, data_was_cut) -> answer text``, or None for a reply with no answer.
AnswerPolicy = Callable[[Task, str, bool], str | None]


def format_value(task: Task, value: Any) -> str:
    """An answer value written the way the question asks for it."""
    if task.kind == "pairs":
        return "\n".join(f"{a}-{b}" for a, b in sorted(value))
    if task.kind == "set":
        return ", ".join(str(v) for v in sorted(value))
    if task.kind == "number":
        return f"{float(value):.2f}"
    return str(value)


def wrong_value(task: Task) -> Any:
    """A plausible wrong answer: off by one, or half the set."""
    truth = task.truth
    if isinstance(truth, frozenset):
        kept = sorted(truth)[: len(truth) // 2]
        return frozenset(kept) if kept else frozenset({(1, 2)} if task.kind == "pairs" else {1})
    if task.kind == "number":
        return float(truth) + 10.0
    return int(truth) + 1


def oracle(task: Task, strategy: str, data_was_cut: bool) -> str | None:
    """The known answer; a wrong one where the direct prompt's data was truncated."""
    value = wrong_value(task) if data_was_cut else task.truth
    return format_value(task, value)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(
        str(b.get("text", "")) for b in content if isinstance(b, dict) and b.get("type") == "text"
    )


def _signature(text: str) -> tuple[int, ...]:
    return tuple(sorted(int(n.replace(",", "")) for _, n in _TABLE.findall(text)))


def harness_fake(
    tasks: Sequence[Task],
    answer: AnswerPolicy = oracle,
    *,
    root_model: str = FAKE_ROOT,
    **fake_options: Any,
) -> FakeAnthropic:
    """A :class:`FakeAnthropic` whose root answers ``tasks`` by ``answer`` (not started)."""
    by_key: dict[tuple[str, tuple[int, ...]], Task] = {}
    for task in tasks:
        rows = tuple(sorted(len(frame) for frame in task.tables.values()))
        by_key.setdefault((task.question, rows), task)

    def find(request: FakeRequest) -> tuple[Task, str, bool]:
        body = request.body
        first = _text(body["messages"][0]["content"])
        where = (
            first if not body.get("tools") and _RLM_MARK not in request.system else request.system
        )
        rows = _signature(where)
        for (question, sizes), task in by_key.items():
            if question in first and sizes == rows:
                strategy = (
                    "tools"
                    if body.get("tools")
                    else "rlm"
                    if _RLM_MARK in request.system
                    else "direct"
                )
                return task, strategy, "truncated to fit" in first
        raise LookupError(f"harness_fake: no task for {first[:200]!r}")

    def root(request: FakeRequest) -> str | FakeReply | ToolUse:
        task, strategy, cut = find(request)
        turn = sum(1 for m in request.body["messages"] if m.get("role") == "assistant")
        value = answer(task, strategy, cut)
        table = sorted(task.tables)[0]
        if strategy == "direct":
            return "I cannot tell from this data." if value is None else f"FINAL({value})"
        if strategy == "tools":
            if turn == 0:
                return ToolUse("sql", {"query": f"SELECT count(*) AS n FROM {table}"})
            return "I am still looking." if value is None else f"FINAL({value})"
        if turn == 0:
            return f"```repl\nprint(sql('SELECT count(*) AS n FROM {table}'))\n```"
        if value is None:
            return "```repl\nprint('still looking')\n```"
        return f"```repl\nFINAL({json.dumps(value)})\n```"

    return FakeAnthropic(
        root=root,
        sub="yes",
        where=lambda predicate, row: False,
        root_model=root_model,
        **fake_options,
    )


@contextlib.contextmanager
def fake_endpoint(config: SuiteConfig) -> Iterator[tuple[SuiteConfig, list[Task]]]:
    """``config``'s suite and ``config`` pointed at a started :func:`harness_fake` that
    answers it (``--fake``): the fake's models, their prices, and ``fake=True``."""
    tasks = build_suite(
        config.suite, seed=config.seed, families=config.families, data_dir=config.data_dir
    )
    with harness_fake(tasks) as fake:
        yield (
            dataclasses.replace(
                config,
                base_url=fake.base_url,
                root_model=FAKE_ROOT,
                sub_model=FAKE_SUB,
                model_profiles={**FAKE_PROFILES, **config.model_profiles},
                api_key="fake-key",
                fake=True,
            ),
            tasks,
        )
