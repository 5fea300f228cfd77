"""The results: one record per question and strategy, one table row per family and strategy.

    >>> report = Report(provenance={"label": FAKE_LABEL, "model_kind": "fake"})
    >>> report.results.append(Result(task_id="needle-1", family="needle", group="needle",
    ...     strategy="rlm", kind="integer", status="answered", score=1.0))
    >>> print(report.table().splitlines()[0])
    rlm_dagster eval: FAKE MODEL — harness check, not a quality result

Written as ``results.json`` (every record, with the provenance: endpoint, models, strategy,
seed, prompt versions, whether the model was a fake) and ``results.md`` (the table and its
notes); printed as the same table.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FAKE_LABEL = "FAKE MODEL — harness check, not a quality result"
STATUSES = ("answered", "failed", "skipped")


@dataclass
class Result:
    """One question answered (or not) by one strategy.

    ``status``: ``answered`` (``score`` holds 0..1: accuracy, or F1 for set answers),
    ``failed`` (no usable answer: an error, a limit, or a reply that holds no answer of the
    asked form; ``error`` says which; scored as 0 in the table, and counted as a failure),
    or ``skipped`` (not started: the suite budget ran out; not scored).
    """

    task_id: str
    family: str
    group: str
    strategy: str
    kind: str
    status: str
    score: float | None = None
    question: str = ""
    answer: str = ""  # the reply's answer part, clipped
    predicted: Any = None
    truth: Any = None
    error: str = ""
    error_type: str = ""
    cost_usd: float | None = 0.0  # at list price, replays included (None: price unknown)
    paid_usd: float = 0.0  # what this invocation paid (cache replays are free)
    root_tokens: int = 0
    sub_calls: int = 0
    calls: int = 0
    cache_hits: int = 0
    turns: int = 0
    wall_s: float = 0.0
    rows: int = 0
    truncation: dict[str, dict[str, int]] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    """One line of the table: a task group (family, or a scale step) and a strategy."""

    group: str
    strategy: str
    metric: str
    questions: int
    answered: int
    failed: int
    skipped: int
    score: float | None  # mean over started questions, failures as 0
    usd_per_question: float | None
    root_tokens_per_question: float | None
    sub_calls_per_question: float | None
    wall_s_per_question: float | None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(results: Iterable[Result]) -> list[Row]:
    """The table's rows, in the order groups and strategies first appear."""
    grouped: dict[tuple[str, str], list[Result]] = {}
    for result in results:
        grouped.setdefault((result.group, result.strategy), []).append(result)
    rows = []
    for (group, strategy), items in grouped.items():
        started = [r for r in items if r.status != "skipped"]
        costs = [r.cost_usd for r in started]
        kinds = {r.kind for r in items}
        metric = (
            "F1"
            if kinds <= {"set", "pairs"}
            else "acc"
            if not kinds & {"set", "pairs"}
            else "acc/F1"
        )
        rows.append(
            Row(
                group=group,
                strategy=strategy,
                metric=metric,
                questions=len(items),
                answered=sum(r.status == "answered" for r in items),
                failed=sum(r.status == "failed" for r in items),
                skipped=len(items) - len(started),
                score=_mean([r.score or 0.0 for r in started]),
                usd_per_question=None
                if any(c is None for c in costs)
                else _mean([c or 0.0 for c in costs]),
                root_tokens_per_question=_mean([float(r.root_tokens) for r in started]),
                sub_calls_per_question=_mean([float(r.sub_calls) for r in started]),
                wall_s_per_question=_mean([r.wall_s for r in started]),
            )
        )
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


HEADERS = (
    "family",
    "strategy",
    "score",
    "metric",
    "n",
    "failed",
    "skipped",
    "USD/q",
    "root tok/q",
    "sub-calls/q",
    "wall s/q",
)


@dataclass
class Report:
    """A suite's results and where they came from."""

    provenance: dict[str, Any] = field(default_factory=dict)
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stopped_by_budget: str = ""  # why new questions stopped being started, if they did

    @property
    def rows(self) -> list[Row]:
        return summarize(self.results)

    @property
    def is_fake(self) -> bool:
        return bool(self.provenance.get("model_kind") == "fake")

    def cells(self) -> list[tuple[str, ...]]:
        return [
            (
                row.group,
                row.strategy,
                _fmt(row.score, ".2f"),
                row.metric,
                str(row.questions),
                str(row.failed),
                str(row.skipped),
                _fmt(row.usd_per_question, ".4f"),
                _fmt(row.root_tokens_per_question, ",.0f"),
                _fmt(row.sub_calls_per_question, ",.1f"),
                _fmt(row.wall_s_per_question, ".1f"),
            )
            for row in self.rows
        ]

    def header_lines(self) -> list[str]:
        p = self.provenance
        lines = [f"rlm_dagster eval: {p.get('label', '')}"]
        if p:
            lines.append(
                f"endpoint {p.get('endpoint')} · root {p.get('root_model')} · sub "
                f"{p.get('sub_model')} · suite {p.get('suite')} · seed {p.get('seed')} · "
                f"prompts {p.get('prompt_version')} · eval prompts {p.get('eval_prompt_version')}"
            )
        if "limits" in p:
            lim = p["limits"]
            cap = "none" if lim.get("max_cost_usd") is None else f"${lim['max_cost_usd']:.2f}"
            budget = p.get("budget_usd")
            lines.append(
                f"per question: {lim['max_iterations']} turns, {lim['max_sub_calls']:,} "
                f"sub-calls, {cap}, {lim['max_wall_time_s']:g} s · suite budget "
                + ("none" if budget is None else f"${budget:.2f}")
                + f" (paid ${self.paid_usd:.4f} now)"
            )
        return lines

    @property
    def paid_usd(self) -> float:
        return sum(r.paid_usd for r in self.results)

    def footnotes(self) -> list[str]:
        notes = [
            "score: mean accuracy (exact, or within tolerance) or F1 (set and pair answers) "
            "over the questions started; a failure (no usable answer) scores 0 and is counted "
            "under failed; skipped questions were not started and are not scored. USD/q is at "
            "list price, cache replays included.",
        ]
        if self.stopped_by_budget:
            notes.append(f"STOPPED BY THE SUITE BUDGET: {self.stopped_by_budget}")
        cut = [r for r in self.results if r.truncation]
        direct = [r for r in self.results if r.strategy == "direct" and r.status != "skipped"]
        if cut:
            worst = min(
                cut,
                key=lambda r: min(
                    n["shown"] / max(1, n["total"]) for n in (r.truncation or {}).values()
                ),
            )
            shown = "; ".join(
                f"{name}: {n['shown']:,} of {n['total']:,} rows"
                for name, n in (worst.truncation or {}).items()
                if n["shown"] < n["total"]
            )
            notes.append(
                f"direct: the data was truncated to the context window in {len(cut)} of "
                f"{len(direct)} questions, and the prompt said so (least shown, {worst.task_id}: "
                f"{shown})."
            )
        failures: dict[str, int] = {}
        for r in self.results:
            if r.status == "failed":
                failures[f"{r.strategy}: {r.error_type}"] = (
                    failures.get(f"{r.strategy}: {r.error_type}", 0) + 1
                )
        if failures:
            notes.append("failures: " + ", ".join(f"{k} x{v}" for k, v in sorted(failures.items())))
        return notes + self.notes

    def table(self) -> str:
        """The table as fixed-width text, with its header and notes."""
        cells = self.cells()
        widths = [
            max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
            for i, h in enumerate(HEADERS)
        ]

        def line(values: tuple[str, ...]) -> str:
            return "  ".join(
                v.ljust(w) if i < 2 or i == 3 else v.rjust(w)
                for i, (v, w) in enumerate(zip(values, widths, strict=True))
            ).rstrip()

        out = [*self.header_lines(), "", line(HEADERS), line(tuple("-" * w for w in widths))]
        out += [line(c) for c in cells]
        out += ["", *(f"- {n}" for n in self.footnotes())]
        return "\n".join(out)

    def markdown(self) -> str:
        """The table as Markdown, with its header and notes."""
        head = self.header_lines()
        out = [f"# {head[0]}", "", *(f"{h}  " for h in head[1:]), ""]
        out.append("| " + " | ".join(HEADERS) + " |")
        out.append(
            "|" + "|".join("---" if i < 2 or i == 3 else "---:" for i in range(len(HEADERS))) + "|"
        )
        out += ["| " + " | ".join(c) + " |" for c in self.cells()]
        out += ["", *(f"- {n}" for n in self.footnotes())]
        return "\n".join(out) + "\n"

    def as_json(self) -> dict[str, Any]:
        return {
            **self.provenance,
            "fake_model": self.is_fake,
            "stopped_by_budget": self.stopped_by_budget or None,
            "paid_usd": self.paid_usd,
            "notes": self.footnotes(),
            "table": [asdict(row) for row in self.rows],
            "results": [asdict(r) for r in self.results],
        }

    def write(self, out: Path) -> tuple[Path, Path]:
        """``results.json`` and ``results.md`` in ``out`` (made if missing)."""
        out.mkdir(parents=True, exist_ok=True)
        json_path, md_path = out / "results.json", out / "results.md"
        json_path.write_text(
            json.dumps(self.as_json(), indent=2, ensure_ascii=False, default=str) + "\n",
            encoding="utf-8",
        )
        md_path.write_text(self.markdown(), encoding="utf-8")
        return json_path, md_path
