"""SRT and WebVTT renderings of a result's segments.

With word times (Segment.words) a segment becomes as many cues as its words need to stay
within SubtitleOptions' lines, characters and seconds. Where a segment must be cut is chosen
over the whole segment at once (a shortest path over the gaps between words): few cues, cut
at pauses and sentence ends rather than wherever a line happens to fill. A segment without
words is one cue, as long as the segment, its text wrapped into lines.
"""

from __future__ import annotations

import math
import numbers
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from sensevoice_core.result import Segment, Token, Word
from sensevoice_core.segmentation import Bounds
from sensevoice_core.vocab import UNSPACED_LANGUAGES
from sensevoice_core.words import WORD_MARK

# Characters per line and lines per cue, whole numbers; past the top a limit means "none" (the
# cue's time limit cuts first), and the bound keeps int() away from thousands of digits.
LINE_LIMIT_BOUNDS = Bounds(1.0, 10_000.0)
CUE_S_BOUNDS = Bounds(0.0, low_exclusive=True)  # seconds

# What a cut between two words costs. A cue costs 1; a cut where nothing invites one costs 4,
# less up to 3 for a pause (in full from PAUSE_S), 3 after a sentence's end, 2 after a clause's.
# So a segment is cut no more often than its limits demand, and where a cut must fall, it
# falls at the best pause or punctuation within reach, even at the price of one more cue.
CUE_COST = 1.0
PLAIN_CUT_COST = 4.0
PAUSE_BONUS, SENTENCE_BONUS, CLAUSE_BONUS = 3.0, 3.0, 2.0
PAUSE_S = 0.3  # a gap this long between words is a full pause
LONG_PAUSE_S = 1.5  # no cue holds a silence this long: its text would wait on screen
# Among cuts that cost the same, cues of even length: a half-full cue costs this * 0.25 more.
FILL_COST = 0.1
SENTENCE_ENDS = tuple(".!?…。！？")
CLAUSE_ENDS = tuple(",;:，、；：")
CLOSING = "\"')]}”’」』）】"
# Text without word times, in an unspaced script: a run of ASCII (a Latin word, a number) or
# one other character, with the punctuation that follows it (a line never starts with "。").
UNSPACED_UNIT = re.compile(r"(\s*)((?:[!-~]+|\S)[^\w\s]*)")


@dataclass(frozen=True)
class SubtitleOptions:
    """How cues are cut from word times (segments without words are one cue each).
    No torch here: the settings take their defaults from it."""

    max_line_width: int = 42  # characters per line (CJK characters count one each)
    max_line_count: int = 2  # lines per cue
    max_cue_s: float = 7.0  # seconds one cue may stay on screen
    karaoke: bool = False  # WebVTT only: each word timed inside its cue (<00:00:01.200>)

    def __post_init__(self) -> None:
        for name in ("max_line_width", "max_line_count"):
            check_line_limit(name, getattr(self, name))
        CUE_S_BOUNDS.check("max_cue_s", self.max_cue_s)
        object.__setattr__(self, "karaoke", bool(self.karaoke))


class Unit(NamedTuple):
    """What is never split across lines: a word, or a piece of untimed text."""

    text: str  # one line, never empty
    space: bool  # a space before it, unless it starts a line
    start: float = 0.0  # word times; a segment's text has none
    end: float = 0.0


@dataclass(frozen=True)
class Cue:
    start: float
    end: float
    lines: tuple[tuple[Unit, ...], ...]
    timed: bool  # its units are words with times of their own


def check_line_limit(name: str, value: object) -> None:
    """ValueError naming the option unless value is a whole number within LINE_LIMIT_BOUNDS."""
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not whole or not LINE_LIMIT_BOUNDS.low <= value <= LINE_LIMIT_BOUNDS.high:
        raise ValueError(f"{name}={value!r}: expected a whole number from "
                         f"{LINE_LIMIT_BOUNDS.low:g} to {LINE_LIMIT_BOUNDS.high:g}")


def timestamp(seconds: float, decimal_mark: str) -> str:
    """HH:MM:SS,mmm (SRT) or HH:MM:SS.mmm (WebVTT)."""
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_mark}{millis:03d}"


def cue_text(text: str) -> str:
    """One line of cue text: a blank line would end the cue, an arrow would start a new one
    ("--->" shortened once would still be one)."""
    text = " ".join(text.split())
    while "-->" in text:
        text = text.replace("-->", "->")
    return text


def to_srt(segments: Sequence[Segment], options: SubtitleOptions | None = None) -> str:
    """Numbered SRT cues; segments without text are left out (a subtitle cannot be empty).
    options.karaoke is WebVTT's alone: SRT has no timing inside a cue."""
    blocks = []
    for cue in cues(segments, options or SubtitleOptions()):
        # Words joined without spaces ("-", "->" in Japanese) can make an arrow of their own.
        text = "\n".join(cue_text(join_line(line, cue_text)) for line in cue.lines)
        blocks.append(f"{len(blocks) + 1}\n{timestamp(cue.start, ',')} --> "
                      f"{timestamp(cue.end, ',')}\n{text}\n")
    return "\n".join(blocks)


def to_vtt(segments: Sequence[Segment], options: SubtitleOptions | None = None) -> str:
    """WebVTT; &, < and > are escaped, as its cue text is markup. With options.karaoke each
    word after a cue's first is preceded by its start time (<00:00:01.200>)."""
    options = options or SubtitleOptions()
    blocks = ["WEBVTT\n"]
    for cue in cues(segments, options):
        if options.karaoke and cue.timed:
            text = karaoke_text(cue)
        else:
            text = "\n".join(join_line(line, vtt_text) for line in cue.lines)
        blocks.append(f"{timestamp(cue.start, '.')} --> {timestamp(cue.end, '.')}\n{text}\n")
    return "\n".join(blocks)


def vtt_text(text: str) -> str:
    return cue_text(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def join_line(line: Sequence[Unit], escape: Callable[[str], str]) -> str:
    return "".join((" " if unit.space and i else "") + escape(unit.text)
                   for i, unit in enumerate(line))


def karaoke_text(cue: Cue) -> str:
    """Each word after the first behind a cue timestamp; a tag must come after the one before
    it and before the cue's end (WebVTT), so a word that starts no later shows with the last."""
    shown, end = round(cue.start * 1000), round(cue.end * 1000)
    lines = []
    for line in cue.lines:
        parts = []
        for i, unit in enumerate(line):
            start = round(unit.start * 1000)
            tag = ""
            if (lines or i) and shown < start < end:
                tag, shown = f"<{timestamp(start / 1000, '.')}>", start
            parts.append((" " if unit.space and i else "") + tag + vtt_text(unit.text))
        lines.append("".join(parts))
    return "\n".join(lines)


def cues(segments: Sequence[Segment], options: SubtitleOptions) -> list[Cue]:
    """Every segment's cues in order; a cue never spans two segments and is never empty."""
    found: list[Cue] = []
    for segment in segments:
        words = word_units(segment, options)
        if words:
            found += [Cue(part[0].start, max(part[0].start, *(unit.end for unit in part)),
                          tuple(map(tuple, balanced(part, options.max_line_width))), True)
                      for part in cut(words, options)]
            continue
        units = text_units(segment)
        if units:
            lines = balanced(units, options.max_line_width)
            found.append(Cue(segment.start, segment.end, tuple(map(tuple, lines)), False))
    return found


def word_units(segment: Segment, options: SubtitleOptions) -> list[Unit]:
    """The segment's words; in zh, yue and ja without spaces, except between two Latin words
    or numbers (用 + GPU + 跑 make "用GPU跑", iPhone + 15 make "iPhone 15"). A word too wide
    for a line or too long for a cue comes in parts (see word_parts)."""
    unspaced = segment.language in UNSPACED_LANGUAGES
    units: list[Unit] = []
    for word in segment.words:
        for index, part in enumerate(word_parts(word, segment.tokens, options)):
            text = cue_text(part.word)
            if not text:
                continue
            space = bool(units) and index == 0 and (
                not unspaced or (latin_end(units[-1].text) and ascii_alnum(text[0])))
            units.append(Unit(text, space, part.start, part.end))
    return units


def word_parts(word: Word, tokens: Sequence[Token], options: SubtitleOptions) -> list[Word]:
    """A word wider than a line or longer than a cue may last (a long number after ITN:
    "11459263587931415936") split between its tokens, which carry their own times; any other
    word, or one whose tokens cannot be told, whole."""
    if len(word.word) <= options.max_line_width and word.end - word.start <= options.max_cue_s:
        return [word]
    inside = [t for t in tokens
              if word.start <= t.start < word.end and t.piece.lstrip(WORD_MARK)]
    text = "".join(t.piece.lstrip(WORD_MARK) for t in inside)
    if len(inside) < 2 or not text or not word.word.startswith(text):
        return [word]
    parts: list[list[Token]] = []
    for token in inside:
        if parts:
            current = "".join(t.piece.lstrip(WORD_MARK) for t in parts[-1])
            if (len(current) + len(token.piece.lstrip(WORD_MARK)) <= options.max_line_width
                    and token.end - parts[-1][0].start <= options.max_cue_s):
                parts[-1].append(token)
                continue
        parts.append([token])
    found = [Word(word="".join(t.piece.lstrip(WORD_MARK) for t in part), start=part[0].start,
                  end=part[-1].end, probability=word.probability) for part in parts]
    rest = word.word[len(text):]  # punctuation that joined the word
    return found[:-1] + [found[-1].model_copy(update={"word": found[-1].word + rest,
                                                       "end": max(found[-1].end, word.end)})]


def ascii_alnum(char: str) -> bool:
    return char.isascii() and char.isalnum()


def latin_end(text: str) -> bool:
    """Ends in a Latin letter or digit, or in ASCII punctuation after one ("GPU", "hello,")."""
    stripped = text.rstrip(string.punctuation)
    return bool(stripped) and ascii_alnum(stripped[-1])


def text_units(segment: Segment) -> list[Unit]:
    text = cue_text(segment.text)
    if segment.language in UNSPACED_LANGUAGES:
        return [Unit(match[2], bool(match[1])) for match in UNSPACED_UNIT.finditer(text)]
    return [Unit(word, True) for word in text.split()]


def wrap(units: Sequence[Unit], width: int) -> list[list[Unit]]:
    """Greedy lines of at most width characters (fewest lines there can be); a unit wider
    than a line has a line of its own."""
    lines: list[list[Unit]] = []
    length = 0
    for unit in units:
        extra = len(unit.text) + unit.space
        if lines and length + extra <= width:
            lines[-1].append(unit)
            length += extra
        else:
            lines.append([unit])
            length = len(unit.text)
    return lines


def balanced(units: Sequence[Unit], width: int) -> list[list[Unit]]:
    """As many lines as wrap() needs at width, at the narrowest width that needs no more, so
    that a cue's lines are about as long as each other."""
    count = len(wrap(units, width))
    low, high = 1, min(width, sum(len(unit.text) + 1 for unit in units))
    while low < high:  # a wider width never needs more lines
        middle = (low + high) // 2
        if len(wrap(units, middle)) <= count:
            high = middle
        else:
            low = middle + 1
    return wrap(units, low)


def cut_cost(word: Unit, following: Unit) -> float:
    text = word.text.rstrip(CLOSING) or word.text
    pause = min(max(following.start - word.end, 0.0) / PAUSE_S, 1.0)
    cost = PLAIN_CUT_COST - PAUSE_BONUS * pause
    if text.endswith(SENTENCE_ENDS):
        cost -= SENTENCE_BONUS
    elif text.endswith(CLAUSE_ENDS):
        cost -= CLAUSE_BONUS
    return max(cost, 0.0)


def cut(words: Sequence[Unit], options: SubtitleOptions) -> list[Sequence[Unit]]:
    """The cheapest cutting of a segment's words into cues that keep the limits (a word on
    its own always does): best[j] is the cost of the first j words, cut after word j-1."""
    width, capacity = options.max_line_width, options.max_line_width * options.max_line_count
    best = [0.0] + [math.inf] * len(words)
    previous = [0] * (len(words) + 1)
    for first in range(len(words)):
        lines, length, characters = 0, 0, 0
        for last in range(first, len(words)):
            word = words[last]
            extra = len(word.text) + word.space
            if last > first and length + extra <= width:  # wrap(), one word at a time
                length += extra
            else:
                lines, length = lines + 1, len(word.text)
            characters += extra
            if last > first and (lines > options.max_line_count
                                 or word.end - words[first].start > options.max_cue_s
                                 or word.start - words[last - 1].end >= LONG_PAUSE_S):
                break
            cost = (best[first] + CUE_COST + FILL_COST * (1 - min(characters / capacity, 1)) ** 2
                    + (cut_cost(word, words[last + 1]) if last + 1 < len(words) else 0.0))
            if cost < best[last + 1]:
                best[last + 1], previous[last + 1] = cost, first
    parts = []
    end = len(words)
    while end:
        parts.append(words[previous[end]:end])
        end = previous[end]
    return parts[::-1]
