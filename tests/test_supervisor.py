"""The service as users run it: a real supervisor process, real workers, real ZeroMQ sockets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import zmq

from model_factory import write_hf
from sensevoice_core import TranscribeOptions, load_model
from sensevoice_core.client import ServiceError, ServiceUnavailableError, SupervisorClient
from sensevoice_core.protocol import (
    ErrorReply,
    StatusRequest,
    TranscribeReply,
    TranscribeRequest,
    decode_reply,
    encode,
)
from sensevoice_core.settings import Settings
from service import BackgroundTraffic, Service, process_alive, start_service

pytestmark = pytest.mark.slow

CLIP = Path(__file__).parent / "data" / "demo_eval" / "en_02.flac"


@pytest.fixture(scope="module")
def service(models: Path, tmp_path_factory: pytest.TempPathFactory):
    running = start_service(tmp_path_factory.mktemp("service"), models / "a",
                            max_request_mb="1", max_queue="2")
    yield running
    assert running.stop() == 0


def test_transcription_round_trip_matches_in_process_inference(service: Service, models: Path):
    reply = service.client.transcribe(CLIP, language="en", use_itn=True)
    expected = load_model(models / "a").transcribe(CLIP, TranscribeOptions("en", use_itn=True))
    assert list(reply.token_ids) == list(expected.token_ids)
    assert (reply.text, reply.raw, reply.language) == (expected.text, expected.raw, expected.language)
    assert reply.fingerprint == service.status().model.fingerprint
    assert reply.worker_pid == service.serving_pid()


def test_samples_and_file_bytes_give_the_same_result(service: Service):
    samples, rate = soundfile.read(CLIP, dtype="float32")
    from_samples = service.client.transcribe(samples, sample_rate=rate)
    from_bytes = service.client.transcribe(CLIP.read_bytes())
    assert from_samples.token_ids == from_bytes.token_ids
    assert from_samples.duration_s == pytest.approx(len(samples) / rate)


def test_bad_audio_is_answered_and_the_worker_keeps_serving(service: Service):
    pid = service.serving_pid()
    with pytest.raises(ServiceError) as error:
        service.client.transcribe(b"this is not audio")
    assert error.value.code == "bad_audio" and "cannot decode" in error.value.message
    with pytest.raises(ServiceError, match="unknown language 'xx'"):
        service.client.transcribe(CLIP, language="xx")
    assert service.client.transcribe(CLIP).text is not None
    assert service.serving_pid() == pid


def test_odd_sample_rates_are_served_without_harming_the_worker(service: Service):
    pid = service.serving_pid()
    samples, rate = soundfile.read(CLIP, dtype="float32")
    for odd_rate in (22051, 383999):
        reply = service.client.transcribe(samples, sample_rate=odd_rate)
        assert reply.duration_s == pytest.approx(len(samples) / odd_rate, rel=0.01)
    assert service.serving_pid() == pid


def test_client_shared_by_many_threads_keeps_a_bounded_number_of_sockets(service: Service):
    """Web servers run handlers on short-lived threads; the client must not keep a socket for
    every thread that ever used it."""
    client = SupervisorClient(service.address, Settings(supervisor_address=service.address))
    fds_before = len(os.listdir("/proc/self/fd"))
    errors: list[Exception] = []

    def call() -> None:
        try:
            client.status()
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    for _ in range(10):
        threads = [threading.Thread(target=call) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    try:
        assert errors == []
        # A connection is a DEALER (its mailbox and its ipc stream) and the pair of sockets
        # that carries its monitor's events: bounded by the concurrent requests, not threads.
        assert len(os.listdir("/proc/self/fd")) - fds_before < 4 * 20
    finally:
        client.close()
    deadline = time.monotonic() + 5  # ZeroMQ releases a closed socket's descriptors in its I/O thread
    while len(os.listdir("/proc/self/fd")) > fds_before + 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 4


def test_an_oversized_request_is_refused_by_the_client_before_sending(service: Service):
    with pytest.raises(ServiceError) as error:
        service.client.transcribe(b"\0" * (2 << 20))
    assert error.value.code == "too_large" and "SENSEVOICE_MAX_REQUEST_MB" in error.value.message


def raw_exchange(address: str, frames: list[bytes], timeout_s: float = 5.0) -> ErrorReply | TranscribeReply:
    with zmq.Context() as context, context.socket(zmq.DEALER) as socket:
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(address)
        socket.send_multipart(frames)
        assert socket.poll(timeout_s * 1000), "no reply to a malformed frame"
        return decode_reply(socket.recv_multipart())


@pytest.mark.parametrize("frames, code, words", [
    ([b"not json"], "bad_request", "Invalid JSON"),
    ([b'{"kind": "transcribe", "v": 99, "request_id": "r1"}', b"x"], "bad_request", "v"),
    ([b'{"kind": "explode", "request_id": "r2"}'], "bad_request", "explode"),
    ([encode(StatusRequest())[0], b"extra"], "bad_request", "2 frames"),
    ([encode(TranscribeRequest())[0]], "bad_request", "1 frames"),
    ([b"{}" * 40000], "bad_request", "header"),
    ([encode(TranscribeRequest(request_id="big"))[0], b"\0" * (2 << 20)], "too_large",
     "SENSEVOICE_MAX_REQUEST_MB"),
])
def test_malformed_frames_are_answered_and_survived(service: Service, frames, code, words):
    reply = raw_exchange(service.address, frames)
    assert isinstance(reply, ErrorReply)
    assert reply.code == code and words in reply.message
    assert service.client.transcribe(CLIP).fingerprint  # still serving


def test_error_reply_names_the_request_it_answers(service: Service):
    reply = raw_exchange(service.address, [b'{"kind": "transcribe", "v": 7, "request_id": "mine"}', b""])
    assert reply.request_id == "mine"


def test_a_full_queue_answers_busy_instead_of_growing(service: Service):
    # The worker takes up to SENSEVOICE_MAX_BATCH_REQUESTS (16) as they come, the queue 2.
    requests = [TranscribeRequest(request_id=f"q{i}") for i in range(30)]
    audio = CLIP.read_bytes()
    with zmq.Context() as context, context.socket(zmq.DEALER) as socket:
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(service.address)
        for request in requests:
            socket.send_multipart(encode(request, audio))
        replies = []
        while len(replies) < len(requests):
            assert socket.poll(30_000), f"only {len(replies)} replies"
            replies.append(decode_reply(socket.recv_multipart()))
    busy = [r for r in replies if isinstance(r, ErrorReply)]
    served = [r for r in replies if isinstance(r, TranscribeReply)]
    assert busy and all(r.code == "busy" and "retry later" in r.message for r in busy)
    assert len(served) >= 2 and len(served) + len(busy) == len(requests)
    assert {r.request_id for r in replies} == {r.request_id for r in requests}


def test_status_reports_model_workers_and_counts(service: Service, models: Path):
    status = service.status()
    assert status.model.model_dir == str((models / "a").resolve())
    assert status.model.cache_level in ("fresh", "L2")
    assert set(status.model.short_ids) == {"config", "weights", "code"}
    roles = sorted(w.role for w in status.workers)
    assert roles == ["serving", "standby"]
    assert status.requests_served >= 1 and status.in_flight == 0
    assert all(process_alive(w.pid) and w.age_s > 0 for w in status.workers)


def test_killed_worker_is_replaced_without_failing_requests(service: Service):
    old_pid = service.serving_pid()
    restarts = service.status().worker_restarts
    with BackgroundTraffic(service, CLIP) as traffic:
        traffic.wait_for_more(1)  # requests are flowing
        os.kill(old_pid, signal.SIGKILL)
        status = service.wait_until(lambda s: s.worker_restarts == restarts + 1 and any(
            w.role == "serving" and w.pid != old_pid for w in s.workers), 60, "a replacement")
        traffic.wait_for_more()
    replies, failures = traffic.replies, traffic.failures
    assert not failures, failures
    assert replies[-1].worker_pid != old_pid
    assert "was killed by SIGKILL" in service.log() and "replacing it" in service.log()
    assert status.model is not None


def test_hung_worker_is_detected_by_missed_pongs_and_replaced(service: Service):
    restarts = service.wait_ready().worker_restarts
    old_pid = service.serving_pid()
    os.kill(old_pid, signal.SIGSTOP)
    try:
        service.wait_until(lambda s: s.worker_restarts == restarts + 1 and any(
            w.role == "serving" and w.pid != old_pid for w in s.workers), 60,
            "replacing a hung worker")
    finally:
        if process_alive(old_pid):
            os.kill(old_pid, signal.SIGCONT)
    assert "missed 3 heartbeats" in service.log()
    assert service.client.transcribe(CLIP).worker_pid != old_pid


def test_client_without_a_supervisor_says_how_to_start_one(tmp_path: Path):
    address = f"ipc://{tmp_path}/none.ipc"
    client = SupervisorClient(address, Settings(supervisor_address=address))
    with pytest.raises(ServiceUnavailableError, match="python -m supervisor"):
        client.transcribe(CLIP)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopping_the_supervisor_leaves_no_orphans(models: Path, tmp_path: Path, sig: int):
    running = start_service(tmp_path, models / "a")
    running.status()
    assert len(running.seen_pids) == 2  # serving + standby
    assert running.stop(sig) == 0
    assert "Supervisor stopped" in running.log()
    assert not Path(running.address[6:]).exists()


def test_in_flight_request_finishes_during_shutdown(models: Path, tmp_path: Path):
    running = start_service(tmp_path, models / "a", standby=False)
    long_audio = np.tile(soundfile.read(CLIP, dtype="float32")[0], 150)  # 200 s: in flight a while
    results: list = []
    thread = threading.Thread(target=lambda: results.append(running.client.transcribe(long_audio)))
    thread.start()
    running.wait_until(lambda s: s.in_flight == 1 or results, 10, "the request in flight")
    assert not results, "the request finished before the stop could be sent; make it longer"
    running.process.send_signal(signal.SIGTERM)
    thread.join(30)
    assert results and isinstance(results[0], TranscribeReply)
    assert running.stop() == 0


def test_a_model_that_cannot_load_stops_start_up_with_a_clear_error(tmp_path: Path, models: Path):
    broken = tmp_path / "broken"
    write_hf(broken)
    (broken / "model.safetensors").write_bytes(b"truncated")
    running = start_service(tmp_path / "run", broken, wait=False)
    assert running.process.wait(60) == 4
    log = running.log()
    assert "Cannot start: the model did not load" in log and "model.safetensors" in log
    running.stop()


def test_invalid_setting_stops_start_up_naming_variable_and_value(tmp_path: Path):
    environment = {**os.environ, "SENSEVOICE_HOTRELOAD_TIMEOUT": "soon"}
    result = subprocess.run([sys.executable, "-m", "supervisor"], env=environment, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: invalid setting: SENSEVOICE_HOTRELOAD_TIMEOUT='soon': "
        "Input should be a valid number, unable to parse string as a number"]


def test_second_supervisor_on_the_same_address_refuses_to_start(service: Service, tmp_path: Path):
    environment = {**os.environ, "SENSEVOICE_SUPERVISOR_ADDRESS": service.address}
    result = subprocess.run([sys.executable, "-m", "supervisor"], env=environment, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "another supervisor is already serving" in result.stderr
    assert service.client.transcribe(CLIP).fingerprint
