"""Running `dagster asset materialize` as a user would, from tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without an API key, with a fresh DAGSTER_HOME at ``home``."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    return {**env, "DAGSTER_HOME": str(home), **extra}


def materialize_command(defs: str | Path, select: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dagster",
        "asset",
        "materialize",
        "-f",
        str(defs),
        "--select",
        select,
    ]


def materialize_cli(
    defs: str | Path, select: str, *, cwd: Path, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`dagster asset materialize -f defs --select select`, waited for, output captured."""
    return subprocess.run(
        materialize_command(defs, select),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
