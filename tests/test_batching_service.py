"""Cross-request batching through the real service: a supervisor and demo-model workers that
hold several requests at once and batch their forward passes; thread settings in status."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile
from service import OrderedClient, Service, start_service, stopped

from sensevoice_core.client import ServiceError, SupervisorClient
from sensevoice_core.protocol import (
    ErrorReply,
    Progress,
    ServiceStatus,
    StatusRequest,
    TranscribeReply,
    TranscribeRequest,
)
from sensevoice_core.settings import Settings

pytestmark = pytest.mark.slow

MODEL = Path(__file__).parent.parent / "model"
CLIPS = sorted((Path(__file__).parent / "data" / "demo_eval").glob("*.flac"))
MAX_BATCH_REQUESTS = 4
MAX_QUEUE = 4


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model in another directory: a reload between the two is a real swap (a reload
    of the model serving, unchanged, is answered from L1 without one)."""
    copy = tmp_path_factory.mktemp("copy") / "model"
    shutil.copytree(MODEL, copy, ignore=shutil.ignore_patterns("canary"))
    return copy


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, model_copy: Path):
    # A long wait makes requests released together share passes whatever the CPU load; small
    # per-request batches (BATCH_S) make a long request many passes. int8: the service path
    # of a reduced compute type (its layers are row-independent, so batching holds there too).
    running = start_service(tmp_path_factory.mktemp("batching"), MODEL, threads="0",
                            compute_type="int8",
                            batch_wait_ms="100", max_batch_requests=str(MAX_BATCH_REQUESTS),
                            max_queue=str(MAX_QUEUE), batch_s="6", max_batch_s="30",
                            model_roots=f"{MODEL.parent},{model_copy.parent}")
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def long_audio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About five minutes of demo speech, a second of silence after each clip."""
    pieces = []
    while sum(len(p) for p in pieces) < 300 * 16000:
        for clip in CLIPS:
            samples, _ = soundfile.read(clip, dtype="float32")
            pieces += [samples, np.zeros(16000, np.float32)]
    path = tmp_path_factory.mktemp("long") / "long.flac"
    soundfile.write(path, np.concatenate(pieces), 16000)
    return path


def serving(status: ServiceStatus):
    return next(w for w in status.workers if w.role == "serving")


def send_all(service: Service, requests: list[tuple[object, dict]],
             go: threading.Event | None = None) -> tuple[list[object], list[threading.Thread]]:
    """Send requests from one thread each: their outcomes (replies or ServiceErrors, in
    order, filled as they come) and the threads to join. Clips are read and the clients made
    first; the sends then go together, at once or when `go` is set: what reaches the
    supervisor arrives within milliseconds, well inside a stopped worker's heartbeat window."""
    outcomes: list[object] = [None] * len(requests)
    prepared = [(audio.read_bytes(), {"filename": audio.name, **options})
                if isinstance(audio, Path) else (audio, options) for audio, options in requests]
    clients = [SupervisorClient(service.address, Settings(supervisor_address=service.address))
               for _ in requests]
    start = threading.Barrier(len(requests))

    def send(index: int) -> None:
        audio, options = prepared[index]
        client = clients[index]
        if go is None:
            start.wait()
        else:
            go.wait()
        try:
            outcomes[index] = client.transcribe(audio, **options)
        except ServiceError as e:
            outcomes[index] = e
        finally:
            client.close()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    return outcomes, threads


def join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive()


def same_transcript(a: TranscribeReply, b: TranscribeReply) -> bool:
    fields = lambda r: [(s.start, s.end, s.text, s.raw, s.language, s.emotion, s.event,
                         s.token_ids, s.tokens, s.words) for s in r.segments]
    return fields(a) == fields(b) and (a.text, a.language) == (b.text, b.language)


def test_threads_auto_divides_the_usable_cores_among_serving_workers(service: Service):
    status = service.wait_until(lambda s: serving(s).threads > 0, 30, "a pong with threads")
    assert serving(status).threads == max(1, len(os.sched_getaffinity(0)) // 1)
    assert "torch threads: " in service.log() and "(auto: " in service.log()


def test_requests_held_together_share_passes_and_each_reply_is_its_own(service: Service):
    clips = CLIPS[:3]
    options = [{"word_timestamps": True}, {"language": "en", "use_itn": True}, {}]
    alone = [service.client.transcribe(clip, **opts) for clip, opts in zip(clips, options)]
    before = serving(service.wait_until(lambda s: serving(s).batches >= 3, 30, "counters"))
    pid = before.pid
    requests = [*zip(clips, options), (b"this is not audio" * 50, {"filename": "junk.wav"})]
    go = threading.Event()
    outcomes, threads = send_all(service, requests, go)
    with stopped(pid):  # what the supervisor sends waits in the worker's socket
        go.set()
        service.wait_until(lambda s: s.in_flight == len(requests), 10, "all dispatched")
    join(threads)
    *replies, junk = outcomes
    assert isinstance(junk, ServiceError) and junk.code == "bad_audio" and "junk.wav" in str(junk)
    for reply, reference in zip(replies, alone):
        assert isinstance(reply, TranscribeReply) and reply.worker_pid == pid
        assert same_transcript(reply, reference)
        # Not bit-equal: the same rows in a GEMM of another shape sum in another order.
        assert [s.avg_logprob for s in reply.segments] == pytest.approx(
            [s.avg_logprob for s in reference.segments], abs=1e-4)
    after = serving(service.wait_until(
        lambda s: serving(s).batch_items >= before.batch_items + len(clips), 30, "counters"))
    assert after.batch_items - before.batch_items == len(clips)
    assert after.batches - before.batches < len(clips)


def test_a_long_request_does_not_stall_a_short_one(service: Service, long_audio: Path):
    steps: list[Progress] = []
    decoding = threading.Event()
    long_done_at_short_reply: list[int] = []

    def on_progress(step: Progress) -> None:
        steps.append(step)
        if step.done >= 1:
            decoding.set()

    def long_request() -> None:
        client = SupervisorClient(service.address, Settings(supervisor_address=service.address))
        try:
            results.append(client.transcribe(long_audio, on_progress=on_progress))
        finally:
            client.close()

    results: list[TranscribeReply] = []
    thread = threading.Thread(target=long_request)
    thread.start()
    assert decoding.wait(60), "the long request never started decoding"
    short = service.client.transcribe(CLIPS[0])
    long_done_at_short_reply.append(steps[-1].done)
    join([thread])
    total = steps[-1].total
    assert short.text and results and results[0].duration_s > 290
    # The short request was answered while the long one had most of its pieces to go.
    assert long_done_at_short_reply[0] < total / 2, (long_done_at_short_reply, total)


def test_a_reload_drains_a_worker_holding_a_batch_and_loses_nothing(service: Service,
                                                                     long_audio: Path,
                                                                     model_copy: Path):
    # Serve the copy first, so that the reload under test goes back to the model's own L2
    # snapshot: a swap in a fraction of a second, while the long request is still running.
    assert service.client.hot_reload_model(model_copy).ok
    old_pid = serving(service.wait_ready()).pid
    decoding = threading.Event()
    long_outcome, long_threads = send_all(service, [(long_audio, {
        "on_progress": lambda step: step.done >= 1 and decoding.set()})])
    assert decoding.wait(60)
    served = service.status().requests_served
    shorts, short_threads = send_all(service, [(clip, {}) for clip in CLIPS[:3]])
    # All four reached the old worker (the short ones may already be answered: a lone
    # caller's pass does not wait, and the demo model is fast).
    service.wait_until(lambda s: s.queued == 0 and s.in_flight
                       + s.requests_served - served == 4, 10, "a batch in the old worker")
    outcome = service.client.hot_reload_model(MODEL)
    assert outcome.ok and outcome.cache_level == "L2", outcome
    status = service.status()
    old = next(w for w in status.workers if w.pid == old_pid)
    assert old.role == "draining" and old.busy  # still holding the long request
    join(long_threads + short_threads)
    assert all(isinstance(o, TranscribeReply) and o.worker_pid == old_pid
               for o in long_outcome + shorts), long_outcome + shorts
    assert service.client.transcribe(CLIPS[0]).worker_pid != old_pid


def test_more_clients_than_a_worker_holds_and_the_queue_are_answered_busy(service: Service):
    count = MAX_BATCH_REQUESTS + MAX_QUEUE + 3
    # A standby still starting (after the reload test) loads the CPU; with it ready, the
    # requests all land inside the 3 s before the stopped worker counts as hung.
    pid = serving(service.wait_ready()).pid
    go = threading.Event()
    outcomes, threads = send_all(service, [(CLIPS[1], {})] * count, go)
    with stopped(pid):
        go.set()
        service.wait_until(lambda s: s.in_flight == MAX_BATCH_REQUESTS and
                           s.queued == MAX_QUEUE, 10, "a full worker and queue")
        # The others were answered busy, while the worker is still stopped.
        busy = lambda: sum(isinstance(o, ServiceError) and o.code == "busy" for o in outcomes)
        service.wait_until(lambda s: busy() == count - MAX_BATCH_REQUESTS - MAX_QUEUE, 10,
                           "busy answers")
    join(threads)
    served = [o for o in outcomes if isinstance(o, TranscribeReply)]
    assert len(served) == MAX_BATCH_REQUESTS + MAX_QUEUE
    assert len({o.text for o in served}) == 1


def test_a_burst_read_in_one_go_fills_the_worker_before_the_queue(service: Service):
    """Requests the supervisor reads together (all sent while it was stopped) go to the
    worker as they are accepted: only those beyond its room and SENSEVOICE_MAX_QUEUE are
    refused. (Queueing the burst first, then dispatching, refused all but MAX_QUEUE.)"""
    count = MAX_BATCH_REQUESTS + MAX_QUEUE + 3
    status = service.wait_ready()
    worker = serving(status).pid
    audio = CLIPS[1].read_bytes()
    with OrderedClient(service.address) as client:
        client.barrier()  # connected: what is sent next waits in the supervisor's socket
        with stopped(worker), stopped(service.process.pid):
            sent = [client.send(TranscribeRequest(filename=CLIPS[1].name), audio)
                    for _ in range(count)]
            barrier = client.send(StatusRequest())
        # Everything sent before the barrier has been handled when its reply comes.
        after = client.reply(barrier).status
        assert (after.in_flight, after.queued) == (MAX_BATCH_REQUESTS, MAX_QUEUE), after
        replies = [client.reply(request_id) for request_id in sent]
    refused = [r for r in replies if isinstance(r, ErrorReply)]
    assert [r.code for r in refused] == ["busy"] * (count - MAX_BATCH_REQUESTS - MAX_QUEUE)
    served = [r for r in replies if isinstance(r, TranscribeReply)]
    assert len(served) == MAX_BATCH_REQUESTS + MAX_QUEUE and len({r.text for r in served}) == 1


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_worker_lost_while_holding_a_batch_has_every_request_retried(service: Service,
                                                                         how: str):
    status = service.wait_ready()
    restarts, pid = status.worker_restarts, serving(status).pid
    alone = service.client.transcribe(CLIPS[2])
    go = threading.Event()
    outcomes, threads = send_all(service, [(CLIPS[2], {})] * MAX_BATCH_REQUESTS, go)
    os.kill(pid, signal.SIGSTOP)
    try:
        go.set()
        service.wait_until(lambda s: s.in_flight == MAX_BATCH_REQUESTS, 10, "a full worker")
        if how == "kill":
            os.kill(pid, signal.SIGKILL)
        # hang: stopped, it misses its heartbeats and is killed as hung
        service.wait_until(lambda s: s.worker_restarts == restarts + 1, 60, "a replacement")
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    join(threads)
    assert all(isinstance(o, TranscribeReply) and o.worker_pid != pid for o in outcomes), outcomes
    assert all(same_transcript(o, alone) for o in outcomes)
    assert service.log().count("retrying it on another worker") >= MAX_BATCH_REQUESTS


def test_batching_off_serves_as_before(tmp_path: Path):
    service = start_service(tmp_path, MODEL, standby=False, batch_wait_ms="0", threads="3")
    try:
        outcomes, threads = send_all(service, [(CLIPS[0], {}), (CLIPS[1], {})])
        join(threads)
        assert all(isinstance(o, TranscribeReply) and o.text for o in outcomes)
        worker = serving(service.wait_until(lambda s: serving(s).threads > 0, 30, "a pong"))
        assert (worker.threads, worker.batches, worker.batch_items) == (3, 0, 0)
        assert "torch threads: 3 (SENSEVOICE_THREADS)" in service.log()
    finally:
        assert service.stop() == 0
