"""The HTTP API through OpenAI's own Python SDK: what users point at base_url works, and its
errors steer the SDK right (no retries of what cannot succeed, a quick 503 when the service is
gone)."""

from __future__ import annotations

import io
import itertools
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile
from openai.types.audio import TranscriptionVerbose
from service import REPO, start_service
from ui_process import start_ui

pytestmark = pytest.mark.slow

EXAMPLES = REPO / "ui" / "examples"
HELLO = EXAMPLES / "en_02.flac"  # "Hello world." with ITN


class CountingTransport(httpx.HTTPTransport):
    """Counts the HTTP requests the SDK sends, retries included."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent += 1
        return super().handle_request(request)


def sdk(url: str, max_retries: int = 2) -> tuple[openai.OpenAI, CountingTransport]:
    transport = CountingTransport()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=max_retries,
                           http_client=httpx.Client(transport=transport, timeout=60))
    return client, transport


def test_the_openai_sdk_transcribes_and_is_not_told_to_retry_hopeless_requests(tmp_path: Path):
    service = start_service(tmp_path / "service", REPO / "model", standby=False)
    ui = start_ui(tmp_path / "ui", service.address, max_upload_mb="1")
    clients: list[openai.OpenAI] = []
    try:
        client, transport = sdk(ui.url)
        clients.append(client)
        with HELLO.open("rb") as audio:
            text = client.audio.transcriptions.create(model="whisper-1", file=audio)
        assert text.text == "Hello world."
        with HELLO.open("rb") as audio:
            verbose = client.audio.transcriptions.create(
                model="whisper-1", file=audio, response_format="verbose_json",
                language="en")
        assert verbose.text == "Hello world." and verbose.segments[0].text == "Hello world."
        assert verbose.segments[0].tokens  # the segment's token ids, not a placeholder
        silence = io.BytesIO()
        soundfile.write(silence, np.zeros(16000 * 3, np.float32), 16000, format="WAV")
        for audio in (HELLO.read_bytes(), silence.getvalue()):
            raw = client.audio.transcriptions.with_raw_response.create(
                model="whisper-1", file=("clip.wav", audio), response_format="verbose_json")
            # Strictly the type OpenAI documents (the SDK itself does not validate it).
            TranscriptionVerbose.model_validate_json(raw.http_response.content, strict=True)
        before = transport.sent
        with pytest.raises(openai.BadRequestError) as word:  # words need verbose_json
            with HELLO.open("rb") as audio:
                client.audio.transcriptions.create(
                    model="whisper-1", file=audio, response_format="json",
                    timestamp_granularities=["word"])
        assert word.value.body["param"] == "timestamp_granularities"
        assert transport.sent == before + 1

        for upload, field in ((("notes.txt", b"not audio at all"), "file"),
                              (("big.wav", b"\0" * (2 << 20)), "file")):
            before = transport.sent
            with pytest.raises(openai.APIStatusError) as failed:
                client.audio.transcriptions.create(model="whisper-1", file=upload)
            assert failed.value.status_code in (400, 413)
            assert transport.sent == before + 1, "the SDK retried a request that cannot succeed"
            assert "notes.txt" in failed.value.message or "MiB" in failed.value.message

        service.stop()
        client, transport = sdk(ui.url, max_retries=0)
        clients.append(client)
        begin = time.monotonic()
        with pytest.raises(openai.APIStatusError) as gone:
            with HELLO.open("rb") as audio:
                client.audio.transcriptions.create(model="whisper-1", file=audio)
        assert gone.value.status_code == 503
        assert gone.value.response.headers["retry-after"] == "1"
        assert time.monotonic() - begin < 10
    finally:
        for client in clients:
            client.close()
        ui.stop()
        if service.process.poll() is None:
            service.stop()


def spoken_clips(path: Path) -> Path:
    """Three example clips with pauses between them: three VAD segments when segments are
    at most 5 s (SENSEVOICE_MAX_SEGMENT_S)."""
    parts = []
    for name in ("en_02.flac", "zh_04.flac", "en_03.flac"):
        parts += [np.zeros(24000, np.float32), soundfile.read(EXAMPLES / name, dtype="float32")[0]]
    soundfile.write(path, np.concatenate(parts + [np.zeros(16000, np.float32)]), 16000)
    return path


def test_word_timestamps_and_real_confidences_through_the_openai_sdk(tmp_path: Path):
    service = start_service(tmp_path / "service", REPO / "model", standby=False,
                            max_segment_s="5")
    ui = start_ui(tmp_path / "ui", service.address)
    clip = spoken_clips(tmp_path / "three.flac")
    client, transport = sdk(ui.url)
    try:
        with clip.open("rb") as audio:
            verbose = client.audio.transcriptions.create(
                model="whisper-1", file=audio, response_format="verbose_json",
                timestamp_granularities=["word", "segment"])
        assert [s.text for s in verbose.segments] == ["Hello world.", "8975。", "325."]
        words = verbose.words
        assert words and all(w.start < w.end for w in words)
        assert all(a.end <= b.start for a, b in itertools.pairwise(words))  # in order, apart
        for segment in verbose.segments:
            inside = [w.word for w in words if segment.start <= w.start and w.end <= segment.end]
            gap = "" if segment.model_extra["language"] == "zh" else " "
            assert gap.join(inside) == segment.text  # every word inside its own segment
            # The model's own measures; none of the old placeholders (0.0, 1.0, [], 0.0).
            assert segment.avg_logprob < 0.0 and 0.0 <= segment.no_speech_prob <= 1.0
            assert segment.no_speech_prob < 0.5  # speech, and the model says so
            assert segment.tokens and all(isinstance(t, int) and t > 0 for t in segment.tokens)
            encoded = segment.text.encode()  # Whisper's measure, honestly: zlib on the text
            assert segment.compression_ratio == round(len(encoded) / len(zlib.compress(encoded)),
                                                      3)
        assert len({s.avg_logprob for s in verbose.segments}) > 1  # measured, not a constant
        raw = client.audio.transcriptions.with_raw_response.create(
            model="whisper-1", file=("three.flac", clip.read_bytes()),
            response_format="verbose_json", timestamp_granularities=["word"])
        only_words = TranscriptionVerbose.model_validate_json(raw.http_response.content,
                                                              strict=True)
        assert only_words.segments is None and only_words.words == words  # OpenAI's way

        before = transport.sent
        for bad, param in (({"timestamp_granularities": ["word"]}, "timestamp_granularities"),
                           ({"response_format": "verbose_json",
                             "timestamp_granularities": ["phoneme"]}, "timestamp_granularities"),
                           ({"extra_body": {"languages": ["auto"]}}, "languages"),
                           ({"extra_body": {"languages": "en,tlh"}}, "languages"),
                           ({"language": "zh", "extra_body": {"languages": ["en"]}}, "language"),
                           ({"response_format": "srt", "extra_body": {"max_line_width": 0}},
                            "max_line_width")):
            with pytest.raises(openai.BadRequestError) as refused:
                client.audio.transcriptions.create(model="whisper-1",
                                                   file=("hello.flac", HELLO.read_bytes()),
                                                   **bad)
            assert refused.value.body["param"] == param, (bad, refused.value.body)
        assert transport.sent == before + 6  # none retried

        # The language whitelist, an extension: a Mandarin clip restricted to English and
        # Japanese is tagged one of those (auto says Mandarin).
        digits = ("zh_04.flac", (EXAMPLES / "zh_04.flac").read_bytes())
        auto = client.audio.transcriptions.create(
            model="whisper-1", file=digits, response_format="verbose_json")
        assert auto.language == "chinese"
        restricted = client.audio.transcriptions.create(
            model="whisper-1", file=digits, response_format="verbose_json",
            extra_body={"languages": ["en", "ja"]})
        assert restricted.language in ("english", "japanese"), restricted
        srt = client.audio.transcriptions.create(
            model="whisper-1", file=("three.flac", clip.read_bytes()), response_format="srt",
            extra_body={"max_line_width": 6, "max_line_count": 1})
        assert srt.count(" --> ") > 3  # "Hello world." is two 6-character cues
    finally:
        client.close()
        ui.stop()
        service.stop()
