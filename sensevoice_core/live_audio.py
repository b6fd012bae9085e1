"""A live stream's audio as the engine takes it: the bytes of a StreamEncoding as float32 samples
(``decode_pcm``), and a resampler to 16 kHz that keeps its state between chunks
(``StreamResampler``), so the samples it gives do not depend on how the stream was chunked.

The resampler computes what the batch path's ``audio.resample_to_16k`` computes for the whole
stream (torchaudio's windowed-sinc kernel, and first the same linear move of an odd rate to
the nearest multiple of 100 Hz), one output as soon as the input it needs has arrived.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchaudio.functional.functional import _get_sinc_resample_kernel

from sensevoice_core.audio import MAX_RESAMPLE_PHASES, SAMPLE_RATE
from sensevoice_core.stream_types import (
    BYTES_PER_SAMPLE,
    STREAM_RATE_BOUNDS,
    StreamEncoding,
)

INT16_SCALE = 32768.0
NEGLIGIBLE = 1e-20  # kernel weights below this (relative to the largest) are left out


def _ulaw_table() -> np.ndarray:
    """ITU-T G.711 mu-law: the 256 codes as 16-bit linear values (0xFF and 0x7F are 0)."""
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    magnitude = (((codes & 0x0F) << 3) + 0x84) << ((codes & 0x70) >> 4)
    return np.where(codes & 0x80, 0x84 - magnitude, magnitude - 0x84).astype(np.int16)


def _alaw_table() -> np.ndarray:
    """ITU-T G.711 A-law: the 256 codes as 16-bit linear values (0xD5 is +8, 0x55 is -8)."""
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    mantissa = (codes & 0x0F) << 4
    segment = (codes & 0x70) >> 4
    magnitude = np.where(segment == 0, mantissa + 8,
                         (mantissa + 0x108) << np.maximum(segment - 1, 0))
    return np.where(codes & 0x80, magnitude, -magnitude).astype(np.int16)


G711_TABLES: dict[str, np.ndarray] = {"pcmu": _ulaw_table(), "pcma": _alaw_table()}


def decode_pcm(data: bytes, encoding: StreamEncoding) -> np.ndarray:
    """The bytes of a stream chunk as float32 samples in [-1, 1] (pcm_f32le as sent, finite)."""
    size = BYTES_PER_SAMPLE.get(encoding)
    if size is None:
        raise ValueError(f"encoding {encoding!r}: expected one of "
                         f"{', '.join(BYTES_PER_SAMPLE)}")
    if len(data) % size:
        raise ValueError(f"{encoding} audio of {len(data)} bytes: expected a multiple of "
                         f"{size} bytes ({size} per sample)")
    if encoding == "pcm_s16le":
        return (np.frombuffer(data, dtype="<i2") / INT16_SCALE).astype(np.float32)
    if encoding == "pcm_f32le":
        samples = np.frombuffer(data, dtype="<f4").astype(np.float32)
        if not np.isfinite(samples).all():
            raise ValueError(f"{encoding} audio contains NaN or infinite samples")
        return samples
    table = G711_TABLES[encoding]
    return (table[np.frombuffer(data, dtype=np.uint8)] / INT16_SCALE).astype(np.float32)


def _nonzero_taps(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(phases, count) tap indices covering each row's span, and their weights. Outside
    its window a row holds cos(pi / 2) ** 2 (about 1e-33) times the sinc: left out."""
    if not kernel.size:
        return np.zeros((0, 0), np.int64), np.zeros((0, 0))
    nonzero = np.abs(kernel) > NEGLIGIBLE * np.abs(kernel).max()
    first = nonzero.argmax(axis=1)
    last = kernel.shape[1] - 1 - nonzero[:, ::-1].argmax(axis=1)
    count = int((last - first).max()) + 1
    taps = np.minimum(first[:, None] + np.arange(count), kernel.shape[1] - 1)
    weights = np.take_along_axis(kernel, taps, axis=1)
    weights[first[:, None] + np.arange(count) > last[:, None]] = 0.0
    return taps, weights


class StreamResampler:
    """float32 samples at ``rate`` in, 16 kHz out, chunk after chunk: the outputs of the
    chunks, joined, equal the output for the whole stream (``flush`` gives its last samples,
    which need the zeros after the end). 16 kHz passes through untouched."""

    def __init__(self, rate: int):
        self.rate = rate
        self.friendly = rate
        if SAMPLE_RATE // math.gcd(rate, SAMPLE_RATE) > MAX_RESAMPLE_PHASES:
            self.friendly = max(100, round(rate / 100) * 100)
        gcd = math.gcd(self.friendly, SAMPLE_RATE)
        self.orig, self.new = self.friendly // gcd, SAMPLE_RATE // gcd
        self.kernel = np.zeros((0, 0))
        self.width = 0
        if self.friendly != SAMPLE_RATE:
            kernel, self.width = _get_sinc_resample_kernel(self.friendly, SAMPLE_RATE, gcd,
                                                           dtype=torch.float64)
            self.kernel = kernel[:, 0].numpy()  # (new, 2 * width + orig)
        # Each phase's row is zero but for about 2 * width taps: the taps each phase uses
        # (taps[:, j], ascending) and their weights (0 past a phase's last tap).
        self.taps, self.weights = _nonzero_taps(self.kernel)
        # Linear stage (odd rates only): inputs received, and the next output to compute.
        self.linear_in = 0
        self.linear_out = 0
        self.linear_last = np.zeros(0, np.float32)  # the last input sample, when any
        # Sinc stage: its input from sample (next_block * orig - width) on, zeros before 0.
        self.history = np.zeros(self.width, np.float32)
        self.sinc_in = 0
        self.next_block = 0
        self.received = 0  # samples fed

    @property
    def passthrough(self) -> bool:
        return self.friendly == SAMPLE_RATE and self.rate == SAMPLE_RATE

    def feed(self, samples: np.ndarray) -> np.ndarray:
        self.received += len(samples)
        if self.passthrough:
            return samples.astype(np.float32, copy=False)
        linear = self._linear(samples, final=False)
        return linear if self.friendly == SAMPLE_RATE else self._sinc(linear, final=False)

    def flush(self) -> np.ndarray:
        """The last samples (the stream has ended): those that the zeros after it decide."""
        if self.passthrough:
            return np.zeros(0, np.float32)
        linear = self._linear(np.zeros(0, np.float32), final=True)
        return linear if self.friendly == SAMPLE_RATE else self._sinc(linear, final=True)

    def _linear(self, samples: np.ndarray, final: bool) -> np.ndarray:
        """audio._to_friendly_rate's np.interp, one output once both its neighbours arrived."""
        if self.friendly == self.rate:
            return samples
        joined = np.concatenate([self.linear_last, samples])
        first = self.linear_in - len(self.linear_last)  # input index of joined[0]
        self.linear_in += len(samples)
        step = self.rate / self.friendly
        if final:
            count = max(1, round(self.linear_in * self.friendly / self.rate)) \
                if self.linear_in else 0
        else:  # the outputs whose right neighbour has arrived
            bound = math.ceil(self.linear_in / step) + 1
            positions = np.arange(self.linear_out, max(bound, self.linear_out),
                                  dtype=np.float64) * step
            count = self.linear_out + int(np.searchsorted(
                np.floor(positions) + 1, self.linear_in - 1, side="right"))
        indices = np.arange(self.linear_out, max(count, self.linear_out), dtype=np.float64)
        self.linear_out = max(count, self.linear_out)
        self.linear_last = joined[-1:] if len(joined) else joined
        if not len(indices):
            return np.zeros(0, np.float32)
        positions = indices * step
        left = np.minimum(np.floor(positions).astype(np.int64), self.linear_in - 1)
        right = np.minimum(left + 1, self.linear_in - 1)
        below, above = joined[left - first].astype(np.float64), joined[right - first]
        values = below + (above - below) * (positions - left)
        return values.astype(np.float32)

    def _sinc(self, samples: np.ndarray, final: bool) -> np.ndarray:
        """torchaudio's conv1d of the padded input with stride orig, one block at a time."""
        self.history = np.concatenate([self.history, samples.astype(np.float32, copy=False)])
        self.sinc_in += len(samples)
        taps = self.kernel.shape[1]
        if final:
            target = math.ceil(self.new * self.sinc_in / self.orig)
            blocks = max(0, math.ceil(target / self.new) - self.next_block)
            self.history = np.concatenate([self.history, np.zeros(taps, np.float32)])
        else:  # block b needs input up to b * orig + width + orig - 1
            target = None
            ready = (self.sinc_in - self.width - self.orig) // self.orig + 1
            blocks = max(0, ready - self.next_block)
        if blocks == 0:
            return np.zeros(0, np.float32)
        frames = np.lib.stride_tricks.sliding_window_view(self.history, taps)[
            ::self.orig][:blocks].astype(np.float64)
        # One tap at a time, element by element: the same arithmetic whatever the chunking
        # (a matrix product may sum in another order for another number of blocks).
        out = np.zeros((blocks, self.new), np.float64)
        for j in range(self.taps.shape[1]):
            out += frames[:, self.taps[:, j]] * self.weights[:, j]
        self.history = self.history[blocks * self.orig:]
        first_out = self.next_block * self.new
        self.next_block += blocks
        flat = out.reshape(-1).astype(np.float32)
        if target is not None:
            flat = flat[:max(0, target - first_out)]
        return flat

    def state(self) -> tuple[dict[str, int], dict[str, np.ndarray]]:
        """Counters and arrays that make a StreamResampler go on where this one is."""
        return ({"rate": self.rate, "linear_in": self.linear_in, "linear_out": self.linear_out,
                 "sinc_in": self.sinc_in, "next_block": self.next_block,
                 "received": self.received},
                {"linear_last": self.linear_last, "history": self.history})

    @classmethod
    def from_state(cls, counters: dict[str, int],
                   arrays: dict[str, np.ndarray]) -> StreamResampler:
        """ValueError naming what does not fit, for counters and arrays that state() could
        not have given."""
        names = ("rate", "linear_in", "linear_out", "sinc_in", "next_block", "received")
        for name in names:
            value = counters[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"stream state is damaged: resampler {name}={value!r}")
        STREAM_RATE_BOUNDS.check("stream state's sample rate", counters["rate"])
        resampler = cls(counters["rate"])
        resampler.linear_in, resampler.linear_out = counters["linear_in"], counters["linear_out"]
        resampler.sinc_in, resampler.next_block = counters["sinc_in"], counters["next_block"]
        resampler.received = counters["received"]
        resampler.linear_last = arrays["linear_last"].astype(np.float32)
        resampler.history = arrays["history"].astype(np.float32)
        held = resampler.width + resampler.sinc_in - resampler.next_block * resampler.orig
        if resampler.history.shape != (held,) or len(resampler.linear_last) > 1 \
                or (resampler.linear_in > 0) != (len(resampler.linear_last) == 1):
            raise ValueError("stream state is damaged: the resampler's history does not match "
                             "its counters")
        return resampler
