"""SRT and WebVTT renderings of timed text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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


def to_srt(cues: Sequence[TimedText]) -> str:
    """Numbered SRT cues; cues without text are left out (a subtitle cannot be empty)."""
    blocks = []
    for cue in (c for c in cues if c.text.strip()):
        blocks.append(f"{len(blocks) + 1}\n{timestamp(cue.start, ',')} --> "
                      f"{timestamp(cue.end, ',')}\n{cue.text.strip()}\n")
    return "\n".join(blocks)


def to_vtt(cues: Sequence[TimedText]) -> str:
    blocks = ["WEBVTT\n"]
    for cue in (c for c in cues if c.text.strip()):
        blocks.append(f"{timestamp(cue.start, '.')} --> {timestamp(cue.end, '.')}\n"
                      f"{cue.text.strip()}\n")
    return "\n".join(blocks)
