"""How far the REPL worker is isolated from the host: sandbox levels, OS limits, confinement.

    >>> from rlm_dagster.repl.sandbox import resolve_level
    >>> resolve_level("process")
    'process'
    >>> resolve_level("auto") in ("namespace", "landlock", "process")
    True

Model-written code runs in a worker process. Every level starts it with an empty environment
in a private scratch directory, under OS resource limits, with Python audit hooks that refuse
files, sockets, processes and native code (:mod:`rlm_dagster.repl.guard`). The levels add
kernel-enforced layers on top, strongest first:

``namespace``  bubblewrap (``bwrap``) runs the worker in its own user, PID, network, IPC and
               UTS namespaces, with a read-only view of only the system and Python directories
               plus the scratch directory; plus Landlock when the kernel has it.
``landlock``   Landlock restricts the worker to reading system and Python directories and to
               writing its scratch directory, and denies TCP (Linux 5.13+; TCP needs 6.7+).
``process``    no file or network confinement by the kernel beyond the seccomp filter below.

On Linux every level also installs a seccomp filter: no sockets, no new processes, no
``exec``, no signals to other processes, no ptrace, mounts, namespaces, kernel modules, BPF
or io_uring. ``auto`` picks the strongest level the machine has; see the README's "Security
model" for what each level does and does not guarantee.

The worker starts in two stages: ``python -m rlm_dagster.repl.sandbox POLICY`` (inside bubblewrap
for ``namespace``) confines itself with ctypes, then execs the worker through a descriptor
the filter lets it exec once. The worker's first step (:func:`sealed`) stacks a second filter
that allows no exec at all, unloads ctypes, and only then imports the REPL, so the process
that runs model code can neither exec nor find ctypes loaded.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
import platform
import shutil
import signal
import site
import struct
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from rlm_dagster.errors import ConfigError

__all__ = [
    "LEVELS",
    "SANDBOX_CHOICES",
    "Policy",
    "WorkerLimits",
    "available_levels",
    "build_policy",
    "landlock_abi",
    "resolve_level",
    "worker_command",
]

LEVELS: tuple[str, ...] = ("namespace", "landlock", "process")
"""Sandbox levels, strongest first."""
SANDBOX_CHOICES: tuple[str, ...] = ("auto", *LEVELS)
"""Valid values of ``RLMResource(sandbox=...)``."""

_GIB = 1024**3
_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])  # rlm_dagster/
# Files under /etc that Python and its libraries read at run time (dynamic loader cache,
# time zone, user database); nothing else of /etc is visible to the worker.
_ETC_FILES = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/mime.types",
    "/etc/os-release",
)
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_DEVICES_READ = ("/dev/urandom", "/dev/random", "/dev/zero")
# Machine-wide procfs files runtimes read for CPU and memory sizes (no process's data).
_PROC_FILES = ("/proc/cpuinfo", "/proc/meminfo", "/proc/stat")
# Where secrets live on a typical host: never readable by model code (the audit hook's list;
# Landlock and bubblewrap do not show these at all).
_SECRET_PATHS = (
    "/root",
    "/home",
    "/etc/shadow",
    "/etc/gshadow",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/ssh",
    "/etc/ssl/private",
    "/run/secrets",
    "/var/run/secrets",
    "/var/lib/docker",
    "/proc",
    "/sys/firmware",
    "/dev",
)


@dataclass(frozen=True)
class WorkerLimits:
    """OS resource limits of one worker process (``setrlimit``), set before model code runs.

    >>> WorkerLimits(memory_bytes=2 * 1024**3).open_files
    256

    ``memory_bytes`` caps the address space (an allocation beyond it is a ``MemoryError`` in
    the cell), ``cpu_seconds`` the CPU time of one worker (it is then killed and replaced),
    ``file_size_bytes`` any file written in scratch, ``processes`` the threads a worker may
    start (seccomp allows it no new processes; the kernel does not apply this limit to root).
    """

    memory_bytes: int = 4 * _GIB
    cpu_seconds: int = 3_600
    open_files: int = 256
    file_size_bytes: int = _GIB
    processes: int = 512

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"WorkerLimits({f.name}={value!r}): use a positive integer.")
        if self.memory_bytes < 512 * 1024**2:
            raise ConfigError(
                f"WorkerLimits(memory_bytes={self.memory_bytes}) is below 512 MiB; the worker "
                "needs about 300 MiB of address space for Python and pandas alone."
            )
        if self.open_files < 64:
            raise ConfigError("WorkerLimits(open_files=...) must be at least 64.")


@dataclass(frozen=True)
class Policy:
    """Everything the worker needs to confine itself; built by the host, sent as JSON."""

    level: str
    scratch: str
    read_roots: tuple[str, ...]
    deny_roots: tuple[str, ...]
    limits: WorkerLimits = field(default_factory=WorkerLimits)
    applied: tuple[str, ...] = ()
    zygote: bool = False
    """A fork server's policy (:mod:`rlm_dagster.repl.forkserver`): stage 1's filter lets the
    process fork and signal its children, and its Landlock ruleset lets it read procfs; every
    child takes both back (:func:`seal_forked_child`) before it runs any model code."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Policy:
        data = json.loads(text)
        return cls(
            level=str(data["level"]),
            scratch=str(data["scratch"]),
            read_roots=tuple(data["read_roots"]),
            deny_roots=tuple(data["deny_roots"]),
            limits=WorkerLimits(**data["limits"]),
            applied=tuple(data.get("applied", ())),
            zygote=bool(data.get("zygote", False)),
        )


# -- choosing a level ---------------------------------------------------------------------------


def check_choice(value: str) -> str:
    """``value`` if it is a valid ``sandbox=`` choice, else a :class:`ConfigError`.

    >>> check_choice("auto")
    'auto'
    """
    if value not in SANDBOX_CHOICES:
        raise ConfigError(
            f"sandbox={value!r} is not a sandbox level. Use one of {', '.join(SANDBOX_CHOICES)} "
            "('auto' picks the strongest level this machine supports)."
        )
    return value


def resolve_level(value: str) -> str:
    """The level ``sandbox=value`` means on this machine; ``auto`` is the strongest available.

    >>> resolve_level("process")
    'process'

    Raises :class:`ConfigError` for an unknown value, or a level this machine cannot provide
    (the message says what is missing and how to install it).
    """
    check_choice(value)
    unavailable = available_levels()
    if value == "auto":
        return next(level for level in LEVELS if level not in unavailable)
    if value in unavailable:
        raise ConfigError(
            f"sandbox={value!r} is not available on this machine: {unavailable[value]} "
            "Use sandbox='auto' to run with the strongest level available."
        )
    return value


def available_levels() -> dict[str, str]:
    """Levels this machine cannot provide, each with the reason (``process`` always works).

    >>> "process" in available_levels()
    False
    """
    missing: dict[str, str] = {}
    if reason := _namespace_unavailable():
        missing["namespace"] = reason
    if not landlock_abi():
        missing["landlock"] = (
            "the kernel has no Landlock support (Linux 5.13+ with landlock in the lsm= list)."
        )
    return missing


@functools.cache
def landlock_abi() -> int:
    """The Landlock ABI version of the running kernel, 0 when Landlock is unavailable.

    >>> landlock_abi() >= 0
    True
    """
    if sys.platform != "linux":
        return 0
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        version = int(libc.syscall(_LANDLOCK_CREATE_RULESET, None, 0, _LANDLOCK_CREATE_VERSION))
    except (OSError, AttributeError):
        return 0
    return max(version, 0)


@functools.cache
def _namespace_unavailable() -> str:
    """Why the namespace level cannot run here ("" when it can): tried once per process."""
    if sys.platform != "linux":
        return "namespaces need Linux."
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)."
    with tempfile.TemporaryDirectory(prefix="rlm-probe-") as scratch:
        probe = Policy(level="namespace", scratch=scratch, read_roots=_read_roots(), deny_roots=())
        argv = [*_bwrap_prefix(bwrap, probe), sys.executable, "-s", "-B", "-c", "pass"]
        try:
            done = subprocess.run(argv, capture_output=True, timeout=30, check=False, env={})
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"bubblewrap could not start ({exc})."
    if done.returncode != 0:
        err = done.stderr.decode("utf-8", "replace").strip().splitlines()
        detail = err[-1] if err else f"exit code {done.returncode}"
        return (
            f"bubblewrap cannot create namespaces here ({detail}); unprivileged user "
            "namespaces may be disabled (sysctl kernel.unprivileged_userns_clone / "
            "user.max_user_namespaces) or blocked by the container runtime."
        )
    return ""


# -- building the worker's command ---------------------------------------------------------------


def build_policy(
    level: str, scratch: str, limits: WorkerLimits | None = None, *, home: str | None = None
) -> Policy:
    """The policy of a worker at ``level`` whose private directory is ``scratch``.

    >>> policy = build_policy("process", "/tmp/rlm-worker-x")
    >>> policy.scratch, "/root" in policy.deny_roots
    ('/tmp/rlm-worker-x', True)

    ``deny_roots`` are what the audit hook never lets model code read: the host user's home,
    the host's working directory (usually the project, with its ``.env`` and warehouse file)
    and the usual places of secrets.
    """
    if level not in LEVELS:
        raise ConfigError(f"build_policy: level must be one of {LEVELS}, got {level!r}.")
    deny = {os.path.realpath(p) for p in _SECRET_PATHS}
    deny.add(os.path.realpath(home or str(Path.home())))
    cwd = os.path.realpath(os.getcwd())
    if cwd != "/":
        deny.add(cwd)
    return Policy(
        level=level,
        scratch=os.path.realpath(scratch),
        read_roots=_read_roots(),
        deny_roots=tuple(sorted(deny)),
        limits=limits or WorkerLimits(),
    )


def worker_command(policy: Policy, *python_args: str) -> list[str]:
    """The argv that runs ``python PYTHON_ARGS... POLICY_JSON`` confined by ``policy``.

    >>> argv = worker_command(build_policy("process", "/tmp/x"), "-m", "rlm_dagster.repl")
    >>> argv[3:5], argv[-2:]
    (['-m', 'rlm_dagster.repl.sandbox'], ['-m', 'rlm_dagster.repl'])

    The first stage, ``python -m rlm_dagster.repl.sandbox POLICY_JSON PYTHON_ARGS...``, confines
    itself and then execs the second, which gets the policy (with the layers applied) as its
    first argument.
    """
    stage1 = [sys.executable, "-s", "-B", "-m", "rlm_dagster.repl.sandbox", policy.to_json()]
    stage1 += python_args
    if policy.level != "namespace":
        return stage1
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise ConfigError(
            "sandbox='namespace' needs bubblewrap (apt-get install bubblewrap); use "
            "sandbox='auto' to run with the strongest level available."
        )
    return [*_bwrap_prefix(bwrap, policy), *stage1]


def _read_roots() -> tuple[str, ...]:
    """Directories and files the worker may read: system libraries, Python, this package."""
    roots: set[str] = set()
    for p in (*_SYSTEM_DIRS, *_ETC_FILES):
        if os.path.lexists(p):
            roots.add(p)
    for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, _PACKAGE_DIR):
        roots.add(os.path.realpath(p))
    roots.update(os.path.realpath(p) for p in site.getsitepackages() if os.path.isdir(p))
    roots.add(os.path.dirname(os.path.realpath(sys.executable)))
    return tuple(sorted(roots))


def _bwrap_prefix(bwrap: str, policy: Policy) -> list[str]:
    """bubblewrap arguments: fresh namespaces, and a root holding only what the worker needs."""
    args = [
        bwrap,
        "--die-with-parent",
        "--unshare-all",
        "--unshare-user",
        "--cap-drop",
        "ALL",
        "--hostname",
        "rlm-worker",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--dir",
        "/var/tmp",
    ]
    for root in policy.read_roots:
        if os.path.islink(root) and root in _SYSTEM_DIRS:
            args += ["--symlink", os.readlink(root), root]
        elif os.path.exists(root):
            args += ["--ro-bind", root, root]
    args += ["--bind", policy.scratch, policy.scratch, "--chdir", policy.scratch, "--"]
    return args


# -- stage 1: confining the process (Linux) --------------------------------------------------------

_LANDLOCK_CREATE_RULESET = 444
_LANDLOCK_ADD_RULE = 445
_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1

_FS_EXECUTE = 1 << 0
_FS_WRITE_FILE = 1 << 1
_FS_READ_FILE = 1 << 2
_FS_READ_DIR = 1 << 3
_FS_TRUNCATE = 1 << 14
_FS_REFER = 1 << 13
_FS_FILE_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE
_FS_MAKE_DEVICES = (1 << 6) | (1 << 11)  # character and block devices
_NET_TCP = (1 << 0) | (1 << 1)  # bind, connect
_SCOPES = (1 << 0) | (1 << 1)  # abstract unix sockets, signals

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2

# seccomp: syscall numbers per architecture (x86_64, aarch64); None where it does not exist.
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_SYSCALLS: dict[str, tuple[int | None, int | None]] = {
    "socket": (41, 198),
    "socketpair": (53, 199),
    "fork": (57, None),
    "vfork": (58, None),
    "execve": (59, 221),
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "tkill": (200, 130),
    "rt_sigqueueinfo": (129, 138),
    "rt_tgsigqueueinfo": (297, 240),
    "pidfd_open": (434, 434),
    "pidfd_send_signal": (424, 424),
    "pidfd_getfd": (438, 438),
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "chroot": (161, 51),
    "unshare": (272, 97),
    "setns": (308, 268),
    "init_module": (175, 105),
    "finit_module": (313, 273),
    "delete_module": (176, 106),
    "kexec_load": (246, 104),
    "kexec_file_load": (320, 294),
    "bpf": (321, 280),
    "perf_event_open": (298, 241),
    "userfaultfd": (323, 282),
    "keyctl": (250, 219),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "mknod": (133, None),
    "mknodat": (259, 33),
    "reboot": (169, 142),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "acct": (163, 89),
    "open_tree": (428, 428),
    "move_mount": (429, 429),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "mount_setattr": (442, 442),
    "quotactl": (179, 60),
    "syslog": (103, 116),
    "iopl": (172, None),
    "ioperm": (173, None),
    # file metadata: modes, owners, times and xattrs are not the worker's to change anywhere
    # (Landlock has no right for them, so the kernel filter refuses them outright)
    "chmod": (90, None),
    "fchmod": (91, 52),
    "fchmodat": (268, 53),
    "fchmodat2": (452, 452),
    "chown": (92, None),
    "fchown": (93, 55),
    "lchown": (94, None),
    "fchownat": (260, 54),
    "utime": (132, None),
    "utimes": (235, None),
    "futimesat": (261, None),
    "utimensat": (280, 88),
    "setxattr": (188, 5),
    "lsetxattr": (189, 6),
    "fsetxattr": (190, 7),
    "removexattr": (197, 14),
    "lremovexattr": (198, 15),
    "fremovexattr": (199, 16),
    # memory outside the address-space limit, and other processes' scheduling
    "memfd_create": (319, 279),
    "memfd_secret": (447, 447),
    "setpriority": (141, 140),
    "ioprio_set": (251, 30),
    "sched_setparam": (142, 118),
    "sched_setscheduler": (144, 119),
    "sched_setattr": (314, 274),
}
# Allowed only on this process (pid 0 or its own): resource limits and CPU affinity.
_PRLIMIT64 = (302, 261)
_SCHED_SETAFFINITY = (203, 122)
_CLONE = (56, 220)
_CLONE3 = (435, 435)
_KILL = (62, 129)
_TGKILL = (234, 131)
_EXECVEAT = (322, 281)
_CLONE_THREAD = 0x00010000
_EPERM, _ENOSYS = 1, 38
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000


def _seccomp_program(arch: str, pid: int, exec_fd: int, *, zygote: bool = False) -> bytes:
    """A classic-BPF seccomp filter: allow everything except the calls listed above.

    ``clone`` is allowed only for threads (``CLONE_THREAD``), ``clone3`` answers ENOSYS so
    libc falls back to ``clone``, ``kill``/``tgkill`` only target this process,
    ``prlimit64`` and ``sched_setaffinity`` only this process, and ``execveat`` only the
    descriptor ``exec_fd`` (stage 1 execs the worker through it).

    ``zygote``: a fork server's filter, which also allows ``fork``/``clone`` and ``kill`` of
    any process it can see (its children). It runs no model code: each child stacks the
    strict filter (:func:`child_filter`) right after the fork, and filters stack with the
    strictest answer winning.
    """
    col = 0 if arch == "x86_64" else 1
    ld_nr = (0x20, 0, 0, 0)  # A = seccomp_data.nr

    def ld_arg0() -> tuple[int, int, int, int]:
        return (0x20, 0, 0, 16)  # A = low 32 bits of args[0]

    def ret(value: int) -> tuple[int, int, int, int]:
        return (0x06, 0, 0, value)

    deny = ret(_RET_ERRNO | _EPERM)
    prog: list[tuple[int, int, int, int]] = [
        (0x20, 0, 0, 4),  # A = seccomp_data.arch
        (0x15, 1, 0, _AUDIT_ARCH[arch]),  # our architecture? skip the deny-all
        deny,
        ld_nr,
    ]
    if arch == "x86_64":
        prog += [(0x35, 0, 1, 0x40000000), deny]  # x32 system calls
    for name, numbers in _SYSCALLS.items():
        nr = numbers[col]
        if nr is not None and not (zygote and name in ("fork", "vfork")):
            prog += [(0x15, 0, 1, nr), deny]
    prog += [(0x15, 0, 1, _CLONE3[col]), ret(_RET_ERRNO | _ENOSYS)]

    def only_if(nr: int, test: tuple[int, int, int, int]) -> list[tuple[int, int, int, int]]:
        # if nr: A = arg0; allow when `test` holds, else deny; otherwise fall through
        return [(0x15, 0, 4, nr), ld_arg0(), test, ret(_RET_ALLOW), deny]

    if not zygote:
        prog += only_if(_CLONE[col], (0x45, 0, 1, _CLONE_THREAD))
        prog += only_if(_KILL[col], (0x15, 0, 1, pid))
    prog += only_if(_TGKILL[col], (0x15, 0, 1, pid))
    prog += only_if(_EXECVEAT[col], (0x15, 0, 1, exec_fd))
    for nr in (_PRLIMIT64[col], _SCHED_SETAFFINITY[col]):
        # if nr: allow when arg0 (the pid) is 0 or this process, else deny
        prog += [
            (0x15, 0, 5, nr),
            ld_arg0(),
            (0x15, 1, 0, 0),
            (0x15, 0, 1, pid),
            ret(_RET_ALLOW),
            deny,
        ]
    prog.append(ret(_RET_ALLOW))
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


def _no_exec_program(arch: str) -> bytes:
    """A second filter, installed by stage 2 before any other code runs: no ``execve`` and
    no ``execveat`` at all. Stage 1's filter lets ``execveat`` through for its descriptor,
    and the kernel ignores the descriptor when the path is absolute; filters stack and the
    strictest answer wins, so after this one no exec is left."""
    col = 0 if arch == "x86_64" else 1
    deny = (0x06, 0, 0, _RET_ERRNO | _EPERM)
    prog = [
        (0x20, 0, 0, 4),  # A = seccomp_data.arch
        (0x15, 1, 0, _AUDIT_ARCH[arch]),
        deny,
        (0x20, 0, 0, 0),  # A = seccomp_data.nr
        (0x15, 0, 1, _SYSCALLS["execve"][col]),
        deny,
        (0x15, 0, 1, _EXECVEAT[col]),
        deny,
        (0x06, 0, 0, _RET_ALLOW),
    ]
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


def seal_forked_child(kernel: _Kernel | None, policy: Policy) -> list[str]:
    """In a child a fork server (``policy.zygote``) just forked, before anything else runs:
    die with the fork server, become not dumpable, stack a Landlock ruleset whose procfs is this process's own
    directory, and stack the strict seccomp filter with this process's own pid (no new
    processes, no exec, signals only to itself). Together they take back all the fork
    server's layers allowed beyond a worker's. Returns the layers the child reports."""
    applied = [layer for layer in policy.applied if layer != "seccomp"]
    if kernel is None:
        return [*applied, "forked from a fork server that ran no model code"]
    kernel.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, "parent-death signal")
    # Forks of one run share the fork server's namespaces: not dumpable, so no sibling can
    # open this one's /proc/<pid>/mem (where Landlock does not hide it already).
    kernel.prctl(_PR_SET_DUMPABLE, 0, "not dumpable")
    if any(layer.startswith("landlock") for layer in policy.applied):
        # The fork server's ruleset let it read procfs; this one allows only our own pid's.
        kernel.landlock(landlock_abi(), policy, _interpreter_paths())
    if "seccomp" in policy.applied:
        arch = platform.machine()
        # The exec descriptor is the number the open-files limit keeps free: nothing to exec.
        kernel.seccomp(_seccomp_program(arch, os.getpid(), policy.limits.open_files))
        applied.append("seccomp")
    return [*applied, "forked from a fork server that ran no model code"]


class _Kernel:
    """Thin ctypes wrappers over the system calls stage 1 needs."""

    def __init__(self) -> None:
        import ctypes

        self.ctypes = ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long
        self.libc.prctl.restype = ctypes.c_int

    def _check(self, result: int, what: str) -> int:
        if result < 0:
            errno = self.ctypes.get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")
        return result

    def prctl(self, option: int, arg: int = 0, what: str = "prctl") -> int:
        c_ulong = self.ctypes.c_ulong
        return self._check(
            self.libc.prctl(option, c_ulong(arg), c_ulong(0), c_ulong(0), c_ulong(0)), what
        )

    def drop_capabilities(self) -> None:
        ctypes = self.ctypes
        for cap in range(64):
            if self.libc.prctl(_PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) < 0:
                break  # past the last capability this kernel knows
        self.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, "clear ambient capabilities")
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, self
        data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2: all empty
        self._check(self.libc.capset(header, data), "capset")

    def seccomp(self, program: bytes) -> None:
        ctypes = self.ctypes

        class Fprog(ctypes.Structure):  # type: ignore[name-defined]
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]  # noqa: RUF012

        prog = Fprog(len(program) // 8, program)
        result = self.libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0)
        self._check(result, "seccomp")

    def landlock(
        self, abi: int, policy: Policy, interpreter: Sequence[str], proc: str | None = None
    ) -> None:
        """Restrict this process to ``policy``; ``proc`` is the procfs directory it may read
        (its own, ``/proc/PID``, by default)."""
        handled_fs = (1 << 13) - 1  # ABI 1: execute ... make_sym
        if abi >= 2:
            handled_fs |= _FS_REFER
        if abi >= 3:
            handled_fs |= _FS_TRUNCATE
        attr = [handled_fs]
        if abi >= 4:
            attr.append(_NET_TCP)
        if abi >= 6:
            attr.append(_SCOPES)
        buf = struct.pack(f"={len(attr)}Q", *attr)
        ruleset = self._check(
            self.libc.syscall(_LANDLOCK_CREATE_RULESET, buf, len(buf), 0), "landlock ruleset"
        )
        try:
            read = _FS_READ_FILE | _FS_READ_DIR
            rules: list[tuple[str, int]] = [(p, read) for p in policy.read_roots]
            # procfs: this process's own directory only (the pid survives the exec), plus
            # the machine-wide files runtimes read for CPU and memory sizes
            rules += [(proc or f"/proc/{os.getpid()}", read), ("/sys/devices/system/cpu", read)]
            rules += [(p, _FS_READ_FILE) for p in _PROC_FILES]
            rules += [(p, _FS_READ_FILE) for p in _DEVICES_READ]
            rules += [("/dev/null", _FS_READ_FILE | _FS_WRITE_FILE | (handled_fs & _FS_TRUNCATE))]
            rules += [(p, _FS_READ_FILE | _FS_EXECUTE) for p in interpreter]
            rules.append((policy.scratch, handled_fs & ~_FS_EXECUTE & ~_FS_MAKE_DEVICES))
            for path, access in rules:
                self._add_rule(ruleset, path, access & handled_fs)
            self.prctl(_PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")
            self._check(self.libc.syscall(_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock")
        finally:
            os.close(ruleset)

    def _add_rule(self, ruleset: int, path: str, access: int) -> None:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return  # a path this machine does not have
        try:
            if not os.path.isdir(path):
                access &= _FS_FILE_RIGHTS
            attr = struct.pack("=Qi", access, fd)
            self._check(
                self.libc.syscall(
                    _LANDLOCK_ADD_RULE, ruleset, _LANDLOCK_RULE_PATH_BENEATH, attr, 0
                ),
                f"landlock rule for {path}",
            )
        finally:
            os.close(fd)


def _elf_interpreter(executable: str) -> str | None:
    """The dynamic loader named in ``executable``'s PT_INTERP header (64-bit ELF only)."""
    try:
        with open(executable, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:
                return None
            (phoff,) = struct.unpack_from("<Q", head, 32)
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
            for i in range(phnum):
                f.seek(phoff + i * phentsize)
                p_type, _, p_offset, _, _, p_filesz = struct.unpack("<IIQQQQ", f.read(40))
                if p_type == 3:  # PT_INTERP
                    f.seek(p_offset)
                    return f.read(p_filesz).rstrip(b"\0").decode()
    except (OSError, struct.error, UnicodeDecodeError):
        return None
    return None


def _interpreter_paths() -> list[str]:
    """The Python executable and its ELF loader: the files the worker may execute."""
    interpreter = [os.path.realpath(sys.executable)]
    if loader := _elf_interpreter(interpreter[0]):
        interpreter.append(os.path.realpath(loader))
    return interpreter


def _set_limits(policy: Policy) -> list[str]:
    """Set the worker's rlimits (soft = hard, so they cannot be raised); the ones set."""
    import resource

    lim = policy.limits
    memory = [resource.RLIMIT_AS, getattr(resource, "RLIMIT_DATA", None)]
    settings: list[tuple[str, list[int | None], int, int]] = [
        ("memory", memory, lim.memory_bytes, lim.memory_bytes),
        ("cpu", [resource.RLIMIT_CPU], lim.cpu_seconds, lim.cpu_seconds + 5),
        ("open files", [resource.RLIMIT_NOFILE], lim.open_files, lim.open_files),
        ("file size", [resource.RLIMIT_FSIZE], lim.file_size_bytes, lim.file_size_bytes),
        ("core", [resource.RLIMIT_CORE], 0, 0),
    ]
    if sys.platform == "linux" and os.getuid() != 0:
        # The kernel counts every task (threads too) of this user in this user namespace,
        # and exempts root; allow `processes` more than there are now.
        tasks = _task_count() + lim.processes
        settings.append(("tasks", [resource.RLIMIT_NPROC], tasks, tasks))
    applied = []
    for name, candidates, soft, hard in settings:
        # The first candidate the platform accepts: macOS refuses RLIMIT_AS, for one.
        for which in candidates:
            if which is None:
                continue
            _, current = resource.getrlimit(which)
            if current != resource.RLIM_INFINITY:
                soft, hard = min(soft, current), min(hard, current)
            try:
                resource.setrlimit(which, (soft, hard))
            except (ValueError, OSError):
                continue
            applied.append(name)
            break
    return applied


def _exec_fd(policy: Policy) -> int:
    """The descriptor stage 1 execs the worker from: the first number the worker's
    open-files limit never lets it own, so the exec the seccomp filter allows is used once."""
    import resource

    fd = policy.limits.open_files
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= fd and (hard == resource.RLIM_INFINITY or hard > fd):
        resource.setrlimit(resource.RLIMIT_NOFILE, (fd + 1, hard))
    return fd


def _task_count() -> int:
    """Tasks (threads included) of this user visible in /proc."""
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            with open(f"/proc/{entry.name}/status") as f:
                count += next(
                    (int(line.split()[1]) for line in f if line.startswith("Threads:")), 1
                )
        except (OSError, ValueError):
            continue
    return count


def confine(policy: Policy) -> tuple[str, ...]:
    """Apply ``policy`` to this process: limits, capabilities, seccomp, Landlock.

    Returns the names of the layers applied. Raises :class:`OSError` when a layer the level
    requires cannot be applied.
    """
    applied: list[str] = []
    if policy.level == "namespace":
        applied.append("namespaces (bubblewrap)")
    interpreter = _interpreter_paths()
    if sys.platform == "linux":
        kernel = _Kernel()
        # The worker dies with its host (it is kept across execve); bubblewrap does the same
        # for the namespace level with --die-with-parent.
        kernel.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, "parent-death signal")
        if policy.level != "namespace" and os.getppid() == 1:
            sys.exit("rlm_dagster.repl.sandbox: the host exited before the worker started")
        applied.append("dies with its host")
        kernel.prctl(_PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")
        if os.geteuid() == 0:
            kernel.drop_capabilities()
            applied.append("no capabilities")
        abi = landlock_abi()
        if policy.level == "landlock" or (policy.level == "namespace" and abi):
            # A fork server's children are new pids: it keeps procfs readable, and each
            # child stacks a ruleset with its own directory (seal_forked_child).
            kernel.landlock(abi, policy, interpreter, "/proc" if policy.zygote else None)
            applied.append(f"landlock (ABI {abi})")
        arch = platform.machine()
        if arch in _AUDIT_ARCH:
            exec_fd = _exec_fd(policy)
            fd = os.open(interpreter[0], os.O_RDONLY | os.O_CLOEXEC)
            os.dup2(fd, exec_fd, inheritable=False)
            os.close(fd)
            try:
                program = _seccomp_program(arch, os.getpid(), exec_fd, zygote=policy.zygote)
                kernel.seccomp(program)
                applied.append("seccomp")
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise  # a kernel without seccomp filters runs without this layer
                os.close(exec_fd)
    applied.append(f"rlimits ({', '.join(_set_limits(policy))})")
    return tuple(applied)


def main(argv: Sequence[str]) -> NoReturn:
    """Stage 1: ``python -m rlm_dagster.repl.sandbox POLICY_JSON PYTHON_ARGS...``: confine, exec."""
    if len(argv) < 2:
        sys.exit("usage: python -m rlm_dagster.repl.sandbox POLICY_JSON PYTHON_ARGS...")
    policy = Policy.from_json(argv[0])
    try:
        applied = confine(policy)
    except OSError as exc:
        sys.exit(
            f"rlm_dagster.repl.sandbox: could not confine the worker at level {policy.level!r}: {exc}"
        )
    stage2 = dataclasses.replace(policy, applied=applied)
    env = dict(os.environ)
    if "seccomp" in applied:
        # Stage 2 starts in `sealed`, which closes the exec this stage needed, then runs
        # PYTHON_ARGS as `python` would.
        boot = "import sys; from rlm_dagster.repl.sandbox import sealed; sealed(sys.argv[1:])"
        args = [sys.executable, "-s", "-B", "-c", boot, *argv[1:], stage2.to_json()]
        os.execve(_exec_fd(policy), args, env)
    os.execve(sys.executable, [sys.executable, "-s", "-B", *argv[1:], stage2.to_json()], env)


def sealed(argv: Sequence[str]) -> None:
    """Stage 2's first step: install the no-exec filter, then run ``-m MODULE ARGS...`` or
    ``-c CODE ARGS...`` the way the ``python`` command line would."""
    import gc
    import runpy

    _Kernel().seccomp(_no_exec_program(platform.machine()))
    # ctypes did its one job; the worker's import guard wants it never loaded (model code
    # must not find it in sys.modules), so drop it and collect what referenced it.
    for name in [m for m in sys.modules if m.partition(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[name]
    gc.collect()
    if len(argv) >= 2 and argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif len(argv) >= 2 and argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.exit(f"rlm_dagster.repl.sandbox: stage 2 expects -m MODULE or -c CODE, not {argv[:1]}")


if __name__ == "__main__":
    main(sys.argv[1:])
