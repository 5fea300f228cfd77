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

Layers, one folder each (see the README's Layout), bottom up:

``models/``  what each model accepts (``profiles``) and costs (``prices``), and the client
             (``client``: the anthropic SDK, retries, deadlines, adaptive concurrency)
``sql/``     the data seams (``tables``), the read-only DuckDB snapshot (``warehouse``), the
             sqlglot policy (``policy``) and the answer schema (``output``)
``semantic`` llm_where and llm_query_batched; ``cache`` the call cache, verdicts and ledger
             (a SQLite file, or PostgreSQL shared by every host: ``cache_postgres``)
``repl/``    the worker process, its sandbox, its RPC, and the in-process test double
``engine/``  the root loop (``loop``), the run's limits and metering (``budget``), ``events``
``dagster/`` the adapter: resource, asset factory, argument model, translator, component
``prompts/`` every text the models read; ``testing/`` the fake server; ``demo`` built on it
"""

from typing import TYPE_CHECKING, Any

# The public API, listed once: name -> module. Exports load on first use (PEP 562): the REPL
# worker imports rlm_dagster.repl.worker and must not pay for, or carry, Dagster, so
# `import rlm_dagster` stays cheap. tests/test_public_api.py pins this list and checks that
# the TYPE_CHECKING imports below (for type checkers only) mirror it exactly.
_EXPORTS = {
    "rlm_asset": "rlm_dagster.dagster.assets",
    "RLMAssetArgs": "rlm_dagster.dagster.definition",
    "RLMTranslator": "rlm_dagster.dagster.translator",
    "WhereResult": "rlm_dagster.dagster.resource",
    "run_metadata": "rlm_dagster.dagster.metadata",
    "Limits": "rlm_dagster.engine.budget",
    "RLMComponent": "rlm_dagster.dagster.component",
    "RLMResult": "rlm_dagster.engine.loop",
    "run_rlm": "rlm_dagster.engine.loop",
    "run": "rlm_dagster.engine.loop",
    "AnswerRejected": "rlm_dagster.errors",
    "BudgetExceeded": "rlm_dagster.errors",
    "CacheError": "rlm_dagster.errors",
    "ConfigError": "rlm_dagster.errors",
    "DemoCannotAnswer": "rlm_dagster.errors",
    "EndpointUnreachable": "rlm_dagster.errors",
    "BatchExpired": "rlm_dagster.errors",
    "BatchCanceled": "rlm_dagster.errors",
    "BatchPending": "rlm_dagster.errors",
    "CascadeTargetMissed": "rlm_dagster.errors",
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
    "LM": "rlm_dagster.models.client",
    "OutputSchema": "rlm_dagster.sql.output",
    "RLMResource": "rlm_dagster.dagster.resource",
    "Warehouse": "rlm_dagster.sql.warehouse",
}

if TYPE_CHECKING:  # what type checkers see: the same names, mirrored (and tested)
    from rlm_dagster.dagster.assets import rlm_asset
    from rlm_dagster.dagster.component import RLMComponent
    from rlm_dagster.dagster.definition import RLMAssetArgs
    from rlm_dagster.dagster.metadata import run_metadata
    from rlm_dagster.dagster.resource import RLMResource, WhereResult
    from rlm_dagster.dagster.translator import RLMTranslator
    from rlm_dagster.engine.budget import Limits
    from rlm_dagster.engine.loop import RLMResult, run, run_rlm
    from rlm_dagster.errors import (
        AnswerRejected,
        BatchCanceled,
        BatchExpired,
        BatchPending,
        BudgetExceeded,
        CacheError,
        CascadeTargetMissed,
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
    from rlm_dagster.models.client import LM
    from rlm_dagster.sql.output import OutputSchema
    from rlm_dagster.sql.warehouse import Warehouse

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
