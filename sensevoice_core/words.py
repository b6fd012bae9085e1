"""Timed sentencepiece tokens merged into timed words. No torch: pieces and seconds only.

- A piece starting with "▁" starts a word (English, Korean: the languages written with
  spaces); a lone "▁" is no word, but whatever follows it starts one.
- Each CJK character (Han, kana) is a word of its own; a piece of several such characters
  shares its time equally among them.
- Punctuation (ITN's ",.?!" and the CJK "，。？！、") joins the word before it, without
  extending that word's end: it has no time of its own ("3,000" stays one word; a "▁"-marked
  mark such as " -" ends the word).
  Opening brackets and quotes ("(", "“"), and punctuation before any word, join the word after.
- Tag pieces (<|Laughter|>) are not words.
- A word's probability is the mean of its tokens' (its punctuation's included).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

from sensevoice_core.result import Token, Word
from sensevoice_core.vocab import TAG_PATTERN

WORD_MARK = "\u2581"  # sentencepiece's word-boundary mark
OPENING = ("Ps", "Pi")  # Unicode categories of opening brackets and quotes
_CJK = re.compile(
    "[\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"
    "\U00020000-\U0003ffff]")


def is_cjk(character: str) -> bool:
    return bool(_CJK.fullmatch(character))


def is_punctuation(text: str) -> bool:
    """Only punctuation marks (Unicode category P*): ",", "。", "？", "、"."""
    return bool(text) and all(unicodedata.category(ch).startswith("P") for ch in text)


@dataclass
class _Building:
    text: str
    start: float
    end: float
    probabilities: list[float] = field(default_factory=list)
    cjk: bool = False

    def word(self) -> Word:
        return Word(word=self.text, start=self.start, end=self.end,
                    probability=round(sum(self.probabilities) / len(self.probabilities), 4))


def words_of(tokens: Sequence[Token]) -> tuple[Word, ...]:
    """The words of a segment's timed tokens, in order (see the module's rules)."""
    words: list[_Building] = []
    boundary = True  # the next piece starts a word
    pending: list[Token] = []  # punctuation waiting for the word after it
    for token in tokens:
        piece = token.piece
        if TAG_PATTERN.fullmatch(piece):
            boundary = True
            continue
        marked = piece.startswith(WORD_MARK)
        text = piece.lstrip(WORD_MARK)
        if not text:  # a lone "▁"
            boundary = True
            continue
        if is_punctuation(text):
            opening = unicodedata.category(text[0]) in OPENING
            if words and not pending and not opening:
                words[-1].text += text
                words[-1].probabilities.append(token.probability)
            else:
                pending.append(token)
            # "3,000" stays one word; "hello ( world" or "▁-" separate the words around them.
            boundary = boundary or marked or opening
            continue
        boundary = boundary or marked
        first_new = len(words)
        for part, start, end in _split_cjk(text, token.start, token.end):
            cjk = is_cjk(part[0])
            if boundary or cjk or not words or words[-1].cjk:
                words.append(_Building(part, start, end, cjk=cjk))
            else:
                words[-1].text += part
                words[-1].end = end
            words[-1].probabilities.append(token.probability)
            boundary = False
        if pending and len(words) > first_new:
            first = words[first_new]
            first.text = "".join(t.piece.lstrip(WORD_MARK) for t in pending) + first.text
            first.probabilities += [t.probability for t in pending]
            pending = []
    if pending and words:  # an opening mark at the very end: it stays with the last word
        words[-1].text += "".join(t.piece.lstrip(WORD_MARK) for t in pending)
        words[-1].probabilities += [t.probability for t in pending]
    return tuple(building.word() for building in words)


def _split_cjk(text: str, start: float, end: float) -> list[tuple[str, float, float]]:
    """A piece cut into runs: each CJK character alone, other characters together; the piece's
    time shared equally among its characters."""
    parts: list[str] = []
    for character in text:
        if is_cjk(character) or not parts or is_cjk(parts[-1][0]):
            parts.append(character)
        else:
            parts[-1] += character
    if len(parts) == 1:
        return [(text, start, end)]
    per_character = (end - start) / len(text)
    timed, at = [], start
    for part in parts:
        part_end = at + per_character * len(part)
        timed.append((part, round(at, 3), round(part_end, 3)))
        at = part_end
    return timed
