"""The service attacked as a hostile or unlucky user would: huge uploads, killed and stopped
processes, open umasks, remote addresses. Real supervisor and worker processes, real sockets."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from sensevoice_core.client import (
    CONNECT_TIMEOUT_S,
    ServiceError,
    ServiceUnavailableError,
    SupervisorClient,
)
from sensevoice_core.curve import generate_keys
from sensevoice_core.protocol import MAX_HEADER_BYTES, LONG_REQUEST_S
from sensevoice_core.settings import Settings
from service import REPO, BackgroundTraffic, Service, process_alive, start_service
from ui_process import free_port

pytestmark = pytest.mark.slow

MODEL = REPO / "model"
EXAMPLES = REPO / "ui" / "examples"
SHORT_CLIP = EXAMPLES / "en_02.flac"  # "Hello world."
RATE = 16000


def speech_with_pauses(seconds: float) -> np.ndarray:
    """The demo clips one after another with 0.6 s pauses, int16, about `seconds` long."""
    clips = [soundfile.read(path, dtype="int16")[0] for path in sorted(EXAMPLES.glob("*.flac"))]
    pause = np.zeros(int(0.6 * RATE), dtype=np.int16)
    parts, total, index = [], 0, 0
    while total < seconds * RATE:
        clip = clips[index % len(clips)]
        parts += [clip, pause]
        total += clip.size + pause.size
        index += 1
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    running = start_service(tmp_path_factory.mktemp("hardening"), MODEL)
    yield running
    running.stop()


def new_client(service: Service) -> SupervisorClient:
    return SupervisorClient(service.address, Settings(supervisor_address=service.address))


# ---------------------------------------------------------------- row 1: one long upload


def test_fifteen_minutes_are_transcribed_while_short_requests_keep_completing(
        service: Service, tmp_path: Path):
    long_wav = tmp_path / "fifteen-minutes.wav"
    soundfile.write(long_wav, speech_with_pauses(15 * 60), RATE, subtype="PCM_16")
    restarts = service.status().worker_restarts
    outcome: dict[str, object] = {}
    started = threading.Event()

    def long_request() -> None:
        with new_client(service) as client:
            started.set()
            begin = time.monotonic()
            try:
                outcome["reply"] = client.transcribe(long_wav, language="auto")
            except ServiceError as e:
                outcome["error"] = e
            outcome["span"] = (begin, time.monotonic())

    with BackgroundTraffic(service, SHORT_CLIP) as first, \
            BackgroundTraffic(service, SHORT_CLIP) as second:
        first.wait_for_more(2)
        thread = threading.Thread(target=long_request)
        thread.start()
        started.wait()
        thread.join(300)
    assert "error" not in outcome, outcome.get("error")
    reply = outcome["reply"]
    assert reply.duration_s == pytest.approx(15 * 60, abs=5)
    assert len(reply.segments) > 300 and "hello world" in reply.text
    # The reply is larger than a request header may be: the frame limit that dropped it is gone.
    assert len(reply.model_dump_json()) > MAX_HEADER_BYTES
    begin, end = outcome["span"]
    assert end - begin > LONG_REQUEST_S + 1, "the long request was too quick to prove anything"
    # While it ran, both clients' short requests went on being served (beside it, on the
    # same worker's second compute thread), with no failure and no worker restart.
    during = [t for t in first.times + second.times if begin + LONG_REQUEST_S + 0.5 < t < end]
    assert not first.failures and not second.failures, first.failures + second.failures
    assert len(during) >= 2, f"{len(during)} short replies while the long one ran"
    status = service.status()
    assert status.worker_restarts == restarts


def test_a_reply_too_large_to_send_fails_that_request_alone(tmp_path: Path):
    """The worker refuses to send a reply over the reply limit; the service goes on."""
    from inference_worker.worker import reply_frames
    from sensevoice_core.protocol import MAX_REPLY_HEADER_BYTES, SegmentInfo, TranscribeReply

    huge = TranscribeReply(request_id="r1", text="x", raw="x", language="en", emotion=None,
                           event=None, text_norm="woitn", duration_s=1.0,
                           token_ids=list(range(MAX_REPLY_HEADER_BYTES // 6)),
                           fingerprint="f", worker_pid=1, inference_s=0.1,
                           segments=[SegmentInfo(start=0, end=1, text="x", language="en",
                                                 emotion=None, event=None)])
    frames = reply_frames(huge)
    assert len(frames[0]) < 1024
    assert b'"code":"internal"' in frames[0] and b"send shorter audio" in frames[0]
    assert b'"request_id":"r1"' in frames[0]


# ---------------------------------------------------------------- row 4: supervisor gone


def test_requests_fail_fast_when_the_supervisor_is_killed(tmp_path: Path):
    service = start_service(tmp_path / "killed", MODEL, standby=False)
    long_wav = tmp_path / "two-minutes.wav"
    soundfile.write(long_wav, speech_with_pauses(120), RATE, subtype="PCM_16")
    errors: list[tuple[ServiceError, float]] = []
    sent = threading.Event()

    def in_flight() -> None:
        with new_client(service) as client:
            sent.set()
            try:
                client.transcribe(long_wav)
            except ServiceError as e:
                errors.append((e, time.monotonic()))

    thread = threading.Thread(target=in_flight)
    thread.start()
    sent.wait()
    service.wait_until(lambda s: s.in_flight == 1, 30, "the request in flight")
    killed_at = time.monotonic()
    service.process.send_signal(signal.SIGKILL)
    service.process.wait()
    service.client.close()
    thread.join(30)
    assert errors, "the in-flight request never failed"
    error, failed_at = errors[0]
    assert error.code == "unavailable" and "went away" in error.message
    assert failed_at - killed_at < 5
    # The killed supervisor left its ipc file: it must not pass for a live supervisor.
    assert Path(service.address[len("ipc://"):]).exists()
    begin = time.monotonic()
    with pytest.raises(ServiceUnavailableError, match="no supervisor answers"), \
            new_client(service) as client:
        client.transcribe(SHORT_CLIP)
    assert time.monotonic() - begin < CONNECT_TIMEOUT_S + 2


def test_a_stopped_supervisor_is_noticed_by_waiting_clients(tmp_path: Path):
    service = start_service(tmp_path / "stopped", MODEL, standby=False)
    try:
        with new_client(service) as client:
            client.transcribe(SHORT_CLIP)  # a pooled, connected socket
            service.process.send_signal(signal.SIGSTOP)
            begin = time.monotonic()
            with pytest.raises(ServiceUnavailableError, match="went away"):
                client.transcribe(SHORT_CLIP)
            assert time.monotonic() - begin < 8
    finally:
        service.process.send_signal(signal.SIGCONT)
    service.stop()


def test_the_runtime_directory_of_a_killed_supervisor_is_removed_at_the_next_start(
        tmp_path: Path):
    first = start_service(tmp_path / "first", MODEL, standby=False)
    pid = first.process.pid
    leftovers = list(Path(tempfile.gettempdir()).glob(f"sensevoice-{pid}-*"))
    assert len(leftovers) == 1 and stat.S_IMODE(leftovers[0].stat().st_mode) == 0o700
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    first.client.close()
    assert leftovers[0].exists()
    second = start_service(tmp_path / "second", MODEL, standby=False)
    assert not leftovers[0].exists()
    second.stop()


# ---------------------------------------------------------------- row 5: a stopped worker


def test_a_worker_stopped_mid_request_is_replaced_and_its_request_retried(service: Service,
                                                                          tmp_path: Path):
    service.wait_ready()
    medium = tmp_path / "ninety-seconds.wav"
    soundfile.write(medium, speech_with_pauses(90), RATE, subtype="PCM_16")
    restarts = service.status().worker_restarts
    result: dict[str, object] = {}

    def request() -> None:
        with new_client(service) as client:
            try:
                result["reply"] = client.transcribe(medium)
            except ServiceError as e:
                result["error"] = e

    thread = threading.Thread(target=request)
    thread.start()
    status = service.wait_until(lambda s: any(w.busy for w in s.workers), 30, "a busy worker")
    stopped = next(w.pid for w in status.workers if w.busy)
    os.kill(stopped, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        service.wait_until(lambda s: s.worker_restarts == restarts + 1, 30, "the hung worker")
        detected = time.monotonic() - stopped_at
        assert detected < 6, f"a stopped busy worker took {detected:.1f} s to be declared hung"
        with new_client(service) as client:
            short = client.transcribe(SHORT_CLIP)
        assert short.worker_pid != stopped and time.monotonic() - stopped_at < 15
        thread.join(60)
    finally:
        if process_alive(stopped):
            os.kill(stopped, signal.SIGCONT)
    assert "error" not in result, result.get("error")
    assert result["reply"].worker_pid != stopped
    assert result["reply"].duration_s == pytest.approx(90, abs=2)


# ---------------------------------------------------------------- row 8: who may connect


def test_sockets_are_owner_only_whatever_the_umask(tmp_path: Path):
    socket_dir = Path(tempfile.mkdtemp(prefix="sv", dir="/tmp")) / "new"
    address = f"ipc://{socket_dir}/s.ipc"
    service = start_service(tmp_path / "umask", MODEL, standby=False, umask=0,
                            address=address)
    try:
        socket_file = socket_dir / "s.ipc"
        assert stat.S_IMODE(socket_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o700
        [runtime] = Path(tempfile.gettempdir()).glob(f"sensevoice-{service.process.pid}-*")
        assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
        assert stat.S_IMODE((runtime / "workers.ipc").stat().st_mode) == 0o600
        if os.geteuid() == 0:  # user nobody may not connect, even given a way into the folder
            os.chmod(socket_dir, 0o711)
            probe = ("import socket, sys\n"
                     "s = socket.socket(socket.AF_UNIX)\n"
                     "try:\n    s.connect(sys.argv[1]); print('CONNECTED')\n"
                     "except OSError as e:\n    print('REFUSED', e.strerror)\n")
            result = subprocess.run(["/usr/bin/python3", "-c", probe, str(socket_file)],
                                    cwd="/", capture_output=True, text=True, timeout=60,
                                    user=65534, env={})
            assert "REFUSED Permission denied" in result.stdout, result.stdout + result.stderr
    finally:
        service.stop()


def test_an_address_off_loopback_is_refused_without_keys(tmp_path: Path):
    env = {**os.environ, "SENSEVOICE_SUPERVISOR_ADDRESS": "tcp://0.0.0.0:5999",
           "SENSEVOICE_MODEL_DIR": str(MODEL), "SENSEVOICE_CACHE_DIR": str(tmp_path)}
    refused = subprocess.run([sys.executable, "-m", "supervisor"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "SENSEVOICE_SUPERVISOR_ALLOW_REMOTE" in refused.stderr
    env["SENSEVOICE_SUPERVISOR_ALLOW_REMOTE"] = "true"
    refused = subprocess.run([sys.executable, "-m", "supervisor"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "SENSEVOICE_CURVE_DIR" in refused.stderr


def test_a_remote_address_serves_only_clients_with_authorized_keys(tmp_path: Path):
    keys, stranger = tmp_path / "keys", tmp_path / "stranger"
    generate_keys(keys)
    generate_keys(stranger)  # a valid key pair the supervisor was never told about
    assert stat.S_IMODE((keys / "server.key_secret").stat().st_mode) == 0o600
    port = free_port()
    service = start_service(tmp_path / "remote", MODEL, standby=False,
                            address=f"tcp://0.0.0.0:{port}", supervisor_allow_remote="true",
                            curve_dir=str(keys))
    try:
        reply = service.client.transcribe(SHORT_CLIP, language="en")
        assert reply.text == "hello world"
        address = f"tcp://127.0.0.1:{port}"
        for settings in (Settings(supervisor_address=address),
                         Settings(supervisor_address=address, curve_dir=stranger)):
            begin = time.monotonic()
            with pytest.raises(ServiceUnavailableError, match="no supervisor answers"), \
                    SupervisorClient(address, settings) as client:
                client.status()
            assert time.monotonic() - begin < CONNECT_TIMEOUT_S + 2
        assert service.status().requests_served == 1
    finally:
        service.stop()


# ---------------------------------------------------------------- row 13: refused reloads


def test_a_refused_reload_is_the_last_reload_in_status(service: Service):
    with pytest.raises(ServiceError) as refused:
        service.client.hot_reload_model("/etc")
    assert refused.value.code == "reload_refused"
    status = service.status()
    assert status.last_reload is not None and not status.last_reload.ok
    assert status.last_reload.requested_path == "/etc"
    assert "refused" in status.last_reload.error and "outside" in status.last_reload.error
    assert status.reload_counts.get("refused", 0) >= 1
