"""Host-enforced limits of one RLM run.

    >>> limits = Limits(max_iterations=10, max_sub_calls=100, max_cost_usd=1.0)
    >>> limits.max_depth
    1

Every model call of a run is made with its :class:`Budget` as the ``meter``: the call's
upper-bound cost is reserved before it is sent (root or sub, from any thread, for the whole
call tree) and released when it ends. Code in the REPL worker has no handle on it and cannot
raise a limit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from rlm_dagster.errors import BudgetExceeded, ConfigError
from rlm_dagster.models.client import Accounting, CallRecord, Meter, ledger_row

if TYPE_CHECKING:
    from rlm_dagster.cache import CacheStore


@dataclass(frozen=True)
class Limits:
    """What one run may spend and how long it may take. ``None`` means unlimited."""

    max_iterations: int = 20
    max_depth: int = 1
    max_sub_calls: int = 5_000
    max_cost_usd: float | None = 5.0
    max_tokens: int | None = None
    max_wall_time_s: float | None = 3_600.0
    max_observation_chars: int = 20_000
    cell_timeout_s: float = 300.0
    max_sql_rows: int = 100_000
    context_window_tokens: int = 200_000  # old turns are compacted beyond 75% of this

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value!r}")
        if self.max_iterations < 1:
            raise ConfigError(f"max_iterations must be at least 1, got {self.max_iterations}")

    def as_dict(self) -> dict[str, Any]:
        """The limits with float fields as floats, so ``600`` and ``600.0`` (YAML) version
        alike."""
        floats = {f.name for f in fields(self) if "float" in str(f.type)}
        return {
            k: float(v) if k in floats and isinstance(v, int) else v
            for k, v in asdict(self).items()
        }


class _Reservation:
    """What one call in flight holds of the budget; released when the call ends."""

    def __init__(self, budget: Budget, usd: float, tokens: int) -> None:
        self._budget, self._usd, self._tokens = budget, usd, tokens
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._budget._release(self._usd, self._tokens)


class Budget:
    """One run's meter: its limits, its accounting and its ledger rows.

    It reserves each call's upper bound before the call is sent (refusing any call that
    would cross a limit) and records what the call used once it completed. A run and its
    child runs share one budget; two runs never do, even on one shared :class:`LM`.

    ``ledger`` is where the run's ledger rows go, tagged with ``tags`` (run id, asset,
    partition). Rows are written as calls complete, except ``llm_where`` batches: the
    semantic layer meters them with :meth:`holding_ledger`, takes them with
    :meth:`take_ledger` and commits them with the verdicts they paid for.
    """

    def __init__(
        self,
        limits: Limits,
        accounting: Accounting | None = None,
        *,
        ledger: CacheStore | None = None,
        tags: Mapping[str, Any] | None = None,
        replay: bool = True,
    ) -> None:
        self.limits = limits
        self.accounting = Accounting() if accounting is None else accounting
        self.ledger = ledger
        self.tags = dict(tags or {})
        # False: a fresh answer was asked for; cached calls and verdicts are not replayed
        # (what this run pays for is still cached).
        self.replay = replay
        self.started = time.monotonic()
        self._lock = threading.RLock()
        self._sub_calls_started = 0
        self._reserved_usd = 0.0
        self._reserved_tokens = 0
        self._rows: list[dict[str, Any]] = []
        self._rows_lock = threading.Lock()

    def record(self, record: CallRecord) -> None:
        """Account one completed call (a cache replay too) and write its ledger row."""
        self._record(record, hold=False)

    def holding_ledger(self) -> Meter:
        """This budget as a meter whose ledger rows wait for :meth:`take_ledger`: a caller
        that commits rows together with what they paid for (``llm_where``'s verdicts)."""
        return _HoldingMeter(self)

    def _record(self, record: CallRecord, *, hold: bool) -> None:
        self.accounting.add(record)
        if self.ledger is None:
            return
        with self._rows_lock:
            self._rows.append(ledger_row(record, self.tags))
        if not hold:
            self.flush_ledger()

    def take_ledger(self) -> list[dict[str, Any]]:
        """The ledger rows not yet written, removed (their caller commits them)."""
        with self._rows_lock:
            rows, self._rows = self._rows, []
        return rows

    def flush_ledger(self) -> None:
        """Write the ledger rows not yet written."""
        rows = self.take_ledger()
        if rows and self.ledger is not None:
            self.ledger.record(rows)

    @property
    def sub_calls_started(self) -> int:
        return self._sub_calls_started

    @property
    def sub_calls_left(self) -> int:
        return max(0, self.limits.max_sub_calls - self._sub_calls_started)

    @property
    def deadline(self) -> float | None:
        """The ``time.monotonic()`` by which the run must end (``None``: no wall limit); every
        model call and every retry is cut to it."""
        limit = self.limits.max_wall_time_s
        return None if limit is None else self.started + limit

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def reserve_sub_calls(self, n: int) -> None:
        """Refuse up front a fan-out of ``n`` sub-calls that cannot fit in the budget."""
        if n > self.sub_calls_left:
            raise BudgetExceeded(
                f"{n:,} sub-calls requested but only {self.sub_calls_left:,} of "
                f"max_sub_calls={self.limits.max_sub_calls} are left. Narrow the input "
                "(filter with sql() first) or raise max_sub_calls on the asset.",
                limit="max_sub_calls",
            )

    def check_plan(self, what: str, requests: int, est_cost_usd: float | None) -> None:
        """Refuse, before the first request, a plan whose estimate cannot fit the budget."""
        self.reserve_sub_calls(requests)
        limit = self.limits.max_cost_usd
        if limit is None or est_cost_usd is None:
            return
        left = limit - self.accounting.cost_usd
        if est_cost_usd > left:
            raise BudgetExceeded(
                f"{what} would cost about ${est_cost_usd:.4f} ({requests:,} requests) but only "
                f"${left:.4f} of max_cost_usd=${limit:.2f} is left. Narrow it (where=, columns=, "
                "limit=) or raise max_cost_usd on the asset; dry_run=True shows the plan.",
                limit="max_cost_usd",
            )

    def reserve(
        self, *, role: str, depth: int, model: str, tokens: int, usd: float | None
    ) -> _Reservation:
        """Reserve one call's upper bound (``tokens``, ``usd``) before it is sent, atomically
        for the whole call tree: spend so far plus what calls in flight reserved plus this one
        must fit every limit, or nothing is sent. Sub-calls, and child runs' root turns, count
        against ``max_sub_calls``; the root's own turns do not (it can always answer with
        what it has while money and time last)."""
        with self._lock:
            self.check()
            counted = role != "root" or depth > 0
            lim = self.limits
            if counted and self._sub_calls_started >= lim.max_sub_calls:
                raise BudgetExceeded(
                    f"max_sub_calls={lim.max_sub_calls} reached. Answer with what you have, or "
                    "raise max_sub_calls on the asset.",
                    limit="max_sub_calls",
                )
            if lim.max_cost_usd is not None and usd is not None:
                committed = self.accounting.cost_usd + self._reserved_usd
                if committed + usd > lim.max_cost_usd:
                    raise BudgetExceeded(
                        f"max_cost_usd=${lim.max_cost_usd:.4f} would be passed: a {role} call to "
                        f"{model} can cost up to ${usd:.4f} (its prompt and max_tokens) and "
                        f"${committed:.4f} is spent or reserved. Raise max_cost_usd on the "
                        "asset, or narrow the question.",
                        limit="max_cost_usd",
                    )
            if lim.max_tokens is not None:
                committed_tokens = self.accounting.usage.total_tokens + self._reserved_tokens
                if committed_tokens + tokens > lim.max_tokens:
                    raise BudgetExceeded(
                        f"max_tokens={lim.max_tokens} would be passed: a {role} call to {model} "
                        f"can use up to {tokens:,} tokens and {committed_tokens:,} are used or "
                        "reserved. Raise max_tokens on the asset.",
                        limit="max_tokens",
                    )
            if counted:
                self._sub_calls_started += 1
            self._reserved_usd += usd or 0.0
            self._reserved_tokens += tokens
            return _Reservation(self, usd or 0.0, tokens)

    def _release(self, usd: float, tokens: int) -> None:
        with self._lock:
            self._reserved_usd -= usd
            self._reserved_tokens -= tokens

    def check(self) -> None:
        """Raise :class:`BudgetExceeded` if spend, tokens or wall time are used up."""
        lim = self.limits
        spent = self.accounting.cost_usd
        if lim.max_cost_usd is not None and spent >= lim.max_cost_usd:
            raise BudgetExceeded(
                f"max_cost_usd=${lim.max_cost_usd:.4f} reached (spent ${spent:.4f}). Raise "
                "max_cost_usd on the asset or narrow the question.",
                limit="max_cost_usd",
            )
        if lim.max_tokens is not None:
            used = self.accounting.usage.total_tokens
            if used >= lim.max_tokens:
                raise BudgetExceeded(
                    f"max_tokens={lim.max_tokens} reached ({used} used). Raise max_tokens on "
                    "the asset.",
                    limit="max_tokens",
                )
        if lim.max_wall_time_s is not None and self.elapsed_s() >= lim.max_wall_time_s:
            raise BudgetExceeded(
                f"max_wall_time_s={lim.max_wall_time_s:g} reached after {self.elapsed_s():.0f} s. "
                "Raise max_wall_time_s on the asset.",
                limit="max_wall_time_s",
            )


class _HoldingMeter:
    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.replay = budget.replay

    def reserve(
        self, *, role: str, depth: int, model: str, tokens: int, usd: float | None
    ) -> _Reservation:
        return self.budget.reserve(role=role, depth=depth, model=model, tokens=tokens, usd=usd)

    def record(self, record: CallRecord) -> None:
        self.budget._record(record, hold=True)
