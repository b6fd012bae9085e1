"""The service attacked as a hostile or unlucky user would: huge uploads, killed and stopped
processes, open umasks, remote addresses. Real supervisor and worker processes, real sockets."""

from __future__ import annotations

import os
import shutil
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

from model_factory import copy_demo_model, nudge_weights
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
def fifteen_minutes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("long") / "fifteen-minutes.wav"
    soundfile.write(path, speech_with_pauses(15 * 60), RATE, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    running = start_service(tmp_path_factory.mktemp("hardening"), MODEL)
    yield running
    running.stop()


def new_client(service: Service) -> SupervisorClient:
    return SupervisorClient(service.address, Settings(supervisor_address=service.address))


# ---------------------------------------------------------------- row 1: one long upload


def test_fifteen_minutes_are_transcribed_while_short_requests_keep_completing(
        service: Service, fifteen_minutes: Path):
    long_wav = fifteen_minutes
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


def test_a_second_long_request_waits_instead_of_slowing_the_first(service: Service,
                                                                  fifteen_minutes: Path):
    """Only a small request goes beside a long one: two long ones on one worker would both
    take twice as long and could both run past SENSEVOICE_REQUEST_TIMEOUT."""
    restarts = service.status().worker_restarts
    replies: list = []
    errors: list = []

    def send() -> None:
        with new_client(service) as client:
            try:
                replies.append(client.transcribe(fifteen_minutes))
            except ServiceError as e:
                errors.append(e)

    first = threading.Thread(target=send)
    first.start()
    service.wait_until(lambda s: s.in_flight == 1, 30, "the first long request")
    second = threading.Thread(target=send)
    second.start()
    service.wait_until(lambda s: s.queued == 1, 30, "the second one queued")
    most_in_flight = 1
    while first.is_alive():
        most_in_flight = max(most_in_flight, service.status().in_flight)
        time.sleep(0.1)
    second.join(120)
    assert not errors, errors
    assert len(replies) == 2 and most_in_flight == 1
    assert service.status().worker_restarts == restarts


def test_a_request_slowed_by_a_neighbour_is_not_timed_out_for_it(tmp_path: Path):
    """The timeout charges each request its share of the worker; when one does run out, the
    request beside it keeps its retry (its worker is replaced for the other one)."""
    import zmq

    from sensevoice_core.protocol import TranscribeRequest
    from supervisor.broker import Broker
    from supervisor.workers import WorkerHandle

    # Batching off: its two requests share the cores (batching on, tests/test_batching_broker).
    settings = Settings(supervisor_address="ipc:///tmp/unused.ipc", request_timeout=10,
                        batch_wait_ms=0)
    with zmq.Context() as context, context.socket(zmq.ROUTER) as frontend, \
            context.socket(zmq.ROUTER) as backend:
        frontend.bind("inproc://clients")
        backend.bind("inproc://workers")
        broker = Broker(settings, frontend, backend)
        sleeper = subprocess.Popen(["sleep", "60"])
        try:
            worker = WorkerHandle("w1", sleeper, age=1, role="serving")
            for _ in range(2):
                broker.accept(b"client", TranscribeRequest(), b"small")
            broker.dispatch([worker])
            assert len(worker.jobs) == 1
            first = broker.jobs[worker.jobs[0]]
            t0 = first.dispatched_at
            broker.expire_running(worker, t0 + 3)  # the supervisor's tick, 3 s alone
            broker.send_job(worker, broker.queue.popleft(), t0 + 3)  # then one beside it
            second = broker.jobs[worker.jobs[1]]
            # 12 s of wall time, of which 9 shared: charged 3 + 4.5 = 7.5 s of 10.
            assert not broker.expire_running(worker, t0 + 12)
            assert first.charged_s == pytest.approx(7.5) and second.charged_s == pytest.approx(4.5)
            assert broker.expire_running(worker, t0 + 18)  # 7.5 + 3 = 10.5 s: out of time
            assert worker.jobs == [second.job_id] and second.attempts == 0
            broker.requeue(worker, "worker w1 was killed")
            assert list(broker.queue) == [second.job_id]  # retried, not failed "twice"
        finally:
            sleeper.kill()
            sleeper.wait()


def test_a_reply_too_large_to_send_fails_that_request_alone(tmp_path: Path):
    """The worker refuses to send a reply over the reply limit; the service goes on."""
    from inference_worker.worker import reply_frames
    from sensevoice_core.protocol import MAX_REPLY_HEADER_BYTES, TranscribeReply
    from sensevoice_core.result import Segment

    huge = TranscribeReply(request_id="r1", text="x", raw="x", language="en", emotion=None,
                           event=None, text_norm="woitn", duration_s=1.0,
                           token_ids=list(range(MAX_REPLY_HEADER_BYTES // 6)),
                           fingerprint="f", worker_pid=1, inference_s=0.1,
                           segments=[Segment(start=0, end=1, text="x", raw="x", language="en",
                                             emotion=None, event=None)])
    frames = reply_frames(huge)
    assert len(frames[0]) < 1024
    assert b'"code":"internal"' in frames[0] and b"send shorter audio" in frames[0]
    assert b'"request_id":"r1"' in frames[0]


# ---------------------------------------------------------------- row 4: supervisor gone


def test_requests_fail_fast_when_the_supervisor_is_killed(tmp_path: Path,
                                                          fifteen_minutes: Path):
    service = start_service(tmp_path / "killed", MODEL, standby=False)
    long_wav = fifteen_minutes
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
    status = service.wait_until(lambda s: s.in_flight == 1, 30, "the request in flight")
    worker = status.workers[0].pid
    killed_at = time.monotonic()
    service.process.send_signal(signal.SIGKILL)
    service.process.wait()
    service.client.close()
    thread.join(30)
    assert errors, "the in-flight request never failed"
    error, failed_at = errors[0]
    assert error.code == "unavailable" and "went away" in error.message
    assert failed_at - killed_at < 5
    # Its worker does not finish a transcription whose answer has nowhere to go.
    while process_alive(worker) and time.monotonic() - killed_at < 10:
        time.sleep(0.05)
    assert time.monotonic() - killed_at < 3, "the orphaned worker went on computing"
    # The killed supervisor left its ipc file: it must not pass for a live supervisor.
    assert Path(service.address[len("ipc://"):]).exists()
    begin = time.monotonic()
    with pytest.raises(ServiceUnavailableError, match="no supervisor answers"), \
            new_client(service) as client:
        client.transcribe(SHORT_CLIP)
    assert time.monotonic() - begin < CONNECT_TIMEOUT_S + 2


def test_a_reply_that_arrived_before_the_connection_closed_is_still_returned():
    """A supervisor that answers and then exits (SIGTERM after its last request): the answer
    counts; and a reply the client cannot read fails at once, not after the whole timeout."""
    import zmq

    from sensevoice_core.protocol import decode_client, encode

    address = f"ipc://{tempfile.mkdtemp(prefix='sv', dir='/tmp')}/fake.ipc"
    with new_client_at(address) as client:
        for answer, expected in ((b"status", None), (b"garbage", "could not be read")):
            context = zmq.Context()
            server = context.socket(zmq.ROUTER)
            server.bind(address)

            def answer_then_close() -> None:
                identity, *frames = server.recv_multipart()
                request, _ = decode_client(frames)
                if answer == b"status":
                    status = service_status_stub(request.request_id)
                    server.send_multipart([identity, *encode(status)])
                else:
                    server.send_multipart([identity, b"{not json"])
                server.close(linger=1000)  # the reply leaves, then the connection closes
                context.term()

            thread = threading.Thread(target=answer_then_close)
            thread.start()
            begin = time.monotonic()
            if expected is None:
                assert client.status(timeout=30).supervisor_pid == 4242
            else:
                with pytest.raises(ServiceError, match=expected) as failed:
                    client.status(timeout=30)
                assert failed.value.code == "internal"
            assert time.monotonic() - begin < 5
            thread.join(10)
            client.close()


def new_client_at(address: str) -> SupervisorClient:
    return SupervisorClient(address, Settings(supervisor_address=address))


def service_status_stub(request_id: str):
    from sensevoice_core.protocol import ServiceStatus, StatusReply

    return StatusReply(request_id=request_id, status=ServiceStatus(
        supervisor_pid=4242, uptime_s=1.0, model=None, workers=[], queued=0, in_flight=0,
        requests_served=0, worker_restarts=0, reloading=False, last_reload=None,
        watching=None))


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
    temp = Path(tempfile.gettempdir())
    lookalikes = [temp / "sensevoice-20240101-recordings", temp / "sensevoice-99999999-abcd1234"]
    for folder in lookalikes:  # a user's folder, and one holding more than a socket
        folder.mkdir(exist_ok=True)
        (folder / "meeting.wav").write_bytes(b"RIFF")
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
    for folder in lookalikes:
        assert (folder / "meeting.wav").exists()
        shutil.rmtree(folder)


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
    top = Path(tempfile.mkdtemp(prefix="sv", dir="/tmp"))
    socket_dir = top / "new" / "deeper"
    address = f"ipc://{socket_dir}/s.ipc"
    service = start_service(tmp_path / "umask", MODEL, standby=False, umask=0,
                            address=address)
    try:
        socket_file = socket_dir / "s.ipc"
        assert stat.S_IMODE(socket_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE(socket_dir.parent.stat().st_mode) == 0o700
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
    again = subprocess.run([sys.executable, "-m", "supervisor", "keygen", str(keys)],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
    assert again.returncode == 1 and "--force" in again.stderr  # keys are never replaced silently
    # The layout of a real deployment: the server keeps its pair and the authorized clients;
    # the client machine has the server's public key and its own pair.
    server_dir, client_dir = tmp_path / "server-keys", tmp_path / "client-keys"
    server_dir.mkdir()
    client_dir.mkdir()
    for name in ("server.key", "server.key_secret"):
        shutil.copy(keys / name, server_dir / name)
    shutil.copytree(keys / "clients", server_dir / "clients")
    for name in ("server.key", "client.key", "client.key_secret"):
        shutil.copy(keys / name, client_dir / name)
    model = copy_demo_model(tmp_path / "models" / "demo")
    port = free_port()
    service = start_service(tmp_path / "remote", model, standby=False,
                            address=f"tcp://0.0.0.0:{port}", supervisor_allow_remote="true",
                            curve_dir=str(server_dir), client_curve_dir=str(client_dir),
                            enable_file_watch="true", watch_quiet_s="0.2")
    try:
        reply = service.client.transcribe(SHORT_CLIP, language="en")
        assert reply.text == "hello world"
        # The file watcher reloads in-process: it needs no client key on the server.
        nudge_weights(model)
        service.wait_until(lambda s: s.reload_counts.get("ok", 0) == 1, 60, "a watched reload")
        address = f"tcp://127.0.0.1:{port}"
        for settings in (Settings(supervisor_address=address),
                         Settings(supervisor_address=address, curve_dir=stranger)):
            begin = time.monotonic()
            with pytest.raises(ServiceUnavailableError, match="no supervisor answers"), \
                    SupervisorClient(address, settings) as client:
                client.status()
            assert time.monotonic() - begin < CONNECT_TIMEOUT_S + 2
        assert service.status().requests_served == 1
        missing = Settings(supervisor_address=address, curve_dir=tmp_path / "nowhere")
        with pytest.raises(ServiceError, match="cannot read the CURVE key"):
            SupervisorClient(address, missing)
        cli = subprocess.run([sys.executable, "-m", "supervisor", "status"], cwd=REPO,
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "SENSEVOICE_SUPERVISOR_ADDRESS": address,
                                  "SENSEVOICE_CURVE_DIR": str(tmp_path / "nowhere")})
        assert cli.returncode == 1 and "Traceback" not in cli.stderr
        assert "cannot read the CURVE key" in cli.stderr
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
