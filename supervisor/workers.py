"""The supervisor's view of its worker processes: one handle each, and the pool that starts
them, reaches them over the backend socket, pings them and kills the hung ones.

What a worker should do next (load, serve, drain, be replaced) is decided in supervisor.py.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import zmq
from pydantic import BaseModel

from sensevoice_core.canary import CanaryReport
from sensevoice_core.protocol import (
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_LIVENESS,
    SPAWN_TIMEOUT_S,
    ModelInfo,
    Ping,
    WorkerRole,
    encode,
)
from supervisor.forking import ForkServer, PendingFork
from supervisor.launch import (
    Backoff,
    StartMethod,
    WorkerProcess,
    describe_exit,
    leave_idle_priority,
    reap_orphans,
    spawn_worker_process,
)

__all__ = ["Assignment", "Backoff", "WorkerHandle", "WorkerPool", "describe_exit"]

logger = logging.getLogger("sensevoice.supervisor")

IDLE_BOOT_S = 10.0  # a standby starting on idle CPU only gets normal priority after this


@dataclass(frozen=True)
class Assignment:
    """What a worker should load once it has said hello."""

    path: str | None  # None: SENSEVOICE_MODEL_DIR or the usual places
    force_fresh: bool


@dataclass
class WorkerHandle:
    worker_id: str
    process: WorkerProcess
    age: int  # spawn order; older workers have smaller ages
    start_method: StartMethod = "spawn"  # forked by the fork server, or spawned
    spawned_at: float = field(default_factory=time.monotonic)  # when it was asked for
    start_s: float | None = None  # asked for -> its Hello
    role: WorkerRole = "starting"
    assignment: Assignment | None = None  # None: a standby until it is given one
    deadline: float = 0.0  # for loading and draining (warming: the reload's deadline)
    last_ping: float = 0.0
    unanswered_pings: int = 0  # pings sent since the worker was last heard from
    health_ping: int | None = None  # nonce of the ping sent after Ready, until it is answered
    idle_since: float = field(default_factory=time.monotonic)
    jobs: list[str] = field(default_factory=list)  # ids of the requests it is serving
    model: ModelInfo | None = None  # what it said Ready with
    requests_served: int = 0
    # Its last Pong's counters: torch threads, batched forward passes and their items.
    threads: int = 0
    batches: int = 0
    batch_items: int = 0
    load_error: str | None = None  # what the worker said when its load failed
    canary: CanaryReport | None = None  # the canary it failed, with that load_error
    kill_reason: str | None = None  # why the supervisor killed it (set: awaiting reaping)
    idle_boot_ended: bool = False  # moved off SCHED_IDLE after IDLE_BOOT_S without a Hello

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def busy(self) -> bool:
        return bool(self.jobs)

    @property
    def killed(self) -> bool:
        return self.kill_reason is not None

    def kill(self, reason: str) -> None:
        if self.kill_reason is None:
            self.kill_reason = reason
        if self.process.poll() is None:
            self.process.kill()


class WorkerPool:
    """The live worker processes, by id, and the backend socket that reaches them."""

    def __init__(self, backend: zmq.Socket, backend_address: str, start: StartMethod):
        self.backend = backend
        self.backend_address = backend_address
        self.start_method = start
        self.fork_server = ForkServer(backend_address)
        self.workers: dict[str, WorkerHandle] = {}
        self.exiting: list[WorkerProcess] = []  # retired, not yet reaped
        self.spawned = 0
        self.nonces = itertools.count(1)  # for pings
        self.renamed: list[tuple[str, str]] = []  # (old id, new id) of lost forks, spawned

    def __iter__(self) -> Iterator[WorkerHandle]:
        """The workers with a process: a fork whose answer is not read yet (milliseconds; up
        to RESTART_WAIT_S while it waits for a restarting server) has no pid to show or
        signal, so status lists it once it has one; in_roles() and get() see it at once."""
        return iter([w for w in self.workers.values() if w.pid])

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self.workers

    def get(self, worker_id: str) -> WorkerHandle | None:
        return self.workers.get(worker_id)

    def in_roles(self, *roles: WorkerRole) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.role in roles]

    def idle_standby(self) -> WorkerHandle | None:
        """The warm standby, if it has said hello. One still starting is not waited for: it
        starts at idle priority, which on a saturated machine could take longer than a load."""
        return next(iter(self.in_roles("standby")), None)

    def start(self) -> None:
        """Start the fork server (SENSEVOICE_WORKER_START=fork): it imports torch meanwhile."""
        if self.start_method == "fork":
            self.fork_server.start()

    def spawn(self, assignment: Assignment | None) -> WorkerHandle:
        """A new worker process: it loads `assignment` once it says hello, or stands by.
        Forked when the fork server can (asked now, its pid known when the answer is read:
        reap()), else spawned (fork_server logs why). Never waits for the fork server."""
        asked_at = time.monotonic()
        standby = assignment is None
        self.spawned += 1
        worker_id = f"w{self.spawned}"
        process: WorkerProcess | None = None
        method: StartMethod = "spawn"
        if self.start_method == "fork":
            process = self.fork_server.fork(worker_id, standby)  # answered later: check()
            method = "fork"
        if process is None:
            process, method = spawn_worker_process(worker_id, self.backend_address,
                                                   standby), "spawn"
        worker = WorkerHandle(worker_id, process, age=self.spawned, start_method=method,
                              spawned_at=asked_at, assignment=assignment)
        self.workers[worker_id] = worker
        return worker

    def send(self, worker: WorkerHandle, message: BaseModel) -> None:
        self.backend.send_multipart([worker.worker_id.encode(), *encode(message)])

    def ping(self, worker: WorkerHandle) -> int:
        nonce = next(self.nonces)
        self.send(worker, Ping(nonce=nonce))
        return nonce

    def retire(self, worker: WorkerHandle, reason: str) -> None:
        """Kill a worker and forget it: its exit is expected, not a failure to report."""
        self.workers.pop(worker.worker_id, None)
        worker.kill(reason)
        self.exiting.append(worker.process)

    def reap(self) -> list[tuple[WorkerHandle, int]]:
        """The workers that exited, with their exit codes, removed from the pool. Takes the
        fork server's answers first: a failed fork's worker is spawned here."""
        if self.start_method == "fork":
            self.fork_server.check()
            self.spawn_failed_forks()
        exited = []
        for worker in list(self.workers.values()):
            code = worker.process.poll()
            if code is not None:
                del self.workers[worker.worker_id]
                exited.append((worker, code))
        self.exiting = [p for p in self.exiting if p.poll() is None]
        known = {w.pid for w in self.workers.values()} | {p.pid for p in self.exiting}
        if self.fork_server.process is not None:
            known.add(self.fork_server.process.pid)
        for pid, code in reap_orphans(known):
            logger.info("Reaped process %d, not a worker (an orphan of a worker or of the fork "
                        "server): it %s", pid, describe_exit(code))
        return exited

    def spawn_failed_forks(self) -> None:
        """Spawn each worker whose fork was refused (same id) or went unanswered (a new id:
        a late fork's Hello must not pass for it; the supervisor ignores unknown ids)."""
        for worker in list(self.workers.values()):
            fork = worker.process
            if not isinstance(fork, PendingFork) or fork.failed is None or fork.cancelled:
                continue
            asked_as = worker.worker_id
            if fork.lost:
                self.spawned += 1
                worker.worker_id = f"w{self.spawned}"
                del self.workers[asked_as]
                self.workers[worker.worker_id] = worker
                self.renamed.append((asked_as, worker.worker_id))
            logger.warning("Spawning worker %s%s: %s", worker.worker_id,
                           f" (forked as {asked_as}: unanswered)" if fork.lost else "",
                           fork.failed)
            try:
                worker.process = spawn_worker_process(worker.worker_id, self.backend_address,
                                                      standby=worker.assignment is None)
                worker.start_method = "spawn"
            except OSError as e:  # out of processes or memory: reaped as killed next tick
                worker.kill(f"could not be spawned: {e}")

    def take_renamed(self) -> list[tuple[str, str]]:
        renamed, self.renamed = self.renamed, []
        return renamed

    def check_liveness(self, now: float) -> None:
        """Kill a worker past its start, load or drain deadline, or that missed
        HEARTBEAT_LIVENESS pings in a row; ping the others that can answer, busy or not (a
        worker answers from its I/O thread while its compute threads transcribe)."""
        for worker in self.workers.values():
            if worker.process.poll() is not None or worker.killed:
                continue  # reaped next tick
            if worker.role == "starting" and not worker.idle_boot_ended and worker.pid \
                    and now - worker.spawned_at > IDLE_BOOT_S:
                worker.idle_boot_ended = True  # a saturated machine leaves idle CPU to none
                try:
                    if leave_idle_priority(worker.pid):
                        logger.info("Worker %s (pid %s) has not started after %.0f s on idle "
                                    "CPU; it now starts at normal priority", worker.worker_id,
                                    worker.pid, IDLE_BOOT_S)
                except OSError as e:  # it exited meanwhile, or a policy forbids it
                    logger.debug("Worker %s (pid %s) stays at idle priority: %s",
                                 worker.worker_id, worker.pid, e)
            if worker.role == "starting" and now - worker.spawned_at > SPAWN_TIMEOUT_S:
                logger.error("Worker %s (pid %s) did not start within %.0f s; killing it",
                             worker.worker_id, worker.pid, SPAWN_TIMEOUT_S)
                worker.kill(f"did not start within {SPAWN_TIMEOUT_S:.0f} s")
            elif worker.role in ("loading", "draining") and now > worker.deadline:
                logger.error("Worker %s (pid %s) still %s after its deadline; killing it",
                             worker.worker_id, worker.pid, worker.role)
                worker.kill(f"still {worker.role} after its deadline")
            elif worker.role == "starting" or (worker.role in ("loading", "warming")
                                               and worker.model is None):
                continue  # importing torch or loading: not answering until Ready
            elif now - worker.last_ping < HEARTBEAT_INTERVAL_S:
                continue
            elif worker.unanswered_pings >= HEARTBEAT_LIVENESS:
                logger.error("Worker %s (pid %s) missed %d heartbeats%s; killing it as hung",
                             worker.worker_id, worker.pid, HEARTBEAT_LIVENESS,
                             f" while serving {len(worker.jobs)} request(s)" if worker.jobs
                             else "")
                worker.kill(f"missed {HEARTBEAT_LIVENESS} heartbeats")
            else:
                worker.last_ping = now
                worker.unanswered_pings += 1
                self.ping(worker)

    def kill_all(self, reason: str) -> None:
        self.fork_server.close()  # first: settles the forks it was asked for
        for worker in self.workers.values():
            worker.kill(reason)
            worker.process.wait()
        for process in self.exiting:
            process.kill()
            process.wait()

