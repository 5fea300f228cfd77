"""The REPL: a worker process that runs model code, and the host's handle on it."""

from rlm_dagster.repl.host import CellResult, Worker

__all__ = ["CellResult", "Worker"]
