"""The SenseVoice tag vocabulary and the query-embedding rows, in one table.

The model is prompted with 4 query frames placed before the audio features: language,
event, emotion and text-norm. Each frame is a row of the ``embed`` table. The model answers
on those 4 frames with tag tokens (``<|en|><|NEUTRAL|><|Speech|><|woitn|>``) and then the text.
Token ids are never hard-coded: they are looked up by piece name in the tokenizer, so a small
demo vocabulary works as well as the official 25,055-piece one.
"""

from __future__ import annotations

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


# Rows of the 16-row query embedding, as the official model was trained with them.
LANGUAGE_QUERY_ROW: dict[Language, int] = {
    Language.AUTO: 0,
    Language.ZH: 3,
    Language.EN: 4,
    Language.YUE: 7,
    Language.JA: 11,
    Language.KO: 12,
    Language.NOSPEECH: 13,
}
EVENT_QUERY_ROW = 1
EMOTION_QUERY_ROW = 2
TEXT_NORM_QUERY_ROW: dict[TextNorm, int] = {TextNorm.WITH_ITN: 14, TextNorm.WITHOUT_ITN: 15}
NUM_PROMPT_FRAMES = 4  # language, event, emotion, text-norm

CTC_BLANK_ID = 0  # FunASR's blank_id; the piece at id 0 is <unk>, which the model never emits as text

LANGUAGE_TAGS = ("zh", "en", "yue", "ja", "ko", "nospeech")
EMOTION_TAGS = (
    "HAPPY", "SAD", "ANGRY", "NEUTRAL", "FEARFUL", "DISGUSTED", "SURPRISED", "OTHER",
    "EMO_UNKNOWN",
)
EVENT_TAGS = (
    "Speech", "BGM", "Laughter", "Applause", "Cry", "Sneeze", "Breath", "Cough", "Sing",
    "Speech_Noise", "Event_UNK",
)
TEXT_NORM_TAGS = ("withitn", "woitn")

EMOTION_EMOJI = {
    "HAPPY": "😊", "SAD": "😔", "ANGRY": "😡", "FEARFUL": "😰", "DISGUSTED": "🤢",
    "SURPRISED": "😮",
}
EVENT_EMOJI = {
    "BGM": "🎼", "Applause": "👏", "Laughter": "😀", "Cry": "😭", "Sneeze": "🤧", "Cough": "😷",
}


def tag_piece(name: str) -> str:
    return f"<|{name}|>"


def language_of(value: str | Language) -> Language:
    """Convert a user-supplied language to the enum, naming the valid choices on error."""
    try:
        return Language(value)
    except ValueError:
        choices = ", ".join(lang.value for lang in Language if lang is not Language.NOSPEECH)
        raise ValueError(f"unknown language {value!r}; expected one of: {choices}") from None
