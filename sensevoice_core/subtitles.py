"""SRT and WebVTT renderings of a result's segments."""

from __future__ import annotations

from collections.abc import Sequence

from sensevoice_core.result import Segment


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
