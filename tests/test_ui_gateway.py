"""The UI's admin and upload checks, which decide before anything reaches the supervisor."""

from __future__ import annotations

import re
from typing import get_args

import pytest

from sensevoice_core.client import SupervisorClient
from sensevoice_core.protocol import (
    CACHE_LEVEL_WORDS,
    CacheLevel,
    ModelInfo,
    ServiceStatus,
    TranscribeReply,
    WorkerRole,
    WorkerStatus,
)
from sensevoice_core.result import Segment, Word
from sensevoice_core.settings import MiB, Settings
from sensevoice_core.vocab import LANGUAGES
from ui.gateway import FrontDoor, Gateway, RequestFailed
from ui.metrics import ServiceMetrics
from ui.views import LOW_CONFIDENCE, MAX_SHOWN_WORDS, tags_html, word_rows, words_html


def gateway(**values) -> Gateway:
    settings = Settings(supervisor_address="ipc:///tmp/sv-gateway-test.ipc", **values)
    door = FrontDoor(2)
    return Gateway(settings, SupervisorClient(settings=settings),
                   ServiceMetrics(lambda: None, door.held, door.capacity), door)


def test_reload_is_off_on_a_public_address_without_a_token():
    with pytest.raises(RequestFailed) as failure:
        gateway(ui_host="0.0.0.0").check_admin("anything")
    assert failure.value.status == 403 and failure.value.code == "reload_disabled"
    assert "SENSEVOICE_ADMIN_TOKEN" in failure.value.message


def test_the_token_must_match():
    guarded = gateway(ui_host="0.0.0.0", admin_token="s3cret")
    for wrong in (None, "", "s3cre", "s3cret "):
        with pytest.raises(RequestFailed, match="needs the admin token"):
            guarded.check_admin(wrong)
    guarded.check_admin("s3cret")


def test_loopback_without_a_token_reloads_freely():
    gateway().check_admin(None)


def test_upload_limits_name_the_file_and_the_setting():
    small = gateway(max_upload_mb=0.5)
    with pytest.raises(RequestFailed) as failure:
        small.check_upload(2**20, "talk.wav")
    assert failure.value.status == 413
    assert failure.value.message == ("talk.wav is larger than the limit of 0.5 MiB "
                                     "(SENSEVOICE_MAX_UPLOAD_MB)")
    with pytest.raises(RequestFailed, match="talk.wav is empty"):
        small.check_upload(0, "talk.wav")


def test_status_panel_shows_outside_text_inert():
    """Paths and error messages come from outside; they must not become markup in the page."""
    from sensevoice_core.protocol import ReloadOutcome
    from ui.views import code, reload_summary, status_markdown

    hostile = '<img src=x onerror="alert(1)"> **bold** `tick`'
    failed = ReloadOutcome(ok=False, origin="ui", requested_path=None, error=hostile)
    rendered = reload_summary(failed) + status_markdown(None, hostile)
    assert "<img" not in rendered and "&lt;img" in rendered
    assert "\\*\\*bold\\*\\*" in rendered and "\\`tick\\`" in rendered
    assert code("/models/a`b") == "`` /models/a`b ``"


def test_the_front_door_counts_what_the_page_holds_too():
    page_holds = [0]
    door = FrontDoor(3)
    door.count_also(lambda: page_holds[0])
    assert door.try_enter() and door.try_enter() and door.try_enter()
    assert door.full() and not door.try_enter()
    door.leave()
    page_holds[0] = 1  # the page's queue took the freed place
    assert door.full() and not door.try_enter()
    page_holds[0] = 0
    assert door.try_enter() and door.held() == 3
    refusal = door.busy()
    assert (refusal.status, refusal.code) == (429, "busy")
    assert "3 transcriptions (SENSEVOICE_MAX_QUEUE + SENSEVOICE_WORKERS)" in refusal.message


class RecordingClient:
    """Stands in for SupervisorClient: records what the gateway sends on."""

    def __init__(self) -> None:
        self.sent: list[dict] = []

    def transcribe(self, audio: bytes, language: str, use_itn: bool, **extra: object):
        self.sent.append({"language": language, "use_itn": use_itn, **extra})
        return TranscribeReply(request_id="r", text="", raw="", language=None, emotion=None,
                               event=None, text_norm="woitn", duration_s=0.0, token_ids=(),
                               fingerprint="f" * 64, worker_pid=1, inference_s=0.0)


def recording_gateway(**values) -> tuple[Gateway, RecordingClient]:
    settings = Settings(supervisor_address="ipc:///tmp/sv-gateway-test.ipc", **values)
    door, client = FrontDoor(2), RecordingClient()
    return Gateway(settings, client, ServiceMetrics(lambda: None, door.held, door.capacity),
                   door), client


def test_languages_are_sent_on_as_codes_whatever_name_the_caller_used():
    door, client = recording_gateway()
    for given, sent in (("English", "en"), (" chinese ", "zh"), ("", "auto"), ("yue", "yue")):
        door.transcribe(b"RIFF", "a.wav", given, True, "openai")
        assert client.sent[-1]["language"] == sent
    with pytest.raises(RequestFailed) as failure:
        door.transcribe(b"RIFF", "a.wav", "nospeech", True, "openai")
    assert (failure.value.status, failure.value.param) == (400, "language")
    assert len(client.sent) == 4


def test_an_upload_over_the_limit_never_reaches_the_supervisor():
    door, client = recording_gateway(max_upload_mb=1)
    with pytest.raises(RequestFailed) as failure:
        door.transcribe(b"\0" * (MiB + 1), "big.wav", "auto", True, "openai")
    assert (failure.value.status, failure.value.code) == (413, "too_large")
    assert client.sent == []


def test_names_labels_roles_and_cache_levels_come_from_one_place():
    from ui.openai_api import language_name
    from ui.views import status_markdown

    for language, info in LANGUAGES.items():
        assert language_name(language.value) == info.name
        reply = RecordingClient().transcribe(b"", "auto", False).model_copy(
            update={"language": language.value})
        assert f"🌐 {info.label}" in tags_html(reply, show_worker=False)
    workers = [WorkerStatus(worker_id=role, pid=1, role=role, age_s=1.0, requests_served=0,
                            busy=False, fingerprint=None) for role in get_args(WorkerRole)]
    model = ModelInfo(model_dir="/m", layout="hf", fingerprint="f" * 64, short_ids={},
                      file_sha256={}, file_paths={}, cache_level="fresh", load_s=1.0,
                      steps_s={}, warmup_s=0.5)
    status = ServiceStatus(supervisor_pid=1, uptime_s=1.0, model=model, workers=workers,
                           queued=0, in_flight=0, requests_served=0, worker_restarts=0,
                           reloading=False, last_reload=None, watching=None)
    assert f"via {CACHE_LEVEL_WORDS['fresh']} in" in status_markdown(status)
    metrics = ServiceMetrics(lambda: status, lambda: 0, 1).render().decode()
    for role in get_args(WorkerRole):
        assert f'sensevoice_workers{{role="{role}"}} 1.0' in metrics
    levels = re.findall(r'sensevoice_model_cache_level\{level="(\w+)"\}', metrics)
    assert levels == list(get_args(CacheLevel))


def test_a_result_without_speech_says_so_on_the_page():
    silent = RecordingClient().transcribe(b"", "auto", False).model_copy(
        update={"segments": (), "text": "", "language": None})
    assert "No speech found" in tags_html(silent, show_worker=False)
    spoken = silent.model_copy(update={"segments": (Segment(
        start=0.1, end=1.0, text="hi", raw="hi", language="en", emotion=None, event=None),)})
    assert "No speech found" not in tags_html(spoken, show_worker=False)


def test_a_language_whitelist_is_checked_here_and_sent_on_as_codes():
    door, client = recording_gateway()
    door.transcribe(b"RIFF", "a.wav", "auto", True, "openai", languages=["Chinese", "en", "zh"])
    assert client.sent[-1]["languages"] == ["zh", "en"]
    door.transcribe(b"RIFF", "a.wav", "english", True, "openai", languages=["en", "ja"])
    assert client.sent[-1]["language"] == "en"
    door.transcribe(b"RIFF", "a.wav", "auto", True, "openai")
    assert client.sent[-1]["languages"] is None  # the service's SENSEVOICE_LANGUAGES
    door.transcribe(b"RIFF", "a.wav", "auto", True, "openai", languages=[])
    assert client.sent[-1]["languages"] == []  # any
    door.transcribe(b"RIFF", "a.wav", "auto", True, "openai", languages=["zh"] * 100_000)
    assert client.sent[-1]["languages"] == ["zh"]  # repeats are one (the protocol takes 16)
    sent = len(client.sent)
    for bad, named in ((["auto"], "'auto' cannot be"), (["en", "klingon"], "'klingon'"),
                       (["nospeech"], "'nospeech'")):
        with pytest.raises(RequestFailed) as failure:
            door.transcribe(b"RIFF", "a.wav", "auto", True, "openai", languages=bad)
        assert (failure.value.status, failure.value.param) == (400, "languages")
        assert named in failure.value.message and "yue" in failure.value.message  # the choices
    with pytest.raises(RequestFailed) as failure:
        door.transcribe(b"RIFF", "a.wav", "ja", True, "openai", languages=["zh", "en"])
    assert (failure.value.status, failure.value.param) == (400, "language")
    assert "'ja' is not among the allowed languages (zh, en)" in failure.value.message
    assert len(client.sent) == sent


def test_the_service_whitelist_applies_when_a_request_has_none():
    door, client = recording_gateway(languages="zh,en")
    with pytest.raises(RequestFailed) as failure:
        door.transcribe(b"RIFF", "a.wav", "ko", True, "openai")
    assert failure.value.param == "language" and "(zh, en)" in failure.value.message
    door.transcribe(b"RIFF", "a.wav", "ko", True, "openai", languages=["ko"])  # its own list
    assert client.sent[-1]["languages"] == ["ko"]


def test_word_timestamps_are_asked_for_only_when_wanted():
    door, client = recording_gateway()
    door.transcribe(b"RIFF", "a.wav", "auto", True, "ui")
    assert client.sent[-1]["word_timestamps"] is False
    door.transcribe(b"RIFF", "a.wav", "auto", True, "ui", word_timestamps=True)
    assert client.sent[-1]["word_timestamps"] is True


def timed_segment(language: str, *words: tuple[str, float, float, float]) -> Segment:
    made = tuple(Word(word=w, start=s, end=e, probability=p) for w, s, e, p in words)
    text = ("" if language in ("zh", "ja", "yue") else " ").join(w.word for w in made)
    return Segment(start=made[0].start, end=made[-1].end, text=text, raw=text,
                   language=language, emotion="NEUTRAL", event="Speech", words=made,
                   avg_logprob=-0.25, no_speech_prob=0.01)


def test_the_word_panel_times_words_and_marks_the_unsure_ones():
    segments = (timed_segment("en", ("Hello", 0.12, 0.48, 0.93), ("world.", 0.54, 0.9, 0.31)),
                timed_segment("zh", ("晚", 1.5, 1.7, 0.8), ("安", 1.7, 1.95, LOW_CONFIDENCE)))
    html = words_html(segments)
    spans = re.findall(r'<span class="([^"]+)" title="([^"]+)"[^>]*>([^<]*)</span>', html)
    assert spans == [("sv-word", "0.12–0.48 s · p=0.93", "Hello"),
                     ("sv-word sv-low", "0.54–0.90 s · p=0.31", "world."),
                     ("sv-word", "1.50–1.70 s · p=0.80", "晚"),
                     ("sv-word", "1.70–1.95 s · p=0.50", "安")]  # the threshold is not "below"
    assert "</span> <span" in html and "晚</span><span" in html  # spaced, unspaced
    assert f"p={LOW_CONFIDENCE:g}" in html  # the legend names the threshold
    assert word_rows(segments)[1] == {"word": "world.", "start": 0.54, "end": 0.9,
                                      "probability": 0.31}
    many = [segments[0]] * (MAX_SHOWN_WORDS // 2 + 1)  # one word more than the panel shows
    assert words_html(many).count('<span class="sv-word') == MAX_SHOWN_WORDS
    assert f"The first {MAX_SHOWN_WORDS} of {MAX_SHOWN_WORDS + 2} words" in words_html(many)
    assert len(word_rows(many)) == MAX_SHOWN_WORDS + 2
    untimed = segments[0].model_copy(update={"words": ()})
    assert words_html([untimed]) == "" and word_rows([untimed]) == []


def test_words_from_the_audio_are_shown_inert():
    hostile = timed_segment("en", ('<img src=x onerror="alert(1)">', 0.0, 0.5, 0.2),
                            ('"><script>', 0.5, 1.0, 0.9))
    html = words_html([hostile])
    assert "<img" not in html and "<script" not in html
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html


def test_verbose_json_carries_the_model_confidences_and_leaves_out_what_it_lacks():
    from ui.openai_api import verbose_json

    spoken = timed_segment("en", ("Hello", 1.25, 1.5, 0.9), ("world.", 1.6, 2.0, 0.7))
    spoken = spoken.model_copy(update={"token_ids": (7, 8)})
    unmeasured = spoken.model_copy(update={"avg_logprob": None, "no_speech_prob": None,
                                           "text": "", "words": ()})
    reply = RecordingClient().transcribe(b"", "auto", False).model_copy(
        update={"segments": (spoken, unmeasured), "language": "en", "text": "Hello world."})
    body = verbose_json(reply, frozenset({"segment"}))
    first, second = body["segments"]
    assert "words" not in body
    assert (first["avg_logprob"], first["no_speech_prob"], first["tokens"]) == (-0.25, 0.01,
                                                                                [7, 8])
    assert first["compression_ratio"] == spoken.compression_ratio > 0
    assert first["seek"] == 125 and first["temperature"] == 0.0
    assert not {"avg_logprob", "no_speech_prob", "compression_ratio"} & set(second)
    both = verbose_json(reply, frozenset({"segment", "word"}))
    assert both["words"] == [{"word": "Hello", "start": 1.25, "end": 1.5, "probability": 0.9},
                             {"word": "world.", "start": 1.6, "end": 2.0, "probability": 0.7}]
    words_only = verbose_json(reply, frozenset({"word"}))  # OpenAI leaves segments out then
    assert "segments" not in words_only and len(words_only["words"]) == 2
