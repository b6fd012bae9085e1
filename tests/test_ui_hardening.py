"""The UI process reads no server files, bounds its front door and shows no internals off
loopback (issue 12). Real UI processes (on 0.0.0.0 where it matters, reached on 127.0.0.1),
the real service or a ZeroMQ stand-in that holds requests until told (so the test knows what
the UI holds), and real clients: httpx, raw sockets, gradio_client.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
import zmq
from gradio_client import Client, handle_file

from model_factory import copy_demo_model
from sensevoice_core.protocol import (
    ErrorReply,
    TranscribeReply,
    TranscribeRequest,
    decode_client,
    encode,
)
from sensevoice_core.result import Segment
from service import Service, start_service
from ui_process import UiProcess, start_ui

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "ui" / "examples"
HELLO = EXAMPLES / "en_02.flac"  # the demo model says "Hello world." with ITN
REFUSED = ("Only audio uploaded to this page (or one of its example clips) can be "
           "transcribed; upload the file and try again.")
TOKEN = "s3cret"
MAX_QUEUE = 2  # with one worker, the UI holds at most 3 transcriptions
CAPACITY = MAX_QUEUE + 1
FAST_S = 2.0  # a refusal "at once"
HELD_TEXT = "Held reply."
# The transcribe API's inputs after the audio: language, ITN, VAD threshold, word timestamps,
# language whitelist (a raw API call sends them all; gradio_client fills in defaults).
OPTIONS = ["auto", True, 0.35, True, []]


def file_data(path: str, **extra: object) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}, **extra}


def gradio_call(http: httpx.Client, audio: dict) -> tuple[str, object]:
    """POST /gradio_api/call/transcribe, then read its event stream: (event, data)."""
    response = http.post("/gradio_api/call/transcribe", json={"data": [audio, *OPTIONS]})
    assert response.status_code == 200, response.text
    stream = http.get(f"/gradio_api/call/transcribe/{response.json()['event_id']}").text
    kind, data = re.findall(r"^event: (\w+)\ndata: (.*)$", stream, re.MULTILINE)[-1]
    return kind, json.loads(data)


def post_audio(http: httpx.Client, data: bytes, name: str = "clip.flac",
               **fields: str) -> httpx.Response:
    return http.post("/v1/audio/transcriptions", files={"file": (name, data)}, data=fields)


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    label_text = ",".join(f'{key}="{value}"' for key, value in labels.items())
    pattern = re.escape(name + (f"{{{label_text}}}" if labels else "")) + r" ([0-9.e+-]+)$"
    text = http.get("/metrics").text
    match = re.search("^" + pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wait_for_metric(ui: UiProcess, http: httpx.Client, name: str, value: float) -> None:
    ui.wait_until(lambda: metric(http, name) == value, f"{name} to reach {value}")


class HeldSupervisor:
    """Listens where the supervisor would and holds every transcription until release(): the
    barrier that tells the test exactly what the UI holds. Status requests get 'unavailable'."""

    def __init__(self, address: str, hold: bool = True):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.bind(address)
        self.held: list[tuple[bytes, TranscribeRequest]] = []
        self.arrived = threading.Condition()
        self.releasing = threading.Event()
        if not hold:
            self.releasing.set()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stopping.is_set():
            if self.socket.poll(20):
                identity, *frames = self.socket.recv_multipart()
                message, _ = decode_client(frames)
                if isinstance(message, TranscribeRequest):
                    with self.arrived:
                        self.held.append((identity, message))
                        self.arrived.notify_all()
                else:
                    self.socket.send_multipart([identity, *encode(ErrorReply(
                        request_id=message.request_id, code="unavailable", message="held"))])
            if self.releasing.is_set():
                with self.arrived:
                    answer, self.held = self.held, []
                for identity, request in answer:
                    self.socket.send_multipart([identity, *encode(held_reply(request))])
        self.socket.close(linger=0)
        self.context.term()

    def wait_for(self, count: int, timeout: float = 30.0) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.held) >= count, timeout), \
                f"only {len(self.held)} of {count} requests reached the supervisor"

    def release(self) -> None:
        self.releasing.set()

    def close(self) -> None:
        """Stop listening, as a supervisor that was killed does."""
        self.stopping.set()
        self.thread.join(10)


def held_reply(request: TranscribeRequest) -> TranscribeReply:
    segment = Segment(start=0.0, end=1.0, text=HELD_TEXT, raw=HELD_TEXT, language="en",
                      emotion="NEUTRAL", event="Speech")
    return TranscribeReply(request_id=request.request_id, text=HELD_TEXT, raw=HELD_TEXT,
                           language="en", emotion="NEUTRAL", event="Speech", text_norm="withitn",
                           duration_s=1.0, token_ids=[], fingerprint="f" * 64,
                           segments=[segment], worker_pid=os.getpid(), inference_s=0.01)


class SlowUpload:
    """An upload over a raw socket that sends only part of its body (sent: the fraction) until
    send_rest()."""

    BOUNDARY = "sv-slow-upload"

    def __init__(self, url: str, audio: bytes, sent: float = 0.5):
        port = urlparse(url).port
        body = (f"--{self.BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"hello.flac\"\r\nContent-Type: audio/flac\r\n\r\n").encode() \
            + audio + f"\r\n--{self.BOUNDARY}--\r\n".encode()
        head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Content-Type: multipart/form-data; boundary={self.BOUNDARY}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        split = int(len(body) * sent)
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.socket.sendall(head + body[:split])
        self.rest = body[split:]

    def send_rest(self) -> None:
        self.socket.sendall(self.rest)

    def response(self) -> tuple[int, bytes]:
        """Status and body, once the server has answered and closed."""
        response = b""
        while chunk := self.socket.recv(65536):
            response += chunk
        head, _, body = response.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    def __enter__(self) -> SlowUpload:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.socket.close()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    demo_dir = copy_demo_model(tmp_path_factory.mktemp("models") / "demo")
    service = start_service(tmp_path_factory.mktemp("service"), demo_dir)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def public_ui(service: Service, tmp_path_factory: pytest.TempPathFactory):
    """A UI open to the network (0.0.0.0), with an admin token, holding at most 3 requests."""
    ui = start_ui(tmp_path_factory.mktemp("public"), service.address, ui_host="0.0.0.0",
                  admin_token=TOKEN, max_queue=str(MAX_QUEUE), max_upload_mb="1")
    yield ui
    ui.stop()


@pytest.fixture(scope="module")
def http(public_ui: UiProcess):
    with httpx.Client(base_url=public_ui.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def held_address():
    socket_dir = tempfile.mkdtemp(prefix="svh", dir="/tmp")  # ipc paths must be short
    yield f"ipc://{socket_dir}/s.ipc"
    shutil.rmtree(socket_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def held_ui(held_address: str, tmp_path_factory: pytest.TempPathFactory):
    ui = start_ui(tmp_path_factory.mktemp("held"), held_address, max_queue=str(MAX_QUEUE))
    yield ui
    ui.stop()


@pytest.fixture
def stack():
    with ExitStack() as stack:
        yield stack


@pytest.fixture
def stand_in(held_address: str):
    supervisor = HeldSupervisor(held_address)
    yield supervisor
    supervisor.release()
    supervisor.close()


# ---------------------------------------------------------------- row 2: server files


def refusal(response: httpx.Response) -> str:
    """The sentence of a 422 in Gradio's validation shape."""
    assert response.status_code == 422, response.text
    [detail] = response.json()["detail"]
    assert detail["__type__"] == "validate" and detail["is_valid"] is False
    return detail["message"]


def test_server_paths_are_refused_alike_and_never_opened(public_ui: UiProcess, http: httpx.Client,
                                                         tmp_path: Path):
    outside = tmp_path / "clip.flac"
    shutil.copy(HELLO, outside)
    fifo = tmp_path / "pipe.flac"
    os.mkfifo(fifo)
    opened = threading.Event()

    def writer() -> None:  # blocks in open() until someone opens the FIFO for reading
        with open(fifo, "wb"):
            opened.set()

    blocked = threading.Thread(target=writer, daemon=True)
    blocked.start()
    public_ui.upload_dir.mkdir(exist_ok=True)
    link = public_ui.upload_dir / "link.flac"
    link.symlink_to(outside)
    cases = [
        file_data(str(outside)),  # exists, readable, real audio
        file_data(str(tmp_path / "missing.flac")),
        file_data(str(fifo)),
        file_data("/dev/zero"),
        file_data("/etc/passwd"),
        file_data(str(link)),  # inside the upload folder, pointing out of it
        file_data(os.path.relpath(outside, public_ui.work_dir)),  # relative to the UI's cwd
        file_data(str(outside), is_stream=True),  # Gradio skips its cache step for streams
        file_data(str(public_ui.upload_dir)),  # a folder, not a file
    ]
    try:
        for audio in cases:
            start = time.monotonic()
            response = http.post("/gradio_api/call/transcribe",
                                 json={"data": [audio, *OPTIONS]})
            assert refusal(response) == REFUSED, audio
            assert time.monotonic() - start < FAST_S, audio
        # Any Gradio route, any place in the body; a second Content-Type changes nothing.
        join = {"data": [file_data(str(outside))], "fn_index": 2, "session_hash": "x"}
        assert refusal(http.post("/gradio_api/queue/join", json=join)) == REFUSED
        assert refusal(http.post(
            "/gradio_api/call/v2/transcribe",
            content=json.dumps({"audio": file_data("/etc/passwd")}),
            headers=[("content-type", "application/json"),
                     ("content-type", "multipart/form-data; boundary=x")])) == REFUSED
        assert not opened.is_set(), "the UI opened the FIFO"
        assert blocked.is_alive()
    finally:
        release = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # lets the writer go
        blocked.join(5)
        os.close(release)
    # The bundled examples are allowed, by their own path.
    kind, data = gradio_call(http, file_data(str(HELLO)))
    assert kind == "complete" and data[0] == "Hello world."


def test_urls_are_refused_without_being_fetched(public_ui: UiProcess):
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(HELLO.read_bytes())

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hello.flac"
        with pytest.raises(Exception) as caught:
            Client(public_ui.url, verbose=False).predict(file_data(url), "auto", True, 0.35,
                                                         api_name="/transcribe")
        assert REFUSED in str(caught.value)
        assert hits == []
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- row 9: the front door's bound


def test_the_front_door_refuses_beyond_its_bound_at_once(held_ui: UiProcess,
                                                        stand_in: HeldSupervisor,
                                                        stack: ExitStack):
    def transcribe() -> httpx.Response:
        with httpx.Client(base_url=held_ui.url, timeout=60) as client:
            return post_audio(client, HELLO.read_bytes())

    http = stack.enter_context(httpx.Client(base_url=held_ui.url, timeout=60))
    busy_before = metric(http, "sensevoice_requests_total", endpoint="openai", outcome="busy")
    with ThreadPoolExecutor(CAPACITY) as holders:
        admitted = [holders.submit(transcribe) for _ in range(CAPACITY)]
        stand_in.wait_for(CAPACITY)  # the UI holds CAPACITY transcriptions now
        assert metric(http, "sensevoice_front_door_requests") == CAPACITY
        assert metric(http, "sensevoice_front_door_capacity") == CAPACITY
        clients = 16
        barrier = threading.Barrier(clients)

        def one_client(_: int) -> tuple[httpx.Response, float]:
            with httpx.Client(base_url=held_ui.url, timeout=30) as client:
                barrier.wait()
                start = time.monotonic()
                return post_audio(client, HELLO.read_bytes()), time.monotonic() - start

        with ThreadPoolExecutor(clients) as pool:
            refused = list(pool.map(one_client, range(clients)))
        for response, seconds in refused:
            assert response.status_code == 429, response.text
            assert response.headers["retry-after"] == "1"
            assert "x-should-retry" not in response.headers
            error = response.json()["error"]
            assert error["code"] == "busy" and error["type"] == "rate_limit_error"
            assert "SENSEVOICE_MAX_QUEUE" in error["message"]
            assert seconds < FAST_S
        # Refused before its upload is read: this one never sends its body.
        with SlowUpload(held_ui.url, HELLO.read_bytes(), sent=0.0) as unsent:
            assert unsent.response()[0] == 429
        # The page's API is behind the same door; its status is not.
        start = time.monotonic()
        page = http.post("/gradio_api/call/transcribe",
                         json={"data": [file_data(str(HELLO)), *OPTIONS]})
        assert page.status_code == 429 and page.headers["retry-after"] == "1"
        assert "busy" in page.json()["detail"] and time.monotonic() - start < FAST_S
        with pytest.raises(Exception, match="429"):
            Client(held_ui.url, verbose=False).predict(handle_file(str(HELLO)), "auto", True,
                                                       0.35, api_name="/transcribe")
        assert http.post("/gradio_api/call/status", json={"data": [""]}).status_code == 200
        # No way around the queue, and so around the door: the direct route is closed.
        assert http.post("/gradio_api/run/transcribe",
                         json={"data": [file_data(str(HELLO)), *OPTIONS]}
                         ).status_code == 404
        stand_in.release()
        assert [future.result().json() for future in admitted] == [{"text": HELD_TEXT}] * CAPACITY
    # Each gave its place back before its response was sent.
    assert metric(http, "sensevoice_front_door_requests") == 0
    assert post_audio(http, HELLO.read_bytes()).json() == {"text": HELD_TEXT}
    assert metric(http, "sensevoice_requests_total", endpoint="openai",
                  outcome="busy") == busy_before + clients + 1


def test_uploads_still_arriving_hold_no_place(public_ui: UiProcess, http: httpx.Client,
                                              stack: ExitStack):
    """More slow uploads than the bound: none is refused, since none holds a place until its
    body is in (else a few slow clients could keep everyone out)."""
    slow = [stack.enter_context(SlowUpload(public_ui.url, HELLO.read_bytes()))
            for _ in range(CAPACITY + 2)]
    assert post_audio(http, HELLO.read_bytes()).json() == {"text": "Hello world."}
    for upload in slow:  # one after the other: each alone at the door once its body is in
        upload.send_rest()
        status, body = upload.response()
        assert (status, json.loads(body)) == (200, {"text": "Hello world."})


def test_page_transcriptions_count_against_the_bound(held_ui: UiProcess,
                                                     stand_in: HeldSupervisor):
    gradio = Client(held_ui.url, verbose=False)
    jobs = [gradio.submit(handle_file(str(HELLO)), "auto", True, 0.35, api_name="/transcribe")
            for _ in range(CAPACITY)]
    stand_in.wait_for(CAPACITY)
    with httpx.Client(base_url=held_ui.url, timeout=30) as http:
        assert metric(http, "sensevoice_front_door_requests") == CAPACITY
        start = time.monotonic()
        response = post_audio(http, HELLO.read_bytes())
        assert response.status_code == 429 and time.monotonic() - start < FAST_S
        page = http.post("/gradio_api/call/transcribe",
                         json={"data": [file_data(str(HELLO)), *OPTIONS]})
        assert page.status_code == 429 and page.headers["retry-after"] == "1"
        stand_in.release()
        assert [job.result(timeout=30)[0] for job in jobs] == [HELD_TEXT] * CAPACITY
        # Each handler gave its place back before Gradio sent its result.
        assert metric(http, "sensevoice_front_door_requests") == 0
        assert post_audio(http, HELLO.read_bytes()).json() == {"text": HELD_TEXT}


def test_cancelled_page_calls_keep_their_place_while_the_service_works(
        held_ui: UiProcess, stand_in: HeldSupervisor):
    """Gradio's /cancel ends the page's event, but its supervisor call goes on: it still
    counts, so join + cancel cannot pour requests past the bound."""
    with httpx.Client(base_url=held_ui.url, timeout=30) as http:
        fn_index = next(d["id"] for d in http.get("/config").json()["dependencies"]
                        if d.get("api_name") == "transcribe")
        upload = http.post("/gradio_api/upload", files={
            "files": ("hello.flac", HELLO.read_bytes())}).json()[0]
        refused = 0
        for index in range(CAPACITY + 3):
            joined = http.post("/gradio_api/queue/join", json={
                "data": [file_data(upload), *OPTIONS], "fn_index": fn_index,
                "session_hash": f"cancel{index}"})
            if joined.status_code == 429:
                refused += 1
                continue
            assert joined.status_code == 200, joined.text
            stand_in.wait_for(index + 1)
            http.post("/gradio_api/cancel", json={"session_hash": f"cancel{index}",
                                                  "fn_index": fn_index,
                                                  "event_id": joined.json()["event_id"]})
        assert refused == 3 and len(stand_in.held) == CAPACITY
        assert metric(http, "sensevoice_front_door_requests") == CAPACITY
        assert post_audio(http, HELLO.read_bytes()).status_code == 429
        stand_in.release()
        # Cancelled: no result to wait for; the handlers give their places back on their own.
        wait_for_metric(held_ui, http, "sensevoice_front_door_requests", 0)


def test_the_ui_fetches_no_urls_and_serves_no_cdn_pages(public_ui: UiProcess, http: httpx.Client):
    for target in ("https://example.invalid/speech.wav", "https%3A%2F%2Fexample.invalid%2Fa.wav",
                   "http:/example.invalid/a.wav", "//example.invalid/a.wav"):
        for route in ("/gradio_api/file=", "/gradio_api/proxy="):
            response = http.get(route + target)
            assert response.status_code == 403, (route, target, response.status_code)
    assert http.get("/docs").status_code == 404  # Swagger UI would load from a CDN


def test_a_supervisor_that_goes_away_is_503_with_retry_after_and_a_sentence(
        held_ui: UiProcess, stand_in: HeldSupervisor):
    gradio = Client(held_ui.url, verbose=False)
    job = gradio.submit(handle_file(str(HELLO)), "auto", True, 0.35, api_name="/transcribe")
    with httpx.Client(base_url=held_ui.url, timeout=60) as http, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post_audio, http, HELLO.read_bytes())
        stand_in.wait_for(2)
        stand_in.close()  # as if the supervisor were killed with both requests in hand
        start = time.monotonic()
        response = pending.result(timeout=30)
        assert time.monotonic() - start < 10
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "unavailable"
        with pytest.raises(Exception, match="The transcription service is unavailable"):
            job.result(timeout=30)


# ---------------------------------------------------------------- row 12: internals


def test_off_loopback_anonymous_callers_see_no_paths_or_pids(public_ui: UiProcess,
                                                             http: httpx.Client,
                                                             service: Service):
    status = service.status()
    model_dir = status.model.model_dir
    ready = http.get("/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "fingerprint": status.model.fingerprint,
                            "workers": 1, "reloading": False}
    admin = http.get("/ready", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert admin["model_dir"] == model_dir
    assert "model_dir" not in http.get("/ready", headers={"Authorization": "Bearer nope"}).json()

    gradio = Client(public_ui.url, verbose=False)
    markdown, details = gradio.predict("", api_name="/status")
    shown = markdown + json.dumps(details)
    assert status.model.fingerprint[:12] in markdown
    assert details["model"]["fingerprint"] == status.model.fingerprint
    for secret in (model_dir, "pid", "file_paths", "warnings", "requested_path", "watching"):
        assert secret not in shown, secret
    markdown, details = gradio.predict(TOKEN, api_name="/status")
    assert model_dir in markdown and details["supervisor_pid"] == status.supervisor_pid
    assert f"pid {service.serving_pid()} serving" in markdown

    text, tags, *_ = gradio.predict(handle_file(str(HELLO)), "auto", True, 0.35,
                                    api_name="/transcribe")
    assert text == "Hello world." and "worker pid" not in tags and "model " in tags


# ---------------------------------------------------------------- row 13


def test_client_errors_tell_openai_sdks_not_to_retry(http: httpx.Client):
    too_large = post_audio(http, b"\0" * (2 * 2**20), name="big.wav")
    bad_format = post_audio(http, HELLO.read_bytes(), response_format="docx")
    no_file = http.post("/v1/audio/transcriptions", files={"other": ("a.txt", b"x")})
    not_a_form = http.post("/v1/audio/transcriptions", json={"file": "x"})
    unknown_model = http.get("/v1/models/whisper-1")
    for response, status in ((too_large, 413), (bad_format, 400), (no_file, 400),
                             (not_a_form, 400), (unknown_model, 404)):
        assert response.status_code == status, response.text
        assert response.headers["x-should-retry"] == "false", response.url
        assert "retry-after" not in response.headers


def test_subtitle_files_are_removed_when_the_ui_exits(tmp_path: Path):
    socket_dir = tempfile.mkdtemp(prefix="svs", dir="/tmp")
    stand_in = HeldSupervisor(f"ipc://{socket_dir}/s.ipc", hold=False)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid no process has any more: a UI killed before it could clean up
    stale = tmp_path / "ui" / "gradio" / "sensevoice-srt-0123456789abcdef"
    stale.mkdir(parents=True)
    (stale / "owner.pid").write_text(str(gone.pid))
    (stale / "old.srt").write_text("1\n00:00:00,000 --> 00:00:01,000\nold\n")
    try:
        ui = start_ui(tmp_path / "ui", f"ipc://{socket_dir}/s.ipc")
        try:
            assert not stale.exists()
            _, _, _, srt, *_ = Client(ui.url, verbose=False).predict(
                handle_file(str(HELLO)), "auto", True, 0.35, api_name="/transcribe")
            assert HELD_TEXT in Path(srt).read_text(encoding="utf-8")
            [own] = ui.upload_dir.glob("sensevoice-srt-*")
            assert str(ui.process.pid) not in Path(srt).parent.name  # paths reach callers
            assert sorted(p.suffix for p in own.iterdir()) == [".pid", ".srt"]
        finally:
            ui.stop()
        assert sorted(str(p) for p in (tmp_path / "ui").rglob("sensevoice-srt*")) == []
    finally:
        stand_in.close()
        shutil.rmtree(socket_dir, ignore_errors=True)
