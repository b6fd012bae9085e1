"""Greedy CTC decoding and the parsing of SenseVoice's tags into a Transcription."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from sensevoice_core import vocab
from sensevoice_core.tokenizer import Tokenizer

_TAG = re.compile(r"<\|[^|<>]*\|>")


@dataclass(frozen=True)
class Transcription:
    text: str  # the transcript with every <|tag|> removed
    raw: str  # the tagged string exactly as the model emitted it
    language: str | None  # language tag the model emitted ("en", "zh", ...), None if none
    emotion: str | None  # emotion tag ("NEUTRAL", "HAPPY", ...)
    event: str | None  # audio event tag ("Speech", "BGM", ...)
    text_norm: str | None  # "withitn" or "woitn", as emitted
    token_ids: tuple[int, ...]  # ids after CTC collapse and blank removal
    duration_s: float  # length of the input audio

    @property
    def rich_text(self) -> str:
        """The text with event and emotion shown as emoji, as SenseVoice's demos show it."""
        event = vocab.EVENT_EMOJI.get(self.event or "", "")
        emotion = vocab.EMOTION_EMOJI.get(self.emotion or "", "")
        return f"{event}{self.text}{emotion}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "token_ids": list(self.token_ids), "rich_text": self.rich_text}


def greedy_ctc(logits: Tensor, lengths: Tensor, blank_id: int = vocab.CTC_BLANK_ID) -> list[list[int]]:
    """Best path per item: argmax, collapse repeats, drop blanks. logits: (B, T, V)."""
    best = logits.argmax(dim=-1)  # (B, T)
    sequences = []
    for path, length in zip(best, lengths.tolist()):
        collapsed = torch.unique_consecutive(path[:length])
        sequences.append(collapsed[collapsed != blank_id].tolist())
    return sequences


def to_transcription(token_ids: list[int], tokenizer: Tokenizer, duration_s: float) -> Transcription:
    raw = tokenizer.decode(token_ids)
    found: dict[str, str] = {}
    for token_id in token_ids:
        name = tokenizer.tag_names.get(token_id)
        if name is None:
            continue
        if name in vocab.LANGUAGE_TAGS:
            found.setdefault("language", name)
        elif name in vocab.EMOTION_TAGS:
            found.setdefault("emotion", name)
        elif name in vocab.EVENT_TAGS:
            found.setdefault("event", name)
        else:
            found.setdefault("text_norm", name)
    return Transcription(
        text=_TAG.sub("", raw).strip(),
        raw=raw,
        language=found.get("language"),
        emotion=found.get("emotion"),
        event=found.get("event"),
        text_norm=found.get("text_norm"),
        token_ids=tuple(token_ids),
        duration_s=duration_s,
    )
