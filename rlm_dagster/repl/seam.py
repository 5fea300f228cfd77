"""The REPL seam: what the engine needs from a place that runs model code.

:class:`~rlm_dagster.repl.host.Worker` (a sandboxed process) is the implementation for model
code. Engine tests whose cells are the test's own code may use an in-process double
(:mod:`rlm_dagster.repl.inprocess`); it is never used for model code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from rlm_dagster.repl.host import CellResult
    from rlm_dagster.repl.sandbox import WorkerLimits

Handler = Callable[[dict[str, Any]], Any]
"""A host function the REPL's namespace calls (``sql``, ``llm_query``, ...): RPC arguments in,
a JSON-able reply out."""


class REPL(Protocol):
    """A persistent namespace that runs cells and calls back into the host's handlers."""

    level: str
    """The sandbox level it runs at (``namespace``, ``landlock``, ``process``, or a double's
    name)."""
    layers: list[str]
    """The confinement layers applied, for the run's metadata."""

    def execute(self, code: str, deadline: float | None = None) -> CellResult:
        """Run one cell; stop it at the cell timeout or at ``deadline`` (monotonic)."""
        ...

    def cell_time_left(self) -> float:
        """Seconds the running cell has left (host work it asks for counts)."""
        ...

    def get_var(self, name: str) -> dict[str, Any]:
        """A namespace variable in wire form (for text-level ``FINAL_VAR``)."""
        ...

    def close(self) -> None:
        """Stop it and remove what it left behind."""
        ...


class REPLFactory(Protocol):
    """Builds a :class:`REPL`; :class:`~rlm_dagster.repl.host.Worker` is one."""

    def __call__(
        self,
        handlers: Mapping[str, Handler],
        *,
        tables: Callable[[], list[dict[str, Any]]],
        cell_timeout_s: float,
        max_capture_chars: int,
        context: Any,
        sandbox: str,
        limits: WorkerLimits | None,
    ) -> REPL: ...
