"""/v1/realtime end to end: the real `openai` SDK and raw WebSocket clients against `python -m
ui` and a real supervisor serving the demo model (SENSEVOICE_MAX_STREAMS=2)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile
from model_factory import copy_demo_model, nudge_weights
from scipy.signal import resample_poly
from service import start_service
from ui_process import start_ui
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from sensevoice_core.audio import resample_to_16k
from sensevoice_core.options import TranscribeOptions
from ui.gateway import PUBLIC_MESSAGES
from ui.realtime import AUDIO_BURST_S, MAX_MESSAGE_BYTES, MESSAGE_BURST

pytestmark = [
    pytest.mark.slow,
    # The SDK (3.57) connects without a context manager, which websockets 17.1+ deprecates.
    pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager"
                               ":DeprecationWarning"),
]

EXAMPLES = Path(__file__).resolve().parent.parent / "ui" / "examples"
RATE = 24000
MAX_STREAMS = 2
IDLE_S = 6  # SENSEVOICE_STREAM_IDLE_TIMEOUT_S
RECV_TIMEOUT_S = 30.0  # a stuck session fails the test instead of hanging it


def utterances(*names: str, gap_s: float = 1.5) -> np.ndarray:
    """Demo clips with gap_s of silence after each (and 0.5 s before), as 24 kHz int16."""
    parts = [np.zeros(8000, np.float32)]
    for name in names:
        clip, rate = soundfile.read(EXAMPLES / f"{name}.flac", dtype="float32")
        parts += [clip, np.zeros(round(gap_s * rate), np.float32)]
    audio = resample_poly(np.concatenate(parts), RATE, 16000)
    return np.clip(np.round(audio * 32767), -32768, 32767).astype("<i2")


def appends(pcm: np.ndarray, chunk_s: float = 0.2) -> list[str]:
    step = round(chunk_s * RATE)
    return [base64.b64encode(pcm[i:i + step].tobytes()).decode()
            for i in range(0, len(pcm), step)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    demo_dir = copy_demo_model(tmp_path_factory.mktemp("models") / "demo")
    service = start_service(tmp_path_factory.mktemp("service"), demo_dir,
                            max_streams=str(MAX_STREAMS), stream_idle_timeout_s=str(IDLE_S))
    ui = start_ui(tmp_path_factory.mktemp("ui"), service.address)
    yield service, ui, demo_dir
    ui.stop()
    service.stop()


def ws_url(ui, query: str = "?intent=transcription") -> str:
    return ui.url.replace("http://", "ws://") + "/v1/realtime" + query


class Raw:
    """A plain WebSocket client, for what the SDK would never send."""

    def __init__(self, ui, query: str = "?intent=transcription", **options):
        self.ws: ClientConnection = connect(ws_url(ui, query), max_size=None, legacy=True,
                                            **options)

    def send(self, event: dict | str | bytes) -> None:
        self.ws.send(event if isinstance(event, (str, bytes)) else json.dumps(event))

    def recv(self) -> dict:
        return json.loads(self.ws.recv(timeout=RECV_TIMEOUT_S))

    def until(self, kind: str) -> tuple[dict, list[dict]]:
        """The next event of kind, and the ones before it."""
        before = []
        while (event := self.recv())["type"] != kind:
            before.append(event)
        return event, before

    def closed(self) -> tuple[int, str, list[dict]]:
        """Read until the server closes: its close code, reason and the events before."""
        events = []
        try:
            while True:
                events.append(self.recv())
        except ConnectionClosed as closed:
            assert closed.rcvd is not None, "the server did not close the connection itself"
            return closed.rcvd.code, closed.rcvd.reason, events


def open_streams(service) -> int:
    return service.status().streams


def test_the_openai_sdk_receives_each_utterance_in_order(stack, demo_model):
    service, ui, _ = stack
    pcm = utterances("en_02", "zh_04", "en_03")
    client = openai.OpenAI(base_url=ui.url + "/v1", api_key="not-checked")
    with client.realtime.connect(model="sensevoice-small",
                                 extra_query={"intent": "transcription"}) as conn:
        created = conn.recv()
        assert created.type == "session.created"
        assert created.session.type == "transcription"
        assert created.session.audio.input.format.rate == RATE
        assert created.session.audio.input.turn_detection.type == "server_vad"
        conn.session.update(session={"type": "transcription", "audio": {"input": {
            "transcription": {"model": "gpt-4o-transcribe", "language": None}}}})
        assert conn.recv().type == "session.updated"
        for audio in appends(pcm):
            conn.input_audio_buffer.append(audio=audio)
        conn.send({"type": "session.close"})
        events = list(conn)  # until the server's normal close
    assert events[-1].type == "session.closed"
    items: dict[str, list] = {}
    for event in events:
        if getattr(event, "item_id", None):
            items.setdefault(event.item_id, []).append(event)
    assert len(items) == 3, [e.type for e in events]
    audio16 = resample_to_16k(pcm.astype(np.float32) / 32768, RATE, "clip").numpy()
    fingerprint = service.status().model.fingerprint
    texts = []
    for item_events in items.values():
        kinds = [e.type for e in item_events]
        assert kinds[0] == "input_audio_buffer.speech_started"
        assert kinds[-1] == "conversation.item.input_audio_transcription.completed"
        first_delta = kinds.index("conversation.item.input_audio_transcription.delta")
        assert kinds.index("input_audio_buffer.committed") < len(kinds) - 1 and first_delta > 0
        completed = item_events[-1]
        extra = completed.model_extra
        piece = audio16[round(extra["start"] * 16000):round(extra["end"] * 16000)]
        assert completed.transcript and completed.transcript == \
            demo_model.transcribe(piece, TranscribeOptions(use_itn=True)).text
        assert extra["fingerprint"] == fingerprint
        assert extra["language"] in ("en", "zh") and extra["emotion"] and extra["event"]
        assert completed.usage.seconds == pytest.approx(extra["end"] - extra["start"], abs=1e-3)
        assert extra["words"] and all(extra["start"] <= w["start"] <= w["end"] <= extra["end"]
                                      for w in extra["words"])
        texts.append(completed.transcript)
    starts = [e.model_extra["start"] for e in events
              if e.type == "conversation.item.input_audio_transcription.completed"]
    assert starts == sorted(starts) and len(set(texts)) == 3
    committed = [e for e in events if e.type == "input_audio_buffer.committed"]
    assert [c.previous_item_id for c in committed] == [None, *[c.item_id for c in committed[:-1]]]
    service.wait_until(lambda status: status.streams == 0, what="the stream to close")


def mu_law(audio: np.ndarray) -> bytes:
    """G.711 mu-law of float samples (the reference encoder: bias 0x84, clip 32635)."""
    pcm = np.clip(np.round(audio * 32767), -32767, 32767).astype(np.int32)
    sign = (pcm < 0).astype(np.int32) << 7
    magnitude = np.minimum(np.abs(pcm), 32635) + 0x84
    exponent = np.clip(np.floor(np.log2(magnitude)).astype(np.int32) - 7, 0, 7)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def test_tiny_appends_are_merged_in_order_and_logprobs_come_when_included(stack, demo_model):
    """A client sending 5 ms at a time (merged by the UI before they reach the supervisor)
    gets the same transcript as the batch path, committed audio complete and in order."""
    _, ui, _ = stack
    pcm = utterances("en_02", gap_s=0.3)
    session = Raw(ui)
    session.recv()
    session.send({"type": "session.update", "session": {
        "type": "transcription", "include": ["item.input_audio_transcription.logprobs"],
        "audio": {"input": {"turn_detection": None,
                            "transcription": {"prompt": "a prompt is ignored"}}}}})
    assert session.recv()["session"]["include"] == ["item.input_audio_transcription.logprobs"]
    tiny = appends(pcm, chunk_s=0.005)
    assert len(tiny) < MESSAGE_BURST
    for audio in tiny:
        session.send({"type": "input_audio_buffer.append", "audio": audio})
    session.send({"type": "input_audio_buffer.commit"})
    completed, _ = session.until("conversation.item.input_audio_transcription.completed")
    audio16 = resample_to_16k(pcm.astype(np.float32) / 32768, RATE, "clip").numpy()
    assert completed["start"] == 0 and completed["end"] == pytest.approx(len(pcm) / RATE, abs=0.01)
    assert completed["transcript"] == \
        demo_model.transcribe(audio16, TranscribeOptions(use_itn=True)).text
    logprobs = completed["logprobs"]
    assert logprobs and all(p["logprob"] <= 0 and p["bytes"] == list(p["token"].encode())
                            for p in logprobs)
    session.ws.close()


def test_telephone_audio_in_g711_mu_law_is_transcribed(stack):
    service, ui, _ = stack
    session = Raw(ui)
    session.recv()
    session.send({"type": "session.update", "session": {"type": "transcription", "audio": {
        "input": {"format": {"type": "audio/pcmu"}}}}})
    updated, _ = session.until("session.updated")
    assert updated["session"]["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    pcm = utterances("en_02")
    audio8k = resample_poly(pcm.astype(np.float32) / 32768, 8000, RATE)
    data = mu_law(audio8k)
    for first in range(0, len(data), 800):
        session.send({"type": "input_audio_buffer.append",
                      "audio": base64.b64encode(data[first:first + 800]).decode()})
    completed, _ = session.until("conversation.item.input_audio_transcription.completed")
    assert completed["transcript"] and completed["language"] == "en"
    # ... and the format is fixed now that audio has come.
    session.send({"type": "session.update", "session": {"type": "transcription", "audio": {
        "input": {"format": {"type": "audio/pcm", "rate": RATE}}}}})
    error, _ = session.until("error")
    assert "before the first audio" in error["error"]["message"]
    session.ws.close()
    service.wait_until(lambda status: status.streams == 0, what="the stream to be aborted")


def test_streams_beyond_the_limit_are_refused_and_the_others_go_on(stack):
    service, ui, _ = stack
    pcm = utterances("zh_04")

    async def scenario() -> None:
        client = openai.AsyncOpenAI(base_url=ui.url + "/v1", api_key="not-checked")
        held = [await client.realtime.connect(
            model="m", extra_query={"intent": "transcription"}).enter()
            for _ in range(MAX_STREAMS)]
        for conn in held:
            assert (await conn.recv()).type == "session.created"
        assert open_streams(service) == MAX_STREAMS
        refused = Raw(ui)
        code, reason, events = refused.closed()
        assert [e["type"] for e in events] == ["error"]
        error = events[0]["error"]
        assert (error["code"], error["type"]) == ("busy", "rate_limit_error")
        assert f"SENSEVOICE_MAX_STREAMS={MAX_STREAMS}" in error["message"], error
        assert code == 1013 and reason.startswith("busy")
        for conn in held:  # the others still transcribe
            for audio in appends(pcm):
                await conn.input_audio_buffer.append(audio=audio)
            await conn.send({"type": "session.close"})
        for conn in held:
            kinds = [event.type async for event in conn]
            assert kinds.count("conversation.item.input_audio_transcription.completed") == 1
            assert kinds[-1] == "session.closed"

    asyncio.run(scenario())
    service.wait_until(lambda status: status.streams == 0, what="the streams to close")


def test_hostile_messages_get_errors_and_the_session_goes_on(stack):
    service, ui, _ = stack
    session = Raw(ui)
    assert session.recv()["type"] == "session.created"
    cases = [
        ("{not json", "invalid_json", None),
        (b"\x00\x01binary", "invalid_json", None),
        ({"type": "input_audio_buffer.append", "audio": "%%%not base64", "event_id": "e1"},
         "invalid_audio", "audio"),
        ({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()},
         "invalid_audio", "audio"),
        ({"type": "no.such.event"}, "invalid_value", "type"),
        ({"type": "response.create"}, "invalid_value", "type"),
        ({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 44100}}}}},
         "invalid_value", "session.audio.input.format.rate"),
        ('{"type": "input_audio_buffer.append", "audio": NaN}', "invalid_json", None),
        ("[" * 50_000 + "]" * 50_000, "invalid_json", None),
    ]
    for message, code, param in cases:
        session.send(message)
        error = session.recv()
        assert error["type"] == "error", (message, error)
        assert (error["error"]["code"], error["error"]["param"]) == (code, param), error
    assert error["error"]["event_id"] is None
    session.send({"type": "input_audio_buffer.append", "audio": "!", "event_id": "mine"})
    assert session.recv()["error"]["event_id"] == "mine"
    # ... and the session still works
    session.send({"type": "session.update", "session": {"type": "transcription", "audio": {
        "input": {"turn_detection": None}}}})
    updated = session.recv()
    assert updated["type"] == "session.updated"
    assert updated["session"]["audio"]["input"]["turn_detection"] is None
    for audio in appends(utterances("en_02", gap_s=0.3)):
        session.send({"type": "input_audio_buffer.append", "audio": audio})
    session.send({"type": "input_audio_buffer.commit"})  # manual turns now
    completed, before = session.until("conversation.item.input_audio_transcription.completed")
    assert completed["transcript"]
    assert "input_audio_buffer.speech_started" not in [e["type"] for e in before]
    # A message over the bound ends the session, with the reason.
    session.send(json.dumps({"type": "input_audio_buffer.append",
                             "audio": "A" * (MAX_MESSAGE_BYTES + 4)}))
    code, _, events = session.closed()
    assert events[-1]["error"]["code"] == "message_too_large" and code == 1009
    # Far over it: the server's WebSocket layer refuses it before reading it all (uvicorn's
    # ws_max_size), so no error event, only the close.
    huge = Raw(ui)
    huge.recv()
    try:
        huge.send(json.dumps({"type": "input_audio_buffer.append",
                              "audio": "A" * (4 * MAX_MESSAGE_BYTES)}))
    except ConnectionClosed:
        pass
    code, _, events = huge.closed()
    assert code == 1009 and events == []
    service.wait_until(lambda status: status.streams == 0, what="the stream to be freed")


def test_audio_faster_than_the_limit_and_floods_of_messages_end_the_session(stack):
    service, ui, _ = stack
    fast = Raw(ui)
    fast.recv()
    second = np.zeros(RATE, "<i2").tobytes()
    for _ in range(int(AUDIO_BURST_S) * 10):  # seconds of audio, as fast as this client can
        try:
            fast.send({"type": "input_audio_buffer.append",
                       "audio": base64.b64encode(second).decode()})
        except ConnectionClosed:
            break
    code, _, events = fast.closed()
    assert events[-1]["error"]["code"] == "rate_limit_exceeded" and code == 1008
    assert "real time" in events[-1]["error"]["message"]
    flood = Raw(ui)
    flood.recv()
    for _ in range(int(MESSAGE_BURST) * 20):  # as fast as this client can
        try:
            flood.send({"type": "input_audio_buffer.commit"})
        except ConnectionClosed:
            break
    code, _, events = flood.closed()
    assert events[-1]["error"]["code"] == "rate_limit_exceeded" and code == 1008
    assert "messages a second" in events[-1]["error"]["message"]
    service.wait_until(lambda status: status.streams == 0, what="the streams to be freed")


def test_a_client_that_vanishes_frees_its_stream(stack):
    service, ui, _ = stack
    aborted = service.status().stream_counts.get("aborted", 0)
    session = Raw(ui)
    session.recv()
    assert open_streams(service) == 1
    session.send({"type": "input_audio_buffer.append", "audio": appends(utterances("en_03"))[3]})
    session.ws.socket.close()  # no close frame: the connection just drops
    # Freed by the UI's abort, well before the idle timeout would have.
    service.wait_until(lambda status: status.streams == 0, timeout=IDLE_S / 2,
                       what="the stream to be aborted")
    assert service.status().stream_counts.get("aborted", 0) == aborted + 1


def test_an_idle_session_is_closed_with_the_reason(stack):
    service, ui, _ = stack
    session = Raw(ui)
    session.recv()
    code, _, events = session.closed()
    error = events[-1]["error"]
    assert error["code"] == "timeout" and "SENSEVOICE_STREAM_IDLE_TIMEOUT_S" in error["message"]
    assert code == 1008
    assert service.status().streams == 0


def test_what_may_not_open_a_session(stack):
    service, ui, _ = stack
    no_intent = Raw(ui, query="")
    code, _, events = no_intent.closed()
    assert events[0]["error"]["param"] == "intent" and code == 1008
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(ui), additional_headers={"Origin": "http://evil.example"}, legacy=True)
    assert refused.value.response.status_code == 403
    with connect(ws_url(ui), additional_headers={"Origin": ui.url}) as same_site:
        assert json.loads(same_site.recv(timeout=RECV_TIMEOUT_S))["type"] == "session.created"
    service.wait_until(lambda status: status.streams == 0, what="the stream to be aborted")


def test_without_a_supervisor_the_session_is_refused_with_the_reason(tmp_path):
    """On a public address the reason is told only to the admin token (the SDK's API key)."""
    address = f"ipc://{tmp_path}/nobody.ipc"
    ui = start_ui(tmp_path / "ui", address, ui_host="0.0.0.0", admin_token="s3cret")
    try:
        code, _, events = Raw(ui).closed()
        error = events[0]["error"]
        assert error["code"] == "unavailable" and code == 1013
        assert error["message"] == PUBLIC_MESSAGES["unavailable"]
        operator = Raw(ui, additional_headers={"Authorization": "Bearer s3cret"})
        code, _, events = operator.closed()
        assert events[0]["error"]["code"] == "unavailable" and code == 1013
        assert "nobody.ipc" in events[0]["error"]["message"]
    finally:
        ui.stop()


def test_a_reload_under_an_open_session_changes_the_fingerprint_without_an_error(stack):
    service, ui, demo_dir = stack
    old = service.status().model.fingerprint
    session = Raw(ui)
    session.recv()
    for audio in appends(utterances("en_02")):
        session.send({"type": "input_audio_buffer.append", "audio": audio})
    before, _ = session.until("conversation.item.input_audio_transcription.completed")
    assert before["fingerprint"] == old
    nudge_weights(demo_dir)
    outcomes = []
    reload = threading.Thread(target=lambda: outcomes.append(service.client.hot_reload_model()))
    reload.start()
    silence = appends(np.zeros(round(0.1 * RATE), "<i2"))[0]
    while reload.is_alive():  # the session goes on meanwhile (and is not idle)
        session.send({"type": "input_audio_buffer.append", "audio": silence})
        time.sleep(0.1)
    [outcome] = outcomes
    assert outcome.ok and outcome.new_fingerprint != old
    for audio in appends(utterances("en_02")):
        session.send({"type": "input_audio_buffer.append", "audio": audio})
    after, between = session.until("conversation.item.input_audio_transcription.completed")
    assert "error" not in [e["type"] for e in between]
    assert after["fingerprint"] == outcome.new_fingerprint
    assert after["transcript"] and after["item_id"] != before["item_id"]
    session.send({"type": "session.close"})
    code, _, events = session.closed()
    assert code == 1000 and events[-1]["type"] == "session.closed"


def test_a_ui_killed_under_open_sessions_leaves_no_stream_behind(stack, tmp_path):
    service, _, _ = stack
    doomed = start_ui(tmp_path / "ui", service.address)
    sessions = [Raw(doomed) for _ in range(MAX_STREAMS)]
    for session in sessions:
        session.recv()
    assert open_streams(service) == MAX_STREAMS
    doomed.process.kill()
    doomed.process.wait()
    # The supervisor's idle timeout frees them (nothing more can come from a dead client).
    service.wait_until(lambda status: status.streams == 0, timeout=IDLE_S + 10,
                       what="the dead UI's streams to be freed")


def test_a_worker_killed_mid_turn_fails_the_item_and_closes_the_session(stack):
    service, ui, _ = stack
    session = Raw(ui)
    session.recv()
    pcm = utterances("zh_04", gap_s=0.0)
    for audio in appends(pcm[:round(1.5 * RATE)]):  # inside the utterance: the turn is open
        session.send({"type": "input_audio_buffer.append", "audio": audio})
    started, _ = session.until("input_audio_buffer.speech_started")
    [worker] = [w for w in service.status().workers if w.streams == 1]
    os.kill(worker.pid, signal.SIGKILL)
    code, _, events = session.closed()
    kinds = [e["type"] for e in events]
    assert kinds[-2:] == ["conversation.item.input_audio_transcription.failed", "error"], kinds
    assert events[-2]["item_id"] == started["item_id"]
    assert events[-1]["error"]["code"] == "worker_lost" and code == 1011
    service.wait_ready()
