"""Where a live stream's turns begin and end (no model here): the VAD's window probabilities
in, turns out, with the stream's audio kept only as long as a turn may still need it.

With turn_detection, a turn is a region of ``segmentation.speech_regions`` found online: speech
windows whose pauses are shorter than min_silence_s, opened once it lasts min_speech_s, closed
after min_silence_s of silence (once speech_pad_s of audio follows it), cut where the batch path
cuts a region longer than max_segment_s (segmentation.cut_point). Without it, a turn is the
audio since the last commit, cut at its quietest window when it reaches max_segment_s.
Positions are in samples at 16 kHz (``start``/``end``) and windows of 32 ms from the stream's
first sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sensevoice_core.audio import SAMPLE_RATE
from sensevoice_core.segmentation import (
    WINDOW,
    Region,
    cut_point,
    max_piece_windows,
    meeting_point,
    padded_region,
    windows_in,
)
from sensevoice_core.stream_types import SpeechStarted, StreamConfig

EMPTY_BUFFER = "the audio buffer is empty (no audio since the last turn, commit or clear)"
ROUNDING_MARGIN = 16  # samples: a region's edge is rounded to the millisecond (8 samples)


@dataclass(frozen=True)
class ClosedTurn:
    """A turn to decode: samples [start, end) of the stream, timed by region."""

    item: int
    start: int
    end: int
    region: Region
    stopped: bool  # the VAD ended it (SpeechStopped), rather than a commit
    heard: bool = True  # False: a manual commit of audio the VAD heard no speech in


class _Samples:
    """The stream's audio from sample ``start`` on, in a buffer that grows by doubling, so
    appending a chunk costs its own length, not the buffer's."""

    def __init__(self, start: int = 0, samples: np.ndarray | None = None):
        self.data = np.zeros(0, np.float32) if samples is None else samples.astype(np.float32)
        self.head, self.used, self.start = 0, len(self.data), start

    def append(self, chunk: np.ndarray) -> None:
        if self.head + self.used + len(chunk) > len(self.data):
            grown = np.zeros(max(2 * (self.used + len(chunk)), SAMPLE_RATE), np.float32)
            grown[:self.used] = self.data[self.head:self.head + self.used]
            self.data, self.head = grown, 0
        self.data[self.head + self.used:self.head + self.used + len(chunk)] = chunk
        self.used += len(chunk)

    def drop_before(self, index: int) -> None:
        count = min(max(0, index - self.start), self.used)
        self.head, self.used, self.start = self.head + count, self.used - count, self.start + count

    def view(self, start: int, end: int) -> np.ndarray:
        first = max(start, self.start) - self.start
        return self.data[self.head + first:self.head + max(first, end - self.start)]


class TurnTracker:
    def __init__(self, config: StreamConfig):
        self.config = config
        self.samples = 0  # received, at 16 kHz
        self.item = 0  # the last turn numbered
        self._audio = _Samples()
        self._probabilities: list[float] = []
        self._windows = 0  # probabilities received
        self._first_window = 0  # window of self._probabilities[0]
        self._partial_mark = 0  # sample the turn had reached at its last partial
        # Turn detection: the region being heard (speech windows run_start..run_end), the
        # window its open turn (open_item) begins at, where that turn begins, and the end of
        # the previous turn, before which no turn may begin.
        self._run_start: int | None = None
        self._run_end = 0
        self._piece_start = 0
        self._open_item: int | None = None
        self._turn_start = 0
        self._turn_begin_s = 0.0
        self._floor_s = 0.0
        self._pending: list[ClosedTurn] = []  # closed, waiting for their padding's audio
        self._manual_start = 0  # without turn detection: the uncommitted audio's first sample

    # -- what the engine asks ------------------------------------------------------------

    @property
    def held(self) -> int:
        return self._audio.used + len(self._probabilities)

    @property
    def between_turns(self) -> bool:
        """No turn open nor waiting for its Final; without turn detection, no speech in the
        uncommitted audio."""
        if self._pending:
            return False
        if self.config.turn_detection:
            return self._open_item is None
        return not self._manual_heard()

    def audio(self, start: int, end: int) -> np.ndarray:
        return self._audio.view(start, end).copy()

    def append(self, audio: np.ndarray) -> None:
        self._audio.append(audio)
        self.samples += len(audio)

    def reconfigure(self, config: StreamConfig) -> None:
        if config.turn_detection != self.config.turn_detection:
            if config.turn_detection:  # the uncommitted audio may pad the next turn
                self._floor_s = round(self._manual_start / SAMPLE_RATE, 3)
            elif self._open_item is not None:  # the open turn goes on until committed
                self._manual_start, self.item = self._turn_start, self._open_item - 1
            else:
                self._manual_start = self._candidate_start()
            self._run_start, self._open_item = None, None
            self._partial_mark = self._manual_start
        self.config = config

    def windows(self, probabilities: np.ndarray) -> list[ClosedTurn | SpeechStarted]:
        """The VAD's next windows: the turns they open and close, in order."""
        out: list[ClosedTurn | SpeechStarted] = []
        for probability in probabilities.tolist():
            index = self._windows
            self._probabilities.append(probability)
            self._windows += 1
            out += (self._detect(index, probability) if self.config.turn_detection
                    else self._manual(index))
            out += self._ready(force=False)
        return out

    def commit(self) -> tuple[list[ClosedTurn | SpeechStarted], str | None]:
        """The turns the commit closes (and closed ones it no longer waits for), and why
        the commit closed no turn of its own (None: it did)."""
        out: list[ClosedTurn | SpeechStarted] = list(self._ready(force=True))
        if not self.config.turn_detection:
            if self.samples == self._manual_start:
                return out, EMPTY_BUFFER
            heard = self._manual_heard()
            out.append(self._manual_turn(self.samples, heard))
            return out, None
        if self._open_item is None:
            return out, (EMPTY_BUFFER if self.samples <= round(self._floor_s * SAMPLE_RATE)
                         else "no turn is open: the VAD heard no speech since the last turn")
        out += self._cut_to_fit(self._run_end)
        end_s = round(self.samples / SAMPLE_RATE, 3)
        out.append(ClosedTurn(self._open_item, self._turn_start, self.samples,
                              Region(self._turn_begin_s, end_s), stopped=False))
        self._end_turn(end_s)
        return out, None

    def clear(self) -> None:
        self._pending.clear()
        self._end_turn(round(self.samples / SAMPLE_RATE, 3))
        self._manual_start = self._partial_mark = self.samples

    def finish(self) -> list[ClosedTurn | SpeechStarted]:
        """The stream ended: the open turn (if the VAD heard speech in it) is closed."""
        duration = self.samples / SAMPLE_RATE
        if not self.config.turn_detection:
            return self.commit()[0] if self._manual_heard() else self._ready(force=True)
        out: list[ClosedTurn | SpeechStarted] = []
        if self._open_item is not None:
            out += self._close_region(duration)
        return out + self._ready(force=True)

    def partial_due(self) -> tuple[int, int, int] | None:
        """(item, start, end) of the open turn when partial_s of audio came since the last
        partial and the VAD hears speech in the newest window. In a pause a partial would
        add no words, and the turn's Final may be due soon: it should not wait behind one."""
        if not self._probabilities or self._probabilities[-1] < self._threshold():
            return None
        if self.config.turn_detection:
            if self._open_item is None:
                return None
            item, start = self._open_item, self._turn_start
        elif self._manual_heard():
            item, start = self.item + 1, self._manual_start
        else:
            return None
        if self.samples - max(self._partial_mark, start) < self.config.partial_s * SAMPLE_RATE:
            return None
        self._partial_mark = self.samples
        return item, start, self.samples

    def trim(self) -> None:
        """Forget the audio and probabilities no turn can need any more."""
        if not self.config.turn_detection:
            keep, first_window = self._manual_start, self._manual_start // WINDOW
        elif self._open_item is not None:
            keep, first_window = self._turn_start, self._piece_start
        else:
            keep = self._candidate_start()
            first_window = self._windows if self._run_start is None else self._run_start
        if self._pending:
            keep = min(keep, self._pending[0].start)
        self._audio.drop_before(keep)
        drop = min(max(0, first_window - self._first_window), len(self._probabilities))
        del self._probabilities[:drop]
        self._first_window += drop

    # -- turn detection ------------------------------------------------------------------

    def _threshold(self) -> float:
        """The threshold as the batch path compares it: rounded to float32, like the
        probabilities (numpy compares a float32 array with the float32 of a Python float)."""
        return float(np.float32(self.config.transcribe.vad.threshold))

    def _detect(self, index: int, probability: float) -> list[ClosedTurn | SpeechStarted]:
        vad = self.config.transcribe.vad
        if probability >= self._threshold():
            if self._run_start is None:
                self._run_start = self._piece_start = index
            self._run_end = index + 1
            out: list[ClosedTurn | SpeechStarted] = []
            if self._open_item is None and \
                    self._run_end - self._run_start >= windows_in(vad.min_speech_s):
                out.append(self._open())
            max_len = max_piece_windows(vad)
            while self._open_item is not None and self._run_end - self._piece_start > 2 * max_len:
                # Cut now: past twice the longest piece, where the region ends cannot move it.
                out += self._cut(self._cut_point(self._run_end, max_len))
            return out
        if self._run_start is not None and \
                index + 1 - self._run_end >= windows_in(vad.min_silence_s):
            if self._open_item is not None:
                return self._close_region(math.inf)
            self._run_start = None  # too short to be speech
        return []

    def _open(self) -> SpeechStarted:
        assert self._run_start is not None
        vad = self.config.transcribe.vad
        begin = padded_region(self._run_start, self._run_end, vad, math.inf).start
        # Not before the previous turn's end, nor before the audio still held.
        begin = max(begin, self._floor_s, math.ceil(self._audio.start / 16) / 1000)
        self.item += 1
        self._open_item = self.item
        self._turn_begin_s, self._turn_start = begin, round(begin * SAMPLE_RATE)
        self._partial_mark = self._turn_start
        return SpeechStarted(item=self.item, start_s=begin)

    def _cut_point(self, end: int, max_len: int) -> int:
        offset = self._first_window
        return offset + cut_point(np.asarray(self._probabilities, np.float32),
                                  self._piece_start - offset, end - offset, max_len)

    def _cut(self, cut: int) -> list[ClosedTurn | SpeechStarted]:
        """The open turn ends at window cut, where the next one begins at once."""
        assert self._open_item is not None
        vad = self.config.transcribe.vad
        end_s = padded_region(self._piece_start, cut, vad, math.inf).end
        begin = padded_region(cut, cut + 1, vad, math.inf).start
        if begin < end_s:
            end_s = begin = meeting_point(end_s, begin)
        self._pending.append(ClosedTurn(self._open_item, self._turn_start,
                                        round(end_s * SAMPLE_RATE),
                                        Region(self._turn_begin_s, end_s), stopped=True))
        out: list[ClosedTurn | SpeechStarted] = list(self._ready(force=False))
        self._piece_start = cut
        self.item += 1
        self._open_item = self.item
        self._turn_begin_s, self._turn_start = begin, round(begin * SAMPLE_RATE)
        self._partial_mark = self._turn_start
        out.append(SpeechStarted(item=self.item, start_s=begin))
        return out

    def _cut_to_fit(self, end: int) -> list[ClosedTurn | SpeechStarted]:
        """Cuts the open turn as the batch path cuts a region ending at window end."""
        max_len = max_piece_windows(self.config.transcribe.vad)
        out: list[ClosedTurn | SpeechStarted] = []
        while end - self._piece_start > max_len:
            out += self._cut(self._cut_point(end, max_len))
        return out

    def _close_region(self, duration: float) -> list[ClosedTurn | SpeechStarted]:
        assert self._open_item is not None
        out = self._cut_to_fit(self._run_end)
        end_s = padded_region(self._piece_start, self._run_end, self.config.transcribe.vad,
                              duration).end
        self._pending.append(ClosedTurn(self._open_item, self._turn_start,
                                        round(end_s * SAMPLE_RATE),
                                        Region(self._turn_begin_s, end_s), stopped=True))
        self._end_turn(end_s)
        return out + self._ready(force=False)

    def _end_turn(self, end_s: float) -> None:
        self._floor_s = max(self._floor_s, end_s)
        self._open_item = self._run_start = None

    def _ready(self, force: bool) -> list[ClosedTurn]:
        """Closed turns whose audio has all arrived (force: the stream ends or commits, what
        has arrived is all there is), in order."""
        out = []
        while self._pending and (force or self._pending[0].end <= self._windows * WINDOW):
            turn = self._pending.pop(0)
            if turn.end > self.samples:
                end_s = round(self.samples / SAMPLE_RATE, 3)
                turn = ClosedTurn(turn.item, turn.start, self.samples,
                                  Region(turn.region.start, end_s), turn.stopped)
            out.append(turn)
        return out

    def _candidate_start(self) -> int:
        """The earliest sample a turn not yet open may begin at (its padding included)."""
        vad = self.config.transcribe.vad
        first = self._windows if self._run_start is None else self._run_start
        start = round(padded_region(first, first + 1, vad, math.inf).start * SAMPLE_RATE)
        return max(start - ROUNDING_MARGIN, round(self._floor_s * SAMPLE_RATE), 0)

    # -- manual turns --------------------------------------------------------------------

    def _manual(self, index: int) -> list[ClosedTurn | SpeechStarted]:
        """A manual turn reaching max_segment_s is cut at its quietest window."""
        vad = self.config.transcribe.vad
        if (index + 1) * WINDOW - self._manual_start < vad.max_segment_s * SAMPLE_RATE:
            return []
        first = math.ceil(self._manual_start / WINDOW)
        low = first + max(1, (index + 1 - first) // 2)
        window = self._probabilities[low - self._first_window:index + 1 - self._first_window]
        cut = low + int(np.argmin(np.asarray(window, np.float32)))
        heard = self._manual_heard(cut)
        turn = self._manual_turn(cut * WINDOW)
        return [turn] if heard else []

    def _manual_turn(self, end: int, heard: bool = True) -> ClosedTurn:
        self.item += 1
        turn = ClosedTurn(self.item, self._manual_start, end,
                          Region(round(self._manual_start / SAMPLE_RATE, 3),
                                 round(end / SAMPLE_RATE, 3)), stopped=False, heard=heard)
        self._manual_start = self._partial_mark = end
        return turn

    def _manual_heard(self, before: int | None = None) -> bool:
        """The VAD heard speech in the uncommitted audio (up to window ``before``)."""
        first = math.ceil(self._manual_start / WINDOW) - self._first_window
        last = len(self._probabilities) if before is None else before - self._first_window
        threshold = self._threshold()
        return any(p >= threshold for p in self._probabilities[max(0, first):last])

    # -- snapshot ------------------------------------------------------------------------

    COUNTERS = ("samples", "item", "windows", "first_window", "partial_mark", "run_start",
                "run_end", "piece_start", "floor_s", "manual_start", "audio_start",
                "turn_detection")

    def state(self) -> tuple[dict[str, int | float | bool | None], dict[str, np.ndarray]]:
        assert self.between_turns
        counters = {"samples": self.samples, "item": self.item, "windows": self._windows,
                    "first_window": self._first_window, "partial_mark": self._partial_mark,
                    "run_start": self._run_start, "run_end": self._run_end,
                    "piece_start": self._piece_start, "floor_s": self._floor_s,
                    "manual_start": self._manual_start, "audio_start": self._audio.start,
                    "turn_detection": self.config.turn_detection}
        arrays = {"audio": self._audio.view(self._audio.start, self.samples).copy(),
                  "probabilities": np.asarray(self._probabilities, np.float32)}
        return counters, arrays

    @classmethod
    def from_state(cls, config: StreamConfig, counters: dict[str, int | float | bool | None],
                   arrays: dict[str, np.ndarray]) -> TurnTracker:
        """A tracker going on from state(), then reconfigured to config (ValueError naming
        what does not fit)."""
        values = {name: counters[name] for name in cls.COUNTERS}
        for name, value in values.items():
            expected = (bool if name == "turn_detection" else float if name == "floor_s"
                        else int)
            if name == "run_start" and value is None:
                continue
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)) \
                    or (expected is not bool and value < 0):
                raise ValueError(f"stream state is damaged: {name}={value!r}")
        audio, probabilities = arrays["audio"], arrays["probabilities"]
        run_start = values["run_start"]
        if audio.ndim != 1 or values["audio_start"] + len(audio) != values["samples"] \
                or probabilities.ndim != 1 \
                or values["first_window"] + len(probabilities) != values["windows"] \
                or values["windows"] * WINDOW > values["samples"] \
                or max(values["partial_mark"], values["manual_start"]) > values["samples"] \
                or (run_start is not None and not values["first_window"] <= run_start
                    <= values["run_end"] <= values["windows"]):
            raise ValueError("stream state is damaged: its audio, probabilities and counters "
                             "do not match")
        tracker = cls(StreamConfig(config.transcribe, config.sample_rate,
                                   bool(values["turn_detection"]), config.partial_s))
        tracker.samples, tracker.item = values["samples"], values["item"]
        tracker._windows, tracker._first_window = values["windows"], values["first_window"]
        tracker._partial_mark = values["partial_mark"]
        tracker._run_start, tracker._run_end = values["run_start"], values["run_end"]
        tracker._piece_start, tracker._floor_s = values["piece_start"], values["floor_s"]
        tracker._manual_start = values["manual_start"]
        tracker._audio = _Samples(values["audio_start"], audio)
        tracker._probabilities = probabilities.tolist()
        tracker.reconfigure(config)
        return tracker
