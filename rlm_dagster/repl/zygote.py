"""The fork server: a confined process that forks fresh REPL workers on request.

Started by :class:`rlm_dagster.repl.forkserver.ForkServer` as
``python -m rlm_dagster.repl.zygote CONTROL_FD POLICY_JSON`` through the same two sandbox
stages as a worker (:mod:`rlm_dagster.repl.sandbox`, with ``policy.zygote`` set, so stage 1's
seccomp filter lets it fork). It imports what a worker imports (pandas, the REPL) once, runs
no model code, and answers the host on ``CONTROL_FD``, a ``SOCK_SEQPACKET`` socket, one JSON
message per packet:

``{"op": "spawn", "id": N, "dir": PATH}`` with two descriptors (the new worker's ends of its
    two pipes) -> fork; the child becomes a worker on those pipes -> ``{"op": "spawned"}``
``{"op": "reap", "id": N}`` -> SIGKILL the child if it still runs, wait for it ->
    ``{"op": "reaped", "returncode": RC}`` (``None`` for an id it does not know)

The child, before anything else runs in it: closes the control socket and every descriptor
but its pipes, stacks the strict seccomp filter with its own pid
(:func:`~rlm_dagster.repl.sandbox.seal_forked_child`: no processes, no exec, signals only to
itself), drops the ctypes handle that filter needed, moves into its own directory, then
serves its pipes exactly as a worker started from scratch does (:func:`worker.main
<rlm_dagster.repl.worker.main>`: audit hooks, channel). Its interpreter state is a copy of
one that never ran model code, at a few milliseconds per worker instead of a new process's
start (two interpreters and pandas: about 0.4 s of CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import signal
import socket
import sys
import traceback
from typing import Any

from rlm_dagster.repl import sandbox

# The ctypes handle each child needs once, for its Landlock ruleset and seccomp filter; a
# child drops it and collects it before model code runs.
_KERNEL: list[Any] = []
_CTYPES = ("ctypes", "_ctypes")


def _load_kernel() -> None:
    """Load the real ctypes for :data:`_KERNEL`, past the import guard if one is installed,
    and leave ``sys.modules`` and the guard as they were (ctypes there is the guard's stub)."""
    if sys.platform != "linux":
        return
    saved = {m: sys.modules.pop(m) for m in list(sys.modules) if m.partition(".")[0] in _CTYPES}
    blockers = [f for f in sys.meta_path if type(f).__name__ == "_ImportBlocker"]
    for finder in blockers:
        sys.meta_path.remove(finder)
    try:
        _KERNEL.append(sandbox._Kernel())
    finally:
        for name in [m for m in sys.modules if m.partition(".")[0] in _CTYPES]:
            del sys.modules[name]
        sys.modules.update(saved)
        sys.meta_path[:0] = blockers


def main(argv: list[str]) -> None:
    """Serve spawn and reap requests until the host closes the control socket."""
    control = socket.socket(fileno=int(argv[0]))
    policy = sandbox.Policy.from_json(argv[1])
    from rlm_dagster.repl import guard

    guard.prepare_imports()
    from rlm_dagster.repl import worker  # noqa: F401 - pandas and the REPL, loaded once

    # Everything loaded so far is frozen: a child's collection (which must run, to free the
    # ctypes objects loaded next) then neither walks nor copies the shared heap.
    gc.collect()
    gc.freeze()
    _load_kernel()
    children: dict[int, int] = {}
    _send(control, {"op": "ready", "pid": os.getpid()})
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(control, 65536, 2)
        except OSError:
            break
        if not data:
            break  # the host closed the socket
        try:
            message = json.loads(data)
            op, child_id = message["op"], int(message["id"])
        except (ValueError, KeyError, TypeError):
            _close(fds)
            _send(control, {"op": "error", "message": "malformed request"})
            continue
        if op == "spawn" and len(fds) == 2:
            pid = os.fork()
            if pid == 0:
                _become_worker(control, policy, fds, str(message["dir"]))
            _close(fds)
            children[child_id] = pid
            _send(control, {"op": "spawned", "id": child_id})
        elif op == "reap":
            _close(fds)
            _send(
                control, {"op": "reaped", "id": child_id, "returncode": _reap(children, child_id)}
            )
        else:
            _close(fds)
            _send(control, {"op": "error", "message": f"unknown op {str(op)[:40]!r}"})
    for pid in children.values():
        _kill(pid)


def _reap(children: dict[int, int], child_id: int) -> int | None:
    pid = children.pop(child_id, None)
    if pid is None:
        return None
    _kill(pid)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _send(control: socket.socket, message: dict[str, Any]) -> None:
    control.sendall(json.dumps(message).encode())


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _seal_child(policy: sandbox.Policy) -> list[str]:
    """A forked child's first step: the strict filter, then the ctypes handle is dropped and
    collected. Returns the confinement layers the child reports."""
    kernel = _KERNEL.pop() if _KERNEL else None
    layers = sandbox.seal_forked_child(kernel, policy)
    del kernel
    gc.collect()  # the ctypes objects go with the handle
    return layers


def _become_worker(
    control: socket.socket, policy: sandbox.Policy, fds: list[int], directory: str
) -> None:
    """The child's side of ``spawn``; never returns."""
    code = 1
    try:
        control.close()
        layers = _seal_child(policy)
        in_fd, out_fd = fds
        os.dup2(in_fd, 0)
        os.dup2(out_fd, 1)
        os.closerange(3, policy.limits.open_files)  # nothing of the fork server's is left
        os.chdir(directory)
        os.environ["HOME"] = os.environ["TMPDIR"] = directory
        if "PWD" in os.environ:  # bubblewrap sets it
            os.environ["PWD"] = directory
        import tempfile

        tempfile.tempdir = None
        if "numpy" in sys.modules:  # each child its own random stream, as a new process has
            sys.modules["numpy"].random.seed()
        from rlm_dagster.repl import worker

        child = dataclasses.replace(policy, applied=tuple(layers), zygote=False)
        worker.main(child.to_json())
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
