"""Greedy CTC decoding, the parsing of SenseVoice's tags into a Segment, and what the same
logits say besides the ids: confidences, and (on request) when each token was said.

Frames: the model's output has NUM_PROMPT_FRAMES prompt frames (language, event, emotion,
text-norm) and then one frame per 60 ms of audio. A token whose greedy run starts on a prompt
frame is a prompt answer (a tag); the others are the text tokens, timed by alignment.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sensevoice_core import vocab
from sensevoice_core.alignment import TokenSpan, forced_align
from sensevoice_core.result import Segment, Token
from sensevoice_core.tokenizer import Tokenizer
from sensevoice_core.words import words_of

# A token's end is its last aligned frame extended through the blank frames after it, up to
# the next token and at most this many frames: CTC is peaky (a token often holds one frame,
# then blanks), so its own frames alone cut most words short. 5 from a one-off measurement on
# the demo model's digit words (README, "Word timestamps"): longer caps gained nothing.
END_EXTENSION_FRAMES = 5


@dataclass(frozen=True)
class Run:
    """One greedy emission: a token and the frames where it won the argmax, first..last."""

    token_id: int
    first: int
    last: int


def greedy_runs(best: Tensor, lengths: Tensor,
                blank_id: int = vocab.CTC_BLANK_ID) -> list[list[Run]]:
    """Per item, the runs of its best path (B, T) within its length, blanks dropped."""
    runs = []
    for path, length in zip(best.cpu(), lengths.tolist()):
        ids, counts = torch.unique_consecutive(path[:length], return_counts=True)
        ends = counts.cumsum(0).tolist()
        runs.append([Run(token_id, end - count, end - 1)
                     for token_id, count, end in zip(ids.tolist(), counts.tolist(), ends)
                     if token_id != blank_id])
    return runs


def to_segment(token_ids: list[int], tokenizer: Tokenizer, start: float, end: float, *,
               avg_logprob: float | None = None, no_speech_prob: float | None = None,
               tokens: Sequence[Token] = ()) -> Segment:
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
    return Segment(start=start, end=end, text=vocab.TAG_PATTERN.sub("", raw).strip(), raw=raw,
                   language=found.get("language"), emotion=found.get("emotion"),
                   event=found.get("event"), token_ids=tuple(token_ids),
                   avg_logprob=avg_logprob, no_speech_prob=no_speech_prob,
                   tokens=tuple(tokens), words=words_of(tokens))


def nospeech_id(tokenizer: Tokenizer) -> int | None:
    """The id of <|nospeech|>, None for a vocabulary without it."""
    return tokenizer.piece_id(vocab.tag_piece(vocab.Language.NOSPEECH.value))


def allowed_language_ids(tokenizer: Tokenizer, allowed: Sequence[vocab.Language]) -> list[int]:
    """The language tags a whitelist allows, those this vocabulary has."""
    ids = [tokenizer.piece_id(vocab.tag_piece(lang.value)) for lang in allowed]
    return [token_id for token_id in ids if token_id is not None]


def language_answers(logits: Tensor, tokenizer: Tokenizer,
                     languages: Sequence[vocab.Language]) -> Tensor:
    """Each item's answer on its language frame (frame 0) under a whitelist. The model's own
    answer stands when it is an allowed language or <|nospeech|>; otherwise the likeliest
    allowed language replaces it, so that ruling out its choice never leaves the slot to a
    blank or a text token, nor turns speech into <|nospeech|> (which would drop it)."""
    own = logits[:, 0].argmax(dim=-1)
    ids = torch.tensor(allowed_language_ids(tokenizer, languages), device=logits.device)
    if ids.numel() == 0:
        return own
    nospeech = nospeech_id(tokenizer)
    keep = torch.isin(own, ids) | (own == (-1 if nospeech is None else nospeech))
    return torch.where(keep, own, ids[logits[:, 0, ids].argmax(dim=-1)])


def decode_logits(logits: Tensor, lengths: Tensor, tokenizer: Tokenizer,
                  durations: Sequence[float], *, languages: Sequence[vocab.Language] = (),
                  word_timestamps: bool = False, frame_s: float = 0.06) -> list[Segment]:
    """A Segment per item of a batch of raw logits (B, 4 + T, V), spanning 0..its duration.

    token_ids: greedy over all frames, except that a language whitelist rules out the other
    language tags on the language frame (frame 0) before its argmax. Confidences, always:
    no_speech_prob is the softmax of <|nospeech|> on frame 0 (unmasked); avg_logprob is the
    mean over the text tokens of each token's log-probability on its best frame (the tags are
    left out: they answer the prompt, they are not the transcript). With word_timestamps, the
    text tokens are aligned on the frames after the prompt and timed (see token_times).
    """
    log_norm = torch.logsumexp(logits, dim=-1)  # (B, T)
    top, best = logits.max(dim=-1)
    if languages:
        best[:, 0] = language_answers(logits, tokenizer, languages)
    winner_logprob = (top - log_norm).cpu().numpy()
    nospeech = nospeech_id(tokenizer)
    no_speech = (None if nospeech is None
                 else (logits[:, 0, nospeech] - log_norm[:, 0]).exp().tolist())
    all_runs = greedy_runs(best, lengths)
    prompt = vocab.NUM_PROMPT_FRAMES
    text_runs = [[run for run in runs if run.first >= prompt] for runs in all_runs]
    timed: list[list[Token]] = [[] for _ in all_runs]
    if word_timestamps and any(text_runs):
        spans = forced_align(logits[:, prompt:], (lengths - prompt).clamp(min=0),
                             [[run.token_id for run in runs] for runs in text_runs],
                             log_norm=log_norm[:, prompt:])
        timed = [token_times(runs, item_spans, tokenizer, frame_s, duration)
                 for runs, item_spans, duration in zip(text_runs, spans, durations)]
    segments = []
    for index, (runs, texts, duration) in enumerate(zip(all_runs, text_runs, durations)):
        logprobs = [float(winner_logprob[index, run.first:run.last + 1].max()) for run in texts]
        segments.append(to_segment(
            [run.token_id for run in runs], tokenizer, 0.0, duration,
            avg_logprob=sum(logprobs) / len(logprobs) if logprobs else None,
            no_speech_prob=None if no_speech is None else no_speech[index],
            tokens=timed[index]))
    return segments


def frame_time(frame: float, frame_s: float) -> float:
    """Seconds at the start of a post-prompt frame's cell: frame j stacks the 10 ms fbank
    frames centred on fbank frame 6j, so it is centred at about j * 60 ms and its cell is
    j * 60 ms - 30 ms .. + 30 ms (FunASR's convention: start = 0.06 * first - 0.03,
    end = 0.06 * (last + 1) - 0.03)."""
    return frame * frame_s - frame_s / 2


def token_times(runs: Sequence[Run], spans: Sequence[TokenSpan], tokenizer: Tokenizer,
                frame_s: float, duration: float) -> list[Token]:
    """Tokens timed from their aligned frames: start at the first frame's cell, end at the
    last frame's cell extended through up to END_EXTENSION_FRAMES blank frames (never into the
    next token); both clipped to 0..duration. Control pieces (</s>) are left out."""
    tokens = []
    processor = tokenizer.processor
    for index, (run, span) in enumerate(zip(runs, spans)):
        if processor.IsControl(run.token_id) or processor.IsUnknown(run.token_id):
            continue  # </s> and the like: emitted, aligned, but no text to place
        following = spans[index + 1].first if index + 1 < len(spans) else math.inf
        end_frame = min(span.last + 1 + END_EXTENSION_FRAMES, following)
        start = min(max(0.0, frame_time(span.first, frame_s)), duration)
        end = min(max(start, frame_time(end_frame, frame_s)), duration)
        tokens.append(Token(id=run.token_id, piece=tokenizer.processor.IdToPiece(run.token_id),
                            start=round(start, 3), end=round(end, 3),
                            probability=round(span.probability, 4)))
    return tokens
