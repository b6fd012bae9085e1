"""How worker processes start: forked by the fork server (inference_worker/forkserver.py), or
spawned as ``python -m inference_worker`` (SENSEVOICE_WORKER_START=spawn, and the fallback
while the fork server is down, starting, stopped or refusing).

A forked worker is double-forked by the server and so reparented to the supervisor, which is a
child subreaper (PR_SET_CHILD_SUBREAPER): the pool waits for it like any child, by its pid only
(never waitpid(-1), which would steal the exit codes of subprocess.Popen's children).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal, Protocol

logger = logging.getLogger("sensevoice.supervisor")

StartMethod = Literal["fork", "spawn"]
FORK_TIMEOUT_S = 2.0  # a fork takes milliseconds; past this the server is stopped or stuck
SERVER_START_TIMEOUT_S = 120.0  # importing torch on a loaded machine
SERVER_STOP_S = 2.0
PR_SET_CHILD_SUBREAPER = 36


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
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
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
    if not sys.platform.startswith("linux"):
        return f"{sys.platform} has no child subreapers"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            return f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}"
    except (OSError, AttributeError) as e:
        return f"prctl is unavailable: {e}"
    return None


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


class ForkServer:
    """The supervisor's end of the fork server: starts it, asks it for workers, notices when it
    dies or stops answering, and restarts it with backoff. fork() returns None when a worker
    must be spawned instead, having logged why."""

    def __init__(self, backend: str):
        self.backend = backend
        self.process: subprocess.Popen | None = None
        self.ready = False
        self.started_at = 0.0
        self.buffer = b""
        self.backoff = Backoff(30.0)
        self.running = False  # between start() and close()
        self.disabled: str | None = None  # set: fork is off for good, and why
        self.down_reason: str | None = None  # why the last server went away
        self.forked_once = False
        self.lost_request = False  # the last fork request went unanswered: its id may be taken

    @property
    def first_start(self) -> bool:
        """The service's first fork server is importing torch: its first worker waits for it
        (the loop reads its ready line in check()) rather than import torch beside it."""
        return (self.running and self.disabled is None and self.process is not None
                and not self.ready and not self.forked_once
                and time.monotonic() - self.started_at < SERVER_START_TIMEOUT_S)

    @property
    def pid(self) -> int | None:
        """The server's pid while it is ready to fork."""
        return self.process.pid if self.process is not None and self.ready else None

    def start(self) -> None:
        self.running = True
        why = become_subreaper()
        if why is not None:
            self.disable(why)
            return
        self.launch_server()

    def disable(self, why: str) -> None:
        self.disabled = why
        logger.warning("Workers will be spawned, not forked: %s", why)
        self.stop()

    def launch_server(self) -> None:
        try:
            # numpy's OpenBLAS starts a thread pool at import unless told not to, before the
            # server's first line runs; a second thread forbids forking.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "inference_worker.forkserver", "--backend", self.backend,
                 "--parent-pid", str(os.getpid()),
                 "--blas-threads", os.environ.get("OPENBLAS_NUM_THREADS", "")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
        except OSError as e:
            self.process = None
            self.down(f"could not start: {e}")
            return
        self.ready, self.buffer, self.started_at = False, b"", time.monotonic()

    def fork(self, worker_id: str, standby: bool) -> AdoptedProcess | None:
        """A worker forked by the server, or None (spawn it; the reason is logged)."""
        if not self.running or self.disabled is not None:
            return None
        why = self.usable(wait=not self.forked_once)
        if why is not None:
            logger.info("Spawning worker %s, not forking it: %s", worker_id, why)
            return None
        assert self.process is not None and self.process.stdin is not None
        deadline = time.monotonic() + FORK_TIMEOUT_S
        self.lost_request = True
        try:
            self.process.stdin.write(json.dumps(
                {"worker_id": worker_id, "standby": standby, "deadline": deadline}).encode()
                + b"\n")
            self.process.stdin.flush()
            answer = self.read_answer(deadline)
        except OSError as e:
            answer = None
            self.down(f"broke its pipe ({e})")
        if answer is None:
            if self.process is not None:
                code = self.process.poll()
                self.down(f"did not answer a fork request within {FORK_TIMEOUT_S:g} s "
                          f"(stopped or stuck), so it was killed" if code is None
                          else describe_server_exit(code))
            logger.warning("Spawning worker %s: the fork server %s", worker_id,
                           self.down_reason)
            return None
        self.lost_request = False
        if "pid" in answer:
            self.forked_once = True
            self.backoff.reset()
            logger.debug("Forked worker %s (pid %s) in %.1f ms", worker_id, answer["pid"],
                         (time.monotonic() - deadline + FORK_TIMEOUT_S) * 1000)
            return AdoptedProcess(int(answer["pid"]))
        if answer.get("permanent"):
            self.disable(f"the fork server refused: {answer.get('error')}")
        else:
            logger.warning("Spawning worker %s: the fork server refused: %s", worker_id,
                           answer.get("error"))
        return None

    def check(self) -> None:
        """From the loop: notice a dead server and restart it once the backoff allows; take
        a starting one's ready line. Never blocks."""
        if not self.running or self.disabled is not None:
            return
        if self.process is not None and self.process.poll() is not None:
            how = describe_server_exit(self.process.returncode)
            logger.warning("The fork server (pid %s) %s; workers are spawned until it is "
                           "back", self.process.pid, how)
            self.down(how)
        if self.process is None and time.monotonic() >= self.backoff.until:
            self.launch_server()
        if self.process is not None and not self.ready:
            self.await_ready(0.0)

    def usable(self, wait: bool) -> str | None:
        """None when the server can fork now (waiting for its start-up when `wait`), else why
        not, restarting it when it is down and the backoff allows."""
        if self.process is None:
            if time.monotonic() < self.backoff.until:
                return f"the fork server {self.down_reason}; restarting it in " \
                       f"{self.backoff.until - time.monotonic():.0f} s"
            self.launch_server()
            if self.process is None:
                return f"the fork server {self.down_reason}"
            if not wait:
                return f"the fork server {self.down_reason}; it is restarting"
        if self.process.poll() is not None:
            how = describe_server_exit(self.process.returncode)
            self.down(how)
            return f"the fork server {how}; restarting it in {self.backoff.delay_s:.0f} s"
        if not self.ready:
            self.await_ready(SERVER_START_TIMEOUT_S - (time.monotonic() - self.started_at)
                             if wait else 0.0)
            if self.process is None:
                return f"the fork server {self.down_reason}"
            if not self.ready:
                return "the fork server is still starting"
        return None

    def await_ready(self, timeout: float) -> None:
        answer = self.read_answer(time.monotonic() + max(timeout, 0.0))
        if answer is not None and answer.get("ready"):
            self.ready = True
            logger.info("Fork server ready (pid %s) after %.1f s", self.process.pid
                        if self.process else "?", time.monotonic() - self.started_at)
        elif self.process is not None and (answer is not None or self.process.poll() is not None
                                           or time.monotonic() - self.started_at
                                           > SERVER_START_TIMEOUT_S):
            self.down("did not start (see its error above)" if answer is None
                      else f"said {answer} at start")
            logger.warning("The fork server %s; workers are spawned; next try in %.0f s",
                           self.down_reason, self.backoff.delay_s)

    def read_answer(self, deadline: float) -> dict | None:
        """The server's next line, or None at its deadline or end of file."""
        assert self.process is not None and self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if not select.select([fd], [], [], max(left, 0.0))[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            answer = json.loads(line)
        except ValueError:
            return {"error": f"unreadable answer {line[:80]!r}", "permanent": False}
        return answer if isinstance(answer, dict) else None

    def down(self, why: str) -> None:
        """The server is gone or useless: kill it, and restart it after the backoff."""
        self.down_reason = why
        self.backoff.fail()
        self.stop(grace_s=0.0)

    def close(self) -> None:
        """The service is stopping: stop the server for good."""
        self.running = False
        self.stop()

    def stop(self, grace_s: float = SERVER_STOP_S) -> None:
        """End the server: end of requests (it exits), SIGKILL after grace_s."""
        process, self.process, self.ready = self.process, None, False
        if process is None:
            return
        try:
            if process.stdin is not None:
                process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()  # SIGKILL works on a stopped process too
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def describe_server_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
