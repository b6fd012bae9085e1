"""Greedy CTC decoding, and the parsing of SenseVoice's tags into a Segment."""

from __future__ import annotations

import re

import torch
from torch import Tensor

from sensevoice_core import vocab
from sensevoice_core.result import Segment
from sensevoice_core.tokenizer import Tokenizer

_TAG = re.compile(r"<\|[^|<>]*\|>")


def greedy_ctc(logits: Tensor, lengths: Tensor, blank_id: int = vocab.CTC_BLANK_ID) -> list[list[int]]:
    """Best path per item: argmax, collapse repeats, drop blanks. logits: (B, T, V)."""
    best = logits.argmax(dim=-1)  # (B, T)
    sequences = []
    for path, length in zip(best, lengths.tolist()):
        collapsed = torch.unique_consecutive(path[:length])
        sequences.append(collapsed[collapsed != blank_id].tolist())
    return sequences


def to_segment(token_ids: list[int], tokenizer: Tokenizer, start: float, end: float) -> Segment:
    """The text and the first language, emotion and event tag of one decoded stretch of audio,
    which lies between start and end seconds (the caller knows where it was cut from)."""
    raw = tokenizer.decode(token_ids)
    found: dict[str, str] = {}
    for token_id in token_ids:
        name = tokenizer.tag_names.get(token_id)
        if name in vocab.LANGUAGE_TAGS:
            found.setdefault("language", name)
        elif name in vocab.EMOTION_TAGS:
            found.setdefault("emotion", name)
        elif name in vocab.EVENT_TAGS:
            found.setdefault("event", name)
    return Segment(start=start, end=end, text=_TAG.sub("", raw).strip(), raw=raw,
                   language=found.get("language"), emotion=found.get("emotion"),
                   event=found.get("event"), token_ids=tuple(token_ids))
