"""The request broker: transcription jobs in a bounded queue, dispatched to serving workers,
answered, retried once when their worker dies, failed when they wait or run too long. A job
asked with progress has its Progress steps passed to its client before the reply.

It owns every job and every reply to a client; the supervisor decides which workers exist.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import zmq

from sensevoice_core.batching import max_requests
from sensevoice_core.protocol import (
    BESIDE_LONG_MAX_BYTES,
    LONG_REQUEST_S,
    MAX_REQUESTS_PER_WORKER,
    ClientMessage,
    ErrorCode,
    ErrorReply,
    MiB,
    Progress,
    ProtocolError,
    TranscribeReply,
    TranscribeRequest,
    decode_client,
    encode,
    request_id_of,
)
from sensevoice_core.settings import Settings
from supervisor.workers import WorkerHandle

logger = logging.getLogger("sensevoice.supervisor")

HELD_MAX_BYTES = 64 * MiB
"""Batching on: the payload bytes one worker holds at most beyond its largest request (so
one request of up to SENSEVOICE_MAX_REQUEST_MB always fits an empty worker)."""


@dataclass
class Job:
    job_id: str
    client: bytes
    request: TranscribeRequest
    payload: bytes
    received_at: float = field(default_factory=time.monotonic)
    attempts: int = 0
    dispatched_at: float = 0.0
    # Worker time charged to it. Batching off: wall time divided by the requests sharing its
    # worker's cores, so a request slowed by a neighbour is not timed out for that. Batching
    # on: the full wall time, as the requests a worker holds advance together in its passes.
    charged_s: float = 0.0
    charged_at: float = 0.0
    # The last Progress.done passed to the client (-1: none): a retry on another worker starts
    # over, and only the steps beyond what the client has seen are passed on.
    progress_done: int = -1


class Broker:
    def __init__(self, settings: Settings, frontend: zmq.Socket, backend: zmq.Socket):
        self.settings = settings
        self.frontend = frontend  # clients
        self.backend = backend  # workers
        self.jobs: dict[str, Job] = {}  # queued or held by a worker
        self.queue: deque[str] = deque()
        self.counter = 0
        self.requests_served = 0

    # ----------------------------------------------------------------- requests and replies

    def receive(self, frames: list[bytes]) -> tuple[bytes, ClientMessage, bytes] | None:
        """A client's message (client id, message, payload); None when it was too large or
        malformed, and already answered so."""
        client, body = frames[0], frames[1:]
        size = sum(len(frame) for frame in body)
        limit = self.settings.max_request_bytes
        request_id = request_id_of(body[0]) if body else None
        if size > limit:
            self.reply_error(client, request_id, "too_large",
                             f"request of {size / MiB:.1f} MiB; at most "
                             f"{self.settings.max_request_mb:g} MiB (SENSEVOICE_MAX_REQUEST_MB)")
            return None
        try:
            message, payload = decode_client(body)
        except ProtocolError as e:
            self.reply_error(client, request_id, "bad_request", str(e))
            return None
        return client, message, payload or b""

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

    def dispatch(self, workers: Iterable[WorkerHandle],
                 streaming: frozenset[str] = frozenset()) -> None:
        """Queued jobs to serving workers, in arrival order.

        Batching on (SENSEVOICE_BATCH_WAIT_MS > 0): each job goes to the worker with the fewest
        requests in flight (the longest idle among equals), until every worker holds
        SENSEVOICE_MAX_BATCH_REQUESTS; the worker batches their forward passes, and a long
        request's pieces take turns with the short ones there (sensevoice_core.batching).
        A worker holds at most one request larger than BESIDE_LONG_MAX_BYTES, and at most
        HELD_MAX_BYTES of payload beyond its largest request; a job that fits no worker keeps
        its place while the jobs behind it go on. A retry (its first worker died holding it)
        runs alone on a worker with no requests and no live streams (streaming: the ids of
        workers holding streams): should that request be what killed the worker, it takes no
        other request with it. While a retry waits, such empty workers are kept for the
        retries, and the other jobs go on to the workers that already hold some.

        Batching off: to idle serving workers, oldest-idle first; then, to each worker whose
        requests have all run for LONG_REQUEST_S, the oldest queued job small enough to be
        short (BESIDE_LONG_MAX_BYTES), on its second compute thread. A large one waits for a
        free worker: two long requests sharing one worker would only slow each other."""
        if not self.queue:
            return
        now = time.monotonic()
        serving = [w for w in workers if w.role == "serving" and not w.killed]
        if self.settings.batch_wait_ms > 0:
            self.dispatch_batched(serving, streaming, now)
            return
        for worker in sorted((w for w in serving if not w.busy), key=lambda w: w.idle_since):
            if not self.queue:
                return
            self.send_job(worker, self.queue.popleft(), now)
        for worker in serving:
            if not (0 < len(worker.jobs) < MAX_REQUESTS_PER_WORKER and all(
                    now - self.jobs[j].dispatched_at > LONG_REQUEST_S for j in worker.jobs)):
                continue
            small = next((j for j in self.queue
                          if len(self.jobs[j].payload) <= BESIDE_LONG_MAX_BYTES), None)
            if small is None:
                return
            self.queue.remove(small)
            self.send_job(worker, small, now)

    def dispatch_batched(self, serving: list[WorkerHandle], streaming: frozenset[str],
                         now: float) -> None:
        empty = sorted((w for w in serving if not w.jobs and w.worker_id not in streaming),
                       key=lambda w: w.idle_since)
        retries = [j for j in self.queue if self.jobs[j].attempts > 0]
        for job_id, worker in zip(retries, empty):
            self.queue.remove(job_id)
            self.send_job(worker, job_id, now)
        retry_waiting = len(retries) > len(empty)
        limit = max_requests(self.settings)
        for job_id in [j for j in self.queue if self.jobs[j].attempts == 0]:
            size = len(self.jobs[job_id].payload)
            open_workers = [w for w in serving if len(w.jobs) < limit
                            and not any(self.jobs[j].attempts > 1 for j in w.jobs)
                            and not (retry_waiting and not w.jobs
                                     and w.worker_id not in streaming)
                            and self.fits(w, size)]
            if not open_workers:
                if not any(len(w.jobs) < limit for w in serving):
                    return  # every worker is full: nothing behind this job fits either
                continue
            worker = min(open_workers, key=lambda w: (len(w.jobs), w.idle_since))
            self.queue.remove(job_id)
            self.send_job(worker, job_id, now)

    def fits(self, worker: WorkerHandle, size: int) -> bool:
        """Whether a job of this payload size may join the requests the worker holds."""
        if not worker.jobs:
            return True
        held = [len(self.jobs[j].payload) for j in worker.jobs]
        if size > BESIDE_LONG_MAX_BYTES and max(held) > BESIDE_LONG_MAX_BYTES:
            return False
        return sum(held) + size - max(*held, size) <= HELD_MAX_BYTES

    def send_job(self, worker: WorkerHandle, job_id: str, now: float) -> None:
        job = self.jobs[job_id]
        job.attempts += 1
        job.dispatched_at = job.charged_at = now
        job.charged_s = 0.0
        worker.jobs.append(job_id)
        forward = job.request.model_copy(update={"request_id": job_id})
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

    def progress(self, worker: WorkerHandle, message: Progress) -> None:
        """A step of a request the worker still holds, to its client under the client's own
        request id; steps of a request that timed out or moved on are dropped."""
        if message.request_id not in worker.jobs:
            return
        job = self.jobs[message.request_id]
        if message.done <= job.progress_done:
            return  # a retry going over segments the client already has
        job.progress_done = message.done
        self.send_client(job.client, message.model_copy(
            update={"request_id": job.request.request_id}))

    def unreadable_reply(self, worker: WorkerHandle, job_id: str | None, problem: str) -> None:
        """A reply that failed validation fails its request alone; the worker goes on."""
        if job_id in worker.jobs:
            worker.jobs.remove(job_id)
            self.fail(job_id, "internal", f"the worker's reply could not be read ({problem})")

    def requeue(self, worker: WorkerHandle, cause: str, retry: bool = True,
                suspect: bool = True) -> None:
        """The requests a dead worker held are retried once on another worker, then fail.
        suspect=False: the worker was killed for a reason of the supervisor's own (a drain
        past its deadline), not one its requests can have caused: they go back to the
        queue as if never dispatched, to be batched as usual."""
        for job_id in reversed(worker.jobs):
            job = self.jobs[job_id]
            if not suspect:  # (expire_running may have given a bystander its try back)
                job.attempts = max(0, job.attempts - 1)
            if retry and job.attempts < 2:
                logger.warning("%s while serving request %s; retrying it on another worker",
                               cause, job.request.request_id)
                self.queue.appendleft(job_id)
            else:
                self.fail(job_id, "worker_lost", f"{cause} while serving this request, twice")
        worker.jobs.clear()

    def expire_running(self, worker: WorkerHandle, now: float) -> bool:
        """Fail the worker's requests charged more than SENSEVOICE_REQUEST_TIMEOUT; True if any
        were (the worker is then replaced: the requests beside them keep their retry)."""
        timeout = self.settings.request_timeout
        expired = []
        for job_id in worker.jobs:
            job = self.jobs[job_id]
            sharing = 1 if self.settings.batch_wait_ms > 0 else len(worker.jobs)
            job.charged_s += (now - job.charged_at) / sharing
            job.charged_at = now
            if job.charged_s > timeout:
                expired.append(job_id)
        for job_id in expired:
            worker.jobs.remove(job_id)
            self.fail(job_id, "timeout",
                      f"no result within {timeout:g} s (SENSEVOICE_REQUEST_TIMEOUT)")
        if expired:
            for job_id in worker.jobs:
                self.jobs[job_id].attempts -= 1  # its worker is killed for another request
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
