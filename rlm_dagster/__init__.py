"""rlm_dagster: Recursive Language Models as Dagster assets over DuckDB tables.

    import dagster as dg
    from dagster_duckdb import DuckDBResource
    from rlm_dagster import RLMResource, rlm_asset

    churn = rlm_asset(
        name="churn_reasons",
        question="Which enterprise customers threatened to cancel in the last 90 days, and why?",
        tables=["tickets", "customers"],
        output={"customer_id": "BIGINT", "reason": "VARCHAR"},
    )
    defs = dg.Definitions(
        assets=[churn],
        resources={
            "duckdb": DuckDBResource(database="data/warehouse.duckdb"),
            "rlm": RLMResource(api_key=dg.EnvVar("ANTHROPIC_API_KEY")),
        },
    )

Layers (see ARCHITECTURE.md): ``models`` + ``prices`` (what each model accepts and costs) ->
``lm`` (Anthropic SDK, requests shaped by the model's profile, accounting) -> ``warehouse`` +
``sql_policy`` (read-only DuckDB snapshot) -> ``semantic`` (llm_where, llm_query_batched) ->
``repl`` (the worker process and its RPC) -> ``engine`` (the root loop, no Dagster) ->
``resource`` / ``assets`` / ``metadata`` (the Dagster adapter). ``testing`` holds the fake
Anthropic server for tests; ``demo`` the offline demo model built on it.
"""

from typing import TYPE_CHECKING, Any

# The public API, listed once: name -> module. Exports load on first use (PEP 562): the REPL
# worker imports rlm_dagster.repl.worker and must not pay for, or carry, Dagster, so
# `import rlm_dagster` stays cheap. tests/test_public_api.py pins this list and checks that
# the TYPE_CHECKING imports below (for type checkers only) mirror it exactly.
_EXPORTS = {
    "rlm_asset": "rlm_dagster.assets",
    "Limits": "rlm_dagster.budget",
    "RLMComponent": "rlm_dagster.component",
    "RLMResult": "rlm_dagster.engine",
    "run_rlm": "rlm_dagster.engine",
    "run": "rlm_dagster.engine",
    "AnswerRejected": "rlm_dagster.errors",
    "BudgetExceeded": "rlm_dagster.errors",
    "CacheError": "rlm_dagster.errors",
    "ConfigError": "rlm_dagster.errors",
    "DemoCannotAnswer": "rlm_dagster.errors",
    "EndpointUnreachable": "rlm_dagster.errors",
    "MissingAPIKey": "rlm_dagster.errors",
    "ModelBadRequest": "rlm_dagster.errors",
    "ModelError": "rlm_dagster.errors",
    "ModelNotFound": "rlm_dagster.errors",
    "ModelRefused": "rlm_dagster.errors",
    "NoFinalAnswer": "rlm_dagster.errors",
    "OutputSchemaError": "rlm_dagster.errors",
    "ProviderAuthError": "rlm_dagster.errors",
    "ProviderOverloaded": "rlm_dagster.errors",
    "ProviderServerError": "rlm_dagster.errors",
    "ProviderTimeout": "rlm_dagster.errors",
    "ProviderUnavailable": "rlm_dagster.errors",
    "QueryError": "rlm_dagster.errors",
    "RateLimited": "rlm_dagster.errors",
    "RLMError": "rlm_dagster.errors",
    "SandboxViolation": "rlm_dagster.errors",
    "SQLPolicyError": "rlm_dagster.errors",
    "UnknownTableError": "rlm_dagster.errors",
    "WarehouseBusy": "rlm_dagster.errors",
    "WorkerError": "rlm_dagster.errors",
    "LM": "rlm_dagster.lm",
    "OutputSchema": "rlm_dagster.output",
    "RLMResource": "rlm_dagster.resource",
    "Warehouse": "rlm_dagster.warehouse",
}

if TYPE_CHECKING:  # what type checkers see: the same names, mirrored (and tested)
    from rlm_dagster.assets import rlm_asset
    from rlm_dagster.budget import Limits
    from rlm_dagster.component import RLMComponent
    from rlm_dagster.engine import RLMResult, run, run_rlm
    from rlm_dagster.errors import (
        AnswerRejected,
        BudgetExceeded,
        CacheError,
        ConfigError,
        DemoCannotAnswer,
        EndpointUnreachable,
        MissingAPIKey,
        ModelBadRequest,
        ModelError,
        ModelNotFound,
        ModelRefused,
        NoFinalAnswer,
        OutputSchemaError,
        ProviderAuthError,
        ProviderOverloaded,
        ProviderServerError,
        ProviderTimeout,
        ProviderUnavailable,
        QueryError,
        RateLimited,
        RLMError,
        SandboxViolation,
        SQLPolicyError,
        UnknownTableError,
        WarehouseBusy,
        WorkerError,
    )
    from rlm_dagster.lm import LM
    from rlm_dagster.output import OutputSchema
    from rlm_dagster.resource import RLMResource
    from rlm_dagster.warehouse import Warehouse

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rlm_dagster' has no attribute {name!r}")


def __dir__() -> list[str]:
    # dg finds components by dir() on the entry-point module, so list the lazy exports too.
    return sorted(set(globals()) | set(_EXPORTS))
