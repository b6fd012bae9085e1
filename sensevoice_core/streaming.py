"""Live transcription of a stream of audio chunks (CONTRACT STUB: being implemented).

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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from sensevoice_core.stream_types import StreamConfig, StreamEvent

if TYPE_CHECKING:
    from sensevoice_core.pipeline import SenseVoice


class LiveTranscriber:
    def __init__(self, model: SenseVoice, config: StreamConfig):
        raise NotImplementedError

    @property
    def config(self) -> StreamConfig:
        raise NotImplementedError

    def reconfigure(self, config: StreamConfig) -> None:
        """New options from the next audio on; a new sample_rate only before any audio
        (ValueError otherwise)."""
        raise NotImplementedError

    @property
    def audio_s(self) -> float:
        """Seconds of audio received (at 16 kHz after resampling)."""
        raise NotImplementedError

    @property
    def between_turns(self) -> bool:
        """No turn is open: the state can be snapshot() and moved to another model."""
        raise NotImplementedError

    def feed(self, samples: np.ndarray) -> list[StreamEvent]:
        """Audio at config.sample_rate (float32 mono, any length, may be empty)."""
        raise NotImplementedError

    def commit(self) -> list[StreamEvent]:
        """Close the open turn now (or, with no turn open and turn_detection off, the audio
        since the last turn) and decode it: Committed, Final. Nothing to commit: []."""
        raise NotImplementedError

    def clear(self) -> list[StreamEvent]:
        """Drop the open turn and the audio not yet committed: [Cleared]."""
        raise NotImplementedError

    def finish(self) -> list[StreamEvent]:
        """End of audio: the VAD's last window, then the open turn is closed and decoded."""
        raise NotImplementedError

    def snapshot(self) -> bytes:
        """The stream's state between turns (ValueError inside a turn): VAD state, the
        audio kept for the next turn's padding, counters. No pickle."""
        raise NotImplementedError

    @classmethod
    def restore(cls, model: SenseVoice, config: StreamConfig, state: bytes) -> LiveTranscriber:
        """Go on from a snapshot(), on this model; ValueError naming the problem for state
        that is not a snapshot."""
        raise NotImplementedError
