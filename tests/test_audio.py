"""load_audio: every input form becomes the same float32 mono 16 kHz tensor, or an AudioError."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from sensevoice_core import AudioError
from sensevoice_core.audio import SAMPLE_RATE, AudioSource, load_audio
from sensevoice_core.errors import AudioTooLongError

DATA = Path(__file__).parent / "data"
EN_MP3 = DATA / "en.mp3"  # 48 kHz mono mp3


def sine(frequency: float, sample_rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def dominant_frequency(samples: torch.Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    samples = np.asarray(samples, dtype=np.float64)
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / sample_rate)[np.argmax(spectrum)])


def rms(samples: torch.Tensor | np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.asarray(samples, dtype=np.float64) ** 2)))


def assert_16k_mono(samples: torch.Tensor) -> None:
    assert isinstance(samples, torch.Tensor)
    assert samples.dtype == torch.float32
    assert samples.ndim == 1
    assert samples.numel() > 0


def assert_same_from_path_bytes_and_array(path: Path, atol: float = 0.0) -> torch.Tensor:
    """The three ways to hand over one file give identical 16 kHz samples (an array decoded by
    libsndfile within atol, for files FFmpeg decodes)."""
    from_path = load_audio(path)
    from_str = load_audio(str(path))
    from_bytes = load_audio(path.read_bytes())
    decoded, rate = soundfile.read(path, dtype="float32")
    from_array = load_audio(decoded, sample_rate=rate)
    assert_16k_mono(from_path)
    for other, tolerance in ((from_str, 0.0), (from_bytes, 0.0), (from_array, atol)):
        assert other.shape == from_path.shape
        torch.testing.assert_close(other, from_path, rtol=0, atol=tolerance)
    return from_path


def expect_audio_error(audio: object, *fragments: str, **kwargs: object) -> AudioError:
    with pytest.raises(AudioError) as caught:
        load_audio(audio, **kwargs)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return caught.value


# --- files, bytes and arrays agree -------------------------------------------------------


def test_mp3_path_bytes_and_array_agree_at_16k():
    # No Xing frame: FFmpeg decodes it (libsndfile would stop at its estimated length).
    samples = assert_same_from_path_bytes_and_array(EN_MP3, atol=1e-5)
    # soundfile.info's frame count for an mp3 is an estimate; count the decoded samples.
    decoded, rate = soundfile.read(EN_MP3, dtype="float32")
    assert rate == 48000
    assert abs(samples.numel() - len(decoded) / 3) <= 1
    assert samples.abs().max() <= 1.0
    assert rms(samples) > 1e-3  # real speech, not silence


@pytest.mark.parametrize(
    ("name", "subtype", "rate", "channels"),
    [
        ("tone.wav", "PCM_16", 44100, 2),
        ("tone32.wav", "FLOAT", 8000, 1),
        ("tone.flac", "PCM_16", 22050, 2),
        ("tone.flac", "PCM_24", 48000, 1),
    ],
)
def test_written_files_path_bytes_and_array_agree(tmp_path, name, subtype, rate, channels):
    tone = sine(440, rate, 1.25)
    data = np.stack([tone] * channels, axis=1) if channels > 1 else tone
    path = tmp_path / name
    soundfile.write(path, data, rate, subtype=subtype)

    samples = assert_same_from_path_bytes_and_array(path)

    assert abs(samples.numel() - 1.25 * SAMPLE_RATE) <= math.ceil(1.25)
    assert dominant_frequency(samples) == pytest.approx(440, abs=2)


def test_16k_wav_round_trips_to_the_written_samples(tmp_path):
    tone = sine(1000, SAMPLE_RATE, 0.5)
    path = tmp_path / "16k.wav"
    soundfile.write(path, tone, SAMPLE_RATE, subtype="PCM_16")

    samples = load_audio(path)

    assert samples.numel() == tone.size
    np.testing.assert_allclose(samples.numpy(), tone, atol=1 / 32768 + 1e-7)


def test_16k_float_array_passes_through_unchanged():
    tone = sine(300, SAMPLE_RATE, 0.25)
    samples = load_audio(tone)
    assert_16k_mono(samples)
    np.testing.assert_array_equal(samples.numpy(), tone)


# --- channels -----------------------------------------------------------------------------


def test_stereo_frames_by_channels_is_the_mean_of_channels():
    left, right = sine(440, SAMPLE_RATE, 0.5), sine(880, SAMPLE_RATE, 0.5, amplitude=0.25)
    samples = load_audio(np.stack([left, right], axis=1))  # (frames, channels)
    assert samples.shape == (left.size,)
    np.testing.assert_allclose(samples.numpy(), (left + right) / 2, atol=1e-7)


def test_stereo_channels_by_frames_is_the_mean_of_channels():
    left, right = sine(440, SAMPLE_RATE, 0.5), sine(880, SAMPLE_RATE, 0.5, amplitude=0.25)
    samples = load_audio(np.stack([left, right], axis=0))  # (channels, frames)
    assert samples.shape == (left.size,)
    np.testing.assert_allclose(samples.numpy(), (left + right) / 2, atol=1e-7)


def test_stereo_layouts_agree_after_resampling():
    left, right = sine(440, 44100, 0.5), sine(880, 44100, 0.5, amplitude=0.25)
    frames_first = load_audio(np.stack([left, right], axis=1), sample_rate=44100)
    channels_first = load_audio(np.stack([left, right], axis=0), sample_rate=44100)
    mono = load_audio((left + right) / 2, sample_rate=44100)
    torch.testing.assert_close(frames_first, channels_first)
    torch.testing.assert_close(frames_first, mono)


# --- resampling ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "frequency", "seconds"),
    [(8000, 440, 2.0), (44100, 1000, 1.5), (44100, 3000, 0.75), (22050, 5000, 1.0)],
)
def test_resampling_keeps_length_frequency_and_level(rate, frequency, seconds):
    tone = sine(frequency, rate, seconds)

    samples = load_audio(tone, sample_rate=rate)

    assert_16k_mono(samples)
    assert abs(samples.numel() - seconds * SAMPLE_RATE) <= math.ceil(seconds)
    assert dominant_frequency(samples) == pytest.approx(frequency, abs=2 / seconds)
    inner = samples[200:-200]  # the resampler's edges taper
    assert rms(inner) == pytest.approx(0.5 / math.sqrt(2), rel=0.02)


@pytest.mark.parametrize(("rate", "frequency"), [(22051, 1000), (383999, 3000), (11025, 440)])
def test_odd_sample_rates_resample_quickly_and_faithfully(rate, frequency):
    """A rate sharing few factors with 16 kHz would need a huge polyphase kernel (gigabytes,
    seconds); such rates are first moved to a nearby multiple of 100 Hz."""
    tone = sine(frequency, rate, 1.0)
    start = time.perf_counter()
    samples = load_audio(tone, sample_rate=rate)
    assert time.perf_counter() - start < 2.0
    assert_16k_mono(samples)
    assert abs(samples.numel() - SAMPLE_RATE) <= 40
    assert dominant_frequency(samples) == pytest.approx(frequency, abs=5)
    assert rms(samples[200:-200]) == pytest.approx(0.5 / math.sqrt(2), rel=0.02)


def test_audio_over_max_seconds_is_refused_before_resampling():
    with pytest.raises(AudioTooLongError, match="12.0 s long; the limit is 10 s") as error:
        load_audio(np.zeros(44100 * 12, dtype=np.float32), sample_rate=44100, max_seconds=10)
    assert error.value.seconds == pytest.approx(12.0)
    assert isinstance(error.value, AudioError)


def test_resampling_removes_tones_above_the_16k_nyquist():
    tone = sine(10000, 44100, 1.0)  # above 8 kHz: cannot be represented at 16 kHz
    samples = load_audio(tone, sample_rate=44100)
    assert rms(samples) < 0.01 * rms(tone)


def test_resampling_length_for_an_odd_number_of_samples():
    samples = load_audio(np.zeros(44107, dtype=np.float32), sample_rate=44100)
    assert abs(samples.numel() - 44107 * SAMPLE_RATE / 44100) <= 1


# --- integer samples ----------------------------------------------------------------------


def test_int16_is_scaled_to_unit_range():
    samples = load_audio(np.array([-32768, -16384, 0, 16384, 32767], dtype=np.int16))
    assert samples.dtype == torch.float32
    np.testing.assert_allclose(samples.numpy(), [-1.0, -0.5, 0.0, 0.5, 32767 / 32768], atol=1e-7)
    assert samples.min() >= -1.0 and samples.max() <= 1.0


def test_int32_is_scaled_to_unit_range():
    values = np.array([-(2**31), -(2**30), 0, 2**30, 2**31 - 1], dtype=np.int32)
    samples = load_audio(values)
    assert samples.dtype == torch.float32
    np.testing.assert_allclose(samples.numpy(), [-1.0, -0.5, 0.0, 0.5, 1.0], atol=1e-7)
    assert samples.min() >= -1.0 and samples.max() <= 1.0


def test_int16_tone_matches_its_float_equivalent():
    tone = sine(440, SAMPLE_RATE, 0.25, amplitude=0.8)
    as_int16 = np.round(tone * 32767).astype(np.int16)
    np.testing.assert_allclose(load_audio(as_int16).numpy(), tone, atol=2 / 32768)


# --- torch tensors ------------------------------------------------------------------------


def test_torch_tensor_matches_numpy_array():
    tone = sine(440, 44100, 0.5)
    from_numpy = load_audio(tone, sample_rate=44100)
    from_tensor = load_audio(torch.from_numpy(tone), sample_rate=44100)
    assert_16k_mono(from_tensor)
    torch.testing.assert_close(from_tensor, from_numpy, rtol=0, atol=0)


def test_torch_tensor_stereo_and_int16():
    stereo = torch.stack([torch.ones(1000), torch.zeros(1000)])  # (channels, frames)
    torch.testing.assert_close(load_audio(stereo), torch.full((1000,), 0.5))
    as_int16 = torch.tensor([-32768, 0, 16384], dtype=torch.int16)
    torch.testing.assert_close(load_audio(as_int16), torch.tensor([-1.0, 0.0, 0.5]))


def test_torch_tensor_that_requires_grad_is_accepted():
    tone = torch.from_numpy(sine(440, SAMPLE_RATE, 0.1)).requires_grad_(True)
    samples = load_audio(tone)
    np.testing.assert_array_equal(samples.numpy(), tone.detach().numpy())


# --- errors -------------------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "missing.wav"
    error = expect_audio_error(missing, str(missing), "no such file")
    assert error.source == str(missing)
    expect_audio_error(str(missing), str(missing), "no such file")


def test_a_directory_is_not_reported_as_a_missing_file(tmp_path):
    folder = tmp_path / "recordings.wav"
    folder.mkdir()
    for given in (folder, str(folder)):
        error = expect_audio_error(given, f"{folder}: is a directory, not an audio file")
        assert "no such file" not in str(error)
        with pytest.raises(AudioError, match="is a directory, not an audio file"):
            AudioSource(given)


def test_a_pipe_is_refused_without_being_opened(tmp_path):
    pipe = tmp_path / "stream.wav"
    os.mkfifo(pipe)  # opening it would wait for a writer forever
    expect_audio_error(pipe, f"{pipe}: is not a regular file")


def test_empty_bytes():
    expect_audio_error(b"", "the request's audio:", "0 bytes", "empty")


def test_garbage_bytes_cannot_be_decoded():
    garbage = b"not audio" * 100
    expect_audio_error(garbage, "the request's audio:", "cannot decode", "Format not recognised")


def test_an_upload_is_named_by_its_file_name_in_every_error():
    """Row 11 of issue 12: the decoder's reason stays, Python reprs go."""
    cases = [(b"", "empty"), (b"not audio" * 100, "Format not recognised"),
             (b"RIFF\x00\x00\x00\x00WAVEjunk" * 10, "cannot decode"),
             (np.zeros((2, 3, 400), np.float32), "3-D"), (np.zeros(0, np.float32), "empty"),
             (np.array([np.nan], np.float32), "NaN"), (np.zeros(1, np.float32), "too short")]
    for audio, reason in cases:
        error = expect_audio_error(audio, "voice memo.m4a: ", reason, source_name="voice memo.m4a")
        assert error.source == "voice memo.m4a"
        assert "<" not in str(error) and " at 0x" not in str(error)


def test_a_file_name_cannot_break_a_log_line():
    error = expect_audio_error(b"junk" * 100, "evil?name.wav: cannot decode",
                               source_name="evil\nname.wav")
    assert "\n" not in str(error)


def test_text_file_with_a_wav_name_cannot_be_decoded(tmp_path):
    path = tmp_path / "speech.wav"
    path.write_text("this is a text file, not a RIFF header\n" * 20, encoding="utf-8")
    expect_audio_error(path, str(path), "cannot decode")


def test_empty_file_cannot_be_decoded(tmp_path):
    path = tmp_path / "empty.flac"
    path.write_bytes(b"")
    expect_audio_error(path, str(path), "cannot decode")


@pytest.mark.parametrize(
    "array",
    [np.zeros(0, np.float32), np.zeros((0, 2), np.float32), np.zeros((2, 0), np.float32),
     torch.zeros(0)],
    ids=["1-D", "frames-by-0-channels", "0-frames", "tensor"],
)
def test_zero_length_array(array):
    expect_audio_error(array, "the request's audio:", "empty")


def test_array_with_nan():
    tone = sine(440, SAMPLE_RATE, 0.1)
    tone[100] = np.nan
    expect_audio_error(tone, "the request's audio:", "NaN")


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_array_with_inf(value):
    tone = sine(440, SAMPLE_RATE, 0.1)
    tone[-1] = value
    expect_audio_error(tone, "the request's audio:", "infinite")


def test_tensor_with_nan():
    expect_audio_error(torch.tensor([0.0, float("nan"), 0.5]), "the request's audio:", "NaN")


def test_three_dimensional_array():
    expect_audio_error(np.zeros((2, 3, 400), np.float32), "3-D", "shape 2 x 3 x 400")


def test_unsupported_sample_type():
    expect_audio_error(np.zeros(100, np.int64), "the request's audio:", "int64")


@pytest.mark.parametrize("rate", [0, -16000, 1, 999, 384001])
def test_invalid_sample_rate_for_an_array(rate):
    """Files and arrays have the same bounds: at 1 Hz, 16,000 zeros would become 256 M samples."""
    expected = "expected 1000 to 384000 Hz"
    expect_audio_error(np.zeros(16000, np.float32), "the request's audio: invalid sample rate",
                       str(rate), expected, sample_rate=rate)
    expect_audio_error(np.zeros(16000, np.float32), "clip.raw:", expected, sample_rate=rate,
                       source_name="clip.raw")
    with pytest.raises(AudioError, match=expected):
        AudioSource(torch.zeros(16000), sample_rate=rate)


@pytest.mark.parametrize("rate", [1000, 384000])
def test_the_bounds_of_the_sample_rate_are_accepted(rate):
    assert load_audio(np.zeros(rate, np.float32), sample_rate=rate).numel() == SAMPLE_RATE


def test_a_file_below_the_lowest_sample_rate_is_refused_like_an_array(tmp_path):
    path = tmp_path / "slow.wav"
    soundfile.write(path, np.zeros(500, np.float32), 500)
    expect_audio_error(path, str(path), "invalid sample rate 500 Hz", "expected 1000 to 384000 Hz")


def test_audio_error_is_a_sensevoice_error():
    from sensevoice_core import SenseVoiceError

    with pytest.raises(SenseVoiceError):
        load_audio(b"")


def test_audio_shorter_than_one_frame_is_a_clear_error():
    with pytest.raises(AudioError, match=r"too short: 1 sample\(s\)"):
        load_audio(np.zeros(1, dtype=np.float32))
    with pytest.raises(AudioError, match="too short"):
        load_audio(np.zeros(2, dtype=np.float32), sample_rate=48000)  # 0 samples at 16 kHz
