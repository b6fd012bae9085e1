"""What the supervisor answers a client: its status, a reload (``reload.py``), a transcription
queued for a worker (``broker.py``) or a live stream's messages (``streams.py``); or, while
nothing can serve, a refusal."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from sensevoice_core.protocol import (
    ReloadRequest,
    ServiceStatus,
    StatusReply,
    StatusRequest,
    StreamAudio,
    StreamControl,
    StreamOpen,
    WorkerStatus,
)
from supervisor.reload import Waiter

if TYPE_CHECKING:
    from supervisor.supervisor import Supervisor


class ClientDesk:
    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor

    def handle(self, frames: list[bytes]) -> None:
        supervisor = self.supervisor
        broker = supervisor.broker
        received = broker.receive(frames)  # None: malformed or too large, answered
        if received is None:
            return
        client, message, payload = received
        if isinstance(message, (StreamOpen, StreamAudio, StreamControl)):
            supervisor.streams.from_client(client, message, payload)
        elif isinstance(message, StatusRequest):
            broker.send_client(client, StatusReply(request_id=message.request_id,
                                                   status=self.status()))
        elif supervisor.shutting_down:
            broker.reply_error(client, message.request_id, "shutting_down",
                               "the service is stopping")
        elif isinstance(message, ReloadRequest):
            supervisor.reloads.request(message, Waiter(client, message.request_id))
        elif not self.can_serve_soon():
            broker.reply_error(client, message.request_id, "unavailable",
                               "no inference worker is running; see the supervisor log")
        else:
            # Dispatched at once: SENSEVOICE_MAX_QUEUE bounds what waits for a worker, so a
            # burst read in one go must not be refused while the workers have room for it.
            broker.accept(client, message, payload)
            supervisor.dispatch()

    def can_serve_soon(self) -> bool:
        """A worker serves, or one will: a reload or a load is under way, or a failed load is
        about to be retried."""
        supervisor = self.supervisor
        pool = supervisor.pool
        return (supervisor.reloads.job is not None or bool(pool.in_roles("serving"))
                or any(w.assignment for w in pool.in_roles("starting", "loading"))
                or pool.fork_server.first_start
                or time.monotonic() < supervisor.backoff.until + 1)

    def status(self) -> ServiceStatus:
        supervisor = self.supervisor
        now = time.monotonic()
        streams = supervisor.streams
        workers = [WorkerStatus(worker_id=w.worker_id, pid=w.pid, role=w.role,
                                age_s=round(now - w.spawned_at, 3),
                                requests_served=w.requests_served, busy=w.busy,
                                fingerprint=w.model.fingerprint if w.model else None,
                                streams=len(streams.held_by(w)), threads=w.threads,
                                batches=w.batches, batch_items=w.batch_items,
                                start_method=w.start_method,
                                start_s=None if w.start_s is None else round(w.start_s, 3))
                   for w in sorted(supervisor.pool, key=lambda w: w.age)]
        watcher = supervisor.watcher
        return ServiceStatus(
            supervisor_pid=os.getpid(), uptime_s=round(now - supervisor.started_at, 3),
            model=supervisor.model, workers=workers, queued=len(supervisor.broker.queue),
            in_flight=sum(len(w.jobs) for w in supervisor.pool),
            requests_served=supervisor.broker.requests_served,
            worker_restarts=supervisor.restarts, reloading=supervisor.reloads.job is not None,
            last_reload=supervisor.reloads.last, reload_counts=dict(supervisor.reloads.counts),
            reload_levels=dict(supervisor.reloads.levels),
            watching=str(watcher.directory) if watcher and watcher.directory else None,
            watch_counts=dict(watcher.counts) if watcher else {},
            streams=len(streams.streams), stream_counts=dict(streams.counts),
            stream_failures=dict(streams.failures),
            fork_server_pid=supervisor.pool.fork_server.pid)
