"""Long audio without holding it: a file or its bytes read in blocks, or any span of it.

A one-hour file is 230 MB of 16 kHz samples; ``AudioSource`` streams it for the VAD, then reads
back only the spans being transcribed. Arrays are already in memory and are simply sliced.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile
import torch

from sensevoice_core.audio import SAMPLE_RATE, AudioInput, describe, load_audio, open_audio_file
from sensevoice_core.errors import AudioError, AudioTooLongError

BLOCK_S = 30.0  # seconds decoded at a time while streaming
TINY_FRAMES = 16


class AudioSource:
    def __init__(self, audio: AudioInput, sample_rate: int = SAMPLE_RATE,
                 max_seconds: float | None = None):
        self.name = describe(audio)
        self._file: soundfile.SoundFile | None = None
        self._samples: torch.Tensor | None = None
        if isinstance(audio, (str, Path, bytes)):
            self._file = open_audio_file(audio, self.name)
            self.native_rate = self._file.samplerate
            self.duration_s = self._file.frames / self.native_rate
        else:
            self._samples = load_audio(audio, sample_rate, max_seconds)
            self.native_rate = SAMPLE_RATE
            self.duration_s = self._samples.numel() / SAMPLE_RATE
        if self.duration_s <= 0:
            raise AudioError(self.name, "audio is empty (0 samples)")
        self.max_seconds = max_seconds
        if max_seconds is not None and self.duration_s > max_seconds:
            raise AudioTooLongError(self.name, self.duration_s, max_seconds)

    def blocks(self, seconds: float = BLOCK_S) -> Iterator[torch.Tensor]:
        """The whole audio as consecutive 16 kHz mono blocks. The header's length is only an
        estimate for some formats (MP3 without a Xing frame, truncated files): the blocks go on
        until the decoder runs dry, and duration_s becomes what was really decoded."""
        start, decoded = 0.0, 0
        while True:
            block = self.read(start, start + seconds)
            decoded += block.numel()
            if self.max_seconds is not None and decoded / SAMPLE_RATE > self.max_seconds:
                raise AudioTooLongError(self.name, decoded / SAMPLE_RATE, self.max_seconds)
            if block.numel():
                yield block
            if block.numel() < round(seconds * SAMPLE_RATE) - SAMPLE_RATE // 100:
                break
            start += seconds
        self.duration_s = decoded / SAMPLE_RATE

    def read(self, start_s: float, end_s: float) -> torch.Tensor:
        """16 kHz mono samples of [start_s, end_s); a span at the very end may come back short."""
        if self._samples is not None:
            return self._samples[round(start_s * SAMPLE_RATE):round(end_s * SAMPLE_RATE)]
        mono = self._read_mono(start_s, end_s)
        if not np.isfinite(mono).all():
            raise AudioError(self.name, "audio contains NaN or infinite samples")
        if self.native_rate == SAMPLE_RATE:
            return torch.from_numpy(np.ascontiguousarray(mono))
        if mono.shape[0] < TINY_FRAMES:  # the tail of a file: too short to resample
            return torch.zeros(round(mono.shape[0] * SAMPLE_RATE / self.native_rate))
        return load_audio(mono, self.native_rate)

    def whole(self) -> torch.Tensor:
        """All of it, with load_audio's checks (empty, too short, NaN) as for any short input."""
        if self._samples is not None:
            return self._samples
        return load_audio(self._read_mono(0.0, self.duration_s), self.native_rate)

    def _read_mono(self, start_s: float, end_s: float) -> np.ndarray:
        assert self._file is not None
        first = math.floor(start_s * self.native_rate)
        count = max(1, math.ceil(end_s * self.native_rate) - first)
        try:
            self._file.seek(first)
            frames = self._file.read(count, dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError) as e:
            raise AudioError(self.name, f"cannot decode audio at {start_s:.1f} s ({e})") from e
        return frames.mean(axis=1)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> AudioSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
