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
    """Base class of every rlm_dagster error."""


class ConfigError(RLMError):
    """A definition or resource is configured wrongly (caught before any call is paid)."""


class OutputSchemaError(ConfigError):
    """The ``output=`` schema of an RLM asset is malformed."""


class MissingAPIKey(ConfigError):
    """No Anthropic API key is configured while the demo model is switched off."""


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


class ModelError(RLMError):
    """A model call failed after retries (auth, bad request, overload, timeout...)."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class ProviderAuthError(ModelError):
    """The endpoint refused the credentials or the key may not use the model (401/403)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class ModelNotFound(ModelError):
    """The model id, or the endpoint itself, does not exist (404)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class ModelBadRequest(ModelError):
    """The endpoint rejected the request's shape or size (400/413/422)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class ProviderUnavailable(ModelError):
    """The provider kept failing (429/529/5xx, refused or reset connections, timeouts) after
    retries. Retryable: the orchestrator's retry policy re-runs later, and every call that
    already succeeded replays from the cache."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True)


class ModelRefused(ModelError):
    """The model stopped with ``stop_reason: "refusal"`` (its safety policy declined the
    request). Retrying the same request gets the same answer, so it is never retryable."""

    def __init__(self, message: str, *, category: str | None = None) -> None:
        super().__init__(message, retryable=False)
        self.category = category


class CacheError(RLMError):
    """The call cache / ledger at ``cache_path`` cannot be opened, read or written."""

    retryable = False


class WarehouseBusy(RLMError):
    """Another process holds the DuckDB file's write lock. Retryable: it is released when that
    writer finishes."""

    retryable = True


class BudgetExceeded(RLMError):
    """A host-enforced limit (sub-calls, tokens, USD, wall time, depth) was reached."""

    def __init__(self, message: str, *, limit: str = "", partial: Any = None) -> None:
        super().__init__(message)
        self.limit = limit
        self.partial = partial


class NoFinalAnswer(RLMError):
    """The root model never produced a final answer within ``max_iterations``."""

    def __init__(self, message: str, *, trajectory: Any = None) -> None:
        super().__init__(message)
        self.trajectory = trajectory
