"""Child runs' REPLs are forks of one fork server per run tree: fresh, isolated, confined.

``tests/test_repl.py`` runs its worker tests against forks too, and
``tests/security/test_sandbox_levels.py`` runs the kernel attacks in a forked child; here is
what is particular to forks: each is a fresh namespace in its own directory, a fork server
that dies is replaced, a fork cannot signal the server, and the engine uses them for
``rlm_query`` and cleans up after the run.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rlm_dagster import Limits
from rlm_dagster.engine.events import ChildStarted, Event
from rlm_dagster.engine.loop import run
from rlm_dagster.models.client import LM
from rlm_dagster.repl.forkserver import ForkedWorker, ForkServer
from rlm_dagster.repl.sandbox import WorkerLimits
from rlm_dagster.testing import FakeAnthropic, FakeRequest


@pytest.fixture(scope="module")
def server() -> Iterator[ForkServer]:
    with ForkServer(sandbox="auto") as s:
        yield s


def fork(server: ForkServer, **kwargs: Any) -> ForkedWorker:
    repl = server(
        {}, tables=lambda: [], cell_timeout_s=30.0, max_capture_chars=10_000, context=None, **kwargs
    )
    assert isinstance(repl, ForkedWorker)
    return repl


def out(repl: ForkedWorker, code: str) -> str:
    result = repl.execute(code)
    assert result.error is None, result.error
    return result.output.strip()


def test_each_fork_is_a_fresh_namespace_in_its_own_directory(server: ForkServer) -> None:
    with fork(server) as a, fork(server) as b:
        out(a, "import os, json\nsecret = 42\nopen('mine.txt', 'w').write('a')")
        assert out(b, "'secret' in globals()") == "False"
        where = [
            json.loads(
                out(r, "import os, json\nprint(json.dumps([os.getcwd(), os.environ['HOME']]))")
            )
            for r in (a, b)
        ]
        assert where[0][0] != where[1][0]
        assert all(
            cwd == home and Path(cwd).parent.name.startswith("rlm-worker-") for cwd, home in where
        )
        assert "forked from a fork server that ran no model code" in a.layers
        assert "audit hooks" in a.layers
        # nothing of the host's environment
        keys = set(json.loads(out(a, "print(json.dumps(sorted(os.environ)))")))
        assert keys <= {
            "PATH",
            "PWD",
            "HOME",
            "TMPDIR",
            "LANG",
            "LC_ALL",
            "PYTHONPATH",
            "PYTHONDONTWRITEBYTECODE",
            "PYTHONUNBUFFERED",
            "OPENBLAS_NUM_THREADS",
            "OMP_NUM_THREADS",
            "MKL_NUM_THREADS",
        }
    assert not Path(where[0][0]).exists(), "a closed fork's directory is removed"


def test_a_fork_cannot_signal_its_fork_server(server: ForkServer) -> None:
    with fork(server) as repl:
        result = repl.execute("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")
        assert result.error is not None and "SandboxViolation" in result.error, result.error
        assert not result.restarted
    with fork(server) as again:
        assert out(again, "1 + 1") == "2"


def test_a_timed_out_fork_is_replaced_by_a_fresh_fork(server: ForkServer) -> None:
    repl = server({}, tables=lambda: [], cell_timeout_s=1.0, max_capture_chars=10_000, context=None)
    with repl:
        repl.execute("kept = 1")
        result = repl.execute("while True:\n    pass")
        assert result.restarted and result.error is not None
        assert result.error.startswith("TimeoutError: the cell ran longer than 1 s")
        assert "NameError" in (repl.execute("kept").error or "")


def test_a_fork_over_its_cpu_limit_says_so() -> None:
    with ForkServer(sandbox="process", limits=WorkerLimits(cpu_seconds=1)) as limited:
        repl = limited(
            {}, tables=lambda: [], cell_timeout_s=60.0, max_capture_chars=10_000, context=None
        )
        with repl:
            result = repl.execute("while True:\n    pass")
            assert result.restarted and result.error is not None
            assert "CPU-time limit of 1 s" in result.error, result.error
            assert repl.execute("1").output == "1\n"


def test_a_fork_server_killed_from_outside_is_replaced() -> None:
    with ForkServer(sandbox="process") as own, fork(own) as first:
        out(first, "x = 1")
        assert own._proc is not None
        os.killpg(own._proc.pid, signal.SIGKILL)  # the server and every fork it made
        result = first.execute("x")
        assert result.restarted and result.error is not None
        assert result.error.startswith("WorkerDied"), result.error
        assert out(first, "'x' in globals()") == "False"


def test_children_run_in_forks_and_the_run_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def root(req: FakeRequest) -> str:
        text = json.dumps(req.body.get("messages"))
        if "PARENT" in text:
            return (
                "```repl\nr = rlm_query_batched(['child a', 'child b', 'child c'])\n"
                "FINAL(' '.join(r))\n```"
            )
        return "```repl\nimport os\nFINAL(os.getcwd().rsplit('/', 1)[-1])\n```"

    events: list[Event] = []
    with FakeAnthropic(root=root) as fake:
        lm = LM(
            api_key="test",
            base_url=fake.base_url,
            root_model=fake.root_model,
            sub_model="claude-haiku-4-5",
        )
        try:
            result = run(
                "PARENT: ask three children",
                lm=lm,
                on_event=events.append,
                limits=Limits(max_depth=2, max_iterations=3, max_cost_usd=None),
            )
        finally:
            lm.close()
    dirs = result.answer_text.split()
    assert len(dirs) == 3 and len(set(dirs)) == 3 and all(d.startswith("child-") for d in dirs)
    assert sum(isinstance(e, ChildStarted) for e in events) == 3
    children = [c for turn in result.turns for c in turn.children]
    assert len(children) == 3
    assert all("forked from a fork server" in c.sandbox for c in children), children
    assert "forked" not in result.sandbox  # the root's own REPL is a worker of its own
    assert not list(tmp_path.glob("rlm-worker-*")), "the fork server's scratch outlived the run"
