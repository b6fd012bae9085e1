"""Protocol frames: every message round-trips, every malformed frame is a ProtocolError."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sensevoice_core.protocol import (
    PROTOCOL_VERSION,
    ErrorReply,
    Hello,
    LoadModel,
    Ping,
    ProtocolError,
    ReloadOutcome,
    ReloadReply,
    ReloadRequest,
    StatusRequest,
    Stop,
    TranscribeReply,
    TranscribeRequest,
    decode_client,
    decode_for_worker,
    decode_from_worker,
    decode_reply,
    encode,
    request_id_of,
)
from sensevoice_core.result import Segment, Token, Word


def test_client_messages_round_trip():
    request = TranscribeRequest(language="en", use_itn=True, audio_format="pcm_f32le")
    assert decode_client(encode(request, b"\0" * 8)) == (request, b"\0" * 8)
    reload = ReloadRequest(path="/m", force_fresh=True, origin="watch")
    assert decode_client(encode(reload)) == (reload, None)
    assert decode_client(encode(StatusRequest()))[0].kind == "status"


def test_word_timestamps_and_a_language_list_travel_with_a_request():
    request = TranscribeRequest(word_timestamps=True, languages=["zh", "en"])
    assert decode_client(encode(request, b"RIFF")) == (request, b"RIFF")
    assert decode_client(encode(TranscribeRequest(), b"x"))[0].languages is None  # the service's
    assert decode_client(encode(TranscribeRequest(languages=[]), b"x"))[0].languages == []  # any


def test_a_reply_carries_words_tokens_and_confidences():
    tokens = (Token(id=9, piece="▁hello", start=0.12, end=0.42, probability=0.875),
              Token(id=4, piece=".", start=0.42, end=0.48, probability=0.5))
    segment = Segment(start=0.1, end=0.5, text="hello.", raw="hello.", language="en",
                      emotion="NEUTRAL", event="Speech", token_ids=(9, 4), avg_logprob=-0.3,
                      no_speech_prob=0.002, tokens=tokens,
                      words=(Word(word="hello.", start=0.12, end=0.42, probability=0.6875),))
    reply = TranscribeReply(request_id="r", text="hello.", raw="hello.", language="en",
                            emotion="NEUTRAL", event="Speech", text_norm="withitn",
                            duration_s=0.6, token_ids=(9, 4), segments=(segment,),
                            fingerprint="f" * 64, worker_pid=1, inference_s=0.01)
    decoded = decode_reply(encode(reply))
    assert decoded == reply and decoded.words == segment.words
    assert decoded.segments[0].tokens == tokens and decoded.segments[0].avg_logprob == -0.3


def test_worker_messages_round_trip():
    assert decode_for_worker(encode(LoadModel(path=None)))[0] == LoadModel(path=None)
    assert decode_for_worker(encode(Stop()))[0] == Stop()
    assert decode_for_worker(encode(Ping(nonce=3)))[0] == Ping(nonce=3)
    assert decode_from_worker(encode(Hello(worker_id="w1", pid=5))) == (Hello(worker_id="w1", pid=5), None)


def test_replies_round_trip():
    outcome = ReloadOutcome(ok=False, origin="api", requested_path=None, error="broken")
    reply = ReloadReply(request_id="r", outcome=outcome)
    assert decode_reply(encode(reply)) == reply
    error = ErrorReply(request_id=None, code="busy", message="retry later")
    assert decode_reply(encode(error)) == error


def test_every_header_carries_the_protocol_version():
    assert encode(StatusRequest())[0].startswith(b'{"v":%d' % PROTOCOL_VERSION)


@pytest.mark.parametrize("frames, words", [
    ([], "empty message"),
    ([b"\xff\xfe"], "Invalid JSON"),
    ([b'{"kind": "status", "v": 2}'], "Input should be 1"),
    ([b'{"kind": "status", "surprise": 1}'], "Extra inputs"),
    ([b'{"kind": "transcribe"}'], "expected 2"),
    ([b'{"kind": "status"}', b"payload"], "expected 1"),
    ([b'{"kind": "transcribe", "audio_format": "mp4"}', b""], "audio_format"),
    ([b'{"kind": "transcribe", "request_id": "' + b"x" * 100 + b'"}', b""], "request_id"),
    ([b" " * 70000], "at most"),
    ([b'{"kind": "transcribe", "languages": "zh"}', b""], "languages"),
    ([b'{"kind": "transcribe", "languages": [' + b'"zh",' * 16 + b'"en"]}', b""], "at most 16"),
    ([b'{"kind": "transcribe", "word_timestamps": "maybe"}', b""], "word_timestamps"),
])
def test_malformed_client_frames_are_protocol_errors(frames, words):
    with pytest.raises(ProtocolError, match=words):
        decode_client(frames)


def test_a_worker_cannot_send_client_requests():
    with pytest.raises(ProtocolError):
        decode_from_worker(encode(StatusRequest()))


def test_request_id_is_recovered_from_a_bad_frame_when_possible():
    assert request_id_of(b'{"kind": "nope", "request_id": "abc"}') == "abc"
    assert request_id_of(b"not json") is None
    assert request_id_of(b'{"request_id": 5}') is None


def test_processes_without_a_model_never_import_torch():
    code = ("import sys, sensevoice_core.client, sensevoice_core.protocol, supervisor.supervisor, "
            "supervisor.watcher; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_stream_messages_round_trip_with_their_payloads():
    from sensevoice_core.protocol import (
        StreamAudio,
        StreamControl,
        StreamEvents,
        StreamMoved,
        StreamOpen,
        StreamOpened,
        StreamResume,
    )
    from sensevoice_core.stream_types import Final, StreamFailed, StreamOptions

    options = StreamOptions(language="en", encoding="pcmu", sample_rate=8000)
    opening = StreamOpen(options=options)
    assert decode_client(encode(opening)) == (opening, None)
    audio = StreamAudio(stream_id="s1", seq=4)
    assert decode_client(encode(audio, b"\x01\x02")) == (audio, b"\x01\x02")
    assert decode_client(encode(audio, b"")) == (audio, b"")  # an empty chunk is a chunk
    update = StreamControl(stream_id="s1", action="update", seq=5, options=options)
    assert decode_client(encode(update)) == (update, None)
    assert decode_for_worker(encode(update)) == (update, None)
    moved = StreamMoved(stream_id="s1", seq=5, messages=7, options=options)
    assert decode_from_worker(encode(moved, b"state")) == (moved, b"state")
    resume = StreamResume(stream_id="s1", seq=5, messages=7, options=options)
    assert decode_for_worker(encode(resume, b"state")) == (resume, b"state")
    segment = Segment(start=0.5, end=1.0, text="hi", raw="hi", language="en",
                      emotion="NEUTRAL", event="Speech", token_ids=(1,))
    events = StreamEvents(stream_id="s1", events=[
        Final(item=1, segment=segment, fingerprint="f" * 64),
        StreamFailed(code="worker_lost", message="gone")])
    assert decode_reply(encode(events)) == events
    assert decode_from_worker(encode(events)) == (events, None)
    opened = StreamOpened(request_id="r", stream_id="s1", fingerprint="f" * 64)
    assert decode_reply(encode(opened)) == opened


@pytest.mark.parametrize("frames, words", [
    ([b'{"kind": "stream_audio", "stream_id": "s", "seq": 0}'], "expected 2"),
    ([b'{"kind": "stream_audio", "stream_id": "s", "seq": -1}', b""], "seq"),
    ([b'{"kind": "stream_control", "stream_id": "s", "seq": 0, "action": "pause"}'], "action"),
    ([b'{"kind": "stream_open", "options": {"encoding": "mp3"}}'], "encoding"),
    ([b'{"kind": "stream_open", "options": {"sample_rate": 4000}}'], "sample_rate"),
    ([b'{"kind": "stream_open", "options": {"min_silence_s": NaN}}'], "min_silence_s"),
    ([b'{"kind": "stream_audio", "stream_id": "' + b"s" * 65 + b'", "seq": 0}', b""],
     "stream_id"),
    ([b'{"kind": "stream_moved", "stream_id": "s", "seq": 0, "messages": 0}', b""], "kind"),
])
def test_malformed_stream_frames_are_protocol_errors(frames, words):
    with pytest.raises(ProtocolError, match=words):
        decode_client(frames)


def test_stream_options_problems_name_the_field():
    from sensevoice_core.protocol import stream_audio_s, stream_options_problem
    from sensevoice_core.settings import Settings
    from sensevoice_core.stream_types import StreamOptions

    settings = Settings()
    assert stream_options_problem(settings, StreamOptions()) is None
    assert "unknown language 'xx'" in stream_options_problem(settings,
                                                             StreamOptions(language="xx"))
    assert "sample_rate must be 8000, found 16000" in stream_options_problem(
        settings, StreamOptions(encoding="pcma"))
    faster = StreamOptions(sample_rate=24000)
    assert stream_options_problem(settings, faster, StreamOptions(), audio_sent=False) is None
    assert "only before the stream's first audio" in stream_options_problem(
        settings, faster, StreamOptions(), audio_sent=True)
    assert stream_audio_s(StreamOptions(), 32000) == 1.0
    assert stream_audio_s(StreamOptions(encoding="pcmu", sample_rate=8000), 8000) == 1.0
    assert stream_audio_s(StreamOptions(encoding="pcm_f32le", sample_rate=48000), 192000) == 1.0


def test_the_stream_client_and_router_never_import_torch():
    code = ("import sys, sensevoice_core.stream_client, supervisor.streams; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
