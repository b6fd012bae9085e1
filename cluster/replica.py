"""The model deployment: one SenseVoice model per replica, loaded and answered by the same
functions as the single-host worker (sensevoice_core.serving), swapped in place by
reconfigure() when the deployment's user_config (a FleetConfig) changes.

What Ray does around reconfigure (verified with ray 2.60, see /work/notes/ray_facts18.md):
a user_config-only change reaches each live replica without restarting it, a fifth of the
replicas at a time (rolling_update_percentage, at least one); while a replica reconfigures
Ray routes no new request to it (state UPDATING), so the other replicas serve, and with a
single replica requests wait for the reconfigure and are then served. None fails.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import ray
import torch
from ray import serve

from cluster.fleet import registry
from cluster.types import MODEL_DEPLOYMENT, FleetConfig, ReplicaReport
from sensevoice_core.long_audio import ProgressCallback
from sensevoice_core.pipeline import SenseVoice
from sensevoice_core.protocol import (
    ErrorReply,
    ModelInfo,
    Progress,
    ReloadOutcome,
    TranscribeReply,
    TranscribeRequest,
)
from sensevoice_core.result import Segment
from sensevoice_core.serving import (
    LoadFailure,
    answer,
    attach_batcher,
    load_for_serving,
)
from sensevoice_core.settings import Settings
from supervisor.unchanged import unchanged_verdict

logger = logging.getLogger("sensevoice.cluster")

REPORT_INTERVAL_S = 5.0  # counters reach the registry at least this often while they change


@dataclass
class Serving:
    """A loaded model and the requests using it: a model swapped out is released (its
    batcher thread stopped) when its last request is done, not while one still runs."""

    model: SenseVoice
    info: ModelInfo
    users: int = 0
    retired: bool = False


def replica_threads(settings: Settings) -> int:
    """SENSEVOICE_THREADS, else the CPUs Ray assigned this replica (ray_actor_options)."""
    if settings.threads > 0:
        return settings.threads
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, round(cpus))


def batch_counts(model: SenseVoice) -> tuple[int, int]:
    batcher = model.batcher
    return (batcher.batches, batcher.batch_items) if batcher is not None else (0, 0)


def release(serving: Serving) -> None:
    if serving.model.batcher is not None:
        serving.model.batcher.close()


@serve.deployment(name=MODEL_DEPLOYMENT, ray_actor_options={"num_cpus": 1})
class SenseVoiceModel:
    """Cross-request batching is the library's ForwardBatcher (attach_batcher), not
    @serve.batch: @serve.batch batches whole calls, while the ForwardBatcher puts the forward
    passes of concurrent requests together and splits a long audio's speech segments into
    the same passes, so a short request does not wait behind a long one's whole call."""

    def __init__(self) -> None:
        self.settings = Settings()
        self.threads = replica_threads(self.settings)
        torch.set_num_threads(self.threads)
        context = ray.get_runtime_context()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.node_id = context.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.started_at = time.time()
        self.registry = registry()
        self.lock = threading.Lock()
        self.serving: Serving | None = None
        self.generation = -1  # no FleetConfig applied yet
        self.error: str | None = None
        self.last_reload: ReloadOutcome | None = None
        self.requests_served = 0
        self.in_flight = 0
        self.past_batches = 0  # forward passes run by models swapped out
        self.past_batch_items = 0
        self.reported = (-1, -1)  # (requests_served, in_flight) in the last report sent
        threading.Thread(target=self.report_counters, name="fleet-report", daemon=True).start()
        logger.info("replica %s on node %s with %d torch threads", self.replica_id,
                    self.node_id[:8], self.threads)

    # ------------------------------------------------------------------ configuration

    async def reconfigure(self, user_config: dict) -> None:
        """Apply a FleetConfig. A failed load keeps the old model serving and is reported,
        never raised (raising here makes Ray replace the replica), except when there is no
        old model: then the replica cannot serve, and Ray is told by the exception."""
        config = FleetConfig.model_validate(user_config)
        start = time.perf_counter()
        old = self.serving
        if old is not None and not config.force_fresh:
            verdict = unchanged_verdict(config.model_dir, old.info)
            if verdict.hit:
                self.applied(config, None, ReloadOutcome(
                    ok=True, origin="cli", requested_path=config.model_dir,
                    model_dir=old.info.model_dir, old_fingerprint=old.info.fingerprint,
                    new_fingerprint=old.info.fingerprint, cache_level="L1",
                    seconds=time.perf_counter() - start))
                return
            logger.info("generation %d: loading %s (%s)", config.generation, config.model_dir,
                        verdict.reason)
        try:
            loaded = await asyncio.to_thread(load_for_serving, config.model_dir,
                                             config.force_fresh, self.settings,
                                             old is not None)
        except LoadFailure as e:
            outcome = ReloadOutcome(
                ok=False, origin="cli", requested_path=config.model_dir,
                model_dir=old.info.model_dir if old else None,
                old_fingerprint=old.info.fingerprint if old else None,
                seconds=time.perf_counter() - start, error=e.cause, canary=e.canary)
            self.applied(config, e.cause, outcome)
            if old is None:
                raise RuntimeError(f"cannot load the model {config.model_dir}: {e.cause}") \
                    from None
            logger.error("generation %d: %s did not load, the old model keeps serving: %s",
                         config.generation, config.model_dir, e.cause)
            return
        attach_batcher(loaded.model, self.settings, self.threads, self.callers)
        idle = False
        with self.lock:
            self.serving = Serving(loaded.model, loaded.info)
            if old is not None:
                old.retired = True
                idle = old.users == 0
                batches, items = batch_counts(old.model)
                self.past_batches += batches
                self.past_batch_items += items
        if old is not None and idle:
            release(old)
        self.applied(config, None, ReloadOutcome(
            ok=True, origin="cli", requested_path=config.model_dir,
            model_dir=loaded.info.model_dir,
            old_fingerprint=old.info.fingerprint if old else None,
            new_fingerprint=loaded.info.fingerprint, cache_level=loaded.info.cache_level,
            seconds=time.perf_counter() - start, canary=loaded.info.canary))

    def applied(self, config: FleetConfig, error: str | None, outcome: ReloadOutcome) -> None:
        self.generation, self.error = config.generation, error
        if outcome.old_fingerprint is not None:  # the first load is not a reload
            self.last_reload = outcome
        self.push()

    # ------------------------------------------------------------------ requests

    def transcribe(self, request: TranscribeRequest, payload: bytes
                   ) -> TranscribeReply | ErrorReply:
        return self.answer(request, payload, None)

    def transcribe_stream(self, request: TranscribeRequest, payload: bytes
                          ) -> Iterator[Progress | TranscribeReply | ErrorReply]:
        """Progress steps as segments finish, then the reply (for stream=true)."""
        steps: queue.SimpleQueue[Progress | TranscribeReply | ErrorReply] = queue.SimpleQueue()

        def progress(done: int, total: int, segment: Segment | None) -> None:
            steps.put(Progress(request_id=request.request_id, done=done, total=total,
                               segment=segment))

        threading.Thread(target=lambda: steps.put(self.answer(request, payload, progress)),
                         name=f"transcribe-{request.request_id}", daemon=True).start()
        while True:
            step = steps.get()
            yield step
            if not isinstance(step, Progress):
                return

    def answer(self, request: TranscribeRequest, payload: bytes,
               progress: ProgressCallback | None) -> TranscribeReply | ErrorReply:
        with self.lock:
            serving = self.serving
            if serving is not None:
                serving.users += 1
                self.in_flight += 1
        if serving is None:
            return ErrorReply(request_id=request.request_id, code="unavailable",
                              message="this replica has no model loaded")
        try:
            return answer(serving.model, serving.info.fingerprint, request, payload,
                          self.settings, progress)
        finally:
            with self.lock:
                serving.users -= 1
                self.in_flight -= 1
                self.requests_served += 1
                idle = serving.retired and serving.users == 0
            if idle:
                release(serving)

    def callers(self) -> int:
        """Requests that may submit forward passes now (the batcher waits for them)."""
        return self.in_flight

    # ------------------------------------------------------------------ health and reports

    def check_health(self) -> None:
        if self.serving is None:
            raise RuntimeError(f"replica {self.replica_id} has no model loaded"
                               + (f": {self.error}" if self.error else ""))

    def report(self) -> ReplicaReport:
        with self.lock:
            served, in_flight = self.requests_served, self.in_flight
        serving = self.serving
        batches, items = batch_counts(serving.model) if serving else (0, 0)
        return ReplicaReport(
            replica_id=self.replica_id, node_id=self.node_id, node_ip=self.node_ip,
            pid=os.getpid(), started_at=self.started_at, reported_at=time.time(),
            generation=self.generation, model=serving.info if serving else None,
            error=self.error, last_reload=self.last_reload, requests_served=served,
            in_flight=in_flight, threads=self.threads,
            batches=self.past_batches + batches, batch_items=self.past_batch_items + items)

    def push(self) -> None:
        """Send this replica's report to the fleet registry (fire and forget)."""
        report = self.report()
        self.reported = (report.requests_served, report.in_flight)
        self.registry.put.remote(report)

    def report_counters(self) -> None:
        while True:
            time.sleep(REPORT_INTERVAL_S)
            with self.lock:
                counters = (self.requests_served, self.in_flight)
            if counters != self.reported and self.generation >= 0:
                try:
                    self.push()
                except Exception:  # noqa: BLE001 - the registry restarting: try next time
                    logger.warning("could not reach the fleet registry", exc_info=True)
