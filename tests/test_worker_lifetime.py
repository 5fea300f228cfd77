"""A REPL worker (and a fork server with its forks) dies with its host, and the scratch a
killed host left behind is removed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from rlm_dagster.repl import Worker
from rlm_dagster.repl.sandbox import resolve_level

HOST = textwrap.dedent(
    """
    import sys, threading, time
    from rlm_dagster.repl import Worker
    from rlm_dagster.repl.forkserver import ForkServer
    if sys.argv[2] == "forked":
        # a child run's REPL, forked by a fork server started from a thread that has ended
        server = ForkServer(sandbox=sys.argv[1])
        starter = threading.Thread(target=server.warm)
        starter.start()
        starter.join()
        worker = server({}, tables=lambda: [], cell_timeout_s=600, max_capture_chars=10_000,
                        context=None)
        scratch = server._scratch.name
    else:
        worker = Worker({}, tables=lambda: [], sandbox=sys.argv[1], cell_timeout_s=600)
        scratch = worker._scratch.name
        if sys.argv[2] == "prestarted":
            # started by a thread that then ends, as a run starts its REPL
            worker.prestart()
            time.sleep(2)
    cell = worker.execute("import os\\nprint(os.getpid())")
    # the worker is now busy in a loop, not reading its channel: only the kernel can tell it
    # that its host is gone
    threading.Thread(target=worker.execute, args=("while True:\\n    pass",), daemon=True).start()
    time.sleep(0.5)
    print(cell.output.strip(), scratch, flush=True)
    time.sleep(60)
    """
)


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (its worker tree), from /proc."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, ppid in parent.items() if ppid == pid]
        found += children
        frontier += children
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    try:
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except OSError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux-only")
@pytest.mark.parametrize("kind", ["worker", "prestarted", "forked"])
@pytest.mark.parametrize("level", ["process", resolve_level("auto")])
def test_worker_dies_with_its_host_and_its_scratch_is_removed(level: str, kind: str) -> None:
    host = subprocess.Popen(
        [sys.executable, "-c", HOST, level, kind], stdout=subprocess.PIPE, text=True
    )
    try:
        assert host.stdout is not None
        line = host.stdout.readline().split()
        assert len(line) == 2, f"the host did not start its worker: {line}"
        worker_pid, scratch = int(line[0]), line[1]
        # The worker's own pid (inside bubblewrap's PID namespace it is not a host pid), and
        # every process of the host's worker tree as the host sees them.
        worker_pids = [worker_pid] if level != "namespace" else []
        worker_pids += descendants(host.pid)
        assert worker_pids, "no worker process found"
        assert Path(scratch).is_dir()
        host.send_signal(signal.SIGKILL)
        host.wait(10)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in worker_pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in worker_pids), "a worker outlived its host"
        assert Path(scratch).is_dir()  # nobody cleaned up: the host was SIGKILLed
        Worker({}, tables=lambda: [], sandbox="process").close()  # the next host sweeps it
        assert not Path(scratch).exists()
    finally:
        if host.poll() is None:
            host.kill()


def test_live_hosts_scratch_is_kept() -> None:
    mine = tempfile.mkdtemp(prefix=f"rlm-worker-{os.getpid()}-")
    try:
        Worker({}, tables=lambda: [], sandbox="process").close()
        assert Path(mine).is_dir()
    finally:
        os.rmdir(mine)
