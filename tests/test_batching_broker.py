"""The broker's dispatch with cross-request batching on, on real sockets and worker handles
over a real (sleeping) process: retries, suspects, timeouts and the per-worker size bound."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from inference_worker.__main__ import usable_cores
from sensevoice_core.protocol import (
    BESIDE_LONG_MAX_BYTES,
    ErrorReply,
    ServiceStatus,
    TranscribeRequest,
    WorkerStatus,
)
from sensevoice_core.settings import Settings
from supervisor.broker import HELD_MAX_BYTES, Broker
from supervisor.workers import WorkerHandle
from ui.metrics import SupervisorCollector

LIMIT = 16  # SENSEVOICE_MAX_BATCH_REQUESTS


@pytest.fixture(scope="module")
def process() -> Iterator[subprocess.Popen]:
    sleeper = subprocess.Popen(["sleep", "600"])
    yield sleeper
    sleeper.kill()
    sleeper.wait()


@pytest.fixture
def broker() -> Iterator[Broker]:
    settings = Settings(supervisor_address="ipc:///tmp/unused.ipc", request_timeout=120,
                        batch_wait_ms=5, max_batch_requests=LIMIT, max_queue=100,
                        max_request_mb=256)
    with zmq.Context() as context, context.socket(zmq.ROUTER) as frontend, \
            context.socket(zmq.ROUTER) as backend:
        frontend.bind("inproc://clients")
        backend.bind("inproc://workers")
        yield Broker(settings, frontend, backend)


def worker(name: str, process: subprocess.Popen) -> WorkerHandle:
    return WorkerHandle(name, process, age=1, role="serving")


def accept(broker: Broker, count: int, payload: bytes = b"small") -> list[str]:
    for _ in range(count):
        broker.accept(b"client", TranscribeRequest(), payload)
    return list(broker.queue)[-count:]


def test_retries_wait_for_an_empty_worker_without_blocking_the_queue(broker: Broker,
                                                                      process):
    lost, busy, empty = (worker(n, process) for n in ("lost", "busy", "empty"))
    held = accept(broker, LIMIT)
    broker.dispatch([lost])
    assert lost.jobs == held
    broker.requeue(lost, "worker lost died")  # a crash: its requests are suspects
    fresh = accept(broker, 10)
    accept(broker, 1)
    broker.send_job(busy, broker.queue.pop(), 0.0)  # busy holds one request already
    broker.dispatch([busy, empty])
    assert empty.jobs == [held[0]]  # one retry, alone
    assert busy.jobs[1:] == fresh  # the new jobs did not wait behind the retries
    assert list(broker.queue) == held[1:]
    broker.dispatch([busy, empty])  # nothing joins the worker running a retry
    assert empty.jobs == [held[0]] and list(broker.queue) == held[1:]
    broker.finish(empty, ErrorReply(request_id=held[0], code="internal", message="done"))
    broker.dispatch([busy, empty])
    assert empty.jobs == [held[1]]  # the worker that went idle is the next retry's


def test_a_retry_never_shares_a_worker_with_live_streams(broker: Broker, process):
    streaming, other = worker("streaming", process), worker("other", process)
    accept(broker, 1)
    broker.dispatch([streaming])
    broker.requeue(streaming, "worker streaming died")
    broker.dispatch([streaming], streaming=frozenset({"streaming"}))
    assert not streaming.jobs and len(broker.queue) == 1
    broker.dispatch([streaming, other], streaming=frozenset({"streaming"}))
    assert len(other.jobs) == 1 and not broker.queue


def test_requests_of_a_worker_killed_past_its_drain_deadline_are_not_suspects(
        broker: Broker, process):
    draining, fresh = worker("draining", process), worker("fresh", process)
    held = accept(broker, 4)
    broker.dispatch([draining])
    broker.requeue(draining, "worker draining was killed: still draining after its deadline",
                   suspect=False)
    assert [broker.jobs[j].attempts for j in held] == [0] * 4
    broker.dispatch([fresh])
    assert fresh.jobs == held  # batched together as usual, not one by one
    # One of them timed out as well: its bystanders get their try back once, not twice.
    broker.jobs[held[0]].charged_s = 200.0
    assert broker.expire_running(fresh, broker.jobs[held[0]].charged_at)
    broker.requeue(fresh, "worker fresh was killed: still draining after its deadline",
                   suspect=False)
    assert [broker.jobs[j].attempts for j in held[1:]] == [0] * 3
    broker.dispatch([draining])
    assert draining.jobs == held[1:] and not broker.queue


def test_a_batch_is_timed_out_on_wall_time_not_on_a_share_of_it(broker: Broker, process):
    hung = worker("hung", process)
    held = accept(broker, LIMIT)
    broker.dispatch([hung])
    t0 = broker.jobs[held[0]].dispatched_at
    assert not broker.expire_running(hung, t0 + 100)
    assert broker.expire_running(hung, t0 + 121)  # not 16 x 120 s
    assert not hung.jobs and not broker.jobs


def test_a_worker_holds_one_large_request_and_a_bounded_total(broker: Broker, process):
    one, two = worker("one", process), worker("two", process)
    large = accept(broker, 3, b"x" * (BESIDE_LONG_MAX_BYTES + 1))
    small = accept(broker, 1)
    broker.dispatch([one, two])
    assert one.jobs[0] == large[0] and two.jobs[0] == large[1]
    assert list(broker.queue) == [large[2]]  # waits for a worker without a large request
    assert small[0] in one.jobs + two.jobs  # the queue behind it went on
    broker.fail_held(one, "internal", "test")
    broker.fail_held(two, "internal", "test")
    broker.fail_queued("internal", "test")
    broker.settings = broker.settings.model_copy(update={"max_batch_requests": 64})
    chunk = b"x" * BESIDE_LONG_MAX_BYTES  # small: at the bound
    accept(broker, 40, chunk)
    broker.dispatch([one])
    assert len(one.jobs) == 1 + HELD_MAX_BYTES // BESIDE_LONG_MAX_BYTES < 40


def test_auto_threads_respect_a_cgroup_cpu_quota(tmp_path: Path):
    affinity = usable_cores(tmp_path)  # no limit files: the affinity
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU (docker --cpus=0.5)
    assert usable_cores(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(tmp_path) == affinity
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # cgroup v1, 1 CPU
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cores(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cores(tmp_path) == affinity


def test_batch_counters_are_exported_per_worker():
    workers = [WorkerStatus(worker_id=f"w{i}", pid=i, role="serving", age_s=1,
                            requests_served=0, busy=False, fingerprint=None, batches=3 * i,
                            batch_items=7 * i) for i in (1, 2)]
    status = ServiceStatus(supervisor_pid=1, uptime_s=1, model=None, workers=workers,
                           queued=0, in_flight=0, requests_served=0, worker_restarts=0,
                           reloading=False, last_reload=None, watching=None)
    samples = {(s.name, s.labels.get("worker")): s.value
               for family in SupervisorCollector(lambda: status).collect()
               for s in family.samples}
    assert samples[("sensevoice_worker_batches_total", "w2")] == 6
    assert samples[("sensevoice_worker_batch_items_total", "w1")] == 7

