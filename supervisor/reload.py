"""The blue-green reload, from request to outcome, in the order its states follow each other.

    requested ──► started ──► warming ──► switched ──► finished ──► the next one starts
        │                        │                        ▲
        └──► refused             └──► failed ─────────────┘

1. requested  request(): the path is checked; a refused one is answered at once and changes
              nothing. With no reload running, this one starts. Otherwise it waits as the next
              one, and later triggers coalesce into it: the latest path wins, and callers who
              asked for another path are told theirs was superseded.
2. started    start(): a reload of the serving model whose files are unchanged since they were
              hashed (unchanged.py), not forced fresh, is an L1 hit: finished at once, with no
              new worker and nothing drained. Otherwise, with SENSEVOICE_SWAP_STRATEGY=stop_first
              the serving (blue) workers drain first. SENSEVOICE_WORKERS green workers are
              taken: the warm standby, else new processes. A green's role is "warming" from
              its load to the switch.
3. warming    each green loads the model, warms up, says Ready and answers a health ping:
              green_passed().
4. switched   switch(): once every green has passed, the blue workers drain and the greens serve.
5. finished   finish(): every caller gets the outcome, and the next reload starts.
   failed     fail(): a green exited (load error, crash, killed) or the reload ran past
              SENSEVOICE_HOTRELOAD_TIMEOUT (check_deadline()): the greens are killed, and blue
              never stopped (with stop_first the supervisor refills it with the old model).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sensevoice_core.canary import CanaryReport
from sensevoice_core.protocol import (
    CACHE_LEVEL_WORDS,
    ModelInfo,
    ReloadOutcome,
    ReloadReply,
    ReloadRequest,
)
from supervisor.reload_path import (
    ReloadRefused,
    check_reload_path,
    resolved_or_none,
)
from supervisor.unchanged import unchanged_verdict
from supervisor.workers import Assignment, WorkerHandle

if TYPE_CHECKING:
    from supervisor.supervisor import Supervisor

logger = logging.getLogger("sensevoice.supervisor")


@dataclass(frozen=True)
class Waiter:
    """Who waits for a reload's outcome: a client (None for triggers that are not clients),
    and an event set when it is over (the file watcher's thread waits on it)."""

    client: bytes | None
    request_id: str
    done: threading.Event | None = None


@dataclass
class ReloadJob:
    path: str | None
    force_fresh: bool
    origin: str
    waiters: list[Waiter]
    received_at: float = field(default_factory=time.monotonic)
    deadline: float = 0.0  # set when it starts
    green: set[str] = field(default_factory=set)  # ids of the workers loading the new model
    passed: set[str] = field(default_factory=set)  # greens that answered their health ping
    old_model: ModelInfo | None = None  # serving when it started
    # It loads what SENSEVOICE_MODEL_DIR resolves to (asked for by that path, or by none
    # while the service serves it): once it serves, a path-less reload follows that setting.
    follows_configured: bool = False

    def merge(self, request: ReloadRequest, path: str | None, waiter: Waiter,
              follows_configured: bool) -> list[Waiter]:
        """A trigger arriving while this job waits its turn: the latest path wins.

        Returns the waiters that asked for another path: they are answered "superseded", so
        nobody is told their model loaded when another one did.
        """
        superseded = [] if path == self.path else self.waiters
        if superseded:
            self.waiters, self.force_fresh = [], False
        self.path, self.follows_configured = path, follows_configured
        self.force_fresh = self.force_fresh or request.force_fresh
        self.origin = request.origin
        self.waiters.append(waiter)
        return superseded

    def outcome(self, new_model: ModelInfo | None, serving: ModelInfo | None,
                error: str | None = None, canary: CanaryReport | None = None) -> ReloadOutcome:
        old = self.old_model
        return ReloadOutcome(
            ok=error is None, origin=self.origin, requested_path=self.path,
            model_dir=serving.model_dir if serving else None,
            old_fingerprint=old.fingerprint if old else None,
            new_fingerprint=new_model.fingerprint if new_model and error is None else None,
            seconds=round(time.monotonic() - self.received_at, 4),
            cache_level=new_model.cache_level if new_model else None,
            error=error, coalesced=len(self.waiters), canary=canary)


class BlueGreen:
    """The reload in progress, the one waiting its turn, and the outcomes so far."""

    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor  # its workers, its model, its broker (replies to clients)
        self.settings = supervisor.settings
        self.job: ReloadJob | None = None  # in progress: started, not finished
        self.next_job: ReloadJob | None = None  # waits for it; later triggers merge into it
        self.last: ReloadOutcome | None = None
        self.counts: Counter[str] = Counter()  # outcome (ok, failed, refused) -> count
        self.levels: Counter[str] = Counter()  # successful ones by cache level (L1, L2, fresh)
        # The first load is SENSEVOICE_MODEL_DIR when set (else the usual places).
        self.follows_configured = self.settings.model_dir is not None
        # From other threads (the file watcher): requests for the loop to pick up.
        self.from_threads: deque[tuple[ReloadRequest, threading.Event]] = deque()

    def is_green(self, worker: WorkerHandle) -> bool:
        return self.job is not None and worker.worker_id in self.job.green

    # ------------------------------------------------------------- 1. requested

    def request(self, request: ReloadRequest, waiter: Waiter) -> None:
        served = self.supervisor.model
        configured = self.settings.model_dir
        try:
            path = check_reload_path(request.path, served, self.settings.model_roots,
                                     configured, self.follows_configured)
        except ReloadRefused as e:
            logger.error(failure_line(served, str(e), verb="refused"))
            self.counts["refused"] += 1
            self.last = self.unattempted(request.origin, request.path, f"refused: {e}")
            if waiter.client is not None:
                self.supervisor.broker.reply_error(waiter.client, waiter.request_id,
                                                   "reload_refused", str(e))
            notify([waiter])
            return
        # Loading what the setting resolves to follows it; reloading the served directory
        # (the file watcher, an explicit path) keeps what was followed; another one pins it.
        follows = path is not None and configured is not None and (
            path == resolved_or_none(configured)
            or (self.follows_configured and served is not None and path == served.model_dir))
        if self.job is None:
            self.job = ReloadJob(path, request.force_fresh, request.origin, [waiter],
                                 follows_configured=follows)
            self.start()
        elif self.next_job is None:
            self.next_job = ReloadJob(path, request.force_fresh, request.origin, [waiter],
                                      follows_configured=follows)
        else:
            replaced = self.next_job.path
            superseded = self.next_job.merge(request, path, waiter, follows)
            self.answer(superseded, self.unattempted(
                request.origin, replaced, f"superseded by a later reload request for {path}"))

    def request_from_thread(self, request: ReloadRequest) -> threading.Event:
        """Thread-safe: the loop requests it within a tick; the event is set when it is over."""
        done = threading.Event()
        self.from_threads.append((request, done))
        return done

    def take_requests_from_threads(self) -> None:
        while self.from_threads:
            request, done = self.from_threads.popleft()
            self.request(request, Waiter(None, "", done))

    # ------------------------------------------------------------- 2. started

    def start(self) -> None:
        job, supervisor = self.job, self.supervisor
        assert job is not None
        job.old_model = supervisor.model
        if self.unchanged(job):
            return
        job.deadline = time.monotonic() + self.settings.hotreload_timeout
        if self.settings.swap_strategy == "stop_first":
            for worker in supervisor.pool.in_roles("serving"):
                supervisor.drain_worker(worker)
            logger.info("[HOTRELOAD] stop_first: old worker stopped; requests wait until the "
                        "new model is ready (downtime = its load time)")
        assignment = Assignment(job.path, job.force_fresh)
        for _ in range(self.settings.workers):
            standby = supervisor.pool.idle_standby()
            green = standby or supervisor.pool.spawn(assignment)
            job.green.add(green.worker_id)  # before its load: its role is then "warming"
            if standby is not None:
                supervisor.send_load(standby, assignment)
            # A new process asks for its load when it says hello.

    def unchanged(self, job: ReloadJob) -> bool:
        """L1: the serving model, unchanged, asked for again: answer at once and keep it.

        Only when this reload is the only one, nothing forces a fresh load, the cache is on and
        every serving worker runs the serving model (none is left over from a reload)."""
        serving, pool = self.supervisor.model, self.supervisor.pool
        if job.force_fresh or self.settings.disable_cache or self.next_job is not None \
                or serving is None:
            return False
        workers = pool.in_roles("serving")
        if not workers or any(w.model is None or w.model.fingerprint != serving.fingerprint
                              for w in workers):
            return False
        verdict = unchanged_verdict(job.path, serving)
        if not verdict.hit:
            logger.debug("Reload of %s is not an L1 hit: %s", job.path or serving.model_dir,
                         verdict.reason)
            return False
        outcome = job.outcome(serving, serving).model_copy(update={"cache_level": "L1"})
        logger.info(l1_line(serving, outcome.seconds))
        self.finish(outcome)
        return True

    # ------------------------------------------------------------- 3. warming

    def green_passed(self, worker: WorkerHandle) -> None:
        """A green said Ready and answered its health ping; the last one to do so switches."""
        job = self.job
        assert job is not None and worker.worker_id in job.green
        job.passed.add(worker.worker_id)
        if job.passed == job.green:
            self.switch()

    # ------------------------------------------------------------- 4. switched

    def switch(self) -> None:
        job, supervisor = self.job, self.supervisor
        assert job is not None
        for worker in supervisor.pool.in_roles("serving"):
            supervisor.drain_worker(worker)
        for worker in supervisor.pool.in_roles("starting", "loading"):
            if worker.assignment is not None and not self.is_green(worker):
                supervisor.pool.retire(worker, "it was loading the model being replaced")  # refilled
        greens = [supervisor.pool.workers[worker_id] for worker_id in sorted(job.green)]
        now = time.monotonic()
        for worker in greens:
            worker.role, worker.idle_since = "serving", now
        model = greens[0].model
        assert model is not None
        supervisor.serve_model(model)
        outcome = job.outcome(model, model, canary=model.canary)
        logger.info(success_line(model, outcome.seconds))
        self.finish(outcome)

    # ------------------------------------------------------------- failed

    def check_deadline(self, now: float) -> None:
        if self.job is not None and now > self.job.deadline:
            self.fail(self.timeout_cause(self.job))

    def timeout_cause(self, job: ReloadJob) -> str:
        """Past SENSEVOICE_HOTRELOAD_TIMEOUT: a green without Ready that was told to run the
        canary may have been in any of its load, warm-up or canary; a long canary is the
        usual culprit, so the cause names its size."""
        cause = (f"not ready within {self.settings.hotreload_timeout:g} s "
                 f"(SENSEVOICE_HOTRELOAD_TIMEOUT)")
        pool = self.supervisor.pool
        waiting = [pool.workers[worker_id] for worker_id in sorted(job.green)
                   if worker_id in pool and pool.workers[worker_id].model is None]
        if self.settings.reload_canary_dir is None or not any(
                worker.assignment is not None for worker in waiting):
            return cause
        size = f" ({self.supervisor.canary.size()})" if self.supervisor.canary else ""
        return (f"{cause} while loading the model, warming up or running the canary{size}; "
                f"if the canary is what takes the time, shorten it or raise the timeout")

    def green_exited(self, worker: WorkerHandle, cause: str) -> None:
        self.fail(f"the new worker (pid {worker.pid}): {cause}", worker.canary)

    def fail(self, cause: str, canary: CanaryReport | None = None) -> None:
        job, supervisor = self.job, self.supervisor
        assert job is not None
        for worker_id in job.green:
            if worker_id in supervisor.pool:
                supervisor.pool.retire(supervisor.pool.workers[worker_id], "its reload failed")
        logger.error(failure_line(supervisor.model, cause))
        self.finish(job.outcome(None, supervisor.model, error=cause, canary=canary))

    # ------------------------------------------------------------- 5. finished

    def finish(self, outcome: ReloadOutcome) -> None:
        assert self.job is not None
        self.last = outcome
        self.counts["ok" if outcome.ok else "failed"] += 1
        if outcome.ok and outcome.cache_level is not None:
            self.levels[outcome.cache_level] += 1
        if outcome.ok:
            self.follows_configured = self.job.follows_configured
        self.answer(self.job.waiters, outcome)
        self.job, self.next_job = self.next_job, None
        if self.job is None:
            return
        if self.supervisor.shutting_down:
            self.fail("the service is stopping")
        else:
            self.start()

    def stop(self) -> None:
        """The service is stopping: the reloads in progress and waiting fail."""
        if self.job is not None:
            self.fail("the service is stopping")

    # ------------------------------------------------------------- answers

    def answer(self, waiters: list[Waiter], outcome: ReloadOutcome) -> None:
        for waiter in waiters:
            if waiter.client is not None:
                self.supervisor.broker.send_client(waiter.client, ReloadReply(
                    request_id=waiter.request_id, outcome=outcome))
        notify(waiters)

    def unattempted(self, origin: str, path: str | None, error: str) -> ReloadOutcome:
        """The outcome of a request that never started: whatever served still serves."""
        served = self.supervisor.model
        return ReloadOutcome(ok=False, origin=origin,
                             requested_path=path[:300] if path else None,
                             model_dir=served.model_dir if served else None,
                             old_fingerprint=served.fingerprint if served else None, error=error)


def notify(waiters: list[Waiter]) -> None:
    for waiter in waiters:
        if waiter.done is not None:
            waiter.done.set()


def describe_model(model: ModelInfo) -> str:
    ids = ", ".join(f"{key}: {value}" for key, value in model.short_ids.items())
    return f"{model.model_dir} ({ids})"


def success_line(model: ModelInfo, seconds: float) -> str:
    return (f"[HOTRELOAD] Swapped model successfully: reloaded from {describe_model(model)} "
            f"in {seconds:.2f} s via {CACHE_LEVEL_WORDS[model.cache_level]}"
            + (f"; {model.canary.verdict()}" if model.canary else ""))


def l1_line(model: ModelInfo, seconds: float) -> str:
    return (f"[HOTRELOAD] Reload answered from L1 in {seconds * 1000:.1f} ms: "
            f"{describe_model(model)} is unchanged and already serving; no new worker")


def failure_line(serving: ModelInfo | None, cause: str, verb: str = "failed") -> str:
    still = describe_model(serving) if serving else "nothing (no model was serving)"
    return f"[HOTRELOAD] Reload {verb}, still serving {still}: {cause}"
