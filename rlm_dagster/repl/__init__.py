"""The REPL: a worker process that runs model code, and the host's handle on it.

Exports load on first use, so that the worker process (``python -m rlm_dagster.repl``) does
not import the host's side.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlm_dagster.repl.host import CellResult, Worker

__all__ = ["CellResult", "Worker"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from rlm_dagster.repl import host

        value = getattr(host, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rlm_dagster.repl' has no attribute {name!r}")
