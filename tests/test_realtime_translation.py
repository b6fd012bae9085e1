"""The Realtime WebSocket's pure parts: session.update read into stream options, and stream
events as OpenAI server events (checked against the installed `openai` SDK's own types)."""

from __future__ import annotations

import re

import pytest
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

from sensevoice_core.client import SupervisorClient
from sensevoice_core.result import Segment, Word
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
from ui.realtime import TokenBucket, close_reason, decode_audio, parse_event
from ui.realtime_events import COMPLETED, DELTA, EventTranslator, server_event
from ui.realtime_session import SessionConfig, updated

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
    ({"type": "transcription", "audio": {"input": {"transcription": {"language": "klingon"}}}},
     "session.audio.input.transcription.language", "expected one of"),
    ({"type": "transcription", "audio": {"input": {"transcription": {"prompt": "names"}}}},
     "session.audio.input.transcription.prompt", "no prompt"),
    ({"type": "transcription", "audio": {"input": {"noise_reduction": {"type": "near_field"}}}},
     "session.audio.input.noise_reduction", "null"),
    ({"type": "transcription", "audio": {"input": {"colour": "blue"}}},
     "session.audio.input.colour", "supported fields"),
    ({"type": "transcription", "include": ["item.input_audio_transcription.logprobs"]},
     "session.include", "not supported"),
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
