"""Prometheus metrics for GET /metrics.

Requests, latency and audio seconds are counted here, at the front door, with how many
transcriptions it holds now and at most. Reloads, worker restarts and the cache level of the
last load belong to the supervisor: they are read from its status at scrape time, so reloads
triggered by the watcher or the CLI count too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sensevoice_core.protocol import CacheLevel, ServiceStatus, WorkerRole

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CACHE_LEVELS = get_args(CacheLevel)
WORKER_ROLES = get_args(WorkerRole)
SCRAPE_STATUS_TIMEOUT_S = 2.0  # a /metrics scrape waits this long for the service's status


class SupervisorCollector(Collector):
    """Service-wide figures from the supervisor's status, fetched on each scrape."""

    def __init__(self, fetch_status: Callable[[], ServiceStatus | None]):
        self.fetch_status = fetch_status

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        status = self.fetch_status()
        up = GaugeMetricFamily("sensevoice_supervisor_up",
                               "1 when the supervisor answered this scrape")
        up.add_metric([], 0.0 if status is None else 1.0)
        yield up
        if status is None:
            return
        reloads = CounterMetricFamily("sensevoice_reloads", "model reloads by outcome",
                                      labels=["outcome"])
        for outcome in ("ok", "failed", "refused"):
            reloads.add_metric([outcome], status.reload_counts.get(outcome, 0))
        yield reloads
        by_level = CounterMetricFamily("sensevoice_reloads_by_cache_level",
                                       "successful model reloads by where the new model came "
                                       "from (L1: unchanged, no new worker)", labels=["level"])
        for name in CACHE_LEVELS:
            by_level.add_metric([name], status.reload_levels.get(name, 0))
        yield by_level
        restarts = CounterMetricFamily("sensevoice_worker_restarts",
                                       "workers replaced after a crash or hang")
        restarts.add_metric([], status.worker_restarts)
        yield restarts
        level = GaugeMetricFamily("sensevoice_model_cache_level",
                                  "1 for the cache level the serving model was loaded from",
                                  labels=["level"])
        load = GaugeMetricFamily("sensevoice_model_load_seconds",
                                 "load time of the serving model")
        compute = GaugeMetricFamily("sensevoice_model_compute_type",
                                    "1, labelled with the compute type the serving model runs in",
                                    labels=["compute_type"])
        if status.model is not None:
            for name in CACHE_LEVELS:
                level.add_metric([name], 1.0 if status.model.cache_level == name else 0.0)
            load.add_metric([], status.model.load_s)
            compute.add_metric([status.model.compute_type], 1.0)
        yield level
        yield load
        yield compute
        workers = GaugeMetricFamily("sensevoice_workers", "worker processes by role",
                                    labels=["role"])
        for role in WORKER_ROLES:
            workers.add_metric([role], sum(w.role == role for w in status.workers))
        yield workers
        # Per worker: each worker counts from its start, so a replaced worker's series ends
        # and its successor's begins at 0 (a sum over workers would go backwards).
        batches = CounterMetricFamily("sensevoice_worker_batches",
                                      "batched forward passes a worker ran",
                                      labels=["worker"])
        batch_items = CounterMetricFamily("sensevoice_worker_batch_items",
                                          "items (requests' segments, stream turns) in a "
                                          "worker's batched forward passes", labels=["worker"])
        for worker in status.workers:
            if worker.role == "serving" or worker.batches:
                batches.add_metric([worker.worker_id], worker.batches)
                batch_items.add_metric([worker.worker_id], worker.batch_items)
        yield batches
        yield batch_items
        for name, value, text in (("sensevoice_queued_requests", status.queued,
                                   "requests waiting for a worker"),
                                  ("sensevoice_in_flight_requests", status.in_flight,
                                   "requests being transcribed")):
            gauge = GaugeMetricFamily(name, text)
            gauge.add_metric([], value)
            yield gauge


class ServiceMetrics:
    def __init__(self, fetch_status: Callable[[], ServiceStatus | None],
                 front_door_held: Callable[[], int], front_door_capacity: int):
        self.registry = CollectorRegistry()
        Gauge("sensevoice_front_door_requests", "transcriptions this UI process holds now "
              "(HTTP API and page)", registry=self.registry).set_function(front_door_held)
        Gauge("sensevoice_front_door_capacity", "transcriptions this UI process holds at most; "
              "beyond it callers get 429", registry=self.registry).set(front_door_capacity)
        self.requests = Counter("sensevoice_requests", "transcription requests by endpoint "
                                "and outcome (ok or an error code)",
                                ["endpoint", "outcome"], registry=self.registry)
        self.latency = Histogram("sensevoice_request_latency_seconds",
                                 "transcription latency seen by the UI process",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.audio = Counter("sensevoice_audio_seconds", "seconds of audio transcribed",
                             registry=self.registry)
        self.registry.register(SupervisorCollector(fetch_status))

    def request_done(self, endpoint: str, outcome: str, seconds: float,
                     audio_seconds: float) -> None:
        self.requests.labels(endpoint, outcome).inc()
        self.latency.labels(endpoint).observe(seconds)
        if audio_seconds:
            self.audio.inc(audio_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
