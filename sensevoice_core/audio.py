"""Every form of audio input becomes one float32 mono 16 kHz tensor, here and only here.

Decoding uses soundfile (libsndfile reads wav, flac, ogg/vorbis/opus and mp3 in memory, with
no ffmpeg and no temp files); resampling uses torchaudio's windowed-sinc resampler.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Union

import numpy as np
import soundfile
import torch
import torchaudio.functional

from sensevoice_core.errors import AudioError, AudioTooLongError

SAMPLE_RATE = 16000
MAX_RESAMPLE_PHASES = 1000  # 16000 / gcd: 160 for 44.1 kHz, 640 for 11.025 kHz, 1 for 48 kHz
EXPECTED_FORMATS = "expected wav, flac, ogg or mp3"
MIN_SAMPLES = 2  # the shortest input Kaldi's fbank can frame (one window of 2 samples)

AudioInput = Union[str, Path, bytes, np.ndarray, torch.Tensor]


def describe(audio: AudioInput) -> str:
    """A short name for an input, for error messages."""
    if isinstance(audio, (str, Path)):
        return str(audio)
    if isinstance(audio, bytes):
        return f"<{len(audio)} bytes of audio>"
    return f"<array of shape {tuple(audio.shape)}>"


def open_audio_file(audio: str | Path | bytes, source: str) -> soundfile.SoundFile:
    """A file path or a file's bytes, opened for reading; AudioError naming source otherwise."""
    if isinstance(audio, (str, Path)):
        path = Path(audio).expanduser()
        if not path.is_file():
            raise AudioError(source, "no such file")
        target: Path | io.BytesIO = path
    else:
        if not audio:
            raise AudioError(source, "empty input")
        target = io.BytesIO(audio)
    try:
        return soundfile.SoundFile(target)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioError(source, f"cannot decode audio ({e}); {EXPECTED_FORMATS}") from e


def _read_file(audio: str | Path | bytes, source: str) -> tuple[np.ndarray, int]:
    with open_audio_file(audio, source) as file:
        try:
            samples = file.read(dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError) as e:
            raise AudioError(source, f"cannot decode audio ({e}); {EXPECTED_FORMATS}") from e
        return samples, file.samplerate  # samples: (frames, channels)


def _as_frames_by_channels(samples: np.ndarray, source: str) -> np.ndarray:
    if samples.ndim == 1:
        return samples[:, None]
    if samples.ndim != 2:
        raise AudioError(source, f"expected a 1-D or 2-D array, found {samples.ndim}-D")
    # soundfile's layout is (frames, channels); accept (channels, frames) too when unambiguous.
    if samples.shape[0] <= 8 < samples.shape[1]:
        return samples.T
    return samples


def _to_float32(samples: np.ndarray, source: str) -> np.ndarray:
    if samples.dtype == np.int16:
        return samples.astype(np.float32) / 32768.0
    if samples.dtype == np.int32:
        return samples.astype(np.float32) / 2147483648.0
    if samples.dtype == np.uint8:
        return (samples.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(samples.dtype, np.floating):
        return samples.astype(np.float32, copy=False)
    raise AudioError(source, f"unsupported sample type {samples.dtype}; expected float or int16/32")


def _to_friendly_rate(samples: np.ndarray, sample_rate: int) -> tuple[np.ndarray, int]:
    """Move an odd rate (e.g. 22051 Hz) to the nearest multiple of 100 Hz by linear
    interpolation: torchaudio's polyphase kernel has 16000 / gcd(rate, 16000) phases, which for
    such rates takes gigabytes and seconds. The shift is below 0.25%, inaudible to the model."""
    if SAMPLE_RATE // math.gcd(sample_rate, SAMPLE_RATE) <= MAX_RESAMPLE_PHASES:
        return samples, sample_rate
    target = max(100, round(sample_rate / 100) * 100)
    count = max(1, round(samples.shape[0] * target / sample_rate))
    positions = np.arange(count, dtype=np.float64) * (sample_rate / target)
    return np.interp(positions, np.arange(samples.shape[0]), samples).astype(np.float32), target


def load_audio(audio: AudioInput, sample_rate: int = SAMPLE_RATE,
               max_seconds: float | None = None) -> torch.Tensor:
    """Decode, downmix and resample any supported input to a (samples,) float32 16 kHz tensor.

    Args:
        audio: a file path, the bytes of an audio file, or an array of samples shaped
            (samples,), (samples, channels) or (channels, samples).
        sample_rate: the rate of an array input; ignored for files and bytes, which carry their own.
        max_seconds: refuse longer audio (AudioTooLongError) before spending time resampling it.
    """
    source = describe(audio)
    if isinstance(audio, (str, Path, bytes)):
        samples, sample_rate = _read_file(audio, source)
    else:
        array = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else audio
        samples = _to_float32(_as_frames_by_channels(np.asarray(array), source), source)
    if sample_rate <= 0:
        raise AudioError(source, f"invalid sample rate {sample_rate}")
    if samples.shape[0] == 0 or samples.shape[1] == 0:
        raise AudioError(source, "audio is empty (0 samples)")
    if not np.isfinite(samples).all():
        raise AudioError(source, "audio contains NaN or infinite samples")
    seconds = samples.shape[0] / sample_rate
    if max_seconds is not None and seconds > max_seconds:
        raise AudioTooLongError(source, seconds, max_seconds)
    mono = np.ascontiguousarray(samples.mean(axis=1, dtype=np.float32))
    if sample_rate != SAMPLE_RATE:
        mono, sample_rate = _to_friendly_rate(mono, sample_rate)
    tensor = torch.from_numpy(mono)
    if sample_rate != SAMPLE_RATE:
        tensor = torchaudio.functional.resample(tensor, sample_rate, SAMPLE_RATE)
    mono = tensor
    if mono.numel() < MIN_SAMPLES:
        raise AudioError(source, f"audio is too short: {mono.numel()} sample(s) at 16 kHz, "
                                 f"need at least {MIN_SAMPLES}")
    return mono
