"""The UI process (python -m ui) over real HTTP and through gradio_client, against a real
supervisor serving a copy of the embedded demo model."""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import get_args

import httpx
import numpy as np
import pytest
import soundfile
from gradio_client import Client, handle_file

from model_factory import copy_demo_model, nudge_weights
from sensevoice_core.protocol import CacheLevel
from sensevoice_core.result import Result
from sensevoice_core.subtitles import timestamp
from sensevoice_core.vocab import UNSPACED_LANGUAGES
from service import Service, start_service
from ui_process import UiProcess, start_ui

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "ui" / "examples"
HELLO = EXAMPLES / "en_02.flac"  # the demo model says "Hello world." with ITN
MAX_AUDIO_S = 20.0
MAX_SEGMENT_S = 5.0  # so that a 15 s recording of four clips is segmented
LONG_CLIPS = [EXAMPLES / name for name in ("en_02.flac", "zh_04.flac", "en_03.flac", "zh_08.flac")]
MAX_UPLOAD_MB = 1.0


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_demo_model(tmp_path_factory.mktemp("models") / "demo")


@pytest.fixture(scope="module")
def service(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    service = start_service(tmp_path_factory.mktemp("service"), demo_dir,
                            max_audio_s=str(MAX_AUDIO_S), max_segment_s=str(MAX_SEGMENT_S))
    yield service
    service.stop()


@pytest.fixture(scope="module")
def ui(service: Service, tmp_path_factory: pytest.TempPathFactory):
    ui = start_ui(tmp_path_factory.mktemp("ui"), service.address,
                  max_upload_mb=str(MAX_UPLOAD_MB))
    yield ui
    ui.stop()


@pytest.fixture(scope="module")
def http(ui: UiProcess):
    with httpx.Client(base_url=ui.url, timeout=60) as client:
        yield client


def post_audio(http: httpx.Client, data: bytes, name: str = "clip.flac",
               **fields: str) -> httpx.Response:
    return http.post("/v1/audio/transcriptions", files={"file": (name, data)}, data=fields)


def flac_bytes(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, 16000, format="FLAC")
    return buffer.getvalue()


# ---------------------------------------------------------------- OpenAI-compatible endpoint


def test_json_is_the_default_format(http: httpx.Client, service: Service):
    response = post_audio(http, HELLO.read_bytes(), model="whisper-1")
    assert response.status_code == 200, response.text
    assert response.json() == {"text": "Hello world."}
    assert response.headers["x-sensevoice-fingerprint"] == service.status().model.fingerprint


def test_text_format(http: httpx.Client):
    response = post_audio(http, HELLO.read_bytes(), response_format="text")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "Hello world.\n"


def test_verbose_json_carries_language_duration_segments_and_tags(http: httpx.Client):
    duration = soundfile.info(str(HELLO)).duration
    body = post_audio(http, HELLO.read_bytes(), response_format="verbose_json",
                      language="en").json()
    assert body["task"] == "transcribe"
    assert body["language"] == "english"
    assert body["duration"] == pytest.approx(duration, abs=1e-3)
    assert body["text"] == "Hello world."
    assert body["emotion"] and body["event"] and len(body["fingerprint"]) == 64
    [segment] = body["segments"]
    assert 0.0 <= segment["start"] < segment["end"] <= duration  # where the VAD heard speech
    assert segment["text"] == "Hello world."


def test_srt_and_vtt(http: httpx.Client):
    srt = post_audio(http, HELLO.read_bytes(), response_format="srt").text
    assert re.fullmatch(r"1\n00:00:00,\d{3} --> 00:00:01,\d{3}\nHello world\.\n", srt), srt
    vtt = post_audio(http, HELLO.read_bytes(), response_format="vtt")
    assert vtt.headers["content-type"].startswith("text/vtt")
    assert re.fullmatch(r"WEBVTT\n\n00:00:00\.\d{3} --> 00:00:01\.\d{3}\nHello world\.\n", vtt.text)


def test_language_and_itn_fields_are_honoured(http: httpx.Client):
    digits = (EXAMPLES / "zh_04.flac").read_bytes()
    with_itn = post_audio(http, digits, language="chinese").json()["text"]
    without = post_audio(http, digits, language="zh", use_itn="false").json()["text"]
    assert with_itn == "8975。"
    assert without != with_itn and not re.search(r"\d", without)


def openai_error(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    return error


def test_missing_file_is_an_openai_shaped_error(http: httpx.Client):
    response = http.post("/v1/audio/transcriptions", data={"model": "x"},
                         files={"other": ("a.txt", b"x")})
    error = openai_error(response, 400, "file")
    assert "'file' field is missing" in error["message"]


def test_not_multipart_is_refused(http: httpx.Client):
    error = openai_error(http.post("/v1/audio/transcriptions", json={"file": "x"}), 400, "file")
    assert "multipart/form-data" in error["message"]


def test_unknown_response_format_names_the_choices(http: httpx.Client):
    error = openai_error(post_audio(http, HELLO.read_bytes(), response_format="docx"), 400,
                         "response_format")
    assert "'docx'" in error["message"] and "verbose_json" in error["message"]


def test_unknown_language_names_the_choices(http: httpx.Client):
    error = openai_error(post_audio(http, HELLO.read_bytes(), language="klingon"), 400,
                         "language")
    assert "'klingon'" in error["message"] and "yue" in error["message"]


def test_undecodable_audio_names_the_file(http: httpx.Client):
    error = openai_error(post_audio(http, b"this is not audio" * 10, name="notes.txt"), 400,
                         "file")
    assert error["code"] == "bad_audio"
    assert error["message"].startswith("notes.txt: cannot decode audio")


def test_upload_over_the_limit_is_refused_before_transcription(http: httpx.Client):
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(16000 * 20, np.float32), 16000, format="WAV",
                    subtype="FLOAT")
    data = buffer.getvalue()
    assert len(data) > MAX_UPLOAD_MB * 2**20
    error = openai_error(post_audio(http, data, name="big.wav"), 413, "file")
    assert error["code"] == "too_large" and "SENSEVOICE_MAX_UPLOAD_MB" in error["message"]


def test_audio_over_the_duration_limit_is_refused(http: httpx.Client):
    long_silence = np.zeros(int(16000 * (MAX_AUDIO_S + 2)), dtype=np.float32)
    error = openai_error(post_audio(http, flac_bytes(long_silence), name="long.flac"), 413,
                         "file")
    assert error["code"] == "too_long"
    assert "22.0 s" in error["message"] and "SENSEVOICE_MAX_AUDIO_S" in error["message"]


@pytest.fixture(scope="module")
def long_recording(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The four example clips with pauses between them (15 s): segmented by the service."""
    parts = []
    for clip in LONG_CLIPS:
        parts += [np.zeros(24000, np.float32), soundfile.read(clip, dtype="float32")[0]]
    path = tmp_path_factory.mktemp("long") / "four_clips.flac"
    soundfile.write(path, np.concatenate(parts + [np.zeros(16000, np.float32)]), 16000)
    return path, ["Hello world.", "8975。", "325.", "晚安。"]


def test_long_audio_comes_back_as_timed_segments(http: httpx.Client, long_recording):
    path, texts = long_recording
    body = post_audio(http, path.read_bytes(), response_format="verbose_json").json()
    assert [s["text"] for s in body["segments"]] == texts
    assert body["text"] == " ".join(texts)
    starts = [s["start"] for s in body["segments"]]
    assert starts == sorted(starts) and all(s["end"] > s["start"] for s in body["segments"])
    assert [s["language"] for s in body["segments"]] == ["en", "zh", "en", "zh"]
    srt = post_audio(http, path.read_bytes(), response_format="srt").text
    assert srt.count(" --> ") == 4 and srt.startswith("1\n00:00:01,") and "4\n00:00:" in srt
    vtt = post_audio(http, path.read_bytes(), response_format="vtt").text
    assert vtt.count(" --> ") == 4 and "晚安。" in vtt


def test_vad_threshold_is_a_per_request_setting(http: httpx.Client, long_recording):
    path, _ = long_recording
    strict = post_audio(http, path.read_bytes(), response_format="verbose_json",
                        vad_threshold="1.0").json()
    assert strict["segments"] == [] and strict["text"] == ""
    error = openai_error(post_audio(http, path.read_bytes(), vad_threshold="loud"), 400,
                         "vad_threshold")
    assert "from 0 to 1" in error["message"]


def assert_words_timed_inside(segments: list[dict], words: list[dict],
                              tolerance: float = 1e-6) -> None:
    """Words in time order, none overlapping the next, each inside a segment, and together
    spelling that segment's text."""
    assert words, "no words"
    assert all(w["start"] < w["end"] for w in words), words
    assert all(a["end"] <= b["start"] for a, b in itertools.pairwise(words)), words
    placed = 0
    for segment in segments:
        inside = [w for w in words if segment["start"] - tolerance <= w["start"]
                  and w["end"] <= segment["end"] + tolerance]
        gap = "" if segment["language"] in UNSPACED_LANGUAGES else " "
        assert gap.join(w["word"] for w in inside) == segment["text"], (segment, words)
        placed += len(inside)
    assert placed == len(words), "a word outside every segment"


def test_word_timestamps_are_openai_shaped_and_inside_their_segments(
        http: httpx.Client, long_recording):
    path, texts = long_recording
    both = post_audio(http, path.read_bytes(), response_format="verbose_json",
                      **{"timestamp_granularities[]": ["word", "segment"]}).json()
    assert [s["text"] for s in both["segments"]] == texts
    assert_words_timed_inside(both["segments"], both["words"])
    assert all(set(w) == {"word", "start", "end", "probability"} for w in both["words"])
    assert all(0.0 < w["probability"] <= 1.0 for w in both["words"])
    for segment in both["segments"]:  # the model's own measures, no placeholder numbers
        assert segment["avg_logprob"] < 0.0 and 0.0 <= segment["no_speech_prob"] <= 1.0
        assert segment["tokens"] and all(type(t) is int and t > 0 for t in segment["tokens"])
        assert segment["compression_ratio"] > 0.0
    words_only = post_audio(http, path.read_bytes(), response_format="verbose_json",
                            timestamp_granularities="word").json()
    assert "segments" not in words_only and words_only["words"] == both["words"]  # OpenAI's way
    default = post_audio(http, path.read_bytes(), response_format="verbose_json").json()
    assert "words" not in default and default["segments"] == both["segments"]
    # A short clip is decoded whole and timed by the VAD: its words too lie inside that time.
    short = post_audio(http, HELLO.read_bytes(), response_format="verbose_json",
                       **{"timestamp_granularities[]": ["word", "segment"]}).json()
    assert_words_timed_inside(short["segments"], short["words"])


def test_timestamp_granularities_follow_openai_rules(http: httpx.Client):
    clip = HELLO.read_bytes()
    for fields, says in (
            ({"response_format": "json", "timestamp_granularities[]": "word"}, "verbose_json"),
            ({"response_format": "srt", "timestamp_granularities[]": ["segment", "word"]},
             "verbose_json"),
            ({"response_format": "verbose_json", "timestamp_granularities[]": "character"},
             "'character' is not supported; expected segment or word"),
            ({"response_format": "verbose_json", "timestamp_granularities[]": ""}, "''"),
            ({"response_format": "verbose_json", "timestamp_granularities": "Word,segment"},
             "'word,segment'")):
        error = openai_error(post_audio(http, clip, **fields), 400, "timestamp_granularities")
        assert says in error["message"], error
    # segment is what json already has: OpenAI accepts it there, and so does this server
    plain = post_audio(http, clip, response_format="json",
                       **{"timestamp_granularities[]": "segment"})
    assert plain.json() == {"text": "Hello world."}


def test_word_timestamps_on_silence_are_no_words_not_a_failure(http: httpx.Client):
    quiet = flac_bytes(np.zeros(16000 * 3, np.float32))
    body = post_audio(http, quiet, response_format="verbose_json",
                      **{"timestamp_granularities[]": ["word", "segment"]}).json()
    assert (body["text"], body["segments"], body["words"]) == ("", [], [])
    assert post_audio(http, quiet, response_format="srt").text == ""
    assert post_audio(http, quiet, response_format="vtt", karaoke="true").text == "WEBVTT\n"


def test_a_language_whitelist_restricts_auto_detection(http: httpx.Client):
    digits = (EXAMPLES / "zh_04.flac").read_bytes()  # Mandarin digits: auto says zh
    assert post_audio(http, digits, response_format="verbose_json").json()["language"] == \
        "chinese"
    for fields in ({"languages": "en,ja"}, {"languages[]": ["en", "ja"]},
                   {"languages": " English , japanese "}):
        body = post_audio(http, digits, response_format="verbose_json", **fields).json()
        assert {s["language"] for s in body["segments"]} <= {"en", "ja"}, (fields, body)
    for fields, param, says in (
            ({"languages": "auto"}, "languages", "'auto' cannot be"),
            ({"languages": "en,klingon"}, "languages", "'klingon'"),
            ({"languages[]": ["en", "nospeech"]}, "languages", "'nospeech'"),
            ({"languages": "en", "language": "zh"}, "language", "not among the allowed")):
        error = openai_error(post_audio(http, digits, **fields), 400, param)
        assert says in error["message"], error
        assert param == "language" or "yue" in error["message"]  # the choices


def test_subtitle_lines_follow_the_requested_limits(http: httpx.Client, long_recording):
    path, texts = long_recording
    audio = path.read_bytes()
    narrow = post_audio(http, audio, response_format="srt", max_line_width="6",
                        max_line_count="1").text
    cues = [block.split("\n") for block in narrow.strip().split("\n\n")]
    assert len(cues) > len(texts)  # "Hello world." no longer fits one 6-character line
    words = post_audio(http, audio, response_format="verbose_json",
                       timestamp_granularities="word").json()["words"]
    longest = max(len(w["word"]) for w in words)
    for number, times, *lines in cues:
        assert len(lines) == 1 and len(lines[0]) <= max(6, longest), cues
    wide = post_audio(http, audio, response_format="vtt", max_line_width="10000",
                      max_line_count="10000").text
    assert wide.count(" --> ") == len(texts)  # one cue per clip, each under 7 s
    karaoke = post_audio(http, audio, response_format="vtt", karaoke="yes").text
    assert re.search(r"<\d{2}:\d{2}:\d{2}\.\d{3}>", karaoke), karaoke
    for fields, field, says in (
            ({"response_format": "srt", "max_line_width": "0"}, "max_line_width", "from 1 to"),
            ({"response_format": "srt", "max_line_width": "-3"}, "max_line_width", "'-3'"),
            ({"response_format": "vtt", "max_line_count": "2.5"}, "max_line_count", "'2.5'"),
            ({"response_format": "srt", "max_line_width": "9" * 5000}, "max_line_width",
             "from 1 to 10000"),
            ({"response_format": "srt", "max_line_width": "²"}, "max_line_width", "'²'"),
            ({"response_format": "json", "max_line_width": "20"}, "max_line_width",
             "srt or vtt only"),
            ({"response_format": "srt", "karaoke": "true"}, "karaoke", "vtt only"),
            ({"response_format": "vtt", "karaoke": "sometimes"}, "karaoke", "true or false")):
        error = openai_error(post_audio(http, audio, **fields), 400, field)
        assert says in error["message"], error


def test_command_line_formats(service: Service, long_recording):
    path, texts = long_recording
    env = {**os.environ, "SENSEVOICE_SUPERVISOR_ADDRESS": service.address}

    def run(*options: str) -> str:
        done = subprocess.run([sys.executable, "-m", "supervisor", "transcribe", str(path),
                               "--itn", *options], env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    [line] = run("--format", "json").splitlines()
    fields = json.loads(line)
    assert fields.pop("file") == str(path)
    result = Result.model_validate(fields)
    assert result.text == " ".join(texts) and [s.text for s in result.segments] == texts
    assert run("--format", "srt").count(" --> ") == 4
    assert run("--format", "vtt").startswith("WEBVTT")
    assert run() == result.rich_text + "\n"


def test_models_endpoint_lists_the_served_model(http: httpx.Client):
    [card] = http.get("/v1/models").json()["data"]
    assert card["id"] == "sensevoice-small" and card["created"] > 0
    assert http.get("/v1/models/sensevoice-small").json() == card
    openai_error(http.get("/v1/models/whisper-1"), 404, "model")


def test_streaming_takes_the_formats_openai_streams_and_a_boolean(http: httpx.Client):
    for response_format in ("verbose_json", "srt", "vtt"):
        error = openai_error(post_audio(http, HELLO.read_bytes(), stream="true",
                                        response_format=response_format), 400, "response_format")
        assert f"{response_format!r} cannot be streamed" in error["message"]
    error = openai_error(post_audio(http, HELLO.read_bytes(), stream="sometimes"), 400, "stream")
    assert "'sometimes'" in error["message"]


def test_a_body_without_a_length_is_refused(http: httpx.Client):
    def chunks():
        yield b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.flac\"\r\n\r\n"
        yield HELLO.read_bytes()
        yield b"\r\n--x--\r\n"

    response = http.post("/v1/audio/transcriptions", content=chunks(),
                         headers={"content-type": "multipart/form-data; boundary=x"})
    openai_error(response, 411, "file")


def test_errors_that_retrying_cannot_fix_tell_openai_clients_not_to_retry(http: httpx.Client):
    response = post_audio(http, b"garbage" * 20)
    assert response.headers["x-should-retry"] == "false"


# ---------------------------------------------------------------- health, readiness, metrics


def test_health_and_ready(http: httpx.Client, service: Service):
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["fingerprint"] == service.status().model.fingerprint


def metric(text: str, name: str, **labels: str) -> float:
    label_text = ",".join(f'{key}="{value}"' for key, value in labels.items())
    pattern = re.escape(name + (f"{{{label_text}}}" if labels else "")) + r" ([0-9.e+-]+)"
    match = re.search(r"^" + pattern + "$", text, re.MULTILINE)
    assert match, f"{name} {labels} not in:\n{text}"
    return float(match.group(1))


def test_metrics_count_requests_audio_and_errors(http: httpx.Client):
    before = http.get("/metrics").text
    post_audio(http, HELLO.read_bytes())
    post_audio(http, b"garbage" * 20)
    after = http.get("/metrics").text
    ok = dict(endpoint="openai", outcome="ok")
    assert metric(after, "sensevoice_requests_total", **ok) == \
        metric(before, "sensevoice_requests_total", **ok) + 1
    assert metric(after, "sensevoice_requests_total", endpoint="openai", outcome="bad_audio") >= 1
    assert metric(after, "sensevoice_audio_seconds_total") > metric(before, "sensevoice_audio_seconds_total")
    assert metric(after, "sensevoice_request_latency_seconds_count", endpoint="openai") >= 2
    assert metric(after, "sensevoice_supervisor_up") == 1
    assert metric(after, "sensevoice_worker_restarts_total") == 0
    assert sum(metric(after, "sensevoice_model_cache_level", level=level)
               for level in get_args(CacheLevel)) == 1


# ---------------------------------------------------------------- gradio_client


@pytest.fixture(scope="module")
def gradio(ui: UiProcess):
    return Client(ui.url, verbose=False)


def test_gradio_api_names_are_pinned(gradio: Client):
    endpoints = gradio.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == {"/transcribe", "/reload", "/status"}


def test_gradio_transcribe_returns_text_tags_segments_and_subtitles(gradio: Client,
                                                                    long_recording):
    text, tags, segments, srt, *_ = gradio.predict(handle_file(str(HELLO)), "auto", True, 0.35,
                                                   api_name="/transcribe")
    assert text == "Hello world."
    assert 'data-language="🌐 English"' in tags and "sv-emotion" in tags and "sv-event" in tags
    assert segments["headers"] == ["start", "end", "text", "language", "emotion", "event"]
    assert [row[2] for row in segments["data"]] == ["Hello world."]
    path, texts = long_recording
    text, _, segments, srt, *_ = gradio.predict(handle_file(str(path)), "auto", True, 0.35,
                                                api_name="/transcribe")
    assert [row[2] for row in segments["data"]] == texts
    assert Path(srt).read_text(encoding="utf-8").count(" --> ") == 4
    quiet = path.parent / "quiet.flac"
    soundfile.write(quiet, np.zeros(int(16000 * (MAX_SEGMENT_S + 1)), np.float32), 16000)
    silent = gradio.predict(handle_file(str(quiet)), "auto", True, 0.35, api_name="/transcribe")
    assert silent[0] == "" and silent[3] is None
    assert silent[2]["data"] in ([], [["", "", "", "", "", ""]])  # Gradio's empty table
    assert silent[4:] == ("", [])  # word timestamps on silence: no words, no failure


def test_gradio_transcribe_returns_the_timed_words(gradio: Client, long_recording):
    path, texts = long_recording
    _, _, segments, srt, panel, words = gradio.predict(
        handle_file(str(path)), "auto", True, 0.35, True, [], api_name="/transcribe")
    rows = [{"start": float(row[0]), "end": float(row[1]), "text": row[2], "language": row[3]}
            for row in segments["data"]]
    assert_words_timed_inside(rows, words, tolerance=0.01)  # the table rounds to 10 ms
    assert [w["word"] for w in words] == re.findall(r'title="[^"]+"[^>]*>([^<]*)<', panel)
    for word in words:
        title = f'{word["start"]:.2f}–{word["end"]:.2f} s · p={word["probability"]:.2f}'
        assert title in panel
    # The subtitle file's cues are cut from the words: each starts as its first word does.
    cue_starts = re.findall(r"^(\d\d:\d\d:\d\d,\d{3}) --> ", Path(srt).read_text("utf-8"),
                            re.MULTILINE)
    assert cue_starts and set(cue_starts) <= {timestamp(w["start"], ",") for w in words}
    _, _, _, without_srt, no_panel, no_words = gradio.predict(
        handle_file(str(path)), "auto", True, 0.35, False, [], api_name="/transcribe")
    assert (no_panel, no_words) == ("", [])
    assert Path(without_srt).read_text(encoding="utf-8").count(" --> ") == len(texts)
    with pytest.raises(Exception, match="klingon"):
        gradio.predict(handle_file(str(HELLO)), "auto", True, 0.35, True, ["klingon"],
                       api_name="/transcribe")
    with pytest.raises(Exception,
                       match=r"language .*ja.* is not among the allowed languages \(en\)"):
        gradio.predict(handle_file(str(HELLO)), "ja", True, 0.35, True, ["en"],
                       api_name="/transcribe")
    endpoint = gradio.view_api(print_info=False, return_format="dict")[
        "named_endpoints"]["/transcribe"]
    assert [p["parameter_name"] for p in endpoint["parameters"]] == [
        "audio_path", "language", "use_itn", "vad_threshold", "word_timestamps", "languages"]


def test_gradio_errors_are_sentences_not_tracebacks(gradio: Client, tmp_path: Path):
    with pytest.raises(Exception, match="Upload or record some audio first"):
        gradio.predict(None, "auto", True, 0.35, api_name="/transcribe")
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF....not really a wave file" * 4)
    with pytest.raises(Exception, match=r"broken\.wav: cannot decode audio") as caught:
        gradio.predict(handle_file(str(bad)), "auto", True, 0.35, api_name="/transcribe")
    assert "Traceback" not in str(caught.value)


def test_gradio_status_shows_model_and_workers(gradio: Client, service: Service):
    markdown, details = gradio.predict(api_name="/status")
    status = service.status()
    assert status.model.fingerprint[:12] in markdown and status.model.model_dir in markdown
    assert details["model"]["fingerprint"] == status.model.fingerprint
    assert f"pid {service.serving_pid()} serving" in markdown


def test_gradio_reload_switches_to_the_changed_model_while_serving(
        gradio: Client, http: httpx.Client, service: Service, demo_dir: Path):
    old = service.status().model.fingerprint
    nudge_weights(demo_dir)
    failures: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            response = post_audio(http, HELLO.read_bytes())
            if response.status_code != 200 or response.json()["text"] != "Hello world.":
                failures.append(response.text)

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        markdown, details = gradio.predict("", api_name="/reload")
    finally:
        stop.set()
        sender.join()
    new = service.status().model.fingerprint
    assert new != old and details["model"]["fingerprint"] == new
    assert "Model updated, new requests use it" in markdown
    assert f"`{old[:12]}` → `{new[:12]}`" in markdown
    assert failures == []
    assert post_audio(http, HELLO.read_bytes()).headers["x-sensevoice-fingerprint"] == new
    assert metric(http.get("/metrics").text, "sensevoice_reloads_total", outcome="ok") >= 1


# ---------------------------------------------------------------- without a supervisor


@pytest.fixture(scope="module")
def lonely_ui(tmp_path_factory: pytest.TempPathFactory):
    """A UI whose supervisor is not running, with an admin token set."""
    ui = start_ui(tmp_path_factory.mktemp("lonely"), "ipc:///tmp/sv-nobody-here.ipc",
                  admin_token="s3cret")
    yield ui
    ui.stop()


def test_without_a_supervisor_ready_and_transcribe_say_unavailable(lonely_ui: UiProcess):
    with httpx.Client(base_url=lonely_ui.url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        ready = http.get("/ready")
        assert ready.status_code == 503 and "python -m supervisor" in ready.json()["reason"]
        error = openai_error(post_audio(http, HELLO.read_bytes()), 503, None)
        assert error["code"] == "unavailable"
        assert "sensevoice_supervisor_up 0.0" in http.get("/metrics").text


def test_admin_token_guards_reload(lonely_ui: UiProcess):
    gradio = Client(lonely_ui.url, verbose=False)
    with pytest.raises(Exception, match="needs the admin token"):
        gradio.predict("wrong", api_name="/reload")
    # The right token passes the check and reaches the (absent) supervisor.
    with pytest.raises(Exception, match="no supervisor at"):
        gradio.predict("s3cret", api_name="/reload")
