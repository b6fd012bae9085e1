"""The public inference object: audio in, Transcription out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sensevoice_core.audio import SAMPLE_RATE, AudioInput, load_audio
from sensevoice_core.config import FrontendConfig
from sensevoice_core.decoding import Transcription, greedy_ctc, to_transcription
from sensevoice_core.frontend import CMVN, compute_features, pad_features
from sensevoice_core.model import SenseVoiceSmall
from sensevoice_core.tokenizer import Tokenizer
from sensevoice_core.vocab import LANGUAGE_QUERY_ROW, TEXT_NORM_QUERY_ROW, Language, TextNorm, language_of

# Padding a short clip up to a long one wastes compute, so batches are formed from
# length-sorted inputs under this budget of LFR frames (60 ms each: about 6 minutes of audio).
DEFAULT_BATCH_FRAMES = 6000


@dataclass(frozen=True)
class TranscribeOptions:
    language: Language = Language.AUTO  # the language prompt; AUTO lets the model decide
    use_itn: bool = False  # True: numerals and punctuation ("withitn"); False: spoken form

    @classmethod
    def create(cls, language: str | Language = "auto", use_itn: bool = False) -> TranscribeOptions:
        return cls(language=language_of(language), use_itn=bool(use_itn))

    @property
    def text_norm(self) -> TextNorm:
        return TextNorm.WITH_ITN if self.use_itn else TextNorm.WITHOUT_ITN


@dataclass
class SenseVoice:
    model: SenseVoiceSmall
    tokenizer: Tokenizer
    cmvn: CMVN
    frontend: FrontendConfig
    model_dir: Path
    layout: str  # "official" (FunASR release) or "hf" (config.json + model.safetensors)

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    def transcribe(
        self,
        audio: AudioInput,
        language: str | Language = "auto",
        use_itn: bool = False,
        sample_rate: int = SAMPLE_RATE,
    ) -> Transcription:
        """Transcribe one input: a path, the bytes of a file, or an array at sample_rate."""
        return self.transcribe_batch([audio], language, use_itn, sample_rate)[0]

    def transcribe_batch(
        self,
        audios: Sequence[AudioInput],
        language: str | Language = "auto",
        use_itn: bool = False,
        sample_rate: int = SAMPLE_RATE,
        batch_frames: int = DEFAULT_BATCH_FRAMES,
    ) -> list[Transcription]:
        """Transcribe several inputs, batched by length; results come back in input order."""
        options = TranscribeOptions.create(language, use_itn)
        waveforms = [load_audio(audio, sample_rate) for audio in audios]
        return self.transcribe_waveforms(waveforms, options, batch_frames)

    def transcribe_waveforms(
        self,
        waveforms: Sequence[torch.Tensor],
        options: TranscribeOptions,
        batch_frames: int = DEFAULT_BATCH_FRAMES,
    ) -> list[Transcription]:
        """waveforms: float32 mono 16 kHz tensors, as load_audio returns them."""
        features = [compute_features(w, self.frontend, self.cmvn) for w in waveforms]
        order = sorted(range(len(features)), key=lambda i: features[i].shape[0])
        results: dict[int, Transcription] = {}
        for batch in length_batches(order, [f.shape[0] for f in features], batch_frames):
            token_ids = self.decode_features([features[i] for i in batch], options)
            for index, ids in zip(batch, token_ids):
                duration_s = waveforms[index].numel() / SAMPLE_RATE
                results[index] = to_transcription(ids, self.tokenizer, duration_s)
        return [results[i] for i in range(len(features))]

    def decode_features(
        self, features: list[torch.Tensor], options: TranscribeOptions
    ) -> list[list[int]]:
        logits, lengths = self.logits(features, options)
        return greedy_ctc(logits, lengths)

    def logits(
        self, features: list[torch.Tensor], options: TranscribeOptions
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw CTC logits (B, 4 + T, vocab) for a batch of feature matrices, and their lengths."""
        batch, lengths = pad_features(features)
        count = len(features)
        language_rows = torch.full((count,), LANGUAGE_QUERY_ROW[options.language])
        text_norm_rows = torch.full((count,), TEXT_NORM_QUERY_ROW[options.text_norm])
        device = self.device
        with torch.inference_mode():
            return self.model(batch.to(device), lengths.to(device), language_rows.to(device),
                              text_norm_rows.to(device))


def length_batches(order: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """Split indices (sorted by length) into batches whose padded size stays under budget."""
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # Sorted ascending, so the padded size of current + index is lengths[index] * size.
        if current and lengths[index] * (len(current) + 1) > budget:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches
