"""What ``SenseVoice.transcribe`` runs: audio of any length to one Result.

Every input streams once through the VAD (about 2 ms per second of audio): audio where it finds
no speech (silence, noise) gives an empty Result without reaching the model. Audio no longer
than one segment (``VadOptions.max_segment_s``) is transcribed whole, in one pass; longer audio
is split at the VAD's pauses. Memory is bounded by the batch budget, not by the file: only one
probability per 32 ms is kept, and each batch reads back just its own spans.

Progress (``ProgressCallback``): the pieces are then batched in time order instead of by length,
so that each batch finishes the next stretch of the transcript; otherwise length-sorted batches
pad less (see ``time_batches``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sensevoice_core.audio import SAMPLE_RATE, AudioInput, AudioSource
from sensevoice_core.options import TranscribeOptions
from sensevoice_core.result import Result, Segment
from sensevoice_core.segmentation import Region, speech_regions
from sensevoice_core.vad import speech_probabilities
from sensevoice_core.vocab import Language
from sensevoice_core.words import words_of

if TYPE_CHECKING:
    from sensevoice_core.pipeline import SenseVoice

NOSPEECH = Language.NOSPEECH.value
MAX_TIME_BATCH_PADDING = 0.1  # of a time-ordered batch's padded frames (time_batches)

ProgressCallback = Callable[[int, int, Segment | None], None]
"""``progress(done, total, segment)``: first (0, total, None) once the VAD has found the input's
total speech segments (0: no speech, and no further call), then (done, total, segment) as each
is decoded, in time order (done counts 1..total); segment is None for one in which the model
heard no speech (it is left out of the Result). An exception it raises aborts the
transcription and propagates (a caller that went away)."""


@dataclass(frozen=True)
class _Piece:
    """A stretch of one input the model decodes: a speech region, or the whole input."""

    owner: int  # index of the input
    region: Region
    source: AudioSource | None  # where the region is read back from, when samples is None
    samples: torch.Tensor | None = None


def transcribe_audio(model: SenseVoice, audios: Sequence[AudioInput],
                     options: TranscribeOptions, sample_rate: int = SAMPLE_RATE,
                     source_names: Sequence[str | None] | None = None,
                     progress: ProgressCallback | None = None) -> list[Result]:
    """One Result per input, in order (see SenseVoice.transcribe); the pieces of all inputs
    share length-sorted batches (time-ordered ones with progress, which counts the pieces of
    all inputs in input order)."""
    names = source_names if source_names is not None else [None] * len(audios)
    durations: list[float] = []
    pieces: list[_Piece] = []
    with ExitStack() as long_sources:  # a short input is read whole and closed at once
        for owner, (audio, name) in enumerate(zip(audios, names, strict=True)):
            with ExitStack() as this_source:
                source = this_source.enter_context(
                    AudioSource(audio, sample_rate, options.max_audio_s, name))
                regions = speech_regions(speech_probabilities(model.vad, source.blocks()),
                                         options.vad, source.duration_s)
                if regions and source.duration_s <= options.vad.max_segment_s:
                    samples = source.whole()
                    duration = samples.numel() / SAMPLE_RATE
                    # Decoded whole, in one pass; timed where the VAD heard speech, so that a
                    # subtitle cue does not start in the silence before it.
                    span = Region(regions[0].start, min(regions[-1].end, round(duration, 3)))
                    pieces.append(_Piece(owner, span, None, samples))
                else:
                    duration = source.duration_s
                    pieces += [_Piece(owner, region, source) for region in regions]
                    if regions:
                        long_sources.enter_context(this_source.pop_all())
            durations.append(duration)
        if progress is not None:
            progress(0, len(pieces), None)
        segments = decode_pieces(model, pieces, options, progress)
    spoken: list[list[Segment]] = [[] for _ in durations]
    for piece, segment in zip(pieces, segments):
        if is_speech(segment):
            spoken[piece.owner].append(segment)
    return [Result.from_segments(found, duration, options.text_norm.value)
            for found, duration in zip(spoken, durations)]


def is_speech(segment: Segment) -> bool:
    """Whether a decoded piece belongs in the Result: the model heard speech and wrote text."""
    return segment.language != NOSPEECH and bool(segment.token_ids)


def decode_pieces(model: SenseVoice, pieces: list[_Piece], options: TranscribeOptions,
                  progress: ProgressCallback | None = None) -> list[Segment]:
    """Pieces in batches of at most options.batch_s padded seconds, length-sorted (in time
    order with progress, each batch reported as it finishes); a Segment for each, in order,
    timed by its region."""
    frame_s = model.frontend.feature_frame_s
    lengths = [round((p.samples.numel() / SAMPLE_RATE if p.samples is not None
                      else p.region.end - p.region.start) / frame_s) for p in pieces]
    budget = max(1, round(options.batch_s / frame_s))
    batches = length_batches(lengths, budget) if progress is None else \
        time_batches(lengths, budget)
    segments: dict[int, Segment] = {}
    for batch in batches:
        waveforms = [_samples(pieces[i]) for i in batch]
        for index, segment in zip(batch, model.decode(waveforms, options)):
            segments[index] = placed(segment, pieces[index])
        if progress is not None:
            for index in batch:  # time order: batch is a run of consecutive pieces
                progress(index + 1, len(pieces),
                         segments[index] if is_speech(segments[index]) else None)
    return [segments[i] for i in range(len(pieces))]


def placed(segment: Segment, piece: _Piece) -> Segment:
    """A decoded piece's Segment in the input's time: spanning its region, its tokens and words
    moved by where its samples began and kept inside the region.

    A whole input (piece.samples) was decoded from sample 0, so its tokens are already in the
    input's time and its region is only where the VAD heard speech; a region read back from
    the source starts at region.start."""
    region = piece.region
    if piece.samples is not None and segment.tokens:
        # The model heard the whole input and may place a word outside the VAD's span (the
        # demo model does, at the edges): the segment grows to hold its words rather than
        # squeeze them to nothing at its edge.
        region = Region(min(region.start, segment.tokens[0].start),
                        max(region.end, segment.tokens[-1].end))
    update: dict[str, object] = {"start": region.start, "end": region.end}
    if segment.tokens:
        offset = 0.0 if piece.samples is not None else region.start
        tokens = tuple(token.model_copy(update={
            "start": _clip(token.start + offset, region), "end": _clip(token.end + offset, region)})
            for token in segment.tokens)
        update |= {"tokens": tokens, "words": words_of(tokens)}
    return segment.model_copy(update=update)


def placed_in(segment: Segment, region: Region) -> Segment:
    """A segment decoded from the samples of region alone, in the input's time (as placed
    puts a region read back from a source; the live engine's turns are such regions)."""
    return placed(segment, _Piece(0, region, None))


def _clip(seconds: float, region: Region) -> float:
    return round(min(max(seconds, region.start), region.end), 3)


def _samples(piece: _Piece) -> torch.Tensor:
    if piece.samples is not None:
        return piece.samples
    assert piece.source is not None
    return piece.source.read(piece.region.start, piece.region.end)


def length_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices sorted by length, split into batches whose padded size (longest x count) stays
    within budget; an item longer than budget is a batch of its own."""
    batches: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        # Ascending, so the padded size of current + index is lengths[index] * size.
        if current and lengths[index] * (len(current) + 1) > budget:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def time_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Runs of consecutive indices whose padded size (longest x count) stays within budget
    and whose padding is at most MAX_TIME_BATCH_PADDING of it; an item longer than budget is a
    batch of its own. Neighbours differ in length more than sorted items do: filling each run
    to the budget padded 22-40% more frames than length-sorted batches on the bench recording
    (and cost 22-35% more CPU time), while the bound keeps runs of like lengths (long speech
    cut at max_segment_s) together and decodes the rest alone, at about the CPU time of
    length-sorted batches."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = frames = 0
    for index, length in enumerate(lengths):
        padded = max(longest, length) * (len(current) + 1)
        if current and (padded > budget or
                        padded - frames - length > MAX_TIME_BATCH_PADDING * padded):
            batches.append(current)
            current, longest, frames = [], 0, 0
        current.append(index)
        longest, frames = max(longest, length), frames + length
    if current:
        batches.append(current)
    return batches
