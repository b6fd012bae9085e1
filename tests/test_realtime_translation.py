"""The Realtime WebSocket's pure parts: session.update read into stream options, and stream
events as OpenAI server events (checked against the installed `openai` SDK's own types)."""

from __future__ import annotations

import base64
import json
import re
import threading
import time

import anyio
import pytest
from fastapi import FastAPI, WebSocket
from fastapi.testclient import TestClient
from openai.types.realtime import (
    ConversationItemInputAudioTranscriptionCompletedEvent,
    ConversationItemInputAudioTranscriptionDeltaEvent,
    ConversationItemInputAudioTranscriptionFailedEvent,
    InputAudioBufferClearedEvent,
    InputAudioBufferCommittedEvent,
    InputAudioBufferSpeechStartedEvent,
    InputAudioBufferSpeechStoppedEvent,
    RealtimeErrorEvent,
    SessionCreatedEvent,
)
from openai.types.realtime.realtime_transcription_session_create_request import (
    RealtimeTranscriptionSessionCreateRequest,
)
from starlette.websockets import WebSocketDisconnect

from sensevoice_core.client import ServiceError, SupervisorClient
from sensevoice_core.result import Segment, Token, Word
from sensevoice_core.settings import Settings
from sensevoice_core.stream_types import (
    Cleared,
    Committed,
    Final,
    Partial,
    SpeechStarted,
    SpeechStopped,
    StreamClosed,
)
from ui.gateway import FrontDoor, Gateway, RequestFailed
from ui.metrics import ServiceMetrics
from ui.realtime import RealtimeSession, close_reason, decode_audio, parse_event
from ui.realtime_events import COMPLETED, DELTA, EventTranslator, server_event
from ui.realtime_flow import FLUSH_AFTER_S, AppendMerger, TokenBucket, merge_bytes
from ui.realtime_session import SessionConfig, token_logprobs, updated

OPENAI_ID = re.compile(r"(event|item|sess)_[A-Za-z0-9]{21}")


def gateway(**values) -> Gateway:
    settings = Settings(supervisor_address="ipc:///tmp/sv-realtime-test.ipc", **values)
    door = FrontDoor(2)
    return Gateway(settings, SupervisorClient(settings=settings),
                   ServiceMetrics(lambda: None, door.held, door.capacity), door)


def segment(text: str, start: float = 1.0, end: float = 2.0, words: tuple[Word, ...] = ()
            ) -> Segment:
    return Segment(start=start, end=end, text=text, raw=f"<|en|><|HAPPY|><|Speech|>{text}",
                   language="en", emotion="HAPPY", event="Speech", words=words)


def test_the_session_shows_the_values_in_force_and_parses_as_the_sdk_reads_it():
    gw = gateway(vad_threshold=0.4, vad_min_silence_s=0.6, vad_speech_pad_s=0.2,
                 languages="zh,en")
    session = SessionConfig().session("sess_x", gw.settings)
    event = SessionCreatedEvent.model_validate(server_event("session.created", session=session))
    assert isinstance(event.session, RealtimeTranscriptionSessionCreateRequest)
    audio_input = session["audio"]["input"]
    assert audio_input["format"] == {"type": "audio/pcm", "rate": 24000}
    assert audio_input["turn_detection"] == {"type": "server_vad", "threshold": 0.4,
                                             "prefix_padding_ms": 200,
                                             "silence_duration_ms": 600}
    assert audio_input["transcription"] == {"model": "sensevoice-small", "language": None,
                                            "languages": ["zh", "en"]}
    assert OPENAI_ID.fullmatch(event.event_id)


def test_a_session_update_becomes_stream_options():
    gw = gateway()
    config = updated(SessionConfig(), {
        "type": "transcription",
        "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "transcription": {"model": "gpt-4o-transcribe", "language": "English",
                              "languages": ["en", "Chinese"], "prompt": ""},
            "turn_detection": {"type": "server_vad", "threshold": 0.7, "prefix_padding_ms": 300,
                               "silence_duration_ms": 800, "create_response": True}}}},
        gw, audio_sent=False)
    options = config.stream_options()
    assert (options.language, options.languages) == ("en", ["en", "zh"])
    assert (options.encoding, options.sample_rate, options.turn_detection) == \
        ("pcm_s16le", 24000, True)
    assert (options.vad_threshold, options.speech_pad_s, options.min_silence_s) == \
        (0.7, 0.3, 0.8)
    manual = updated(config, {"type": "transcription", "audio": {"input": {
        "turn_detection": None, "format": {"type": "audio/pcmu"}}}}, gw, audio_sent=False)
    options = manual.stream_options()
    assert (options.turn_detection, options.encoding, options.sample_rate) == \
        (False, "pcmu", 8000)
    assert options.language == "en"  # what the update left out stays
    assert manual.session("sess_x", gw.settings)["audio"]["input"]["turn_detection"] is None


def test_a_session_update_from_openais_docs_is_accepted_and_logprobs_are_included():
    """prompt and idle_timeout_ms change nothing SenseVoice does (no prompt for CTC; no
    responses to trigger): accepted, as the HTTP API accepts a prompt."""
    gw = gateway()
    config = updated(SessionConfig(), {
        "type": "transcription",
        "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 24000}, "noise_reduction": None,
            "transcription": {"model": "gpt-4o-transcribe", "prompt": "Names: Ada, Grace",
                              "language": "en"},
            "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                               "silence_duration_ms": 500, "idle_timeout_ms": 6000}}},
        "include": ["item.input_audio_transcription.logprobs"]}, gw, audio_sent=False)
    assert config.logprobs and config.stream_options().language == "en"
    session = config.session("sess_x", gw.settings)
    assert session["include"] == ["item.input_audio_transcription.logprobs"]
    SessionCreatedEvent.model_validate(server_event("session.created", session=session))
    # An update that leaves include out keeps it; null or [] turns it off.
    assert updated(config, {"type": "transcription"}, gw, audio_sent=True).logprobs
    for off in (None, []):
        assert not updated(config, {"type": "transcription", "include": off}, gw,
                           audio_sent=True).logprobs


def test_logprobs_are_each_text_tokens_text_log_probability_and_bytes():
    tokens = (Token(id=1, piece="\u2581hello", start=1.0, end=1.2, probability=0.5),
              Token(id=2, piece=",", start=1.2, end=1.2, probability=1.0),
              Token(id=3, piece="\u2581wörld", start=1.3, end=1.5, probability=0.0))
    final = segment("hello, wörld").model_copy(update={"tokens": tokens})
    logprobs = token_logprobs(final)
    assert [p["token"] for p in logprobs] == ["hello", ",", " wörld"]
    assert "".join(p["token"] for p in logprobs) == final.text
    assert logprobs[0]["logprob"] == pytest.approx(-0.693147, abs=1e-6)
    assert logprobs[1]["logprob"] == 0.0
    assert logprobs[2]["logprob"] < -700 and logprobs[2]["logprob"] > float("-inf")  # JSON
    assert logprobs[2]["bytes"] == list(" wörld".encode())
    event = ConversationItemInputAudioTranscriptionCompletedEvent.model_validate(
        server_event(COMPLETED, item_id="item_x", content_index=0, transcript=final.text,
                     usage={"type": "duration", "seconds": 1.0}, logprobs=logprobs))
    assert event.logprobs is not None and event.logprobs[2].token == " wörld"


def test_appends_are_held_until_a_tenth_of_a_second_or_the_flush_time():
    full = merge_bytes(24000, 2)
    assert full == 4800 and merge_bytes(8000, 1) == 800
    merger = AppendMerger()
    assert merger.due_in() is None and merger.take() == b""
    assert not merger.add(b"\1\0" * 1000, full)
    due = merger.due_in()
    assert due is not None and 0 < due <= FLUSH_AFTER_S
    assert not merger.add(b"\2\0" * 1399, full)
    assert merger.add(b"\3\0", full)  # 2400 samples: 100 ms
    assert merger.take() == b"\1\0" * 1000 + b"\2\0" * 1399 + b"\3\0"
    assert merger.due_in() is None and merger.take() == b""


@pytest.mark.parametrize("session, param, says", [
    ({"type": "realtime"}, "session.type", "'transcription'"),
    ({"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcm",
                                                              "rate": 16000}}}},
     "session.audio.input.format.rate", "24000"),
    ({"type": "transcription", "audio": {"input": {"format": {"type": "audio/opus"}}}},
     "session.audio.input.format.type", "audio/pcmu"),
    ({"type": "transcription", "audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}},
     "session.audio.input.turn_detection.type", "server_vad"),
    ({"type": "transcription", "audio": {"input": {"turn_detection": {"threshold": 1.5}}}},
     "session.audio.input.turn_detection.threshold", "1"),
    ({"type": "transcription", "audio": {"input": {"turn_detection": {
        "silence_duration_ms": "500"}}}},
     "session.audio.input.turn_detection.silence_duration_ms", "whole number"),
    ({"type": "transcription", "audio": {"input": {"turn_detection": {
        "silence_duration_ms": float("inf")}}}},  # what json.loads makes of 1e999
     "session.audio.input.turn_detection.silence_duration_ms", "whole number"),
    ({"type": "transcription", "audio": {"input": {"turn_detection": {
        "prefix_padding_ms": 10 ** 400}}}},
     "session.audio.input.turn_detection.prefix_padding_ms", "whole number"),
    ({"type": "transcription", "audio": {"input": {"turn_detection": {
        "idle_timeout_ms": "soon"}}}},
     "session.audio.input.turn_detection.idle_timeout_ms", "whole number"),
    ({"type": "transcription", "audio": {"input": {"transcription": {"language": "klingon"}}}},
     "session.audio.input.transcription.language", "expected one of"),
    ({"type": "transcription", "audio": {"input": {"transcription": {"prompt": 5}}}},
     "session.audio.input.transcription.prompt", "string"),
    ({"type": "transcription", "audio": {"input": {"noise_reduction": {"type": "near_field"}}}},
     "session.audio.input.noise_reduction", "null"),
    ({"type": "transcription", "audio": {"input": {"colour": "blue"}}},
     "session.audio.input.colour", "supported fields"),
    ({"type": "transcription", "include": ["item.input_audio_transcription.logprobs",
                                           "item.input_audio_transcription.audio"]},
     "session.include", "'item.input_audio_transcription.audio' is not supported"),
    ({"type": "transcription", "include": "item.input_audio_transcription.logprobs"},
     "session.include", "a list"),
    ("transcription", "session", "object"),
])
def test_an_unsupported_value_names_the_field_and_what_is_supported(session, param, says):
    with pytest.raises(RequestFailed) as failure:
        updated(SessionConfig(), session, gateway(), audio_sent=False)
    assert failure.value.param == param, failure.value
    assert says in failure.value.message, failure.value


def test_the_format_is_fixed_once_audio_has_come():
    change = {"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcma"}}}}
    with pytest.raises(RequestFailed, match="before the first audio"):
        updated(SessionConfig(), change, gateway(), audio_sent=True)
    same = {"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcm"}}}}
    assert updated(SessionConfig(), same, gateway(), audio_sent=True) == SessionConfig()


def test_turn_events_become_openai_events_with_one_item_id_per_turn():
    translator = EventTranslator()
    started, = translator.translate(SpeechStarted(item=1, start_s=1.234))
    stopped, = translator.translate(SpeechStopped(item=1, end_s=2.5))
    committed, = translator.translate(Committed(item=1, start_s=1.234, end_s=2.5))
    started_again, = translator.translate(SpeechStarted(item=2, start_s=4.0))
    committed_again, = translator.translate(Committed(item=2, start_s=4.0, end_s=5.0))
    assert InputAudioBufferSpeechStartedEvent.model_validate(started).audio_start_ms == 1234
    assert InputAudioBufferSpeechStoppedEvent.model_validate(stopped).audio_end_ms == 2500
    first = InputAudioBufferCommittedEvent.model_validate(committed)
    assert started["item_id"] == stopped["item_id"] == first.item_id
    assert OPENAI_ID.fullmatch(first.item_id) and first.previous_item_id is None
    assert committed_again["previous_item_id"] == first.item_id
    assert started_again["item_id"] == committed_again["item_id"] != first.item_id
    assert len({started["event_id"], stopped["event_id"], committed["event_id"]}) == 3


def deltas(events: list[dict]) -> list[str]:
    return [e["delta"] for e in events if e["type"] == DELTA]


def test_deltas_send_what_a_partial_adds_and_the_final_flushes_the_rest():
    translator = EventTranslator()
    events = [*translator.translate(Partial(item=1, segment=segment("Hel"))),
              *translator.translate(Partial(item=1, segment=segment("Hel"))),  # unchanged
              *translator.translate(Partial(item=1, segment=segment("Hello wor"))),
              *translator.translate(Final(item=1, segment=segment("Hello world."),
                                          fingerprint="f" * 64))]
    assert deltas(events) == ["Hel", "lo wor", "ld."]
    for event in events[:-1]:
        ConversationItemInputAudioTranscriptionDeltaEvent.model_validate(event)
    completed = ConversationItemInputAudioTranscriptionCompletedEvent.model_validate(events[-1])
    assert completed.transcript == "Hello world." == "".join(deltas(events))
    assert completed.usage.seconds == 1.0
    extra = events[-1]
    assert (extra["language"], extra["emotion"], extra["event"], extra["fingerprint"],
            extra["start"], extra["end"]) == ("en", "HAPPY", "Speech", "f" * 64, 1.0, 2.0)
    assert len({e["item_id"] for e in events}) == 1


def test_a_revised_partial_sends_an_empty_delta_and_carries_the_whole_hypothesis():
    translator = EventTranslator()
    events = [*translator.translate(Partial(item=1, segment=segment("Open"))),
              *translator.translate(Partial(item=1, segment=segment("Hello"))),
              *translator.translate(Partial(item=1, segment=segment("Open the"))),
              *translator.translate(Final(item=1, segment=segment("Open the door.")))]
    assert deltas(events) == ["Open", "", " the", " the door."[4:]]
    assert [e["partial"] for e in events if e["type"] == DELTA] == \
        ["Open", "Hello", "Open the", "Open the door."]
    assert "".join(deltas(events)) == events[-1]["transcript"]


def test_an_item_with_text_gets_a_delta_even_without_partials_and_silence_gets_none():
    translator = EventTranslator()
    words = (Word(word="8975。", start=1.1, end=1.9, probability=0.875),)
    events = translator.translate(Final(item=1, segment=segment("8975。", words=words)))
    assert deltas(events) == ["8975。"] and events[-1]["type"] == COMPLETED
    assert events[-1]["words"] == [{"word": "8975。", "start": 1.1, "end": 1.9,
                                    "probability": 0.875}]
    nothing = translator.translate(Final(item=2, segment=segment("")))
    assert [e["type"] for e in nothing] == [COMPLETED] and nothing[0]["transcript"] == ""


def test_a_failed_stream_fails_each_open_item_then_says_why():
    translator = EventTranslator()
    translator.translate(Final(item=1, segment=segment("done")))
    translator.translate(SpeechStarted(item=2, start_s=3.0))
    open_item = translator.translate(Partial(item=2, segment=segment("half")))[0]["item_id"]
    failure = RequestFailed(502, "worker_lost", "the worker stopped")
    *failed, error = translator.failed(failure)
    assert [f["item_id"] for f in failed] == [open_item]
    assert ConversationItemInputAudioTranscriptionFailedEvent.model_validate(
        failed[0]).error.code == "worker_lost"
    parsed = RealtimeErrorEvent.model_validate(error)
    assert (parsed.error.type, parsed.error.code, parsed.error.message) == \
        ("server_error", "worker_lost", "the worker stopped")


def test_a_clear_drops_the_open_turn_but_not_the_committed_one():
    translator = EventTranslator()
    translator.translate(Committed(item=1, start_s=0.0, end_s=1.0))
    translator.translate(SpeechStarted(item=2, start_s=2.0))
    cleared, = translator.translate(Cleared())
    InputAudioBufferClearedEvent.model_validate(cleared)
    assert list(translator.items) == [1]
    closed, = translator.translate(StreamClosed())
    assert closed["type"] == "session.closed"


@pytest.mark.parametrize("text, code", [
    ("{not json", "invalid_json"), ("[1, 2]", "invalid_json"), ('{"type": NaN}', "invalid_json"),
    ('{"audio": "AAAA"}', "missing_required_parameter"), ("[" * 100_000, "invalid_json"),
])
def test_a_message_that_is_not_an_event_is_refused(text, code):
    with pytest.raises(RequestFailed) as failure:
        parse_event(text)
    assert failure.value.code == code


@pytest.mark.parametrize("audio, says", [
    ("not base64!", "base64"), ("", "empty"),
    ("AAAA", "whole samples of 2 bytes; this message has 3"),
    (None, "base64 audio bytes"),
])
def test_audio_that_is_not_whole_samples_in_base64_is_refused(audio, says):
    with pytest.raises(RequestFailed, match=says):
        decode_audio({"type": "input_audio_buffer.append", "audio": audio}, SessionConfig())


def test_g711_audio_is_one_byte_a_sample():
    config = SessionConfig(audio_format="audio/pcmu")
    assert decode_audio({"audio": "AAA="}, config) == b"\0\0"


def test_a_token_bucket_allows_its_burst_then_its_rate():
    bucket = TokenBucket(rate=10.0, capacity=5.0)
    assert bucket.take(5.0) and not bucket.take(1.0)
    bucket.updated -= 0.2  # as if 0.2 s passed: 2 more
    assert bucket.take(2.0) and not bucket.take(0.5)


def test_a_close_reason_fits_a_close_frame():
    reason = close_reason(RequestFailed(503, "unavailable", "ü" * 200))
    assert len(reason.encode()) <= 123 and reason.startswith("unavailable: ü")


class RecordingStream:
    """Stands in for LiveStream where the real one cannot show it: what reaches the stream (the
    supervisor counts no messages), and when."""

    stream_id = "stream-test"

    def __init__(self, audio_fails: str | None = None) -> None:
        self.audio_fails = audio_fails  # the ServiceError code send_audio raises
        self.calls: list[tuple[str, int, float]] = []  # (what, bytes, time.monotonic())
        self.arrived = threading.Event()
        self.closed: anyio.Event | None = None

    def record(self, what: str, size: int = 0) -> None:
        self.calls.append((what, size, time.monotonic()))
        self.arrived.set()

    async def send_audio(self, data: bytes) -> None:
        self.record("audio", len(data))
        if self.audio_fails:
            raise ServiceError(self.audio_fails, "the stream was open longer than "
                                                 "SENSEVOICE_MAX_STREAM_S")

    async def commit(self) -> None:
        self.record("commit")

    async def clear(self) -> None:
        self.record("clear")

    async def update(self, options) -> None:
        self.record("update")

    async def close(self) -> None:
        self.record("close")
        assert self.closed is not None
        self.closed.set()

    async def abort(self) -> None:
        self.record("abort")
        if self.closed is not None:
            self.closed.set()

    async def events(self):
        self.closed = anyio.Event()
        await self.closed.wait()
        if self.calls[-1][0] == "close":
            yield StreamClosed()


def appended(size: int) -> str:
    return json.dumps({"type": "input_audio_buffer.append",
                       "audio": base64.b64encode(b"\0" * size).decode()})


def session_app(stream: RecordingStream) -> FastAPI:
    app = FastAPI()

    @app.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket) -> None:
        await websocket.accept()
        await RealtimeSession(websocket, gateway(), stream, internals=True).run()  # type: ignore

    return app


def test_tiny_appends_reach_the_stream_merged_in_order_and_held_audio_goes_on_in_time():
    stream = RecordingStream()
    with TestClient(session_app(stream)) as client, \
            client.websocket_connect("/v1/realtime") as ws:
        assert json.loads(ws.receive_text())["type"] == "session.created"
        # 100 ms of 24 kHz pcm is 4800 bytes: three of 2000 go on as one.
        for _ in range(3):
            ws.send_text(appended(2000))
        assert stream.arrived.wait(5)
        # One too small alone, then the flush timer: no further message needed.
        stream.arrived.clear()
        sent_at = time.monotonic()
        ws.send_text(appended(480))
        assert stream.arrived.wait(5)
        waited = stream.calls[-1][2] - sent_at
        assert FLUSH_AFTER_S * 0.8 <= waited < 1.0, waited
        # Held audio goes before a commit, a clear, an update and the close; a large append
        # goes as it came, after what was held.
        ws.send_text(appended(20))
        ws.send_text(json.dumps({"type": "input_audio_buffer.commit"}))
        ws.send_text(appended(40))
        ws.send_text(json.dumps({"type": "input_audio_buffer.clear"}))
        ws.send_text(appended(60))
        ws.send_text(appended(9600))
        ws.send_text(appended(80))
        ws.send_text(json.dumps({"type": "session.update", "session": {
            "type": "transcription", "audio": {"input": {"turn_detection": None}}}}))
        ws.send_text(appended(100))
        ws.send_text(json.dumps({"type": "session.close"}))
        kinds = []
        while (kind := json.loads(ws.receive_text())["type"]) != "session.closed":
            kinds.append(kind)
        assert kinds == ["session.updated"]
    assert [(what, size) for what, size, _ in stream.calls] == [
        ("audio", 6000), ("audio", 480), ("audio", 20), ("commit", 0), ("audio", 40),
        ("clear", 0), ("audio", 60), ("audio", 9600), ("audio", 80), ("update", 0),
        ("audio", 100), ("close", 0)]


def test_held_audio_the_stream_refuses_on_the_timer_ends_the_session_with_the_reason():
    stream = RecordingStream(audio_fails="too_long")
    with TestClient(session_app(stream)) as client, \
            client.websocket_connect("/v1/realtime") as ws:
        ws.receive_text()
        ws.send_text(appended(480))  # held; the timer sends it
        error = json.loads(ws.receive_text())
        assert error["type"] == "error" and error["error"]["code"] == "too_long"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
        assert closed.value.code == 1008 and "SENSEVOICE_MAX_STREAM_S" in closed.value.reason
    assert [what for what, _, _ in stream.calls] == ["audio", "abort"]
