"""The REPL worker's in-process guard: what model code may import, open, call and change.

    >>> from rlm_dagster.repl import guard
    >>> guard.prepare_imports()          # doctest: +SKIP  (worker only: before pandas loads)
    >>> guard.install(policy, (3, 4))    # doctest: +SKIP  (worker only: before model code)

:func:`prepare_imports` keeps modules that reach native code or files behind Python's back
out of the worker (``ctypes`` becomes an empty stub, ``pyarrow``, ``duckdb``, ``sqlite3``,
``cffi`` cannot be imported), so pandas loads without them. :func:`install` then adds a
PEP 578 audit hook that refuses, with a :class:`SandboxViolation` saying what to do instead:
writing files outside the scratch directory; reading the host's home, working directory,
``/proc`` of other processes and the usual places of secrets; sockets; subprocesses, ``exec``
and ``fork``; signals to other processes; changing resource limits; importing the blocked
modules or the host's own ``rlm_dagster`` modules; ``gc`` walks and rewriting functions'
code or defaults (how one would reach and patch this hook).

An audit hook is not a security boundary on its own: code that corrupts memory (numpy's
``as_strided`` on purpose, or an interpreter bug) can get past it. It gives model code clear
errors, and covers the ``process`` level; the kernel layers of :mod:`rlm_dagster.repl.sandbox`
(seccomp, Landlock, namespaces) are what hold against native code.

The hook keeps no state that model code can reach: everything it uses is bound as a default
argument when it is created (tuples, frozensets, C functions), and changing a function's
``__code__`` or ``__defaults__`` is one of the things it refuses.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import posix
import sys
import types
from collections.abc import Sequence
from typing import Any

from rlm_dagster.errors import SandboxViolation as _RLMSandboxViolation
from rlm_dagster.repl.sandbox import Policy

__all__ = ["BLOCKED_MODULES", "SandboxViolation", "install", "prepare_imports"]


class SandboxViolation(_RLMSandboxViolation, PermissionError):
    """Model code tried something the REPL worker does not allow; the message says what to
    do instead. Also a ``PermissionError``, so libraries that handle that keep working."""

    __module__ = "builtins"  # tracebacks read "SandboxViolation: ...", not a module path

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


_DATA_HINT = "The data is in the bound tables: use sql(), llm_query() and llm_where()."
BLOCKED_MODULES: dict[str, str] = {
    "ctypes": "native code is blocked in the REPL.",
    "_ctypes": "native code is blocked in the REPL.",
    "cffi": "native code is blocked in the REPL.",
    "_cffi_backend": "native code is blocked in the REPL.",
    "pyarrow": "its native file I/O would bypass the sandbox; use pandas (pd).",
    "duckdb": f"the REPL has no database handle. {_DATA_HINT}",
    "_duckdb": f"the REPL has no database handle. {_DATA_HINT}",
    "sqlite3": f"the REPL has no database handle. {_DATA_HINT}",
    "_sqlite3": f"the REPL has no database handle. {_DATA_HINT}",
    "anthropic": "the REPL has no API key and no network; use llm_query() for model calls.",
    "dagster": "the REPL runs model code only; Dagster runs in the host.",
    **dict.fromkeys(
        # Subinterpreters start without this process's audit hooks.
        ("_xxsubinterpreters", "_xxinterpchannels", "_interpreters", "_interpchannels",
         "_interpqueues"),
        "a subinterpreter would run without the sandbox's checks.",
    ),
    **dict.fromkeys(
        # CPython's test modules poke at memory and interpreter internals.
        ("_testcapi", "_testinternalcapi", "_testbuffer", "_testclinic", "_testmultiphase",
         "_testsinglephase", "_testimportmultiple", "_ctypes_test", "_xxtestfuzz"),
        "native code is blocked in the REPL.",
    ),
    **dict.fromkeys(
        # Native code that opens files, shared memory or devices without an audit event.
        ("_gdbm", "_dbm", "readline", "_posixshmem", "_multiprocessing", "spwd", "syslog",
         "nis", "ossaudiodev", "_tkinter", "_curses"),
        "it reaches files or devices behind the sandbox's back. Write scratch files with "
        "open() in the current directory.",
    ),
}  # fmt: skip
"""Modules model code cannot import, with the reason it is told."""


class _CtypesStub(types.ModuleType):
    """What ``import ctypes`` gives in the worker: pandas imports ctypes for a Windows-only
    error helper, so the import must succeed, but nothing in it is usable."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise SandboxViolation(
            f"ctypes.{name} is not available: native code is blocked in the REPL. Work with "
            "pandas and the namespace functions instead."
        )


class _ImportBlocker(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Refuses :data:`BLOCKED_MODULES` while the worker's own libraries load."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == "ctypes":
            return importlib.machinery.ModuleSpec(fullname, self)
        top = fullname.partition(".")[0]
        if top in BLOCKED_MODULES:
            raise ImportError(
                f"SandboxViolation: importing {fullname!r} is blocked: {BLOCKED_MODULES[top]}",
                name=fullname,
            )
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _CtypesStub(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the stub is empty."""


def prepare_imports() -> None:
    """Keep :data:`BLOCKED_MODULES` out of this process; call before pandas is imported."""
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED_MODULES)
    if loaded:
        raise RuntimeError(f"prepare_imports() came too late: {loaded} are already imported")
    sys.meta_path.insert(0, _ImportBlocker())


# -- the audit hook ------------------------------------------------------------------------------
#
# Every helper below takes what it uses as default arguments, never from module globals or
# builtins (which model code can rebind), and uses only C functions and str/tuple methods.

_S_IFMT, _S_IFLNK, _S_IFDIR = 0o170000, 0o120000, 0o040000
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PROCESS_EVENTS = frozenset(
    {
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
        "os.forkpty", "os.startfile", "pty.spawn", "webbrowser.open",
    }
)  # fmt: skip
_NETWORK_PREFIXES = (
    "socket.", "urllib.", "http.client.", "ftplib.", "smtplib.", "poplib.", "imaplib.",
    "nntplib.", "telnetlib.", "ssl.",
)  # fmt: skip
_INTERNALS_EVENTS = frozenset(
    {
        "gc.get_objects",
        "gc.get_referrers",
        "gc.get_referents",
        "sys.addaudithook",
        "setopencodehook",
    }
)
_LIMIT_EVENTS = frozenset({"resource.setrlimit", "resource.prlimit"})
_SIGNAL_EVENTS = frozenset({"os.killpg", "signal.pidfd_send_signal"})
_LINK_EVENTS = frozenset({"os.link", "os.symlink"})
# event -> (index of the path argument, index of its dir_fd argument or -1)
_WRITE_EVENTS: tuple[tuple[str, int, int], ...] = (
    ("os.remove", 0, 1),
    ("os.rmdir", 0, 1),
    ("os.mkdir", 0, 2),
    ("os.chmod", 0, 2),
    ("os.lchmod", 0, -1),
    ("os.chown", 0, 3),
    ("os.utime", 0, 3),
    ("os.truncate", 0, -1),
    ("os.setxattr", 0, -1),
    ("os.removexattr", 0, -1),
    ("os.chflags", 0, -1),
    ("os.lchflags", 0, -1),
    ("shutil.rmtree", 0, 1),
    ("shutil.copyfile", 1, -1),
    ("shutil.copymode", 1, -1),
    ("shutil.copystat", 1, -1),
    ("shutil.copytree", 1, -1),
    ("shutil.unpack_archive", 1, -1),
    ("os.rename", 0, 2),
    ("os.rename", 1, 3),
)
_READ_EVENTS: tuple[tuple[str, int], ...] = (
    ("os.listdir", 0),
    ("os.scandir", 0),
    ("os.getxattr", 0),
    ("os.listxattr", 0),
    ("shutil.copyfile", 0),
    ("shutil.copytree", 0),
    ("shutil.make_archive", 2),
)
_WATCHED = frozenset(
    {"open", "import", "os.kill", "object.__setattr__", "object.__delattr__"}
    | {e for e, _, _ in _WRITE_EVENTS}
    | {e for e, _ in _READ_EVENTS}
    | _PROCESS_EVENTS
    | _INTERNALS_EVENTS
    | _LIMIT_EVENTS
    | _SIGNAL_EVENTS
    | _LINK_EVENTS
)
_PROTECTED_ATTRS = frozenset({"__code__", "__defaults__", "__kwdefaults__"})
# Files never readable wherever they are: database files (the warehouse itself holds
# tables this run was not given) and common credential files.
_SECRET_SUFFIXES = (".duckdb", ".duckdb.wal", ".sqlite", ".pem", ".key")
_SECRET_NAMES = frozenset({".env", ".netrc", ".pgpass", ".git-credentials", "credentials"})
_VERBS: tuple[tuple[str, str], ...] = (
    ("open", "reading"),
    ("open for writing", "writing"),
    ("os.listdir", "listing"),
    ("os.scandir", "listing"),
    ("os.remove", "deleting"),
    ("os.rmdir", "deleting"),
    ("shutil.rmtree", "deleting"),
    ("os.rename", "renaming"),
    ("os.mkdir", "creating"),
    ("os.truncate", "truncating"),
    ("shutil.copyfile", "copying"),
    ("shutil.copytree", "copying"),
)


def _under(path: str, roots: tuple[str, ...]) -> bool:
    for root in roots:  # noqa: SIM110 - any() is a builtin, which model code can rebind
        if root == "/" or path == root or path.startswith(root + "/"):
            return True
    return False


def _resolve(
    path: str,
    _getcwd: Any = posix.getcwd,
    _lstat: Any = posix.lstat,
    _readlink: Any = posix.readlink,
    _oserror: Any = OSError,
    _s_ifmt: int = _S_IFMT,
    _s_iflnk: int = _S_IFLNK,
) -> str:
    """``path`` made absolute with its symlinks resolved (missing parts are kept as written)."""
    if not path.startswith("/"):
        path = _getcwd() + "/" + path
    todo = path.split("/")[::-1]
    parts: list[str] = []
    hops = 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
        current = "/" + "/".join(parts)
        try:
            mode = _lstat(current).st_mode
        except _oserror:
            continue
        if mode & _s_ifmt == _s_iflnk:
            hops += 1
            if hops > 40:
                return current
            target = _readlink(current)
            parts.pop()
            if target.startswith("/"):
                parts.clear()
            todo.extend(target.split("/")[::-1])
    return "/" + "/".join(parts)


def _as_path(
    value: Any,
    _str: Any = str,
    _bytes: Any = bytes,
    _int: Any = int,
    _type: Any = type,
    _fspath: Any = posix.fspath,
    _path_types: tuple[type, ...] = (),
) -> str | int | None:
    """A path argument as ``str`` (or ``int`` for a file descriptor); None if unusable."""
    kind = _type(value)
    if kind is _str:
        return value
    if kind is _bytes:
        return value.decode("utf-8", "surrogateescape")
    if kind is _int:
        return value
    if kind in _path_types:
        return _fspath(value)
    return None  # a custom os.PathLike could answer differently to open() itself


def _fd_path(fd: int, _readlink: Any = posix.readlink, _oserror: Any = OSError) -> str | None:
    try:
        return _readlink(f"/proc/self/fd/{fd}")
    except _oserror:
        return None


def _make_hook(policy: Policy, protected_fds: tuple[int, ...]) -> Any:
    import pathlib

    pid = os.getpid()
    scratch = os.path.realpath(policy.scratch)
    writable = (scratch, "/dev/null")
    readable = (
        scratch,
        *policy.read_roots,
        f"/proc/{pid}",
        "/proc/cpuinfo",
        "/proc/meminfo",
        "/proc/stat",
        "/proc/loadavg",
        "/proc/uptime",
        "/proc/version",
        "/proc/sys/kernel",
        "/proc/sys/vm",
        "/sys/devices/system/cpu",
        "/dev/null",
        "/dev/zero",
        "/dev/full",
        "/dev/urandom",
        "/dev/random",
    )
    loaded_own = frozenset(m for m in sys.modules if m.partition(".")[0] == "rlm_dagster")
    blocked = tuple(sorted(BLOCKED_MODULES.items()))
    path_types = (pathlib.PosixPath, pathlib.PurePosixPath)

    def violation(message: str, _exc: Any = SandboxViolation) -> BaseException:
        return _exc(message)

    def shown(
        event: str,
        path: Any,
        _repr: Any = repr,
        _len: Any = len,
        _verbs: tuple[tuple[str, str], ...] = _VERBS,
    ) -> str:
        """``"reading '/etc/shadow'"``: the attempted action, for messages."""
        text: str = _repr(path)
        text = text if _len(text) <= 200 else text[:197] + "..."
        for name, verb in _verbs:
            if name == event:
                return f"{verb} {text}"
        return f"{event} on {text}"

    def check_write(
        raw: Any,
        dir_fd: Any,
        event: str,
        _as_path: Any = _as_path,
        _resolve: Any = _resolve,
        _under: Any = _under,
        _fd_path: Any = _fd_path,
        _writable: tuple[str, ...] = writable,
        _int: Any = int,
        _type: Any = type,
        _path_types: tuple[type, ...] = path_types,
        _violation: Any = violation,
        _shown: Any = shown,
    ) -> None:
        path = _as_path(raw, _path_types=_path_types)
        if _type(path) is _int:
            return  # an open descriptor was checked when it was opened
        if path is not None and dir_fd is not None and not path.startswith("/"):
            if _type(dir_fd) is not _int:
                path = None
            elif dir_fd >= 0:  # audit events report "no dir_fd" as -1
                base = _fd_path(dir_fd)
                path = None if base is None else base + "/" + path
        if path is None or not _under(_resolve(path), _writable):
            raise _violation(
                f"{_shown(event, raw)} is not allowed: model code may only write inside its "
                "scratch directory (the current directory). Keep results in variables, or "
                "return them with FINAL()."
            )

    def check_read(
        raw: Any,
        event: str,
        _as_path: Any = _as_path,
        _resolve: Any = _resolve,
        _under: Any = _under,
        _fd_path: Any = _fd_path,
        _readable: tuple[str, ...] = readable,
        _denied: tuple[str, ...] = policy.deny_roots,
        _int: Any = int,
        _type: Any = type,
        _path_types: tuple[type, ...] = path_types,
        _violation: Any = violation,
        _shown: Any = shown,
        _hint: str = _DATA_HINT,
        _secret_suffixes: tuple[str, ...] = _SECRET_SUFFIXES,
        _secret_names: frozenset[str] = _SECRET_NAMES,
    ) -> str:
        path = _as_path("." if raw is None else raw, _path_types=_path_types)
        if _type(path) is _int:
            return ""  # an open descriptor was checked when it was opened
        real = None if path is None else _resolve(path)
        secret_file = real is not None and (
            real.endswith(_secret_suffixes) or real.rpartition("/")[2] in _secret_names
        )
        # An allowlist: the read roots (system libraries, Python, this package), scratch and
        # the worker's own /proc; a secret-looking file only in scratch, where the REPL put it.
        if real is None or not _under(real, _readable) or (secret_file and _under(real, _denied)):
            raise _violation(
                f"{_shown(event, raw)} is not allowed: the REPL reads only its scratch "
                "directory and the Python installation; the host's home and project "
                "directories, other processes and secrets are off limits to the REPL. " + _hint
            )
        return real

    def audit(
        event: str,
        args: tuple[Any, ...],
        _watched: frozenset[str] = _WATCHED,
        _check_write: Any = check_write,
        _check_read: Any = check_read,
        _violation: Any = violation,
        _process: frozenset[str] = _PROCESS_EVENTS,
        _network: tuple[str, ...] = _NETWORK_PREFIXES,
        _internals: frozenset[str] = _INTERNALS_EVENTS,
        _limits: frozenset[str] = _LIMIT_EVENTS,
        _signals: frozenset[str] = _SIGNAL_EVENTS,
        _links: frozenset[str] = _LINK_EVENTS,
        _writes: tuple[tuple[str, int, int], ...] = _WRITE_EVENTS,
        _reads: tuple[tuple[str, int], ...] = _READ_EVENTS,
        _protected_attrs: frozenset[str] = _PROTECTED_ATTRS,
        _protected_fds: tuple[int, ...] = protected_fds,
        _write_flags: int = _WRITE_FLAGS,
        _lstat: Any = posix.stat,
        _scratch: str = scratch,
        _under: Any = _under,
        _pid: int = pid,
        _blocked: tuple[tuple[str, str], ...] = blocked,
        _loaded_own: frozenset[str] = loaded_own,
        _type: Any = type,
        _int: Any = int,
        _str: Any = str,
        _isinstance: Any = isinstance,
        _getattr: Any = getattr,
        _len: Any = len,
        _oserror: Any = OSError,
        _import_error: Any = ImportError,
        _protected_modules: tuple[str, ...] = ("rlm_dagster", "pathlib"),
        _s_ifmt: int = _S_IFMT,
        _s_ifdir: int = _S_IFDIR,
        _resolve: Any = _resolve,
        _code_roots: tuple[str, ...] = tuple(policy.read_roots),
    ) -> None:
        if event.startswith(_network):
            raise _violation(
                f"network access is blocked in the REPL ({event}). Use llm_query() for model "
                "calls and sql() for data."
            )
        if event.startswith("ctypes."):
            raise _violation(f"native code is blocked in the REPL ({event}).")
        if event not in _watched:
            return
        if event == "open":
            raw, _, flags = args
            if _type(raw) is _int and raw in _protected_fds:
                raise _violation(
                    "opening the REPL's RPC channel is not allowed. Call the namespace "
                    "functions (sql, llm_query, ...) instead."
                )
            if _type(flags) is _int and flags & _write_flags:
                _check_write(raw, None, "open for writing")
                return
            real = _check_read(raw, "open")
            if real and not _under(real, (_scratch,)):
                try:
                    is_dir = _lstat(real).st_mode & _s_ifmt == _s_ifdir
                except _oserror:
                    is_dir = False
                if is_dir:  # a directory fd would let dir_fd= calls escape these checks
                    raise _violation(
                        f"opening the directory {real!r} as a file descriptor is not allowed "
                        "outside the scratch directory; use os.listdir() or os.scandir()."
                    )
            return
        if event == "import":
            name = args[0] if _type(args[0]) is _str else ""
            filename = args[1] if _type(args[1]) is _str else ""
            stem = filename.rpartition("/")[2].partition(".")[0]
            for blocked_name, reason in _blocked:
                if blocked_name in (name.partition(".")[0], name.rpartition(".")[2], stem):
                    raise _import_error(
                        f"SandboxViolation: importing {name!r} is blocked: {reason}"
                    )
            if name.partition(".")[0] == "rlm_dagster" and name not in _loaded_own:
                raise _import_error(
                    f"SandboxViolation: importing {name!r} is blocked: it is the host's code, "
                    "which runs in another process; the REPL reaches it only through sql(), "
                    "llm_query(), llm_where() and FINAL(), and limits are enforced there."
                )
            if filename and not _under(_resolve(filename), _code_roots):
                # Only extension modules report a file here: native code written to scratch.
                raise _import_error(
                    f"SandboxViolation: loading the native module {filename!r} is blocked: "
                    "only the Python installation's own extension modules can be loaded."
                )
            return
        if event in _process:
            raise _violation(
                f"starting processes is blocked in the REPL ({event}). Do the work in Python "
                "in this cell; use llm_query_batched() for concurrent model calls."
            )
        if event in _internals:
            raise _violation(
                f"{event} is blocked in the REPL: it reaches the interpreter's internals."
            )
        if event in _limits:
            raise _violation("resource limits are fixed by the host and cannot be changed.")
        if event == "os.kill":
            if args[0] != _pid:
                raise _violation("sending signals to other processes is blocked in the REPL.")
            return
        if event in _signals:
            raise _violation("sending signals to other processes is blocked in the REPL.")
        if event in _links:
            raise _violation(
                f"{event} is blocked in the REPL: links could point outside the scratch "
                "directory. Copy the file instead."
            )
        if event in ("object.__setattr__", "object.__delattr__"):
            target, attr = args[0], args[1]
            module = _getattr(target, "__module__", "") if _isinstance(target, _type) else ""
            if attr in _protected_attrs or (
                _type(module) is _str and module.startswith(_protected_modules)
            ):
                raise _violation(
                    f"changing {attr!r} of {target!r} is blocked in the REPL: it could "
                    "disable the sandbox's checks."
                )
            return
        for name, index, dir_index in _writes:
            if event == name and index < _len(args):
                _check_write(args[index], args[dir_index] if dir_index >= 0 else None, event)
        for name, index in _reads:
            if event == name and index < _len(args):
                _check_read(args[index], event)

    return audit


def install(policy: Policy, protected_fds: tuple[int, ...]) -> None:
    """Arm the guard for model code: call once, after the worker's own imports.

    ``protected_fds`` are the RPC channel's descriptors, which model code may not reopen.
    """
    import _posixsubprocess

    # fork_exec starts processes without an audit event. seccomp refuses the fork on Linux;
    # elsewhere, replacing every reference to it is what stops subprocesses in C.
    fork_exec = getattr(_posixsubprocess, "fork_exec", None)
    if fork_exec is not None:
        for module in list(sys.modules.values()):
            for name, value in list(getattr(module, "__dict__", {}).items()):
                if value is fork_exec:
                    setattr(module, name, _no_fork_exec)
    sys.addaudithook(_make_hook(policy, protected_fds))


def _no_fork_exec(*args: Any, **kwargs: Any) -> Any:
    raise SandboxViolation(
        "starting processes is blocked in the REPL (_posixsubprocess.fork_exec). Do the work "
        "in Python in this cell."
    )
