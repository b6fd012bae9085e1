"""SRT / WebVTT rendering."""

from __future__ import annotations

import pytest

from sensevoice_core.result import Segment
from sensevoice_core.subtitles import timestamp, to_srt, to_vtt


def cue(start: float, end: float, text: str) -> Segment:
    return Segment(start=start, end=end, text=text, raw=text, language="en", emotion=None,
                   event=None)


@pytest.mark.parametrize(("seconds", "srt", "vtt"), [
    (0.0, "00:00:00,000", "00:00:00.000"),
    (1.2345, "00:00:01,234", "00:00:01.234"),
    (61.9996, "00:01:02,000", "00:01:02.000"),
    (3725.5, "01:02:05,500", "01:02:05.500"),
    (-0.2, "00:00:00,000", "00:00:00.000"),
])
def test_timestamps(seconds, srt, vtt):
    assert timestamp(seconds, ",") == srt
    assert timestamp(seconds, ".") == vtt


CUES = [cue(0.0, 1.5, " Hello. "), cue(1.5, 2.0, ""), cue(2.25, 4.0, "World.")]


def test_srt_numbers_cues_and_skips_empty_ones():
    assert to_srt(CUES) == ("1\n00:00:00,000 --> 00:00:01,500\nHello.\n\n"
                            "2\n00:00:02,250 --> 00:00:04,000\nWorld.\n")


def test_vtt_has_its_header_and_dot_milliseconds():
    assert to_vtt(CUES) == ("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello.\n\n"
                            "00:00:02.250 --> 00:00:04.000\nWorld.\n")


def test_no_speech_gives_empty_documents():
    assert to_srt([cue(0, 1, "")]) == ""
    assert to_vtt([]) == "WEBVTT\n"


def test_cue_text_cannot_break_the_format():
    cues = [cue(0, 1, "Hello & <b>world</b>\n\n2\n00:00:00,000 --> 00:00:01,000")]
    srt = to_srt(cues)
    assert srt.count("-->") == 1 and srt.count("\n\n") == 0
    vtt = to_vtt(cues)
    assert "Hello &amp; &lt;b&gt;world&lt;/b&gt; 2 00:00:00.000" not in vtt  # SRT times stay SRT
    assert "Hello &amp; &lt;b&gt;world&lt;/b&gt; 2 00:00:00,000 -&gt; 00:00:01,000" in vtt
