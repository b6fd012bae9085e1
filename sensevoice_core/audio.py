"""Every form of audio input becomes float32 mono 16 kHz samples, here and only here: whole
(``load_audio``) or, for long audio, in blocks and spans (``AudioSource``).

Files and their bytes are decoded by ``audio_stream`` (soundfile, else FFmpeg); resampling uses
torchaudio's windowed-sinc resampler.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torchaudio.functional

from sensevoice_core.audio_stream import (
    BLOCK_S,
    Decoder,
    check_declared_length,
    check_rate,
    open_decoder,
    to_float32,
)
from sensevoice_core.errors import REQUEST_AUDIO, AudioError, AudioTooLongError

SAMPLE_RATE = 16000
MAX_RESAMPLE_PHASES = 1000  # 16000 / gcd: 160 for 44.1 kHz, 640 for 11.025 kHz, 1 for 48 kHz
MIN_SAMPLES = 2  # the shortest input Kaldi's fbank can frame (one window of 2 samples)
TINY_FRAMES = 16  # a block's tail shorter than this is too short to resample
# AudioSource keeps what it decoded up to this long (23 MB at 48 kHz), so audio short enough
# to be transcribed whole is decoded once, not once for the VAD and again for the model.
KEEP_DECODED_S = 120.0

AudioInput = Union[str, Path, bytes, np.ndarray, torch.Tensor]


def describe(audio: AudioInput, source_name: str | None = None) -> str:
    """How errors name an input: the upload's file name (control characters replaced, so a log
    line stays one line), else its path, else "the request's audio"."""
    if source_name:
        return re.sub(r"[\x00-\x1f\x7f]", "?", source_name)
    return str(audio) if isinstance(audio, (str, Path)) else REQUEST_AUDIO


def _as_frames_by_channels(samples: np.ndarray, source: str) -> np.ndarray:
    if samples.ndim == 1:
        return samples[:, None]
    if samples.ndim != 2:
        raise AudioError(source, f"expected a 1-D or 2-D array of samples, found "
                                 f"{samples.ndim}-D (shape {' x '.join(map(str, samples.shape))})")
    # soundfile's layout is (frames, channels); accept (channels, frames) too when unambiguous.
    if samples.shape[0] <= 8 < samples.shape[1]:
        return samples.T
    return samples


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
               max_seconds: float | None = None, source_name: str | None = None) -> torch.Tensor:
    """Decode, downmix and resample any supported input to a (samples,) float32 16 kHz tensor.

    Args:
        audio: a file path, the bytes of an audio file, or an array of samples shaped
            (samples,), (samples, channels) or (channels, samples).
        sample_rate: the rate of an array input, 1 kHz to 384 kHz; ignored for files and
            bytes, which carry their own.
        max_seconds: refuse longer audio (AudioTooLongError) before spending time resampling it.
        source_name: how errors name the input (an upload's file name); default: its path, or
            "the request's audio".
    """
    source = describe(audio, source_name)
    if isinstance(audio, (str, Path, bytes)):
        with open_decoder(audio, source) as decoder:
            mono, sample_rate = decoder.read_all(max_seconds), decoder.rate
    else:
        check_rate(source, sample_rate)  # the bounds files have: an absurd rate would blow up
        array = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else audio
        samples = to_float32(_as_frames_by_channels(np.asarray(array), source), source)
        if samples.shape[0] == 0 or samples.shape[1] == 0:
            raise AudioError(source, "audio is empty (0 samples)")
        if not np.isfinite(samples).all():  # before the mean, which could overflow to inf
            raise AudioError(source, "audio contains NaN or infinite samples")
        mono = np.ascontiguousarray(samples.mean(axis=1, dtype=np.float32))
    if mono.shape[0] == 0:
        raise AudioError(source, "audio is empty (0 samples)")
    if not np.isfinite(mono).all():
        raise AudioError(source, "audio contains NaN or infinite samples")
    seconds = mono.shape[0] / sample_rate
    if max_seconds is not None and seconds > max_seconds:
        raise AudioTooLongError(source, seconds, max_seconds)
    return resample_to_16k(mono, sample_rate, source)


def resample_to_16k(mono: np.ndarray, sample_rate: int, source: str) -> torch.Tensor:
    """Mono float32 samples at any rate as a 16 kHz tensor of at least MIN_SAMPLES."""
    if sample_rate != SAMPLE_RATE:
        mono, sample_rate = _to_friendly_rate(mono, sample_rate)
    tensor = torch.from_numpy(np.ascontiguousarray(mono))
    if sample_rate != SAMPLE_RATE:
        tensor = torchaudio.functional.resample(tensor, sample_rate, SAMPLE_RATE)
    if tensor.numel() < MIN_SAMPLES:
        raise AudioError(source, f"audio is too short: {tensor.numel()} sample(s) at 16 kHz, "
                                 f"need at least {MIN_SAMPLES}")
    return tensor


class AudioSource:
    """Long audio without holding it: a file or its bytes streamed in blocks (for the VAD), then
    only the spans being transcribed read back. A one-hour file is 230 MB of 16 kHz samples.
    Arrays are already in memory and are simply sliced."""

    def __init__(self, audio: AudioInput, sample_rate: int = SAMPLE_RATE,
                 max_seconds: float | None = None, source_name: str | None = None):
        self.name = describe(audio, source_name)
        self.max_seconds = max_seconds
        self._decoder: Decoder | None = None
        self._samples: torch.Tensor | None = None
        self._native_frames: int | None = None  # counted by blocks()
        # What blocks() decoded, while short enough to keep, so whole() need not decode again.
        self._kept: list[np.ndarray] | None = []
        if isinstance(audio, (str, Path, bytes)):
            self._decoder = open_decoder(audio, self.name)
            declared = self._decoder.declared
            try:
                check_declared_length(self.name, declared, max_seconds)
            except AudioError:
                self._decoder.close()
                raise
            self.native_rate = self._decoder.rate
            self.duration_s = declared.seconds if declared else 0.0  # until blocks() measures
        else:
            self._samples = load_audio(audio, sample_rate, max_seconds, self.name)
            self.native_rate = SAMPLE_RATE
            self.duration_s = self._samples.numel() / SAMPLE_RATE

    def blocks(self, seconds: float = BLOCK_S) -> Iterator[torch.Tensor]:
        """The whole audio as consecutive 16 kHz mono blocks. A header's length may be an
        estimate: the blocks go on until the decoder runs dry, then duration_s is what was
        decoded (and AudioTooLongError as soon as that passes max_seconds)."""
        if self._samples is not None:
            step = round(seconds * SAMPLE_RATE)
            for first in range(0, self._samples.numel(), step):
                yield self._samples[first:first + step]
            return
        assert self._decoder is not None
        block, frames, samples = round(seconds * self.native_rate), 0, 0
        while True:
            mono = self._decoder.read(frames, block)
            frames += mono.shape[0]
            if self._kept is not None:
                self._kept.append(mono)
                if frames > KEEP_DECODED_S * self.native_rate:
                    self._kept = None  # too long to keep: whole() decodes it again
            if self.max_seconds is not None and frames / self.native_rate > self.max_seconds:
                raise AudioTooLongError(self.name, frames / self.native_rate, self.max_seconds,
                                        at_least=mono.shape[0] == block)
            if mono.shape[0]:
                converted = self._to_16k(mono)
                samples += converted.numel()
                yield converted
            if mono.shape[0] < block:
                break
        if frames == 0:
            raise AudioError(self.name, "audio is empty (0 samples)")
        if samples < MIN_SAMPLES:
            raise AudioError(self.name, f"audio is too short: {samples} sample(s) at 16 kHz, "
                                        f"need at least {MIN_SAMPLES}")
        self._native_frames, self.duration_s = frames, frames / self.native_rate

    def read(self, start_s: float, end_s: float) -> torch.Tensor:
        """16 kHz mono samples of [start_s, end_s); a span at the very end may come back short."""
        if self._samples is not None:
            return self._samples[round(start_s * SAMPLE_RATE):round(end_s * SAMPLE_RATE)]
        assert self._decoder is not None
        first = math.floor(start_s * self.native_rate)
        count = max(1, math.ceil(end_s * self.native_rate) - first)
        return self._to_16k(self._decoder.read(first, count))

    def whole(self) -> torch.Tensor:
        """All of it, with load_audio's checks (empty, too short, NaN) as for any short input."""
        if self._samples is not None:
            return self._samples
        assert self._decoder is not None
        if self._native_frames is None:
            mono = self._decoder.read_all(self.max_seconds)
        elif self._kept is not None:
            mono = np.concatenate(self._kept) if self._kept else np.zeros(0, np.float32)
        else:
            mono = self._decoder.read(0, self._native_frames)
        return load_audio(mono, self.native_rate, source_name=self.name)

    def _to_16k(self, mono: np.ndarray) -> torch.Tensor:
        if not np.isfinite(mono).all():
            raise AudioError(self.name, "audio contains NaN or infinite samples")
        if self.native_rate == SAMPLE_RATE:
            return torch.from_numpy(np.ascontiguousarray(mono))
        if mono.shape[0] < TINY_FRAMES:  # the tail of a file: too short to resample
            return torch.zeros(round(mono.shape[0] * SAMPLE_RATE / self.native_rate))
        return resample_to_16k(mono, self.native_rate, self.name)

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()

    def __enter__(self) -> AudioSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
