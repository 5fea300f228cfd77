"""The `dg` route: `dg check yaml` reports a wrong RLMComponent attribute with file and line,
before anything is loaded (as Dagster's own components do)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DG = shutil.which("dg", path=os.path.dirname(sys.executable)) or shutil.which("dg")
pytestmark = pytest.mark.skipif(DG is None, reason="dagster-dg-cli is not installed")

GOOD = """\
type: rlm_dagster.RLMComponent
attributes:
  name: churn
  question: Who threatens to cancel?
  tables: [tickets]
  max_cost_usd: 2.0
"""


def project(root: Path, defs_yaml: str) -> Path:
    """A minimal dg project whose one component is ``defs_yaml``; rlm_dagster is found through
    its entry point (the project names no registry modules)."""
    (root / "pyproject.toml").write_text(
        textwrap.dedent(
            """\
            [project]
            name = "churnproj"
            version = "0.1.0"
            requires-python = ">=3.11"

            [tool.dg]
            directory_type = "project"

            [tool.dg.project]
            root_module = "churnproj"
            """
        )
    )
    package = root / "src" / "churnproj"
    (package / "defs" / "churn").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "defs" / "__init__.py").write_text("")
    (package / "defs" / "churn" / "defs.yaml").write_text(defs_yaml)
    return package / "defs" / "churn" / "defs.yaml"


def check_yaml(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "DAGSTER_HOME": str(root / "home")}
    (root / "home").mkdir(exist_ok=True)
    assert DG is not None
    return subprocess.run(
        [DG, "check", "yaml"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("change", "line", "needle"),
    [
        (("  max_cost_usd: 2.0", "  max_cost_usdd: 2.0"), 6, "'max_cost_usdd' was unexpected"),
        (("attributes:\n", "attributes:\n  questoin: typo\n"), 3, "'questoin' was unexpected"),
        (
            ("  max_cost_usd: 2.0\n", "  max_cost_usd: 2.0\nmax_iterations: 5\n"),
            7,
            "'max_iterations' was unexpected",
        ),  # misplaced: outside attributes
        (
            ("  max_cost_usd: 2.0\n", "  max_cost_usd: 2.0\n  retry_policy: {max_retry: 3}\n"),
            7,
            "attributes.retry_policy",
        ),
    ],
    ids=["misspelled", "misspelled-first", "misplaced", "nested"],
)
def test_dg_check_yaml_names_file_line_and_attribute(
    tmp_path: Path, change: tuple[str, str], line: int, needle: str
) -> None:
    path = project(tmp_path, GOOD.replace(*change))
    done = check_yaml(tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert f"{path}:{line}" in out, out
    assert needle in out, out


def test_dg_check_yaml_passes_a_good_component(tmp_path: Path) -> None:
    project(tmp_path, GOOD)
    done = check_yaml(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
