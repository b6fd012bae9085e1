"""The ingress's door to the model replicas: what ui.gateway.Gateway calls on its client
(ServiceClient), over a Ray Serve DeploymentHandle to the SenseVoiceModel deployment.

Called from Gateway's worker threads (no event loop there), so it uses the handle's blocking
calls. Ray routes each call to a replica with room (max_ongoing_requests); a call the handle
cannot place within max_queued_requests is refused at once: "busy", as the supervisor's full
queue is. A replica that dies while holding a request (its process killed, its node lost) has
the request sent once more, to another replica (the router drops a dead one at once), as the
supervisor retries a request its worker died on; a second death is "worker_lost".
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ray.exceptions import RayActorError, RayError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)
from ray.serve.handle import DeploymentHandle

from cluster.fleet import (
    ReplicaView,
    fleet_view,
    last_fleet_reload,
    reload_counts,
    serving_model,
)
from cluster.types import FleetReloadResult
from sensevoice_core.client import reply_limit, transcribe_request
from sensevoice_core.errors import ServiceError
from sensevoice_core.protocol import (
    STATUS_TIMEOUT_S,
    ErrorReply,
    ModelInfo,
    Progress,
    ReloadOutcome,
    ReloadRequest,
    ServiceStatus,
    TranscribeReply,
    TranscribeRequest,
    WorkerStatus,
)
from sensevoice_core.settings import Settings

logger = logging.getLogger("sensevoice.cluster")

# /ready and /metrics polled in a loop reach the Serve controller (which runs rollouts) and
# the registry at most this often.
STATUS_CACHE_S = 1.0
ATTEMPTS = 2  # a request whose replica died is sent once more, as the supervisor does
# The replica died or its actor cannot be reached (RayActorError: ActorDiedError,
# ActorUnavailableError), or the router picked a replica that was just removed.
REPLICA_LOST = (RayActorError, ReplicaUnavailableError)


class FleetClient:
    """handle: to the model deployment. Its status is the fleet registry's (cluster.fleet):
    the live replicas' last reports and the fleet reloads."""

    def __init__(self, handle: DeploymentHandle, settings: Settings):
        self.handle = handle
        self.stream_handle = handle.options(stream=True)
        self.settings = settings
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._outstanding = 0  # calls sent to the fleet and not answered yet
        self._served = 0  # replies this client passed on
        self._seen: set[str] = set()  # replica ids its status calls saw
        self._departed: set[str] = set()  # ...that left the fleet since
        self._status_lock = threading.Lock()  # one fleet read at a time; the others wait
        self._fleet: tuple[float, list[ReplicaView], FleetReloads] | None = None  # last read

    def transcribe(self, audio: Any, language: str = "auto", use_itn: bool = False,
                   sample_rate: int = 16000, timeout: float | None = None,
                   vad_threshold: float | None = None,
                   filename: str | None = None, word_timestamps: bool = False,
                   languages: Sequence[str] | None = None,
                   on_progress: Callable[[Progress], None] | None = None) -> TranscribeReply:
        """As SupervisorClient.transcribe, answered by a model replica."""
        request, payload = transcribe_request(
            audio, self.settings, language, use_itn, sample_rate, vad_threshold, filename,
            word_timestamps, languages, progress=on_progress is not None)
        limit = reply_limit(self.settings, timeout)
        deadline = time.monotonic() + limit
        with self._lock:
            self._outstanding += 1
        try:
            reply = self._send(request, payload, deadline, limit, on_progress)
        finally:
            with self._lock:
                self._outstanding -= 1
        if isinstance(reply, ErrorReply):
            raise ServiceError(reply.code, reply.message)
        with self._lock:
            self._served += 1
        return reply

    def _send(self, request: TranscribeRequest, payload: bytes, deadline: float, limit: float,
              on_progress: Callable[[Progress], None] | None) -> TranscribeReply | ErrorReply:
        seen = Seen()
        for attempt in range(1, ATTEMPTS + 1):
            try:
                if on_progress is None:
                    return self._call(request, payload, deadline)
                return self._stream(request, payload, deadline, on_progress, seen)
            except REPLICA_LOST as e:
                cause = f"the replica serving it was lost ({type(e).__name__})"
                if attempt == ATTEMPTS:
                    raise ServiceError("worker_lost", f"{cause} while serving this request, "
                                                      f"twice") from None
                logger.warning("%s while serving request %s; retrying it on another replica",
                               cause, request.request_id)
            except BackPressureError:
                raise ServiceError("busy", "every model replica is full, and so is the "
                                           "handle's queue (max_queued_requests); retry "
                                           "later") from None
            except DeploymentUnavailableError as e:
                raise ServiceError("unavailable", e.message) from None
            except (TimeoutError, RequestCancelledError):
                raise ServiceError("timeout", f"no reply from the model replicas within "
                                              f"{limit:g} s") from None
            except RayError as e:  # the replica's method raised: a bug there, not the audio
                logger.error("Request %s failed in a model replica: %s", request.request_id, e)
                raise ServiceError("internal", f"the model replica failed on this request: "
                                               f"{type(e).__name__}") from None
        raise AssertionError("unreachable")

    def _call(self, request: TranscribeRequest, payload: bytes, deadline: float
              ) -> TranscribeReply | ErrorReply:
        response = self.handle.transcribe.remote(request, payload)
        try:
            return response.result(timeout_s=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            response.cancel()
            raise

    def _stream(self, request: TranscribeRequest, payload: bytes, deadline: float,
                on_progress: Callable[[Progress], None], seen: Seen
                ) -> TranscribeReply | ErrorReply:
        """The replica's transcribe_stream: each Progress to on_progress, then the reply.
        A stream has no wait limit of its own: a timer cancels it at the deadline."""
        response = self.stream_handle.transcribe_stream.remote(request, payload)
        timer = threading.Timer(max(0.0, deadline - time.monotonic()), response.cancel)
        timer.daemon = True
        timer.start()
        try:
            for step in response:
                if not isinstance(step, Progress):
                    return step
                if step.done > seen.done:  # a retry goes over steps the caller already has
                    seen.done = step.done
                    on_progress(step)  # what it raises (ClientGone) ends the wait
        except BaseException:
            response.cancel()
            raise
        finally:
            timer.cancel()
        raise ServiceError("internal", "the model replica's stream ended without a reply")

    def status(self, timeout: float = STATUS_TIMEOUT_S) -> ServiceStatus:
        """The fleet as last read (at most STATUS_CACHE_S old); ServiceError("unavailable")
        when it cannot be read, whatever the cause."""
        if not self._status_lock.acquire(timeout=timeout):
            raise ServiceError("unavailable", f"the fleet's state was not read within "
                                              f"{timeout:g} s (another read is under way)")
        try:
            if self._fleet is None or time.monotonic() - self._fleet[0] > STATUS_CACHE_S:
                self._fleet = (time.monotonic(), *self._read_fleet(timeout))
            read_at, views, reloads = self._fleet
        finally:
            self._status_lock.release()
        with self._lock:
            outstanding, served, departed = self._outstanding, self._served, len(self._departed)
        return fleet_status(views, time.monotonic() - read_at, reloads,
                            time.monotonic() - self.started, outstanding,
                            len(views) * self.settings.max_batch_requests, served, departed)

    def _read_fleet(self, timeout: float) -> tuple[list[ReplicaView], FleetReloads]:
        """The live replicas that have reported, and the fleet reloads, from the Serve
        controller and the fleet registry."""
        try:
            views = [v for v in fleet_view(timeout) if v.report is not None]
            reloads = FleetReloads(last_fleet_reload(timeout), *reload_counts(timeout))
        except TimeoutError:
            raise ServiceError("unavailable", f"the Serve controller or the fleet registry did "
                                              f"not answer within {timeout:g} s") from None
        except Exception as e:  # Serve gone (FleetError), an actor lost, a changed schema
            raise ServiceError("unavailable", f"the fleet's state could not be read: "
                                              f"{type(e).__name__}: {e}"[:500]) from None
        with self._lock:
            live = {v.live.replica_id for v in views}
            self._departed |= self._seen - live
            self._seen |= live
        return views, reloads

    def reload(self, request: ReloadRequest, timeout: float | None = None) -> ReloadOutcome:
        raise ServiceError("reload_refused", "a cluster reloads every replica at once: run "
                                             "`python -m cluster reload [PATH]`")


@dataclass(frozen=True)
class FleetReloads:
    """What the fleet registry knows of `python -m cluster reload`s."""

    last: FleetReloadResult | None
    outcomes: dict[str, int]  # "ok" / "failed" -> count
    levels: dict[str, int]  # successful ones by cache level


@dataclass
class Seen:
    """The last Progress.done passed on, across a request's attempts (-1: none)."""

    done: int = -1


def fleet_status(views: list[ReplicaView], read_s_ago: float, reloads: FleetReloads,
                 uptime_s: float, outstanding: int, capacity: int, served: int, departed: int
                 ) -> ServiceStatus:
    """The fleet as a ServiceStatus: one worker per replica, as it last reported (each
    worker's report_age_s says how old its busy / served figures are). outstanding: this
    ingress's calls not answered yet; capacity: what the live replicas take at once."""
    now = time.time()
    reports = [v.report for v in views if v.report is not None]
    workers = [WorkerStatus(worker_id=r.replica_id, pid=r.pid,
                            role="serving" if r.model is not None else "loading",
                            age_s=max(0.0, now - r.started_at),
                            requests_served=r.requests_served, busy=r.in_flight > 0,
                            fingerprint=r.model.fingerprint if r.model else None,
                            threads=r.threads, batches=r.batches, batch_items=r.batch_items,
                            report_age_s=None if v.age_s is None else v.age_s + read_s_ago)
               for v in sorted(views, key=lambda v: v.live.replica_id)
               if (r := v.report) is not None]
    # Counted by the replicas as of their last report (a heartbeat, and on each change).
    in_flight = sum(r.in_flight for r in reports)
    generations = {r.generation for r in reports}
    model = serving_model(reports)
    return ServiceStatus(
        # In cluster mode the process answering status is the ingress replica: its pid, its
        # uptime. There is no supervisor process.
        supervisor_pid=os.getpid(), uptime_s=uptime_s,
        model=model, workers=workers,
        # Ray's router queue is not observable; what is known: this ingress's calls beyond what
        # the live replicas take at once wait there (a lower bound: a replica that is
        # reconfiguring takes none, and uneven routing queues some earlier).
        queued=max(0, outstanding - capacity), in_flight=in_flight,
        requests_served=served,  # replies this ingress passed on
        # Replicas its status reads saw that have left the fleet since (died and replaced, or
        # removed by a redeploy); ones replaced between two reads are not seen: a lower bound.
        worker_restarts=departed,
        # A fleet reload is under way while the replicas have not all applied one generation.
        reloading=len(generations) > 1,
        last_reload=None if reloads.last is None else reload_outcome(reloads.last, model),
        reload_counts=reloads.outcomes, reload_levels=reloads.levels,
        watching=None)  # no file watcher in cluster mode: `python -m cluster reload` only


def reload_outcome(result: FleetReloadResult, serving: ModelInfo | None) -> ReloadOutcome:
    """A fleet reload as the single-host service states a reload."""
    levels = {r.last_reload.cache_level for r in result.replicas
              if r.last_reload is not None and r.generation == result.generation}
    failures = "; ".join(f"replica {rid}: {why}" for rid, why in sorted(result.failures.items()))
    return ReloadOutcome(
        ok=result.ok, origin="cli", requested_path=result.requested_path,
        model_dir=serving.model_dir if serving else None,
        new_fingerprint=result.fingerprint, seconds=result.seconds,
        # One level when every replica loaded the same way; mixed levels are not one answer.
        cache_level=levels.pop() if result.ok and len(levels) == 1 else None,
        error=(failures + (" (rolled back: every replica serves the old model)"
                           if result.rolled_back else "")) or None)
