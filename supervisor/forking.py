"""The supervisor's end of the fork server (inference_worker/forkserver.py): start it, ask it
for workers without waiting for the answer, restart it when it dies or stops answering.

Every call here returns at once: the loop reads the server's answers each tick (check()), so
neither a slow fork nor a stopped server delays routing. A request the server cannot take
soon is spawned instead (the pool does, supervisor/workers.py).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections import deque

from supervisor.launch import (
    AdoptedProcess,
    Backoff,
    become_subreaper,
    describe_exit,
    process_stopped,
    wait_polling,
)

logger = logging.getLogger("sensevoice.supervisor")

FORK_TIMEOUT_S = 2.0  # a fork takes milliseconds; past this the server is stopped or stuck
SERVER_START_TIMEOUT_S = 120.0  # importing torch on a loaded machine
FIRST_START_WAIT_S = 20.0  # the first worker waits this long for the first server, then spawns
SERVER_STABLE_S = 30.0  # a server up this long resets the restart backoff
RESTART_WAIT_S = 10.0  # a worker waits this long for a restarting server, if expected by then
SERVER_STOP_S = 2.0


class PendingFork:
    """A worker asked of the fork server, whose answer may not be read yet: it has not exited
    (poll: None) until the answer gives its pid, then it is that process; or the answer (or its
    absence) says why it must be spawned instead (`failed`), which the pool then does."""

    def __init__(self, worker_id: str, standby: bool, deadline: float):
        self.worker_id = worker_id
        self.standby = standby
        self.asked_at = time.monotonic()
        self.deadline = deadline
        self.adopted: AdoptedProcess | None = None
        self.failed: str | None = None
        self.lost = False  # unanswered: a late fork may still say hello under worker_id
        self.cancelled = False  # killed before its answer came

    @property
    def pid(self) -> int:
        """Its pid; 0 for the milliseconds before the server's answer is read."""
        return self.adopted.pid if self.adopted is not None else 0

    def forked(self, pid: int) -> None:
        self.adopted = AdoptedProcess(pid)
        if self.cancelled:
            self.adopted.kill()

    def fail(self, why: str, lost: bool) -> None:
        if self.adopted is None and self.failed is None:
            self.failed, self.lost = why, lost

    def poll(self) -> int | None:
        if self.adopted is not None:
            return self.adopted.poll()
        return -signal.SIGKILL if self.cancelled and self.failed is not None else None

    def kill(self) -> None:
        self.cancelled = True
        if self.adopted is not None:
            self.adopted.kill()

    def wait(self, timeout: float | None = None) -> int:
        return wait_polling(self.poll, timeout, f"worker {self.worker_id}")


class ForkServer:
    """The supervisor's end of the fork server: starts it, asks it for workers without waiting
    (answers are read from the loop, check()), notices when it dies or stops answering, and
    restarts it with backoff. fork() returns None when a worker must be spawned at once, having
    logged why; a PendingFork that fails later says why in its `failed`."""

    def __init__(self, backend: str):
        self.backend = backend
        self.process: subprocess.Popen | None = None
        self.ready = False
        self.started_at = 0.0
        self.ready_at = 0.0
        self.buffer = b""
        self.backoff = Backoff(30.0)
        self.running = False  # between start() and close()
        self.disabled: str | None = None  # set: fork is off for good, and why
        self.down_reason: str | None = None  # why the last server went away
        self.pending: deque[PendingFork] = deque()  # asked, in order; the server answers in order
        self.queued: list[PendingFork] = []  # waiting for a restarting server, not sent
        self.last_start_s: float | None = None  # the last server's start -> ready
        self.first_wait = False  # the service's first worker waits for the first server

    @property
    def first_start(self) -> bool:
        """The service's first fork server is importing torch: its first worker waits for it
        (check() takes its ready line) rather than import torch beside it, up to
        FIRST_START_WAIT_S or until the server is seen stopped."""
        return self.first_wait and self.running and self.disabled is None

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
        if self.process is not None:
            self.first_wait = True
            logger.info("Waiting for the fork server (pid %s) to import torch; the first worker "
                        "is spawned instead if it is not ready within %.0f s",
                        self.process.pid, FIRST_START_WAIT_S)

    def disable(self, why: str) -> None:
        self.disabled = why
        self.first_wait = False
        logger.warning("Workers will be spawned, not forked: %s", why)
        self.stop()
        self.fail_queued(why)

    def fail_queued(self, why: str) -> None:
        for pending in self.queued:
            pending.fail(why, lost=False)
        self.queued = []

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

    def fork(self, worker_id: str, standby: bool) -> PendingFork | None:
        """Ask the server for a worker (never waits), or None: spawn it (the reason logged)."""
        if not self.running or self.disabled is not None:
            return None
        why = self.usable()
        if why is not None and self.back_soon():
            logger.info("Worker %s waits for the fork server (up to %.0f s) rather than import "
                        "torch beside it: %s", worker_id, RESTART_WAIT_S, why)
            pending = PendingFork(worker_id, standby, time.monotonic() + RESTART_WAIT_S)
            self.queued.append(pending)
            return pending
        if why is not None:
            logger.info("Spawning worker %s, not forking it: %s", worker_id, why)
            return None
        pending = PendingFork(worker_id, standby, 0.0)
        if not self.send(pending):
            logger.warning("Spawning worker %s: the fork server %s", worker_id, self.down_reason)
            return None
        return pending

    def send(self, pending: PendingFork) -> bool:
        """Write its fork request (a line into an empty pipe: does not block)."""
        assert self.process is not None and self.process.stdin is not None
        pending.deadline = time.monotonic() + FORK_TIMEOUT_S
        try:
            self.process.stdin.write(json.dumps(
                {"worker_id": pending.worker_id, "standby": pending.standby,
                 "deadline": pending.deadline}).encode() + b"\n")
            self.process.stdin.flush()
        except OSError as e:
            self.down(f"broke its pipe ({e})")
            return False
        self.pending.append(pending)
        logger.debug("Asked the fork server (pid %s) for worker %s", self.process.pid,
                     pending.worker_id)
        return True

    def back_soon(self) -> bool:
        """A restarting server should be ready within RESTART_WAIT_S, judging by how long
        the last one took to start (never for the first: check() spawns after a bound)."""
        if self.last_start_s is None or not self.running or self.disabled is not None:
            return False
        now = time.monotonic()
        start = self.started_at if self.process is not None else max(self.backoff.until, now)
        return start + 1.5 * self.last_start_s < now + RESTART_WAIT_S

    def send_queued(self, now: float) -> None:
        """Send the waiting requests once the server is ready; fail those waited too long."""
        waiting, self.queued = self.queued, []
        for pending in waiting:
            if pending.cancelled or now > pending.deadline:
                pending.fail(f"the fork server was not back within {RESTART_WAIT_S:.0f} s "
                             f"({self.down_reason})", lost=False)
            elif not self.ready:
                self.queued.append(pending)
            elif not self.send(pending):
                pending.fail(f"the fork server {self.down_reason}", lost=False)

    def check(self) -> None:
        """From the loop, every tick: take the server's answers, notice a dead, stuck or
        never-ready server and restart it once the backoff allows. Never blocks."""
        if not self.running or self.disabled is not None:
            return
        now = time.monotonic()
        if self.process is not None and self.process.poll() is not None:
            how = describe_exit(self.process.returncode)
            logger.warning("The fork server (pid %s) %s; workers are spawned until it is "
                           "back", self.process.pid, how)
            self.down(how)
        if self.process is None and not self.first_wait and now >= self.backoff.until:
            self.launch_server()
        if self.process is not None:
            self.take_answers()
        if self.queued:
            self.send_queued(now)
        if self.process is not None and self.pending and now > self.pending[0].deadline:
            self.down(f"did not answer a fork request within {FORK_TIMEOUT_S:g} s (stopped "
                      f"or stuck), so it was killed")
        elif self.process is not None and not self.ready \
                and now - self.started_at > SERVER_START_TIMEOUT_S:
            self.down(f"was not ready within {SERVER_START_TIMEOUT_S:.0f} s, so it was killed")
            logger.warning("The fork server %s; workers are spawned; next try in %.0f s",
                           self.down_reason, self.backoff.delay_s)
        if self.first_wait:
            self.end_first_wait(now)
        if self.ready and self.backoff.delay_s and now - self.ready_at > SERVER_STABLE_S:
            self.backoff.reset()  # up a while: a crash-looping server still backs off

    def end_first_wait(self, now: float) -> None:
        process = self.process
        if process is not None and self.ready:
            self.first_wait = False
            return
        stopped = process is not None and process_stopped(process.pid)
        waited = now - self.started_at
        if process is None or stopped or waited > FIRST_START_WAIT_S:
            self.first_wait = False
            why = (f"{self.down_reason}" if process is None else
                   f"(pid {process.pid}) is stopped" if stopped else
                   f"(pid {process.pid}) is not ready after {waited:.0f} s")
            logger.warning("The fork server %s: spawning the first worker instead; later ones "
                           "are forked once it is ready", why)

    def usable(self) -> str | None:
        """None when the server can fork now, else why not (restarting it when it is down and
        the backoff allows)."""
        if self.process is None:
            if time.monotonic() < self.backoff.until:
                return f"the fork server {self.down_reason}; restarting it in " \
                       f"{self.backoff.until - time.monotonic():.0f} s"
            self.launch_server()
            if self.process is None:
                return f"the fork server {self.down_reason}"
        if self.process.poll() is not None:
            how = describe_exit(self.process.returncode)
            self.down(how)
            return f"the fork server {how}; restarting it in {self.backoff.delay_s:.0f} s"
        if not self.ready:
            self.take_answers()
            if self.process is None:
                return f"the fork server {self.down_reason}"
            if not self.ready:
                return f"the fork server (pid {self.process.pid}) is still starting " \
                       f"({time.monotonic() - self.started_at:.0f} s)"
        return None

    def take_answers(self) -> None:
        """Apply every answer the server has written so far (reads without waiting)."""
        while self.process is not None and (answer := self.read_answer()) is not None:
            if not self.ready:
                if answer.get("ready"):
                    self.ready, self.ready_at = True, time.monotonic()
                    self.last_start_s = self.ready_at - self.started_at
                    logger.info("Fork server ready (pid %s) after %.1f s", self.process.pid,
                                self.ready_at - self.started_at)
                else:
                    self.down(f"said {answer} at start")
                    logger.warning("The fork server %s; workers are spawned; next try in "
                                   "%.0f s", self.down_reason, self.backoff.delay_s)
            else:
                self.settle(answer, live=True)

    def settle(self, answer: dict, live: bool) -> None:
        """The oldest pending fork's answer."""
        if not self.pending:
            logger.error("The fork server answered a request it was not sent: %s", answer)
            return
        pending = self.pending.popleft()
        if "pid" in answer:
            pending.forked(int(answer["pid"]))
            logger.debug("Forked worker %s (pid %s) in %.1f ms", pending.worker_id, pending.pid,
                         (time.monotonic() - pending.asked_at) * 1000)
            return
        pending.fail(f"the fork server refused: {answer.get('error')}", lost=False)
        if live and answer.get("permanent"):
            self.disable(str(pending.failed))

    def read_answer(self) -> dict | None:
        """The server's next whole line, if it has written one; None otherwise."""
        assert self.process is not None and self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while b"\n" not in self.buffer:
            if not select.select([fd], [], [], 0.0)[0]:
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
        return answer if isinstance(answer, dict) else {"error": f"unreadable answer {line[:80]!r}"}

    def down(self, why: str) -> None:
        """The server is gone or useless: kill it, and restart it after the backoff."""
        self.down_reason = why
        self.backoff.fail()
        self.stop(grace_s=0.0)

    def close(self) -> None:
        """The service is stopping: stop the server for good."""
        self.running = False
        self.first_wait = False
        self.stop()
        self.fail_queued("the service is stopping")

    def stop(self, grace_s: float = SERVER_STOP_S) -> None:
        """End the server: end of requests (it exits), SIGKILL after grace_s. Answers it wrote
        are still applied; forks still unanswered are lost (spawned under a new id)."""
        process = self.process
        if process is not None:
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
            if self.ready:
                while (answer := self.read_answer()) is not None:  # all written: EOF after
                    self.settle(answer, live=False)
            if process.stdout is not None:
                process.stdout.close()
        self.process, self.ready = None, False
        why = f"the fork server {self.down_reason}" if self.down_reason else \
            "the fork server stopped before answering"
        while self.pending:
            self.pending.popleft().fail(why, lost=True)
