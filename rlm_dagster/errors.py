"""The one exception hierarchy of rlm_dagster.

Every error a user can meet is an :class:`RLMError` subclass whose message says what went
wrong and what to do next::

    >>> from rlm_dagster.errors import RLMError, UnknownTableError
    >>> issubclass(UnknownTableError, RLMError)
    True
"""

from __future__ import annotations

from typing import Any


class RLMError(Exception):
    """Base class of every rlm_dagster error.

    ``retryable`` (a property of the class) says whether running the same thing again later
    can succeed; the Dagster layer hands exactly those to the orchestrator's retry policy.
    Every run error also carries ``partial``: the run's result so far, when it had started.
    """

    retryable: bool = False
    partial: Any = None


class ConfigError(RLMError):
    """A definition, resource or argument is wrong (caught before any call is paid). Not a
    ``ValueError`` on purpose: pydantic (Dagster's config) would wrap one raised at definition
    load in its own ``ValidationError`` and hide the name."""


class OutputSchemaError(ConfigError):
    """The ``output=`` schema of an RLM asset is malformed."""


class MissingAPIKey(ConfigError):
    """No Anthropic API key is configured while the demo model is switched off."""


class DemoCannotAnswer(ConfigError):
    """The offline demo model (scripted, not an LLM) was asked a question it has no script
    for; it refuses instead of passing off a placeholder as an answer."""


class UnknownTableError(RLMError):
    """A table named in ``tables=`` (or in model code) does not exist."""


class QueryError(RLMError):
    """A query failed in DuckDB (bad column, type error) or returned too many rows."""


class SQLPolicyError(RLMError):
    """Model-written SQL was refused by the read-only policy.

    ``rule`` names the rule that refused it (e.g. ``"read-only"``, ``"unbound-table"``).
    """

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"[{rule}] {message}")
        self.rule = rule


class SandboxViolation(RLMError):
    """Model-written code tried something the REPL worker does not allow."""


class WorkerError(RLMError):
    """The REPL worker process died or broke the RPC protocol."""


class AnswerRejected(RLMError):
    """A final answer does not fit the asset's declared output; the model is told why and
    tries again (users meet it only through the trajectory)."""


# -- model calls -------------------------------------------------------------------------------


class ModelError(RLMError):
    """A model call failed. The leaves name what happened; ``retryable`` is theirs."""


class ProviderAuthError(ModelError):
    """The endpoint refused the credentials or the key may not use the model (401/403)."""


class ModelNotFound(ModelError):
    """The model id, or the endpoint itself, does not exist (404)."""


class ModelBadRequest(ModelError):
    """The endpoint rejected the request's shape or size (400/413/422)."""


class ModelRefused(ModelError):
    """The model stopped with ``stop_reason: "refusal"`` (its safety policy declined the
    request). Retrying the same request gets the same answer, so it is never retryable."""

    def __init__(self, message: str, *, category: str | None = None) -> None:
        super().__init__(message)
        self.category = category


class ProviderUnavailable(ModelError):
    """The provider kept failing after retries. Retryable: the orchestrator's retry policy
    re-runs later, and every call that already succeeded replays from the cache. The
    subclasses say how it failed."""

    retryable = True


class RateLimited(ProviderUnavailable):
    """The provider kept answering 429 (rate limit or quota) after retries."""


class ProviderOverloaded(ProviderUnavailable):
    """The provider kept answering 529 (overloaded) after retries."""


class ProviderServerError(ProviderUnavailable):
    """The provider kept answering 5xx after retries."""


class ProviderTimeout(ProviderUnavailable):
    """No complete reply arrived within ``request_timeout_s``, attempt after attempt."""


class EndpointUnreachable(ProviderUnavailable):
    """No connection could be made to ``base_url`` (refused, unreachable, DNS, TLS), or it
    kept being reset."""


class BatchExpired(ProviderTimeout):
    """A batch request was not processed before its batch's 24-hour expiry (not billed);
    retryable: ask it again."""


class BatchCanceled(ProviderUnavailable):
    """A batch request was canceled before it was processed (not billed); retryable."""


class CacheError(RLMError):
    """The call cache / ledger at ``cache_path`` cannot be opened, read or written."""

    retryable = False


class WarehouseBusy(RLMError):
    """Another process holds the DuckDB file's write lock. Retryable: it is released when that
    writer finishes."""

    retryable = True


class BudgetExceeded(RLMError):
    """A host-enforced limit (sub-calls, tokens, USD, wall time, depth) was reached. Not
    retryable: the same run would reach it again; raise the limit."""

    def __init__(self, message: str, *, limit: str = "", partial: Any = None) -> None:
        super().__init__(message)
        self.limit = limit
        self.partial = partial


class BatchPending(BudgetExceeded):
    """``max_wall_time_s`` passed while message batches were still processing. They stay
    recorded, so a retry of the run resumes them and pays nothing twice: retryable, unlike
    other :class:`BudgetExceeded` errors."""

    retryable = True

    def __init__(self, message: str, *, batch_ids: tuple[str, ...]) -> None:
        super().__init__(message, limit="max_wall_time_s")
        self.batch_ids = batch_ids


class CascadeTargetMissed(RLMError):
    """``llm_where(recall=...)``'s sample could not certify its quality target and the user
    chose ``on_miss="fail"``. Not retryable: the same data and seed draw the same sample."""

    def __init__(self, message: str, *, decision: Any = None) -> None:
        super().__init__(message)
        self.decision = decision


class NoFinalAnswer(RLMError):
    """The root model never produced a final answer within ``max_iterations``."""

    def __init__(self, message: str, *, trajectory: Any = None) -> None:
        super().__init__(message)
        self.trajectory = trajectory
        # the run so far, like every run error's partial (``trajectory`` kept for callers)
        self.partial = trajectory
