"""Host-enforced limits of one RLM run.

    >>> limits = Limits(max_iterations=10, max_sub_calls=100, max_cost_usd=1.0)
    >>> limits.max_depth
    1

The :class:`Budget` is installed as the ``before_call`` hook of the run's ``LM``, so every
request (root or sub, from any thread) is checked in the host before it is sent. Code in
the REPL worker has no handle on it and cannot raise a limit.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

from rlm_dagster.errors import BudgetExceeded, ConfigError
from rlm_dagster.lm import Accounting


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


class Budget:
    """Counts sub-calls as they start and refuses any call that would cross a limit."""

    def __init__(self, limits: Limits, accounting: Accounting) -> None:
        self.limits = limits
        self.accounting = accounting
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._sub_calls_started = 0

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

    def before_call(self, role: str) -> None:
        self.check()
        if role == "root":
            return
        with self._lock:
            if self._sub_calls_started >= self.limits.max_sub_calls:
                raise BudgetExceeded(
                    f"max_sub_calls={self.limits.max_sub_calls} reached. Answer with what you "
                    "have, or raise max_sub_calls on the asset.",
                    limit="max_sub_calls",
                )
            self._sub_calls_started += 1

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
