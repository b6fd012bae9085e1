"""SRT and WebVTT renderings of timed text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class Cue(Protocol):
    """Anything with a time span and text: TimedText, a protocol SegmentInfo, a Segment."""

    @property
    def start(self) -> float: ...

    @property
    def end(self) -> float: ...

    @property
    def text(self) -> str: ...


@dataclass(frozen=True)
class TimedText:
    start: float  # seconds from the start of the audio
    end: float
    text: str


def timestamp(seconds: float, decimal_mark: str) -> str:
    """HH:MM:SS,mmm (SRT) or HH:MM:SS.mmm (WebVTT)."""
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_mark}{millis:03d}"


def cue_text(text: str) -> str:
    """One line of cue text: a blank line would end the cue, an arrow would start a new one."""
    return " ".join(text.split()).replace("-->", "->")


def to_srt(cues: Sequence[Cue]) -> str:
    """Numbered SRT cues; cues without text are left out (a subtitle cannot be empty)."""
    blocks = []
    for cue in (c for c in cues if cue_text(c.text)):
        blocks.append(f"{len(blocks) + 1}\n{timestamp(cue.start, ',')} --> "
                      f"{timestamp(cue.end, ',')}\n{cue_text(cue.text)}\n")
    return "\n".join(blocks)


def to_vtt(cues: Sequence[Cue]) -> str:
    """WebVTT; &, < and > are escaped, as its cue text is markup."""
    blocks = ["WEBVTT\n"]
    for cue in (c for c in cues if cue_text(c.text)):
        text = cue_text(cue.text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        blocks.append(f"{timestamp(cue.start, '.')} --> {timestamp(cue.end, '.')}\n{text}\n")
    return "\n".join(blocks)
