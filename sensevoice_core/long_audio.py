"""Audio of any length: VAD segmentation, length-sorted batches, segments merged back in order.

Memory is bounded by the batch budget, not by the file: the audio is streamed once through the
VAD (only one probability per 32 ms is kept), then each batch reads back just its own spans.
Audio no longer than one segment is transcribed whole, in one pass, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

from sensevoice_core.audio import SAMPLE_RATE, AudioInput
from sensevoice_core.audio_stream import AudioSource
from sensevoice_core.decoding import Transcription
from sensevoice_core.pipeline import SenseVoice, TranscribeOptions, length_batches
from sensevoice_core.segmentation import Region, VadOptions, speech_regions
from sensevoice_core.vad import SileroVAD, speech_probabilities

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
        return " ".join(segment.text for segment in self.segments if segment.text).strip()


def transcribe_long(model: SenseVoice, vad: SileroVAD, audio: AudioInput,
                    options: TranscribeOptions, vad_options: VadOptions = VadOptions(),
                    sample_rate: int = SAMPLE_RATE, batch_s: float = DEFAULT_BATCH_S,
                    max_seconds: float | None = None) -> LongTranscription:
    """Transcribe audio of any length into timed segments (none when there is no speech)."""
    with AudioSource(audio, sample_rate, max_seconds) as source:
        probabilities = speech_probabilities(vad, source.blocks())
        regions = speech_regions(probabilities, vad_options, source.duration_s)
        if not regions:
            return LongTranscription([], source.duration_s)
        if source.duration_s <= vad_options.max_segment_s:
            # One pass over the whole clip, exactly as a short request always ran.
            regions = [Region(0.0, round(source.duration_s, 3))]
        results = transcribe_regions(model, source, regions, options, batch_s)
    segments = [Segment(region.start, region.end, result.text, result.raw, result.language,
                        result.emotion, result.event, result.token_ids)
                for region, result in zip(regions, results)]
    return LongTranscription(segments, source.duration_s)


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
