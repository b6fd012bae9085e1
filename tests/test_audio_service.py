"""Issue 12 rows 6, 7 and 11 through the real service (supervisor + worker on the demo model):
no text from silence or noise, a truncated MP3 refused naming the second, every bad-audio error
naming the upload; and the formats browsers and phones send."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile

from model_factory import copy_demo_model
from sensevoice_core.audio import load_audio
from sensevoice_core.client import ServiceError
from service import Service, start_service
from test_formats import encode_as

pytestmark = pytest.mark.slow

CLIP = Path(__file__).resolve().parent.parent / "ui" / "examples" / "en_02.flac"  # 1.34 s


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("audio_service")
    running = start_service(work, copy_demo_model(work / "model"), standby=False)
    yield running
    assert running.stop() == 0


def wav_bytes(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, 16000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def bad_audio(service: Service, audio: bytes, filename: str | None) -> str:
    with pytest.raises(ServiceError) as error:
        service.client.transcribe(audio, filename=filename)
    assert error.value.code == "bad_audio", error.value
    assert "<" not in error.value.message and " at 0x" not in error.value.message
    return error.value.message


def test_silence_and_noise_give_an_empty_result(service: Service):
    """Row 6: 20 s of digital silence gave "555。", 20 s of white noise "thirty eight"."""
    noise = np.random.default_rng(6).uniform(-0.5, 0.5, 20 * 16000).astype(np.float32)
    for name, samples in (("silence.wav", np.zeros(20 * 16000, np.float32)),
                          ("noise.wav", noise)):
        reply = service.client.transcribe(wav_bytes(samples), filename=name)
        assert (reply.text, reply.segments, reply.language, reply.token_ids) == ("", (), None, ())
        assert reply.duration_s == pytest.approx(20.0)


def test_a_short_speech_clip_is_transcribed_exactly_as_in_process(service: Service, demo_model):
    reply = service.client.transcribe(CLIP.read_bytes(), filename=CLIP.name)
    assert reply.result() == demo_model.transcribe(CLIP)
    [segment] = reply.segments  # one pass, timed where the VAD heard speech
    assert 0.0 < segment.start < segment.end < reply.duration_s == pytest.approx(1.34, abs=0.01)


def test_a_truncated_mp3_names_the_file_and_the_second_where_decoding_stopped(service: Service,
                                                                              tmp_path: Path):
    """Row 7: the first 30 % of an MP3 whose Xing frame says 1.34 s used to be transcribed."""
    mp3 = encode_as("mp3", load_audio(CLIP).numpy(), tmp_path).read_bytes()
    message = bad_audio(service, mp3[:int(len(mp3) * 0.3)], "talk.mp3")
    assert message.startswith("talk.mp3: decoding stopped at 0.")
    assert message.endswith(" s of the 1.34 s its header states: the file is cut short or corrupt")


def test_undecodable_uploads_are_named_by_their_file_name(service: Service):
    """Row 11: "Error opening <_io.BytesIO object at 0x7f…>", "<0 bytes of audio>"."""
    pid = service.serving_pid()
    assert bad_audio(service, b"this is not audio" * 40, "notes.txt") == (
        "notes.txt: cannot decode audio (libsndfile: Format not recognised; FFmpeg: Invalid data "
        "found when processing input); expected wav, flac, mp3, ogg, opus, webm, m4a, mp4 or mpeg")
    assert bad_audio(service, b"RIFF\x24\x00\x00\x00WAVEfmt ", "memo.wav").startswith(
        "memo.wav: cannot decode audio (libsndfile: ")
    assert bad_audio(service, b"this is not audio", None).startswith(
        "the request's audio: cannot decode audio (")
    assert service.client.transcribe(CLIP).text
    assert service.serving_pid() == pid


@pytest.mark.parametrize("name", ["webm", "m4a", "mp4"])
def test_browser_phone_and_video_uploads_transcribe_like_the_flac(service: Service,
                                                                  tmp_path: Path, name: str):
    expected = service.client.transcribe(CLIP).text
    encoded = encode_as(name, load_audio(CLIP).numpy(), tmp_path)
    reply = service.client.transcribe(encoded.read_bytes(), filename=encoded.name)
    assert reply.text == expected and reply.duration_s == pytest.approx(1.34, abs=0.03)
