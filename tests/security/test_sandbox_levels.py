"""What each sandbox level enforces in the kernel, below the worker's Python guard.

These programs run in the confined process *without* the audit hook (``python -c`` after
``rlm_dagster.repl.sandbox``'s first stage), as native code that got past the hook would. They
pin down the README's table: what every level stops, and what only ``landlock`` and
``namespace`` stop. Each level is skipped, with the reason, where the machine lacks it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from rlm_dagster.errors import ConfigError
from rlm_dagster.repl.host import Worker
from rlm_dagster.repl.sandbox import WorkerLimits, build_policy, resolve_level, worker_command

from .conftest import each_level

ATTACKS = """
import errno, json, os, resource, socket, sys, threading
targets = json.loads(os.environ["RLM_TEST_TARGETS"])
results = {}
def attempt(name, fn):
    try:
        fn()
        results[name] = "allowed"
    except OSError as exc:
        results[name] = errno.errorcode.get(exc.errno, str(exc.errno))
def fork():
    if os.fork() == 0:
        os._exit(0)
attempt("socket", lambda: socket.socket())
attempt("unix-socket", lambda: socket.socket(socket.AF_UNIX))
attempt("fork", fork)
attempt("exec", lambda: os.execv("/bin/true", ["true"]))
attempt("kill-host", lambda: os.kill(targets["host_pid"], 0))
attempt("kill-parent", lambda: os.kill(os.getppid(), 0))
def execveat(path):
    # the kernel ignores the descriptor when the path is absolute: stage 1's own exec
    # descriptor number must not open a way to run another program (or Python again)
    import ctypes, platform
    libc = ctypes.CDLL(None, use_errno=True)
    nr = {"x86_64": 322, "aarch64": 281}[platform.machine()]
    argv = (ctypes.c_char_p * 2)(path.encode(), None)
    envp = (ctypes.c_char_p * 1)(None)
    if libc.syscall(nr, targets["exec_fd"], path.encode(), argv, envp, 0) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
attempt("execveat-absolute", lambda: execveat("/bin/true"))
attempt("execveat-python", lambda: execveat(os.path.realpath(sys.executable)))
attempt("read-proc-cpuinfo", lambda: open("/proc/cpuinfo").read())
attempt("read-host-environ", lambda: open(f"/proc/{targets['host_pid']}/environ").read())
attempt("read-host-cmdline", lambda: open(f"/proc/{targets['host_pid']}/cmdline").read())
attempt("read-parent-environ", lambda: open(f"/proc/{os.getppid()}/environ").read())
attempt("read-home-secret", lambda: open(targets["secret"]).read())
attempt("read-warehouse", lambda: open(targets["warehouse"], "rb").read(16))
attempt("write-outside", lambda: open(targets["outside"], "w").write("x"))
attempt("write-scratch", lambda: open("ok.txt", "w").write("x"))
attempt("thread", lambda: threading.Thread(target=lambda: None).start())
attempt("chmod-warehouse", lambda: os.chmod(targets["warehouse"], 0o777))
attempt("utime-warehouse", lambda: os.utime(targets["warehouse"], (0, 0)))
attempt("chown-warehouse", lambda: os.chown(targets["warehouse"], 0, 0))
attempt("setxattr-warehouse", lambda: os.setxattr(targets["warehouse"], "user.x", b"1"))
attempt("chmod-scratch", lambda: os.chmod("ok.txt", 0o600))
attempt("prlimit-host", lambda: resource.prlimit(targets["host_pid"], resource.RLIMIT_CPU, (1, 1)))
attempt("prlimit-self", lambda: resource.prlimit(0, resource.RLIMIT_CORE, (0, 0)))
attempt("affinity-host", lambda: os.sched_setaffinity(targets["host_pid"], {0}))
attempt("renice-host", lambda: os.setpriority(os.PRIO_PROCESS, targets["host_pid"], 10))
attempt("memfd", lambda: os.memfd_create("big"))
status = open("/proc/self/status").read()
results["caps"] = status.split("CapEff:")[1].split()[0]
results["no_new_privs"] = status.split("NoNewPrivs:")[1].split()[0]
results["as"] = resource.getrlimit(resource.RLIMIT_AS)[0]
results["nofile"] = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
import ctypes as _c
results["dumpable"] = _c.CDLL(None).prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
results["hostname"] = socket.gethostname()
results["applied"] = json.loads(sys.argv[1])["applied"]
print(json.dumps(results))
"""

# The same attacks in a child of a fork server (rlm_dagster.repl.zygote), right after the
# step every forked worker takes first: the fork server's own filter allows fork and kill,
# and the child's must take both away again (its parent is the fork server).
FORKED_ATTACKS = f"""
import json, os, sys
from rlm_dagster.repl import sandbox, zygote
policy = sandbox.Policy.from_json(sys.argv[-1])
zygote._load_kernel()
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    os.dup2(w, 1)
    layers = zygote._seal_child(policy)
    sys.argv = [sys.argv[0], json.dumps({{"applied": layers}})]
    try:
        exec({ATTACKS!r})
    finally:
        sys.stdout.flush()
        os._exit(0)
os.close(w)
out = b"".join(iter(lambda: os.read(r, 65536), b""))
os.waitpid(pid, 0)
sys.stdout.write(out.decode())
"""


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("targets")
    (root / "home").mkdir()
    secret = root / "home" / "id_rsa"
    secret.write_text("PRIVATE")
    warehouse = root / "warehouse.duckdb"
    warehouse.write_bytes(b"DUCK")
    yield {
        "host_pid": os.getpid(),
        "secret": str(secret),
        "warehouse": str(warehouse),
        "outside": str(root / "written-by-worker.txt"),
        "home": str(root / "home"),
        "exec_fd": WorkerLimits().open_files,
    }


def run_attacks(
    level: str, targets: dict[str, Any], tmp_path: Path, *, forked: bool = False
) -> dict[str, Any]:
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700)
    policy = build_policy(
        level, str(scratch), WorkerLimits(memory_bytes=1024**3), home=targets["home"]
    )
    policy = dataclasses.replace(policy, zygote=forked)
    env = {"PATH": os.defpath, "RLM_TEST_TARGETS": json.dumps(targets), "LANG": "C.UTF-8"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(
        worker_command(policy, "-c", FORKED_ATTACKS if forked else ATTACKS),
        cwd=scratch,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "no report: an exec replaced the attack program"
    return dict(json.loads(done.stdout))


@pytest.mark.skipif(sys.platform != "linux", reason="the kernel layers are Linux-only")
@pytest.mark.parametrize("forked", [False, True], ids=["worker", "forked-worker"])
@pytest.mark.parametrize("level", each_level())
def test_kernel_layers_of_each_level(
    level: str, forked: bool, targets: dict[str, Any], tmp_path: Path
) -> None:
    got = run_attacks(level, targets, tmp_path, forked=forked)
    # Every level: seccomp, no_new_privs, rlimits.
    assert "seccomp" in got["applied"]
    assert "rlimits (memory, cpu, open files, file size, core" in " ".join(got["applied"])
    for attack in (
        "socket",
        "unix-socket",
        "fork",
        "exec",
        "execveat-absolute",
        "execveat-python",
        "kill-host",
        "kill-parent",
    ):
        assert got[attack] == "EPERM", (attack, got)
    assert got["write-scratch"] == "allowed"
    assert got["read-proc-cpuinfo"] == "allowed"
    assert got["thread"] == "allowed"
    # metadata, other processes' limits and scheduling, anonymous memory: refused by the
    # kernel filter at every level, as if the Python guard did not exist
    for attack in (
        "chmod-warehouse",
        "utime-warehouse",
        "chown-warehouse",
        "setxattr-warehouse",
        "chmod-scratch",
        "prlimit-host",
        "affinity-host",
        "renice-host",
        "memfd",
    ):
        assert got[attack] == "EPERM", (attack, got)
    assert got["prlimit-self"] == "allowed"
    assert got["no_new_privs"] == "1"
    assert got["as"] == 1024**3
    assert got["nofile"] == WorkerLimits().open_files
    if forked:  # a sibling fork in the same namespaces cannot open its /proc/<pid>/mem
        assert got["dumpable"] == 0, got
    if os.geteuid() == 0:
        assert got["caps"] == "0000000000000000"
    if level == "process":
        # Honest about the gap: native code at this level reads and writes what the host
        # user can (the Python guard stops Python-level attempts; see the hostile tests).
        assert got["read-home-secret"] == "allowed"
        assert got["write-outside"] == "allowed"
        Path(targets["outside"]).unlink()
        return
    for attack in (
        "read-home-secret",
        "read-warehouse",
        "write-outside",
        "read-host-environ",
        "read-parent-environ",
    ):
        assert got[attack] in ("EACCES", "ENOENT", "EPERM", "EROFS"), (attack, got)
    assert not Path(targets["outside"]).exists()
    # /proc shows the worker its own directory only
    assert got["read-host-cmdline"] in ("ENOENT", "EACCES"), got
    if level == "namespace":
        assert got["hostname"] == "rlm-worker"
        assert "namespaces (bubblewrap)" in got["applied"]
    else:
        assert any(layer.startswith("landlock") for layer in got["applied"])


# -- OS limits, through the real worker ------------------------------------------------------


def tiny_worker(level: str, limits: WorkerLimits, **kwargs: Any) -> Worker:
    frame = pd.DataFrame({"n": [1, 2, 3]})
    return Worker(
        {"sql": lambda args: None},
        tables=lambda: [{"name": "t", "columns": list(frame), "types": ["BIGINT"], "rows": 3}],
        sandbox=level,
        limits=limits,
        **kwargs,
    )


@pytest.mark.parametrize("level", each_level())
def test_cpu_time_limit_ends_the_worker_with_a_clear_error(level: str) -> None:
    with tiny_worker(level, WorkerLimits(cpu_seconds=1), cell_timeout_s=60) as worker:
        worker.execute("kept = 1")
        result = worker.execute("while True:\n    pass")
        assert result.restarted
        assert result.error is not None
        assert "CPU-time limit of 1 s" in result.error, result.error
        assert "variables you defined are lost" in result.error
        assert worker.execute("len(t)").output == "3\n"


@pytest.mark.parametrize("level", each_level())
def test_file_size_and_open_file_limits(level: str) -> None:
    limits = WorkerLimits(file_size_bytes=1024**2, open_files=64)
    with tiny_worker(level, limits) as worker:
        big = worker.execute("open('big.bin', 'wb').write(b'x' * 2 * 1024**2)")
        assert big.error is not None and "File too large" in big.error, big.error
        many = worker.execute("files = [open(f'f{i}.txt', 'w') for i in range(100)]")
        assert many.error is not None and "Too many open files" in many.error, many.error
        assert not many.restarted


@pytest.mark.skipif(sys.platform != "linux", reason="task counting reads /proc")
def test_thread_limit_counts_the_users_tasks_when_not_root(tmp_path: Path) -> None:
    # Root is exempt from RLIMIT_NPROC, so the limit is only set for other users: check the
    # plumbing in a child that believes it is uid 65534.
    code = (
        "import os, resource, sys\nos.getuid = lambda: 65534\n"
        "from rlm_dagster.repl.sandbox import WorkerLimits, _set_limits, build_policy\n"
        f"applied = _set_limits(build_policy('process', {str(tmp_path)!r}, "
        "WorkerLimits(processes=77)))\n"
        "print(applied[-1], resource.getrlimit(resource.RLIMIT_NPROC)[0])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    name, limit = done.stdout.split()[-2:]
    assert name == "tasks"
    assert int(limit) >= 77


def test_worker_loads_no_native_escape_hatches() -> None:
    with tiny_worker("process", WorkerLimits()) as worker:
        out = worker.execute(
            "import sys\n"
            "sorted(m for m in sys.modules if m.split('.')[0] in "
            "('ctypes', '_ctypes', 'pyarrow', 'duckdb', 'sqlite3', 'cffi', 'rlm_dagster'))"
        ).output
    assert "pyarrow" not in out and "_ctypes" not in out and "duckdb" not in out
    assert "rlm_dagster.repl.host" not in out and "rlm_dagster.engine.loop" not in out
    assert "'ctypes'" in out  # the empty stub pandas imports


def test_sandbox_value_is_validated() -> None:
    with pytest.raises(
        ConfigError, match=r"sandbox='bogus' is not a sandbox level\. Use one of auto"
    ):
        tiny_worker("bogus", WorkerLimits())


def test_unavailable_level_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import rlm_dagster.repl.sandbox as sandbox

    monkeypatch.setattr(
        sandbox,
        "available_levels",
        lambda: {"namespace": "bubblewrap is not installed (apt-get install bubblewrap)."},
    )
    with pytest.raises(ConfigError, match=r"apt-get install bubblewrap.*sandbox='auto'"):
        resolve_level("namespace")
    assert resolve_level("auto") == "landlock"


def test_worker_limits_are_validated() -> None:
    with pytest.raises(ConfigError, match="512 MiB"):
        WorkerLimits(memory_bytes=10)
    with pytest.raises(ConfigError, match="positive integer"):
        WorkerLimits(cpu_seconds=0)


def test_loopback_listener_sees_no_connection(targets: dict[str, Any], tmp_path: Path) -> None:
    # The same attack as the hostile suite's, below the Python guard, at the weakest level.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        got = run_attacks("process", targets, tmp_path)
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()
    assert got["socket"] == "EPERM"


def test_a_worker_that_cannot_be_confined_fails_with_its_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rlm_dagster.errors import WorkerError
    from rlm_dagster.repl import host

    monkeypatch.setattr(
        host,
        "worker_command",
        lambda policy, *args: [sys.executable, "-c", "import sys; sys.exit('landlock: EPERM')"],
    )
    worker = tiny_worker("process", WorkerLimits())
    try:
        with pytest.raises(WorkerError, match=r"(?s)did not start.*landlock: EPERM.*'process'"):
            worker.execute("1")
    finally:
        worker.close()


ORDINARY_WORK = """
import csv, json, os, pathlib, shutil, tempfile, zipfile, datetime, zoneinfo, decimal
os.mkdir('out'); os.makedirs('out/deep/er')
pathlib.Path('out/a.txt').write_text('hello')
shutil.copyfile('out/a.txt', 'out/b.txt')  # copy() also copies the mode: chmod is refused
os.rename('out/b.txt', 'out/c.txt'); os.replace('out/c.txt', 'out/d.txt'); os.remove('out/d.txt')
with tempfile.NamedTemporaryFile('w', delete=False) as f:
    f.write('t')
with zipfile.ZipFile('out/z.zip', 'w') as z:
    z.write('out/a.txt')
t.df().to_csv('out/t.csv', index=False)
back = pd.read_csv('out/t.csv')
json.dump({'n': int(back['n'].sum())}, open('out/n.json', 'w'))
walked = sorted(p for _, _, files in os.walk('out') for p in files)
shutil.rmtree('out/deep')
stamp = datetime.datetime(2024, 1, 1, tzinfo=zoneinfo.ZoneInfo('Europe/Paris')).isoformat()
print(json.load(open('out/n.json'))['n'], walked, stamp, decimal.Decimal('1.10') * 2)
"""


@pytest.mark.parametrize("level", each_level())
def test_ordinary_scratch_work_is_not_blocked(level: str) -> None:
    with tiny_worker(level, WorkerLimits()) as worker:
        worker.handlers["sql"] = lambda args: {"arrow": _arrow_of_n()}
        result = worker.execute(ORDINARY_WORK)
    assert result.error is None, result.error
    assert result.output == (
        "6 ['a.txt', 'n.json', 't.csv', 'z.zip'] 2024-01-01T00:00:00+01:00 2.20\n"
    )


def _arrow_of_n() -> str:
    import pyarrow as pa

    from rlm_dagster.repl.protocol import encode_arrow

    return encode_arrow(pa.table({"n": [1, 2, 3]}))
