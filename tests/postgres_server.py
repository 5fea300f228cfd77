"""A throwaway PostgreSQL server on 127.0.0.1 for the tests of the shared cache.

One server per test session (initdb takes a few seconds), one database per test. The
superuser logs in without a password (trust, loopback only); the tests' user ``rlm`` needs
its password, so a wrong one is refused as it would be in production. initdb refuses to run
as root: as root the server runs as the ``postgres`` system user, in a directory given to it.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

USER = "rlm"
PASSWORD = "pw-7f3a9c-never-printed"
ADMIN = "rlm_admin"
INSTALL = "apt-get install postgresql (Debian/Ubuntu), or put initdb and pg_ctl on PATH"


def find_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian's layout, then PATH)."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    found.sort(key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """``start()`` a server on a free loopback port; ``database()`` makes an empty database
    the tests' user owns and returns its URL; ``stop()`` stops it and deletes its files."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="rlm-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.port = 0
        self._as_postgres = os.geteuid() == 0
        self._names = itertools.count(1)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        proc = subprocess.run(
            command, cwd=self.root, capture_output=True, text=True, timeout=120, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def start(self) -> PostgresServer:
        self.sockets.mkdir()
        if self._as_postgres:
            owner = pwd.getpwnam("postgres")
            for path in (self.root, self.sockets):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._run(
            "initdb", "-D", str(self.data), "-U", ADMIN, "--auth=trust", "--no-sync",
            "--encoding=UTF8", "--locale=C",
        )  # fmt: skip
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all {ADMIN} 127.0.0.1/32 trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
        )
        self.port = free_port()
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self.sockets} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip
        self.admin(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
        return self

    def admin(self, *statements: str, dbname: str = "postgres") -> list[Sequence[object]]:
        """Run ``statements`` as the superuser; the rows of the last one."""
        import psycopg

        rows: list[Sequence[object]] = []
        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=ADMIN, dbname=dbname, autocommit=True
        ) as con:
            for statement in statements:
                cursor = con.execute(statement)
                rows = list(cursor.fetchall()) if cursor.description else []
        return rows

    def database(self) -> str:
        """A new empty database owned by the tests' user: its URL, password included."""
        name = f"rlm_test_{next(self._names)}"
        self.admin(f"CREATE DATABASE {name} OWNER {USER}")
        return self.url(name)

    def url(self, dbname: str, *, password: str = PASSWORD, port: int | None = None) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{port or self.port}/{dbname}"

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
