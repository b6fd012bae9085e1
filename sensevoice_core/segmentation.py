"""Speech regions from per-window speech probabilities (numpy only: no torch here, so the
settings that describe segmentation can be read by processes that never load a model)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

WINDOW = 512  # samples per probability: 32 ms at 16 kHz
WINDOW_S = WINDOW / 16000


@dataclass(frozen=True)
class Bounds:
    """The numbers an option allows: finite, from low to high (None: unbounded; low itself
    excluded when low_exclusive). Each option's bounds are written once, as a constant, and
    read both by the options' own checks and by the pydantic Field of its setting."""

    low: float | None = None
    high: float | None = None
    low_exclusive: bool = False

    @property
    def field(self) -> dict[str, float | bool]:
        """Keyword arguments for pydantic's Field: ge/gt, le, and finite numbers only."""
        limits: dict[str, float | bool] = {"allow_inf_nan": False}
        if self.low is not None:
            limits["gt" if self.low_exclusive else "ge"] = self.low
        if self.high is not None:
            limits["le"] = self.high
        return limits

    def describe(self) -> str:
        if self.low is not None and self.high is not None and not self.low_exclusive:
            return f"a number from {self.low:g} to {self.high:g}"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_exclusive else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"<= {self.high:g}")
        return "a finite number" + (f" {' and '.join(parts)}" if parts else "")

    def check(self, name: str, value: object) -> None:
        """ValueError naming the option, its value and what is allowed, unless value fits."""
        fits = (isinstance(value, numbers.Real) and not isinstance(value, bool)
                and math.isfinite(value)
                and (self.low is None or value > self.low
                     or (value == self.low and not self.low_exclusive))
                and (self.high is None or value <= self.high))
        if not fits:
            raise ValueError(f"{name}={value!r}: expected {self.describe()}")


THRESHOLD_BOUNDS = Bounds(0.0, 1.0)  # a speech probability
DURATION_BOUNDS = Bounds(0.0)  # min_speech_s, min_silence_s, speech_pad_s (seconds)
MAX_SEGMENT_BOUNDS = Bounds(1.0, 120.0)  # seconds
MAX_PAD_FRACTION = 0.25  # speech_pad_s is at most this much of max_segment_s


def padding_problem(speech_pad_s: float, max_segment_s: float,
                    pad_name: str = "speech_pad_s",
                    segment_name: str = "max_segment_s") -> str | None:
    """What is wrong when the padding on both sides would fill half a segment, or None.
    The names are the caller's: VadOptions' fields, or the settings' variables."""
    limit = max_segment_s * MAX_PAD_FRACTION
    if speech_pad_s <= limit:
        return None
    return (f"{pad_name}={speech_pad_s:g} is more than a quarter of "
            f"{segment_name}={max_segment_s:g} (at most {limit:g})")


@dataclass(frozen=True)
class VadOptions:
    threshold: float = 0.35  # speech when the probability is at least this
    min_speech_s: float = 0.25  # shorter bursts are dropped
    min_silence_s: float = 0.3  # shorter pauses do not split speech
    speech_pad_s: float = 0.1  # kept on each side of a region, so word edges are not cut
    max_segment_s: float = 30.0  # longer regions are split at their quietest point

    def __post_init__(self) -> None:
        THRESHOLD_BOUNDS.check("threshold", self.threshold)
        for name in ("min_speech_s", "min_silence_s", "speech_pad_s"):
            DURATION_BOUNDS.check(name, getattr(self, name))
        MAX_SEGMENT_BOUNDS.check("max_segment_s", self.max_segment_s)
        problem = padding_problem(self.speech_pad_s, self.max_segment_s)
        if problem:
            raise ValueError(problem)


@dataclass(frozen=True)
class Region:
    start: float  # seconds
    end: float


def speech_regions(probabilities: np.ndarray, options: VadOptions,
                   duration_s: float | None = None) -> list[Region]:
    """Speech regions from per-window probabilities, each at most options.max_segment_s long."""
    duration = duration_s if duration_s is not None else len(probabilities) * WINDOW_S
    speech = probabilities >= options.threshold
    # Close pauses shorter than min_silence, then drop bursts shorter than min_speech.
    runs = list(_runs(speech))
    min_gap = windows_in(options.min_silence_s)
    merged: list[list[int]] = []
    for start, end in runs:
        if merged and start - merged[-1][1] < min_gap:
            merged[-1][1] = end
        else:
            merged.append([start, end])
    min_len = windows_in(options.min_speech_s)
    kept = [(start, end) for start, end in merged if end - start >= min_len]
    max_len = max_piece_windows(options)
    pieces = [piece for start, end in kept
              for piece in _split_long(probabilities, start, end, max_len)]
    regions: list[Region] = []
    for start, end in pieces:
        region = padded_region(start, end, options, duration)
        begin, finish = region.start, region.end
        if regions and begin < regions[-1].end:  # padding of neighbours overlaps: meet halfway
            middle = meeting_point(regions[-1].end, begin)
            regions[-1] = Region(regions[-1].start, middle)
            begin = middle
        regions.append(Region(begin, finish))
    return regions


def windows_in(seconds: float) -> int:
    """How many 32 ms windows min_silence_s or min_speech_s stands for."""
    return round(seconds / WINDOW_S)


def max_piece_windows(options: VadOptions) -> int:
    """The most windows of speech one piece holds: max_segment_s less its padding."""
    pad_windows = options.speech_pad_s / WINDOW_S
    return max(1, math.floor(options.max_segment_s / WINDOW_S - 2 * pad_windows))


def padded_region(start: int, end: int, options: VadOptions, duration: float) -> Region:
    """Windows [start, end) of speech in seconds, with speech_pad_s on each side, inside the
    audio (before neighbours' overlaps are settled with meeting_point)."""
    return Region(round(max(0.0, start * WINDOW_S - options.speech_pad_s), 3),
                  round(min(duration, end * WINDOW_S + options.speech_pad_s), 3))


def meeting_point(previous_end: float, begin: float) -> float:
    """Where two neighbours whose padding overlaps (begin < previous_end) meet: halfway."""
    return round((previous_end + begin) / 2, 3)


def cut_point(probabilities: np.ndarray, position: int, end: int, max_len: int) -> int:
    """Where a piece of speech from window position, in a region ending at end (more than
    max_len windows on), is cut: the quietest window of its second half, leaving what follows
    in one piece when that fits (so no piece is tiny). Once end - position > 2 * max_len, the
    cut no longer depends on end: a live stream can cut before its region ends."""
    low, high = position + max(1, max_len // 2), position + max_len
    if end - position <= 2 * max_len:
        low = max(low, end - max_len)  # what is left after this cut must fit in one piece
    return low + int(np.argmin(probabilities[low:high + 1]))


def _runs(mask: np.ndarray) -> Iterator[tuple[int, int]]:
    """[start, end) index pairs of the True runs."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    yield from zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist())


def _split_long(probabilities: np.ndarray, start: int, end: int,
                max_len: int) -> Iterator[tuple[int, int]]:
    """Cut [start, end) into pieces of at most max_len windows, each cut at the quietest window
    (lowest probability) of the second half of the piece it ends, so no piece is tiny."""
    position = start
    while end - position > max_len:
        cut = cut_point(probabilities, position, end, max_len)
        yield position, cut
        position = cut
    yield position, end
