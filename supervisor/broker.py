"""The request broker: transcription jobs in a bounded queue, dispatched to serving workers,
answered, retried once when their worker dies, failed when they wait or run too long.

It owns every job and every reply to a client; the supervisor decides which workers exist.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import zmq

from sensevoice_core.protocol import (
    LONG_REQUEST_S,
    MAX_REQUESTS_PER_WORKER,
    ErrorCode,
    ErrorReply,
    TranscribeReply,
    TranscribeRequest,
    encode,
)
from sensevoice_core.settings import Settings
from supervisor.workers import WorkerHandle

logger = logging.getLogger("sensevoice.supervisor")


@dataclass
class Job:
    job_id: str
    client: bytes
    request: TranscribeRequest
    payload: bytes
    received_at: float = field(default_factory=time.monotonic)
    attempts: int = 0
    dispatched_at: float = 0.0


class Broker:
    def __init__(self, settings: Settings, frontend: zmq.Socket, backend: zmq.Socket):
        self.settings = settings
        self.frontend = frontend  # clients
        self.backend = backend  # workers
        self.jobs: dict[str, Job] = {}  # queued or held by a worker
        self.queue: deque[str] = deque()
        self.counter = 0
        self.requests_served = 0

    # ----------------------------------------------------------------- replies

    def send_client(self, client: bytes, message) -> None:
        self.frontend.send_multipart([client, *encode(message)])

    def reply_error(self, client: bytes, request_id: str | None, code: ErrorCode,
                    message: str) -> None:
        self.send_client(client, ErrorReply(request_id=request_id, code=code, message=message))

    def fail(self, job_id: str, code: ErrorCode, message: str) -> None:
        job = self.jobs.pop(job_id)
        self.reply_error(job.client, job.request.request_id, code, message)

    # ----------------------------------------------------------------- life of a job

    def accept(self, client: bytes, request: TranscribeRequest, payload: bytes) -> None:
        if len(self.queue) >= self.settings.max_queue:
            self.reply_error(client, request.request_id, "busy",
                             f"{len(self.queue)} requests are waiting; retry later")
            return
        self.counter += 1
        job = Job(f"j{self.counter}", client, request, payload)
        self.jobs[job.job_id] = job
        self.queue.append(job.job_id)

    def dispatch(self, workers: Iterable[WorkerHandle]) -> None:
        """Queued jobs to idle serving workers, oldest-idle first; then one more job to each
        worker whose requests have all run for LONG_REQUEST_S (its second compute thread)."""
        if not self.queue:
            return
        now = time.monotonic()
        serving = [w for w in workers if w.role == "serving" and not w.killed]
        idle = sorted((w for w in serving if not w.busy), key=lambda w: w.idle_since)
        beside_long = [w for w in serving if 0 < len(w.jobs) < MAX_REQUESTS_PER_WORKER
                       and all(now - self.jobs[j].dispatched_at > LONG_REQUEST_S
                               for j in w.jobs)]
        for worker in idle + beside_long:
            if not self.queue:
                return
            job = self.jobs[self.queue.popleft()]
            job.attempts += 1
            job.dispatched_at = now
            worker.jobs.append(job.job_id)
            forward = job.request.model_copy(update={"request_id": job.job_id})
            self.backend.send_multipart([worker.worker_id.encode(), *encode(forward, job.payload)])

    def finish(self, worker: WorkerHandle, reply: TranscribeReply | ErrorReply) -> None:
        if reply.request_id not in worker.jobs:
            # A late answer to a request that already timed out; the ones in hand stay.
            logger.warning("Worker %s (pid %s) answered request %s, which it is no longer "
                           "serving; ignored", worker.worker_id, worker.pid, reply.request_id)
            return
        worker.jobs.remove(reply.request_id)
        job = self.jobs.pop(reply.request_id)
        if not worker.jobs:
            worker.idle_since = time.monotonic()
        if isinstance(reply, TranscribeReply):
            worker.requests_served += 1
            self.requests_served += 1
        self.send_client(job.client, reply.model_copy(update={"request_id": job.request.request_id}))

    def unreadable_reply(self, worker: WorkerHandle, job_id: str | None, problem: str) -> None:
        """A reply that failed validation fails its request alone; the worker goes on."""
        if job_id in worker.jobs:
            worker.jobs.remove(job_id)
            self.fail(job_id, "internal", f"the worker's reply could not be read ({problem})")

    def requeue(self, worker: WorkerHandle, cause: str, retry: bool = True) -> None:
        """The requests a dead worker held are retried once on another worker, then fail."""
        for job_id in reversed(worker.jobs):
            job = self.jobs[job_id]
            if retry and job.attempts < 2:
                logger.warning("%s while serving request %s; retrying it on another worker",
                               cause, job.request.request_id)
                self.queue.appendleft(job_id)
            else:
                self.fail(job_id, "worker_lost", f"{cause} while serving this request, twice")
        worker.jobs.clear()

    def expire_running(self, worker: WorkerHandle, now: float) -> bool:
        """Fail the worker's requests that ran past SENSEVOICE_REQUEST_TIMEOUT; True if any did."""
        timeout = self.settings.request_timeout
        expired = [j for j in worker.jobs if now - self.jobs[j].dispatched_at > timeout]
        for job_id in expired:
            worker.jobs.remove(job_id)
            self.fail(job_id, "timeout",
                      f"no result within {timeout:g} s (SENSEVOICE_REQUEST_TIMEOUT)")
        return bool(expired)

    def expire_queued(self, now: float) -> None:
        while self.queue and now - self.jobs[self.queue[0]].received_at > self.settings.request_timeout:
            self.fail(self.queue.popleft(), "timeout", "no worker became free in time")

    def fail_queued(self, code: ErrorCode, message: str) -> None:
        while self.queue:
            self.fail(self.queue.popleft(), code, message)

    def fail_held(self, worker: WorkerHandle, code: ErrorCode, message: str) -> None:
        for job_id in worker.jobs:
            self.fail(job_id, code, message)
        worker.jobs.clear()
