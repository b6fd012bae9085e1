"""Live transcription of a stream of audio chunks.

    live = LiveTranscriber(model, settings.stream_config(StreamOptions()))
    for chunk in chunks:                 # float32 mono at config.sample_rate, any size
        for event in live.feed(chunk):   # SpeechStarted, Partial, SpeechStopped, Committed, Final
            ...
    events = live.finish()               # end of audio: the open turn is decoded

An online Silero VAD (the same weights and windows as the batch path) opens a turn when it
hears speech and closes it after min_silence_s of silence (turn_detection) or on commit();
a turn reaching max_segment_s is closed at its quietest point, like the batch path splits.
While a turn is open, it is decoded again after every partial_s of new audio (Partial); a
closed turn is decoded once (Final), exactly as the batch path decodes the same samples.
Everything depends on the audio, never on how it was chunked, except how many partials.

With turn_detection, the turns of a whole stream are the regions ``segmentation.speech_regions``
finds in it, with one exception: where the padding of two turns would overlap (speech_pad_s
more than half of min_silence_s), the later one starts where the earlier one ended instead of
both meeting halfway, which would hold the earlier one's Final until the later one is sure.
A region longer than max_segment_s is cut as the batch path cuts it, which may need up to twice
max_segment_s of it: memory stays O(max_segment_s) however long the stream.

Without turn detection, a turn is the audio since the last commit; one reaching max_segment_s
is cut at its quietest window, and the part before the cut is decoded only if the VAD heard
speech in it (uncommitted silence gives no events, and partials wait for speech too). A
commit of audio the VAD heard no speech in gives an empty Final (language "nospeech") without
asking the model, which would invent words for silence; a commit with nothing to commit gives
CommitEmpty.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from sensevoice_core.audio import MIN_SAMPLES, SAMPLE_RATE
from sensevoice_core.live_audio import StreamResampler
from sensevoice_core.long_audio import placed_in
from sensevoice_core.result import Segment
from sensevoice_core.segmentation import WINDOW, Region
from sensevoice_core.stream_state import pack, unpack
from sensevoice_core.stream_turns import ClosedTurn, TurnTracker
from sensevoice_core.stream_types import (
    Cleared,
    CommitEmpty,
    Committed,
    Final,
    Partial,
    SpeechStarted,
    SpeechStopped,
    StreamConfig,
    StreamEvent,
)
from sensevoice_core.vad import SpeechProbabilities
from sensevoice_core.vocab import Language

if TYPE_CHECKING:
    from sensevoice_core.pipeline import SenseVoice

NOSPEECH = Language.NOSPEECH.value
BLOCK_S = 10  # a long feed goes through in blocks of this many seconds, so memory stays flat


class LiveTranscriber:
    def __init__(self, model: SenseVoice, config: StreamConfig):
        self._model = model
        self._config = config
        self._resampler = StreamResampler(config.sample_rate)
        self._vad = SpeechProbabilities(model.vad)
        self._turns = TurnTracker(config)
        self._finished = False

    @property
    def config(self) -> StreamConfig:
        return self._config

    def reconfigure(self, config: StreamConfig) -> None:
        """New options from the next audio on; a new sample_rate only before any audio
        (ValueError otherwise)."""
        if config.sample_rate != self._config.sample_rate:
            if self._resampler.received or self._turns.samples:
                raise ValueError(f"sample_rate={config.sample_rate}: a stream's sample rate "
                                 f"cannot change once audio arrived (it is "
                                 f"{self._config.sample_rate})")
            self._resampler = StreamResampler(config.sample_rate)
        self._config = config
        self._turns.reconfigure(config)

    @property
    def audio_s(self) -> float:
        """Seconds of audio received (at 16 kHz after resampling)."""
        return self._turns.samples / SAMPLE_RATE

    @property
    def between_turns(self) -> bool:
        """No turn is open: the state can be snapshot() and moved to another model."""
        return self._turns.between_turns

    @property
    def held_samples(self) -> int:
        """Audio samples (16 kHz) and probabilities the stream holds now: bounded by the
        longest turn, however long the stream."""
        return self._turns.held

    def feed(self, samples: np.ndarray) -> list[StreamEvent]:
        """Audio at config.sample_rate (float32 mono, any length, may be empty)."""
        self._check_open("feed")
        array = _checked(samples)
        events: list[StreamEvent] = []
        block = self._config.sample_rate * BLOCK_S
        for first in range(0, len(array), block):
            events += self._take(self._resampler.feed(array[first:first + block]))
        if self._config.partial_s > 0:
            events += self._partial()
        return events

    def commit(self) -> list[StreamEvent]:
        """Close the open turn now (or, with turn_detection off, the audio since the last
        turn) and decode it: Committed, Final; a Final with empty text (language "nospeech")
        without a decode where the VAD heard no speech in it. Nothing to commit: CommitEmpty.
        """
        self._check_open("commit")
        turns, empty = self._turns.commit()
        # Closed turns waiting for their padding's audio answer the commit too, so the
        # worker's own commit before a move (only when not between turns) never answers this.
        if not turns and empty is not None:
            return [CommitEmpty(reason=empty)]
        return self._events(turns)

    def clear(self) -> list[StreamEvent]:
        """Drop the open turn and the audio not yet committed: [Cleared]."""
        self._check_open("clear")
        self._turns.clear()
        self._turns.trim()
        return [Cleared()]

    def finish(self) -> list[StreamEvent]:
        """End of audio: the VAD's last window, then the open turn is closed and decoded."""
        self._check_open("finish")
        events = self._take(self._resampler.flush())
        last = self._vad.feed(torch.zeros(0), final=True)
        self._finished = True
        return events + self._events(self._turns.windows(last) + self._turns.finish())

    def snapshot(self) -> bytes:
        """The stream's state between turns (ValueError inside a turn): VAD state, the
        audio kept for the next turn's padding, counters. No pickle."""
        self._check_open("snapshot")
        if not self.between_turns:
            raise ValueError("snapshot: a turn is open; take it between turns")
        counters, arrays = self._turns.state()
        resampler_counters, resampler_arrays = self._resampler.state()
        counters |= {f"resampler.{k}": v for k, v in resampler_counters.items()}
        arrays |= {f"resampler.{k}": v for k, v in resampler_arrays.items()}
        lstm = self._vad.state
        arrays |= {"vad.pending": self._vad.pending.numpy().astype(np.float32),
                   "vad.context": self._vad.context.numpy().astype(np.float32)}
        if lstm is not None:
            arrays |= {"vad.h": lstm[0].numpy(), "vad.c": lstm[1].numpy()}
        return pack(counters, arrays)

    @classmethod
    def restore(cls, model: SenseVoice, config: StreamConfig, state: bytes) -> LiveTranscriber:
        """Go on from a snapshot(), on this model; ValueError naming the problem for state
        that is not a snapshot."""
        counters, arrays = unpack(state)
        try:
            rate = counters["resampler.rate"]
            if rate != config.sample_rate:
                raise ValueError(f"stream state is at sample_rate={rate}, the config asks for "
                                 f"{config.sample_rate}")
            live = cls(model, config)
            live._resampler = StreamResampler.from_state(
                {k.removeprefix("resampler."): v for k, v in counters.items()
                 if k.startswith("resampler.")},
                {k.removeprefix("resampler."): v for k, v in arrays.items()
                 if k.startswith("resampler.")})
            live._vad.pending = _tensor(arrays["vad.pending"], None)
            live._vad.context = _tensor(arrays["vad.context"], (64,))
            if "vad.h" in arrays:
                live._vad.state = (_tensor(arrays["vad.h"], (1, 1, 128)),
                                   _tensor(arrays["vad.c"], (1, 1, 128)))
            live._turns = TurnTracker.from_state(config, counters, arrays)
        except KeyError as e:
            raise ValueError(f"stream state is damaged: {e.args[0]!r} is missing") from None
        except TypeError as e:
            raise ValueError(f"stream state is damaged: {e}") from None
        return live

    def _check_open(self, action: str) -> None:
        if self._finished:
            raise ValueError(f"{action}: the stream has finished")

    def _take(self, audio: np.ndarray) -> list[StreamEvent]:
        """16 kHz audio through the VAD and the turn tracker."""
        if not len(audio):
            return []
        self._turns.append(audio)
        probabilities = self._vad.feed(torch.from_numpy(audio))
        return self._events(self._turns.windows(probabilities))

    def _partial(self) -> list[StreamEvent]:
        due = self._turns.partial_due()
        if due is None:
            return []
        item, start, end = due
        return [Partial(item=item, segment=self._decode(start, end))]

    def _events(self, closed: list[ClosedTurn | SpeechStarted]) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for turn in closed:
            if isinstance(turn, SpeechStarted):
                events.append(turn)
                continue
            start_s, end_s = turn.region.start, turn.region.end
            if turn.stopped:
                events.append(SpeechStopped(item=turn.item, end_s=end_s))
            events.append(Committed(item=turn.item, start_s=start_s, end_s=end_s))
            events.append(Final(item=turn.item, segment=self._decode_turn(turn)))
        self._turns.trim()
        return events

    def _decode_turn(self, turn: ClosedTurn) -> Segment:
        if not turn.heard:  # the model would be asked to find words in silence
            return Segment(start=turn.region.start, end=turn.region.end, text="", raw="",
                           language=NOSPEECH, emotion=None, event=None)
        return self._decode(turn.start, turn.end, turn.region)

    def _decode(self, start: int, end: int, region: Region | None = None) -> Segment:
        """Samples [start, end) of the stream decoded as the batch path decodes a piece, in
        stream time."""
        region = region or Region(round(start / SAMPLE_RATE, 3), round(end / SAMPLE_RATE, 3))
        samples = self._turns.audio(start, end)
        if len(samples) < MIN_SAMPLES:
            return Segment(start=region.start, end=region.end, text="", raw="", language=None,
                           emotion=None, event=None)
        segment = self._model.decode([torch.from_numpy(samples)], self._config.transcribe)[0]
        return placed_in(segment, region)


def _checked(samples: np.ndarray) -> np.ndarray:
    if not isinstance(samples, np.ndarray):
        raise TypeError(f"samples: expected a numpy array, found {type(samples).__name__}")
    if samples.ndim != 1:
        raise ValueError(f"samples: expected a 1-D array (mono), found {samples.ndim}-D "
                         f"(shape {' x '.join(map(str, samples.shape))})")
    if samples.dtype.kind != "f":
        raise ValueError(f"samples: expected float samples in [-1, 1], found dtype "
                         f"{samples.dtype}")
    if not np.isfinite(samples).all():
        raise ValueError("samples: the audio contains NaN or infinite samples")
    return samples.astype(np.float32, copy=False)


def _tensor(array: np.ndarray, shape: tuple[int, ...] | None) -> torch.Tensor:
    if shape is not None and array.shape != shape:
        raise ValueError(f"stream state is damaged: VAD state of shape {array.shape}, "
                         f"expected {shape}")
    if shape is None and (array.ndim != 1 or len(array) >= WINDOW):
        raise ValueError(f"stream state is damaged: VAD pending audio of shape {array.shape}")
    return torch.from_numpy(array.astype(np.float32))

