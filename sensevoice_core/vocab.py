"""The SenseVoice tag vocabulary and the query-embedding rows, in one table.

The model is prompted with 4 query frames placed before the audio features: language,
event, emotion and text-norm. Each frame is a row of the ``embed`` table. The model answers
on those 4 frames with tag tokens (``<|en|><|NEUTRAL|><|Speech|><|woitn|>``) and then the text.
Token ids are never hard-coded: they are looked up by piece name in the tokenizer, so a small
demo vocabulary works as well as the official 25,055-piece one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum


class Language(str, Enum):
    AUTO = "auto"
    ZH = "zh"
    EN = "en"
    YUE = "yue"
    JA = "ja"
    KO = "ko"
    NOSPEECH = "nospeech"


class TextNorm(str, Enum):
    WITH_ITN = "withitn"  # numerals and punctuation: "123."
    WITHOUT_ITN = "woitn"  # spoken form: "one two three"


@dataclass(frozen=True)
class LanguageInfo:
    query_row: int  # row of the 16-row query embedding, as the official model was trained
    name: str  # the English name OpenAI's API uses ("chinese"); also accepted as input
    label: str  # what the page shows ("Mandarin")
    unspaced: bool = False  # written without spaces between sentences


# Every language, once: everything else about languages is derived from this table.
LANGUAGES: dict[Language, LanguageInfo] = {
    Language.AUTO: LanguageInfo(0, "auto", "auto-detect"),
    Language.ZH: LanguageInfo(3, "chinese", "Mandarin", unspaced=True),
    Language.EN: LanguageInfo(4, "english", "English"),
    Language.YUE: LanguageInfo(7, "cantonese", "Cantonese", unspaced=True),
    Language.JA: LanguageInfo(11, "japanese", "Japanese", unspaced=True),
    Language.KO: LanguageInfo(12, "korean", "Korean"),
    Language.NOSPEECH: LanguageInfo(13, "nospeech", "no speech"),
}
LANGUAGE_QUERY_ROW: dict[Language, int] = {lang: info.query_row for lang, info in LANGUAGES.items()}
# What a caller may ask for (the model answers "nospeech"; nobody asks for it).
LANGUAGE_CHOICES = tuple(lang.value for lang in LANGUAGES if lang is not Language.NOSPEECH)
# What the model may answer.
LANGUAGE_TAGS = tuple(lang.value for lang in LANGUAGES if lang is not Language.AUTO)
UNSPACED_LANGUAGES = frozenset(lang.value for lang, info in LANGUAGES.items() if info.unspaced)
# A result's language tag ("en", "nospeech") -> its row: names and labels to show.
LANGUAGE_BY_TAG: dict[str, LanguageInfo] = {lang.value: info for lang, info in LANGUAGES.items()}
EVENT_QUERY_ROW = 1
EMOTION_QUERY_ROW = 2
TEXT_NORM_QUERY_ROW: dict[TextNorm, int] = {TextNorm.WITH_ITN: 14, TextNorm.WITHOUT_ITN: 15}
NUM_PROMPT_FRAMES = 4  # language, event, emotion, text-norm

CTC_BLANK_ID = 0  # FunASR's blank_id; the piece at id 0 is <unk>, which the model never emits as text

EMOTION_TAGS = (
    "HAPPY", "SAD", "ANGRY", "NEUTRAL", "FEARFUL", "DISGUSTED", "SURPRISED", "OTHER",
    "EMO_UNKNOWN",
)
EVENT_TAGS = (
    "Speech", "BGM", "Laughter", "Applause", "Cry", "Sneeze", "Breath", "Cough", "Sing",
    "Speech_Noise", "Event_UNK",
)
TEXT_NORM_TAGS = tuple(norm.value for norm in TextNorm)

EMOTION_EMOJI = {
    "HAPPY": "😊", "SAD": "😔", "ANGRY": "😡", "FEARFUL": "😰", "DISGUSTED": "🤢",
    "SURPRISED": "😮",
}
EVENT_EMOJI = {
    "BGM": "🎼", "Applause": "👏", "Laughter": "😀", "Cry": "😭", "Sneeze": "🤧", "Cough": "😷",
}


# Any <|tag|> piece, known or not: what is removed from the text and is never a word.
TAG_PATTERN = re.compile(r"<\|[^|<>]*\|>")


def tag_piece(name: str) -> str:
    return f"<|{name}|>"


def language_choices_text(include_auto: bool = True) -> str:
    """The languages a caller may ask for, by code and by name:
    "auto, zh, en, ... (or a name: chinese, english, ...)"."""
    codes = [code for code in LANGUAGE_CHOICES if include_auto or code != Language.AUTO.value]
    names = [LANGUAGE_BY_TAG[code].name for code in codes]
    return (f"{', '.join(codes)} (or a name: "
            f"{', '.join(name for name in names if name not in LANGUAGE_CHOICES)})")


def language_of(value: str | Language) -> Language:
    """A user-supplied language ("en", "English", Language.EN) as the enum; an unknown one is a
    ValueError naming the valid choices."""
    if isinstance(value, Language):
        return value
    lowered = str(value).strip().lower()
    for lang, info in LANGUAGES.items():
        if lowered in (lang.value, info.name) and lang is not Language.NOSPEECH:
            return lang
    raise ValueError(f"unknown language {value!r}; expected one of: {language_choices_text()}")


def languages_of(values: str | Iterable[str | Language]) -> tuple[Language, ...]:
    """A language whitelist ("zh,en", ["Chinese", "en"]) as enums, in order, without repeats;
    "auto" and unknown names are a ValueError naming the choices."""
    if isinstance(values, str):
        values = [part for part in values.split(",") if part.strip()]
    found: list[Language] = []
    for value in values:
        try:
            lang = language_of(value)
        except ValueError:
            raise ValueError(f"unknown language {value!r} in the language list; expected "
                             f"languages from: {language_choices_text(include_auto=False)}"
                             ) from None
        if lang is Language.AUTO:
            raise ValueError(f"'auto' cannot be in a language list; expected languages from: "
                             f"{language_choices_text(include_auto=False)}")
        if lang not in found:
            found.append(lang)
    return tuple(found)
