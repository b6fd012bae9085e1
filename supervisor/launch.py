"""How worker processes start and end: forked by the fork server (forking.py asks it), or
spawned as ``python -m inference_worker`` (SENSEVOICE_WORKER_START=spawn, and the fallback
while the fork server is down, starting, stopped or refusing).

A forked worker is double-forked by the server and so reparented to the supervisor, which is a
child subreaper (PR_SET_CHILD_SUBREAPER): the pool waits for it like any child, by its pid only
(never waitpid(-1), which would steal the exit codes of subprocess.Popen's children); other
orphans the subreaper inherits are reaped by reap_orphans, by pid too.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from sensevoice_core.exit_codes import EXIT_BOOT_ERROR, EXIT_MODEL_LOAD_ERROR
from sensevoice_core.linux import PR_SET_CHILD_SUBREAPER, prctl

logger = logging.getLogger("sensevoice.supervisor")

StartMethod = Literal["fork", "spawn"]


class WorkerProcess(Protocol):
    """What the pool needs of a worker process (subprocess.Popen has it)."""

    pid: int

    def poll(self) -> int | None: ...

    def kill(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


class AdoptedProcess:
    """A forked worker, reparented to this process: reaped by its pid alone. Exit codes as
    Popen's (negative: the signal that killed it)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # cannot happen while this process is a subreaper
                logger.error("Worker pid %d is not a child of the supervisor; counting it as "
                             "exited", self.pid)
                self.returncode = -signal.SIGKILL
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float | None = None) -> int:
        return wait_polling(self.poll, timeout, f"pid {self.pid}")


def wait_polling(poll: Callable[[], int | None], timeout: float | None, name: str) -> int:
    """Popen.wait for a process this one cannot block on: poll() until it has an exit code."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while (code := poll()) is None:
        if deadline is not None and time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(name, timeout or 0.0)
        time.sleep(0.005)
    return code


def spawn_worker_process(worker_id: str, backend: str, standby: bool) -> subprocess.Popen:
    """Start ``python -m inference_worker``; it inherits the environment and stderr."""
    command = [sys.executable, "-m", "inference_worker", "--backend", backend,
               "--worker-id", worker_id, "--parent-pid", str(os.getpid())]
    if standby:
        command.append("--standby")
    return subprocess.Popen(command, stdin=subprocess.DEVNULL)


def become_subreaper() -> str | None:
    """Make orphaned descendants (forked workers) this process's children; None, or why not."""
    return prctl(PR_SET_CHILD_SUBREAPER, 1)


def reap_orphans(known: set[int]) -> list[tuple[int, int]]:
    """Reap exited children this process never started nor adopted knowingly (a subreaper
    inherits every orphaned descendant: a late fork's worker, a library's leftover
    subprocess), with their exit codes; children in `known` are left to their owners.
    waitid(WNOWAIT) peeks first, so nothing is read unless some child has exited."""
    try:
        if os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            return []
    except ChildProcessError:
        return []
    reaped = []
    for pid in children() - known:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        if done:
            reaped.append((pid, os.waitstatus_to_exitcode(status)))
    return reaped


def children() -> set[int]:
    """This process's children (all its threads'), from /proc."""
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            pids.update(int(pid) for pid in (task / "children").read_text().split())
        except OSError:  # the thread exited meanwhile
            pass
    return pids


def leave_idle_priority(pid: int) -> bool:
    """Move a spawned standby's main thread from SCHED_IDLE (its start-up on idle CPU only)
    to normal scheduling, as on a saturated machine it would get no CPU at all; threads it
    makes later inherit this. True if it was at SCHED_IDLE; OSError if it cannot be moved."""
    if pid <= 0 or not hasattr(os, "SCHED_IDLE"):
        return False
    if os.sched_getscheduler(pid) != os.SCHED_IDLE:
        return False
    os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
    return True


def process_stopped(pid: int) -> bool:
    """Stopped by a signal (SIGSTOP, SIGTSTP) or traced, per /proc/PID/stat."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("T", "t")


def describe_exit(code: int) -> str:
    """Why a worker or the fork server exited, in words a user can act on."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:  # a real-time signal has no name
            name = f"signal {-code}"
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    if code == EXIT_MODEL_LOAD_ERROR:
        return "could not load its model (exit code 4)"
    if code == EXIT_BOOT_ERROR:
        return "could not start (exit code 3): check the settings and the installation"
    return f"exited with code {code}"


@dataclass
class Backoff:
    """After a failure wait 1 s, doubling per failure up to max_s; a success resets it."""

    max_s: float
    delay_s: float = 0.0
    until: float = 0.0  # monotonic time before which nothing is retried

    def fail(self) -> None:
        self.delay_s = min(max(self.delay_s * 2, 1.0), self.max_s)
        self.until = time.monotonic() + self.delay_s

    def reset(self) -> None:
        self.delay_s = 0.0
