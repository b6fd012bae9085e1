"""The HTTP API through OpenAI's own Python SDK: what users point at base_url works, and its
errors steer the SDK right (no retries of what cannot succeed, a quick 503 when the service is
gone)."""

from __future__ import annotations

import io
import time
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

HELLO = REPO / "ui" / "examples" / "en_02.flac"  # "Hello world." with ITN


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
        with pytest.raises(openai.BadRequestError) as word:
            with HELLO.open("rb") as audio:
                client.audio.transcriptions.create(
                    model="whisper-1", file=audio, response_format="verbose_json",
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
