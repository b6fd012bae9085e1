"""SRT and WebVTT renderings of a result's segments."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sensevoice_core.result import Segment
from sensevoice_core.segmentation import Bounds

LINE_WIDTH_BOUNDS = Bounds(1.0)  # characters
LINE_COUNT_BOUNDS = Bounds(1.0)
CUE_S_BOUNDS = Bounds(0.0, low_exclusive=True)  # seconds


@dataclass(frozen=True)
class SubtitleOptions:
    """How cues are cut from word times (segments without words are one cue each).
    No torch here: the settings take their defaults from it."""

    max_line_width: int = 42  # characters per line (CJK characters count one each)
    max_line_count: int = 2  # lines per cue
    max_cue_s: float = 7.0  # seconds one cue may stay on screen
    karaoke: bool = False  # WebVTT only: each word timed inside its cue (<00:00:01.200>)

    def __post_init__(self) -> None:
        LINE_WIDTH_BOUNDS.check("max_line_width", self.max_line_width)
        LINE_COUNT_BOUNDS.check("max_line_count", self.max_line_count)
        CUE_S_BOUNDS.check("max_cue_s", self.max_cue_s)


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


def to_srt(segments: Sequence[Segment]) -> str:
    """Numbered SRT cues; segments without text are left out (a subtitle cannot be empty)."""
    blocks = []
    for cue in (s for s in segments if cue_text(s.text)):
        blocks.append(f"{len(blocks) + 1}\n{timestamp(cue.start, ',')} --> "
                      f"{timestamp(cue.end, ',')}\n{cue_text(cue.text)}\n")
    return "\n".join(blocks)


def to_vtt(segments: Sequence[Segment]) -> str:
    """WebVTT; &, < and > are escaped, as its cue text is markup."""
    blocks = ["WEBVTT\n"]
    for cue in (s for s in segments if cue_text(s.text)):
        text = cue_text(cue.text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        blocks.append(f"{timestamp(cue.start, '.')} --> {timestamp(cue.end, '.')}\n{text}\n")
    return "\n".join(blocks)
