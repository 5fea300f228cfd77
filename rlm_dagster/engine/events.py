"""What a run reports while it runs: typed, immutable events.

The engine and the semantic layer emit them through ``on_event``; the Dagster layer (or any
caller of :func:`rlm_dagster.run`) renders them. Each event has ``level`` (``"info"`` or
``"warning"``) and :meth:`describe`, one plain line for a log::

    >>> ChildStarted(run_id="r0.1", depth=1).describe()
    'rlm_query: starting child RLM r0.1 at depth 1'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from rlm_dagster.semantic import WhereStats


@dataclass(frozen=True)
class TurnStarted:
    """A root turn was sent: the run is waiting for the root model (said before the reply
    arrives, so the log shows what the step waits for from its first second)."""

    run_id: str
    depth: int
    iteration: int
    max_iterations: int
    model: str
    level: ClassVar[str] = "info"

    def describe(self) -> str:
        who = f"child RLM {self.run_id} (depth {self.depth}) " if self.depth else ""
        return (
            f"{who}iteration {self.iteration}/{self.max_iterations}: waiting for the root model "
            f"({self.model}) to write its next step"
        )


@dataclass(frozen=True)
class IterationDone:
    """One root turn of a run (or of a child run) finished."""

    run_id: str
    depth: int
    iteration: int
    max_iterations: int
    cells: int
    code_lines: int
    output_chars: int
    errors: int
    sub_calls: int
    cost_usd: float
    final: bool
    note: str = ""
    level: ClassVar[str] = "info"

    def describe(self) -> str:
        return (
            (f"child RLM {self.run_id} (depth {self.depth}) " if self.depth else "")
            + f"iteration {self.iteration}/{self.max_iterations}: ran {self.cells} cell(s), "
            f"{self.code_lines} lines of code, {self.output_chars:,} chars of output"
            + (f", {self.errors} error(s)" if self.errors else "")
            + f"; sub-calls so far {self.sub_calls:,}, spend so far ${self.cost_usd:.4f}"
            + ("; final answer received" if self.final else "")
            + (f" [{self.note[:200]}]" if self.note else "")
        )


@dataclass(frozen=True)
class WhereDone:
    """An ``llm_where`` call finished."""

    stats: WhereStats
    level: ClassVar[str] = "info"

    def describe(self) -> str:
        return self.stats.describe()


@dataclass(frozen=True)
class WherePlanned:
    """An ``llm_where`` call is about to send its requests (its plan, in one line)."""

    plan: str
    level: ClassVar[str] = "info"

    def describe(self) -> str:
        return f"llm_where: starting: {self.plan}"


@dataclass(frozen=True)
class WhereProgress:
    """An ``llm_where`` call is under way (at most every few seconds), or waits for another
    run that judges the same rows (``waiting``)."""

    requests_done: int = 0
    requests_total: int = 0
    matches: int = 0
    cost_usd: float = 0.0
    eta_s: float = 0.0
    concurrency: int = 0
    waiting: bool = False
    level: ClassVar[str] = "info"

    def describe(self) -> str:
        if self.waiting:
            return (
                "llm_where: another run is judging the same rows; waiting for its verdicts "
                "(from the shared cache) instead of paying twice"
            )
        done, total = self.requests_done, self.requests_total
        return (
            f"llm_where: {done:,}/{total:,} requests ({done / max(total, 1):.0%}), "
            f"{self.matches:,} rows match so far, ${self.cost_usd:.4f} spent, ETA "
            f"{self.eta_s:.0f} s, concurrency {self.concurrency}"
        )


@dataclass(frozen=True)
class WhereCalibrated:
    """``llm_where`` measured its batch size: agreement of packed verdicts with one-row
    verdicts on a sample, per candidate size, and the size chosen."""

    values: int
    agreement: Mapping[int, float]
    batch_rows: int
    target: float
    level: ClassVar[str] = "info"

    def describe(self) -> str:
        measured = ", ".join(f"{a:.0%} at {size}" for size, a in sorted(self.agreement.items()))
        return (
            f"llm_where: batch size {self.batch_rows} chosen by measurement on {self.values} "
            f"values judged alone and packed (agreement {measured}; target {self.target:.1%})"
        )


@dataclass(frozen=True)
class WhereCascaded:
    """``llm_where(recall=...)`` decided how to go on after the model judged its sample:
    cascade (the proxy decides the rest it is sure of), fallback (judge everything) or
    fail."""

    summary: str
    action: str
    level: ClassVar[str] = "info"

    def describe(self) -> str:
        return f"llm_where (cascade): {self.summary}"


@dataclass(frozen=True)
class WhereBatchProgress:
    """An ``llm_where`` call's message batches: how far they are, after each look at one."""

    batch_id: str
    status: str
    requests_done: int
    requests_total: int
    batches_open: int
    elapsed_s: float
    level: ClassVar[str] = "info"

    def describe(self) -> str:
        done, total = self.requests_done, self.requests_total
        return (
            f"llm_where (message batches): {done:,}/{total:,} requests answered "
            f"({done / max(total, 1):.0%}), {self.batches_open} batch(es) processing, "
            f"{self.elapsed_s:.0f} s; batch {self.batch_id} is {self.status}. Batches finish "
            "within 24 h, most within an hour; a retried run resumes them, paying nothing twice"
        )


@dataclass(frozen=True)
class ChildStarted:
    """``rlm_query`` started a child run."""

    run_id: str
    depth: int
    level: ClassVar[str] = "info"

    def describe(self) -> str:
        return f"rlm_query: starting child RLM {self.run_id} at depth {self.depth}"


@dataclass(frozen=True)
class RunWarning:
    """Something the user should know about the run (e.g. a model on the conservative
    profile)."""

    message: str
    level: ClassVar[str] = "warning"

    def describe(self) -> str:
        return self.message


Event = (
    TurnStarted
    | IterationDone
    | WherePlanned
    | WhereDone
    | WhereProgress
    | WhereBatchProgress
    | WhereCalibrated
    | WhereCascaded
    | ChildStarted
    | RunWarning
)
"""Every event a run emits."""
