"""What a transcription returns: one ``Result`` of timed ``Segment``s.

The same two types flow from the model (``SenseVoice.transcribe``) through the ZeroMQ protocol
(``TranscribeReply`` is a ``Result`` plus where it ran) to the UI, the HTTP API and both CLIs,
so a new field is added here once. Pydantic (no torch): the supervisor and the UI import it.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

from sensevoice_core.vocab import EMOTION_EMOJI, EVENT_EMOJI, UNSPACED_LANGUAGES


class Token(BaseModel):
    """One emitted text token, placed in time by CTC forced alignment (alignment.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    id: int
    piece: str  # the sentencepiece piece ("▁he"); "▁" marks the start of a word
    start: float  # seconds from the start of the audio (VAD offsets applied)
    end: float
    probability: float  # the model's probability of this token, the highest over its frames


class Word(BaseModel):
    """Tokens merged into a word: a "▁" piece starts one, each CJK character is one, and
    punctuation joins the word before it without a time of its own."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    word: str  # as written, no leading space ("hello," with its punctuation)
    start: float
    end: float
    probability: float  # the mean probability of its tokens


class Segment(BaseModel):
    """One stretch of speech, decoded in one pass of the model."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    start: float  # seconds from the start of the audio
    end: float
    text: str  # the transcript with every <|tag|> removed
    raw: str  # the tagged string exactly as the model emitted it
    language: str | None  # the language tag the model emitted ("en", "zh", ...), None if none
    emotion: str | None  # the emotion tag ("NEUTRAL", "HAPPY", ...)
    event: str | None  # the audio event tag ("Speech", "BGM", ...)
    token_ids: tuple[int, ...] = ()  # after CTC collapse and blank removal
    # Confidences, from the same forward pass (None only where there was nothing to measure):
    # Mean over the emitted text tokens (the 4 prompt tags left out) of each token's
    # log-probability on its best frame of its greedy run; None without text tokens.
    avg_logprob: float | None = None
    no_speech_prob: float | None = None  # P(<|nospeech|>) at the language query frame
    # With TranscribeOptions.word_timestamps only (empty otherwise):
    words: tuple[Word, ...] = ()
    tokens: tuple[Token, ...] = ()  # the text tokens (not the 4 tags), timed

    @property
    def compression_ratio(self) -> float | None:
        """Whisper's repetition measure: UTF-8 bytes of the text over its zlib-compressed
        size (high for looping output); None for an empty text."""
        return compression_ratio(self.text)


class Result(BaseModel):
    """A whole input: its segments in time order (none when there is no speech), and the
    text, tags and token ids of all of them together."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    text: str  # the segments' texts joined (no space between neighbours in unspaced scripts)
    raw: str  # the segments' raw strings joined
    language: str | None  # the language covering the most speech time
    emotion: str | None  # the emotion covering the most speech time
    event: str | None  # the event covering the most speech time
    text_norm: str  # "withitn" or "woitn": the text normalisation asked for
    duration_s: float  # length of the input audio
    token_ids: tuple[int, ...]  # every segment's ids in order
    segments: tuple[Segment, ...] = ()

    @classmethod
    def from_segments(cls, segments: Sequence[Segment], duration_s: float,
                      text_norm: str) -> Result:
        return cls(text=join_text(segments), raw="".join(s.raw for s in segments),
                   language=dominant(segments, "language"),
                   emotion=dominant(segments, "emotion"), event=dominant(segments, "event"),
                   text_norm=text_norm, duration_s=duration_s,
                   token_ids=tuple(i for s in segments for i in s.token_ids),
                   segments=tuple(segments))

    @property
    def words(self) -> tuple[Word, ...]:
        """Every segment's words, in time order (empty without word timestamps)."""
        return tuple(word for segment in self.segments for word in segment.words)

    @property
    def rich_text(self) -> str:
        """The text with event and emotion shown as emoji, as SenseVoice's demos show it."""
        event = EVENT_EMOJI.get(self.event or "", "")
        emotion = EMOTION_EMOJI.get(self.emotion or "", "")
        return f"{event}{self.text}{emotion}"

    def result(self) -> Result:
        """Just the Result fields (a TranscribeReply also says where it ran)."""
        return Result(**{name: getattr(self, name) for name in Result.model_fields})


def compression_ratio(text: str) -> float | None:
    data = text.encode("utf-8")
    return round(len(data) / len(zlib.compress(data)), 3) if data else None


def join_text(segments: Sequence[Segment]) -> str:
    text = ""
    previous: Segment | None = None
    for segment in (s for s in segments if s.text):
        unspaced = (previous is not None and previous.language in UNSPACED_LANGUAGES
                    and segment.language in UNSPACED_LANGUAGES)
        text += ("" if previous is None or unspaced else " ") + segment.text
        previous = segment
    return text


def seconds_by(segments: Sequence[Segment], tag: str) -> dict[str, float]:
    """Seconds of speech per language / emotion / event, over segments that have it."""
    seconds: dict[str, float] = {}
    for segment in segments:
        value = getattr(segment, tag)
        if value is not None:
            seconds[value] = seconds.get(value, 0.0) + segment.end - segment.start
    return seconds


def dominant(segments: Sequence[Segment], tag: str) -> str | None:
    """The language / emotion / event covering the most time, over segments that have it."""
    seconds = seconds_by(segments, tag)
    return max(seconds, key=seconds.__getitem__) if seconds else None
