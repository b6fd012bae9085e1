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
from typing import Any

import ray
import torch
from ray import serve

from cluster.fleet import REPORT_INTERVAL_S, registry
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
from supervisor.reload_path import ReloadRefused, check_reload_path
from supervisor.unchanged import unchanged_verdict

logger = logging.getLogger("sensevoice.cluster")


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
        self.registry: Any = None  # looked up on the first push, again after a failed one
        self.lock = threading.Lock()
        # Ray calls reconfigure again before the last call returned when a config changes
        # while the replica is still STARTING (a rollback during its first load).
        self.reconfiguring = asyncio.Lock()
        self.serving: Serving | None = None
        self.retiring: list[Serving] = []  # swapped out, still answering requests
        self.generation = -1  # no FleetConfig applied yet
        self.error: str | None = None
        self.last_reload: ReloadOutcome | None = None
        self.requests_served = 0
        self.in_flight = 0
        self.past_batches = 0  # forward passes run by models since released
        self.past_batch_items = 0
        threading.Thread(target=self.heartbeat, name="fleet-report", daemon=True).start()
        logger.info("replica %s on node %s with %d torch threads", self.replica_id,
                    self.node_id[:8], self.threads)

    # ------------------------------------------------------------------ configuration

    async def reconfigure(self, user_config: dict) -> None:
        """Apply a FleetConfig, one at a time and never one older than the last applied. A
        failed load keeps the old model serving and is reported, never raised (raising here
        makes Ray replace the replica), except when there is no old model: then the replica
        cannot serve, and Ray is told by the exception."""
        config = FleetConfig.model_validate(user_config)
        async with self.reconfiguring:
            if config.generation < self.generation:
                logger.info("generation %d skipped: generation %d is applied already",
                            config.generation, self.generation)
                return
            await self.apply(config)

    async def apply(self, config: FleetConfig) -> None:
        start = time.perf_counter()
        old = self.serving
        # A replica's first load (a start, a replacement) uses its node's L2 snapshot even
        # when the deployed config still says force_fresh from the reload that set it.
        fresh = config.force_fresh and old is not None
        refused = self.refusal(config.model_dir, old)
        if refused is not None:
            self.failed(config, old, refused, None, start)
            return
        if old is not None and not fresh:
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
            loaded = await asyncio.to_thread(load_for_serving, config.model_dir, fresh,
                                             self.settings, old is not None)
        except LoadFailure as e:
            self.failed(config, old, e.cause, e.canary, start)
            return
        serving = Serving(loaded.model, loaded.info)
        # The requests on this model are the ones its batcher may wait for (not those still
        # running on a model being swapped out).
        attach_batcher(loaded.model, self.settings, self.threads, lambda: serving.users)
        with self.lock:
            swapped = self.serving  # whatever serves now, not what served before the load
            self.serving = serving
            idle = swapped is not None and self.retire(swapped)
        if idle:
            release(swapped)
        self.applied(config, None, ReloadOutcome(
            ok=True, origin="cli", requested_path=config.model_dir,
            model_dir=loaded.info.model_dir,
            old_fingerprint=old.info.fingerprint if old else None,
            new_fingerprint=loaded.info.fingerprint, cache_level=loaded.info.cache_level,
            seconds=time.perf_counter() - start, canary=loaded.info.canary))

    def refusal(self, model_dir: str, old: Serving | None) -> str | None:
        """Why this node does not load `model_dir` (outside its own SENSEVOICE_MODEL_ROOTS or,
        without them, the served model's parent; not a directory here), or None. A first
        load without roots is the deployed config's: nothing to hold it against."""
        if old is None and not self.settings.model_roots:
            return None
        try:
            check_reload_path(model_dir, old.info if old else None, self.settings.model_roots)
        except ReloadRefused as e:
            return f"refused on node {self.node_ip}: {e}"
        return None

    def failed(self, config: FleetConfig, old: Serving | None, cause: str,
               canary: Any, start: float) -> None:
        """`config` was not applied: the old model keeps serving; with none, Ray is told."""
        outcome = ReloadOutcome(
            ok=False, origin="cli", requested_path=config.model_dir,
            model_dir=old.info.model_dir if old else None,
            old_fingerprint=old.info.fingerprint if old else None,
            seconds=time.perf_counter() - start, error=cause, canary=canary)
        self.applied(config, cause, outcome)
        if old is None:
            raise RuntimeError(f"cannot load the model {config.model_dir}: {cause}") from None
        logger.error("generation %d: %s was not loaded, the old model keeps serving: %s",
                     config.generation, config.model_dir, cause)

    def retire(self, serving: Serving) -> bool:
        """Under self.lock: `serving` takes no new request; True when none runs on it (the
        caller releases it)."""
        serving.retired = True
        if serving.users:
            self.retiring.append(serving)
            return False
        self.count_released(serving)
        return True

    def count_released(self, serving: Serving) -> None:
        """Under self.lock: its forward passes join the past ones, once, as it goes."""
        if serving in self.retiring:
            self.retiring.remove(serving)
        batches, items = batch_counts(serving.model)
        self.past_batches += batches
        self.past_batch_items += items

    def applied(self, config: FleetConfig, error: str | None, outcome: ReloadOutcome) -> None:
        self.generation, self.error = config.generation, error
        if outcome.old_fingerprint is not None:  # the first load is not a reload
            self.last_reload = outcome
        try:
            self.push()
        except Exception:  # the heartbeat sends it again
            logger.warning("could not reach the fleet registry", exc_info=True)

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
            # Ray frees a request's slot when its caller cancels (a stream whose client left,
            # a timeout), but the transcription runs on to its end: this bound counts those too,
            # so callers that leave cannot stack work past SENSEVOICE_MAX_BATCH_REQUESTS.
            full = self.in_flight >= self.settings.max_batch_requests
            serving = None if full else self.serving
            if serving is not None:
                serving.users += 1
                self.in_flight += 1
        if full:
            return ErrorReply(request_id=request.request_id, code="busy",
                              message=f"this replica is still transcribing "
                                      f"{self.settings.max_batch_requests} requests "
                                      f"(SENSEVOICE_MAX_BATCH_REQUESTS), some for callers that "
                                      f"left; retry later")
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
                    self.count_released(serving)
            if idle:
                release(serving)

    # ------------------------------------------------------------------ health and reports
    # Both async: they run on the replica's event loop, not in the threadpool that
    # max_ongoing_requests bounds, so a replica whose every slot holds a long request still
    # answers Ray's health check (and the fleet) instead of being killed as unhealthy.

    async def check_health(self) -> None:
        if self.serving is None:
            raise RuntimeError(f"replica {self.replica_id} has no model loaded"
                               + (f": {self.error}" if self.error else ""))

    async def report(self) -> ReplicaReport:
        return self.snapshot()

    def snapshot(self) -> ReplicaReport:
        with self.lock:
            served, in_flight = self.requests_served, self.in_flight
            serving = self.serving
            batches, items = self.past_batches, self.past_batch_items
            for each in ([serving] if serving else []) + self.retiring:
                more, more_items = batch_counts(each.model)
                batches, items = batches + more, items + more_items
        return ReplicaReport(
            replica_id=self.replica_id, node_id=self.node_id, node_ip=self.node_ip,
            pid=os.getpid(), started_at=self.started_at, reported_at=time.time(),
            generation=self.generation, model=serving.info if serving else None,
            error=self.error, last_reload=self.last_reload, requests_served=served,
            in_flight=in_flight, threads=self.threads, batches=batches, batch_items=items)

    def push(self) -> ray.ObjectRef:
        """Send this replica's report to the fleet registry."""
        if self.registry is None:
            self.registry = registry()
        return self.registry.put.remote(self.snapshot())

    def heartbeat(self) -> None:
        """The whole report every REPORT_INTERVAL_S, changed or not: a registry that
        restarted empty, or a report lost on the way, is made good within one interval."""
        while True:
            time.sleep(REPORT_INTERVAL_S)
            if self.generation < 0:
                continue
            try:
                ray.get(self.push(), timeout=REPORT_INTERVAL_S)
            except Exception:  # keep beating; the registry may be restarting
                logger.warning("could not reach the fleet registry; looking it up again",
                               exc_info=True)
                self.registry = None
