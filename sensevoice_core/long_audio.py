"""Audio of any length: VAD segmentation, length-sorted batches, segments merged back in order.

Memory is bounded by the batch budget, not by the file: the audio is streamed once through the
VAD (only one probability per 32 ms is kept), then each batch reads back just its own spans.
Audio where the VAD finds no speech never reaches the model; audio no longer than one segment
is transcribed whole, in one pass, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sensevoice_core.audio import SAMPLE_RATE, AudioInput, AudioSource
from sensevoice_core.decoding import Transcription
from sensevoice_core.pipeline import SenseVoice, TranscribeOptions, length_batches
from sensevoice_core.segmentation import Region, VadOptions, speech_regions
from sensevoice_core.vad import SileroVAD, speech_probabilities
from sensevoice_core.vocab import Language

UNSPACED = {"zh", "yue", "ja"}  # scripts written without spaces between sentences
NOSPEECH = Language.NOSPEECH.value
FEATURE_FRAME_S = 0.06  # one low-frame-rate feature frame: 6 stacked 10 ms frames
DEFAULT_BATCH_S = 120.0  # padded seconds of audio per batch


@dataclass(frozen=True)
class Segment:
    start: float  # seconds from the start of the audio
    end: float
    text: str
    raw: str  # as the model emitted it, tags included
    language: str | None
    emotion: str | None
    event: str | None
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class LongTranscription:
    segments: list[Segment]
    duration_s: float

    @property
    def text(self) -> str:
        """The segments' texts in order; no space between neighbours in unspaced scripts."""
        text = ""
        previous: Segment | None = None
        for segment in (s for s in self.segments if s.text):
            unspaced = (previous is not None and previous.language in UNSPACED
                        and segment.language in UNSPACED)
            text += ("" if previous is None or unspaced else " ") + segment.text
            previous = segment
        return text

    def dominant(self, tag: str) -> str | None:
        """The language / emotion / event covering the most time, over segments with speech."""
        seconds: dict[str, float] = {}
        for segment in self.segments:
            value = getattr(segment, tag)
            if value is not None:
                seconds[value] = seconds.get(value, 0.0) + segment.end - segment.start
        return max(seconds, key=seconds.__getitem__) if seconds else None


def transcribe_long(model: SenseVoice, vad: SileroVAD, audio: AudioInput,
                    options: TranscribeOptions, vad_options: VadOptions = VadOptions(),
                    sample_rate: int = SAMPLE_RATE, batch_s: float = DEFAULT_BATCH_S,
                    max_seconds: float | None = None,
                    source_name: str | None = None) -> LongTranscription:
    """Transcribe audio of any length into timed segments (none when there is no speech).

    Every request streams once through the VAD (about 2 ms per second of audio): audio where
    it finds no speech (silence, noise) gives an empty result without reaching the model. Audio
    no longer than one segment is then transcribed whole, in one pass, exactly as a short
    request always ran; longer audio is split at the VAD's pauses. source_name (an upload's
    file name) names the audio in every error.
    """
    with AudioSource(audio, sample_rate, max_seconds, source_name) as source:
        probabilities = speech_probabilities(vad, source.blocks())
        regions = speech_regions(probabilities, vad_options, source.duration_s)
        if not regions:
            return LongTranscription([], source.duration_s)
        if source.duration_s <= vad_options.max_segment_s:
            waveform = source.whole()
            [result] = model.transcribe_waveforms([waveform], options)
            duration = waveform.numel() / SAMPLE_RATE
            if result.language == NOSPEECH or not result.token_ids:
                return LongTranscription([], duration)
            return LongTranscription([segment_of(Region(0.0, round(duration, 3)), result)],
                                     duration)
        results = transcribe_regions(model, source, regions, options, batch_s)
    segments = [segment_of(region, result) for region, result in zip(regions, results)
                if result.language != NOSPEECH]
    return LongTranscription(segments, source.duration_s)


def has_speech(vad: SileroVAD, waveform: torch.Tensor, vad_options: VadOptions) -> bool:
    """Whether the VAD finds a speech region in 16 kHz samples (silence and noise: no)."""
    probabilities = speech_probabilities(vad, [waveform])
    return bool(speech_regions(probabilities, vad_options, waveform.numel() / SAMPLE_RATE))


def segment_of(region: Region, result: Transcription) -> Segment:
    return Segment(region.start, region.end, result.text, result.raw, result.language,
                   result.emotion, result.event, result.token_ids)


def transcribe_regions(model: SenseVoice, source: AudioSource, regions: list[Region],
                       options: TranscribeOptions, batch_s: float) -> list[Transcription]:
    """Regions in length-sorted batches of at most batch_s padded seconds; results in order."""
    lengths = [round((r.end - r.start) / FEATURE_FRAME_S) for r in regions]
    order = sorted(range(len(regions)), key=lambda i: lengths[i])
    results: dict[int, Transcription] = {}
    for batch in length_batches(order, lengths, max(1, round(batch_s / FEATURE_FRAME_S))):
        waveforms = [source.read(regions[i].start, regions[i].end) for i in batch]
        for index, result in zip(batch, model.transcribe_waveforms(waveforms, options)):
            results[index] = result
    return [results[i] for i in range(len(regions))]
