"""Live transcription's shared vocabulary: how a stream is configured (``StreamOptions`` as a
client asks, ``StreamConfig`` as the engine runs it) and what it emits (``StreamEvent``).

The streaming engine (streaming.py), the ZeroMQ protocol, the stream client and the Realtime
WebSocket all use these types, so an event or option is defined once. No torch here.

Times are seconds of stream audio: 0.0 is the first sample the stream received, counted at
16 kHz after resampling, so they do not depend on how the audio was chunked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from sensevoice_core.options import TranscribeOptions
from sensevoice_core.result import Segment
from sensevoice_core.segmentation import Bounds

# How the bytes of a stream's audio are encoded: 16-bit or float32 little-endian PCM, or
# G.711 mu-law / A-law (8 kHz telephone audio, one byte a sample).
StreamEncoding = Literal["pcm_s16le", "pcm_f32le", "pcmu", "pcma"]
BYTES_PER_SAMPLE: dict[str, int] = {"pcm_s16le": 2, "pcm_f32le": 4, "pcmu": 1, "pcma": 1}
G711_RATE = 8000  # pcmu and pcma are always 8 kHz
STREAM_RATE_BOUNDS = Bounds(8000.0, 384000.0)  # samples per second a stream may send
PARTIAL_MS_BOUNDS = Bounds(0.0, 10000.0)  # 0: no partial results


class StreamOptions(BaseModel):
    """What a client asks of one stream (None: the service's SENSEVOICE_* setting)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    language: str = "auto"
    use_itn: bool = False
    word_timestamps: bool = True  # partials and finals carry word times
    languages: list[str] | None = Field(None, max_length=16)  # None: SENSEVOICE_LANGUAGES
    encoding: StreamEncoding = "pcm_s16le"
    sample_rate: int = Field(16000, ge=8000, le=384000)
    # True: the VAD ends a turn after min_silence_s of silence (OpenAI's "server_vad");
    # False: a turn ends only when the client commits it (or at SENSEVOICE_MAX_SEGMENT_S).
    turn_detection: bool = True
    vad_threshold: float | None = Field(None, ge=0.0, le=1.0)
    min_silence_s: float | None = Field(None, ge=0.0, le=10.0)  # silence that ends a turn
    speech_pad_s: float | None = Field(None, ge=0.0, le=5.0)  # audio kept before speech
    partial_ms: int | None = Field(None, ge=0, le=10000)  # None: SENSEVOICE_STREAM_PARTIAL_MS


@dataclass(frozen=True)
class StreamConfig:
    """How the engine runs one stream: resolved from StreamOptions and the settings
    (Settings.stream_config). transcribe.vad carries the turn detection's numbers and
    max_segment_s, the longest a turn may grow before it is closed."""

    transcribe: TranscribeOptions
    sample_rate: int = 16000  # of the float samples fed to the engine
    turn_detection: bool = True
    partial_s: float = 0.5  # re-decode the open turn after this much new audio; 0: never

    def __post_init__(self) -> None:
        STREAM_RATE_BOUNDS.check("sample_rate", self.sample_rate)
        PARTIAL_MS_BOUNDS.check("partial_s * 1000", self.partial_s * 1000)


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class SpeechStarted(_Event):
    """The VAD heard speech: turn ``item`` is open from start_s (its padding included)."""

    type: Literal["speech_started"] = "speech_started"
    item: int  # turns are numbered 1, 2, ... in the order they open
    start_s: float


class SpeechStopped(_Event):
    """The VAD heard min_silence_s of silence (or the turn reached its longest): it ends at
    end_s (its padding included)."""

    type: Literal["speech_stopped"] = "speech_stopped"
    item: int
    end_s: float


class Committed(_Event):
    """Turn ``item``'s audio is closed (speech stopped, the client committed, or the turn
    reached max_segment_s) and is being decoded; its Final follows."""

    type: Literal["committed"] = "committed"
    item: int
    start_s: float
    end_s: float


class Partial(_Event):
    """The open turn's audio so far, decoded again: may revise earlier partials."""

    type: Literal["partial"] = "partial"
    item: int
    segment: Segment  # timed in stream time, words when word_timestamps


class Final(_Event):
    """Turn ``item`` decoded whole: the same text the batch path gives for its audio. A
    turn the model heard as no speech has an empty text (language "nospeech")."""

    type: Literal["final"] = "final"
    item: int
    segment: Segment
    fingerprint: str | None = None  # the model that decoded it (set by the worker)


class CommitEmpty(_Event):
    """The client's commit found nothing to commit (no audio since the last turn; with
    turn_detection, no turn open nor a closed one still to send): no Committed follows. Each
    commit gets an answer, this or Committed, so a client waiting for one does not hang."""

    type: Literal["commit_empty"] = "commit_empty"
    reason: str  # a sentence: what was missing


class Cleared(_Event):
    """The client's clear: the open turn and the audio not yet committed were dropped."""

    type: Literal["cleared"] = "cleared"


class StreamFailed(_Event):
    """The stream ended on an error (worker lost, idle too long, too long, bad audio...);
    no event follows."""

    type: Literal["failed"] = "failed"
    code: str  # a protocol ErrorCode
    message: str


class StreamClosed(_Event):
    """The stream ended as asked (close): every Final it owed was sent before this."""

    type: Literal["closed"] = "closed"


StreamEvent = Annotated[
    Union[SpeechStarted, SpeechStopped, Committed, CommitEmpty, Partial, Final, Cleared,
          StreamFailed, StreamClosed],
    Field(discriminator="type")]
