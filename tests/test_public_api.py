"""The public API: one list in ``rlm_dagster/__init__.py``, pinned here.

A name added to or removed from the API must be added to or removed from ``PUBLIC`` too, on
purpose; the type checkers' mirror of the list must agree with it; and every error class is
an ``RLMError`` that users can import from the package.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import rlm_dagster
from rlm_dagster import errors

PUBLIC = frozenset(
    {
        # Dagster
        "RLMResource",
        "rlm_asset",
        "RLMComponent",
        "RLMAssetArgs",
        "RLMTranslator",
        "WhereResult",
        "run_metadata",
        # engine, without Dagster
        "run",
        "run_rlm",
        "RLMResult",
        "Limits",
        "LM",
        "Warehouse",
        "OutputSchema",
        # errors
        "RLMError",
        "ConfigError",
        "OutputSchemaError",
        "MissingAPIKey",
        "DemoCannotAnswer",
        "UnknownTableError",
        "QueryError",
        "SQLPolicyError",
        "SandboxViolation",
        "WorkerError",
        "AnswerRejected",
        "ModelError",
        "ProviderAuthError",
        "ModelNotFound",
        "ModelBadRequest",
        "ModelRefused",
        "ProviderUnavailable",
        "RateLimited",
        "ProviderOverloaded",
        "ProviderServerError",
        "ProviderTimeout",
        "EndpointUnreachable",
        "BatchExpired",
        "BatchCanceled",
        "CacheError",
        "WarehouseBusy",
        "BudgetExceeded",
        "BatchPending",
        "CascadeTargetMissed",
        "NoFinalAnswer",
    }
)
INIT = Path(rlm_dagster.__file__)


def test_the_public_api_is_pinned() -> None:
    assert set(rlm_dagster.__all__) == PUBLIC
    assert set(rlm_dagster._EXPORTS) == PUBLIC
    for name in PUBLIC:
        value = getattr(rlm_dagster, name)
        assert value.__module__ == rlm_dagster._EXPORTS[name], name
    with pytest.raises(AttributeError):
        _ = rlm_dagster.not_an_export  # type: ignore[attr-defined]


def test_the_type_checkers_mirror_lists_the_same_names_from_the_same_modules() -> None:
    tree = ast.parse(INIT.read_text())
    block = next(
        node
        for node in tree.body
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
    )
    mirrored = {
        alias.name: node.module
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert mirrored == rlm_dagster._EXPORTS


def test_every_error_is_an_exported_rlm_error_and_says_if_it_is_retryable() -> None:
    classes = {
        name: cls
        for name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__ == errors.__name__
    }
    assert set(classes) <= PUBLIC
    for name, cls in classes.items():
        assert issubclass(cls, errors.RLMError), name
        assert isinstance(cls.retryable, bool), name
    retryable = {name for name, cls in classes.items() if cls.retryable}
    assert retryable == {
        "ProviderUnavailable",
        "RateLimited",
        "ProviderOverloaded",
        "ProviderServerError",
        "ProviderTimeout",
        "EndpointUnreachable",
        "BatchExpired",
        "BatchCanceled",
        "BatchPending",
        "WarehouseBusy",
    }


def test_importing_the_package_does_not_import_dagster() -> None:
    code = "import sys, rlm_dagster; print('dagster' in sys.modules, 'anthropic' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.split() == ["False", "False"]


def test_the_engine_runs_without_dagster() -> None:
    """The engine, the semantic layer and the data seams never import Dagster."""
    code = (
        "import sys, rlm_dagster.engine.loop, rlm_dagster.semantic, rlm_dagster.sql.tables; "
        "print(sorted(m for m in sys.modules if m.split('.')[0].startswith('dagster')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"
