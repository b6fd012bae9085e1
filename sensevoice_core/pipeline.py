"""The inference object: audio of any length in, one Result out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sensevoice_core.audio import SAMPLE_RATE, AudioInput
from sensevoice_core.config import FrontendConfig
from sensevoice_core.decoding import greedy_ctc, to_segment
from sensevoice_core.frontend import CMVN, compute_features, pad_features
from sensevoice_core.long_audio import transcribe_audio
from sensevoice_core.model import SenseVoiceSmall
from sensevoice_core.options import TranscribeOptions
from sensevoice_core.result import Result, Segment
from sensevoice_core.tokenizer import Tokenizer
from sensevoice_core.vad import SileroVAD
from sensevoice_core.vocab import LANGUAGE_QUERY_ROW, TEXT_NORM_QUERY_ROW


@dataclass
class SenseVoice:
    """A loaded model (``sensevoice_core.load_model``) and the VAD that segments its input."""

    model: SenseVoiceSmall
    tokenizer: Tokenizer
    cmvn: CMVN
    frontend: FrontendConfig
    model_dir: Path
    layout: str  # "official" (FunASR release) or "hf" (config.json + model.safetensors)
    _vad: SileroVAD | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    @property
    def vad(self) -> SileroVAD:
        """Silero VAD (1 MB, shipped in the silero-vad wheel), loaded on first use. It runs on
        the CPU whatever the model's device."""
        if self._vad is None:
            self._vad = SileroVAD.from_package()
        return self._vad

    def transcribe(self, audio: AudioInput, options: TranscribeOptions | None = None, *,
                   sample_rate: int = SAMPLE_RATE, source_name: str | None = None) -> Result:
        """Transcribe audio of any length into timed segments (none when there is no speech).

        Args:
            audio: a file path, the bytes of a file, or an array of samples at sample_rate.
            options: language, ITN, VAD, batch size and length limit; None: the defaults.
            sample_rate: the rate of an array input; files and bytes carry their own.
            source_name: how errors name the audio (an upload's file name); default: its
                path, or "the request's audio".

        The VAD runs on every call: silence or noise gives an empty Result without reaching
        the model. Audio no longer than ``options.vad.max_segment_s`` is transcribed whole,
        in one pass; longer audio is streamed, split at pauses and decoded in length-sorted
        batches of at most ``options.batch_s`` padded seconds, so memory does not grow with
        its length. Longer than ``options.max_audio_s``: AudioTooLongError.
        """
        return transcribe_audio(self, [audio], options or TranscribeOptions(), sample_rate,
                                [source_name])[0]

    def transcribe_batch(self, audios: Sequence[AudioInput],
                         options: TranscribeOptions | None = None, *,
                         sample_rate: int = SAMPLE_RATE) -> list[Result]:
        """Several inputs, each as ``transcribe`` would give it, in input order; the speech of
        all of them is batched by length, so many short clips share forward passes."""
        return transcribe_audio(self, audios, options or TranscribeOptions(), sample_rate)

    def decode(self, waveforms: Sequence[torch.Tensor],
               options: TranscribeOptions) -> list[Segment]:
        """One forward pass over 16 kHz waveforms as one padded batch: no VAD, no splitting.
        Each Segment spans its whole waveform, from 0 s; ``transcribe`` places them in time."""
        features = [compute_features(w, self.frontend, self.cmvn) for w in waveforms]
        logits, lengths = self.logits(features, options)
        return [to_segment(ids, self.tokenizer, 0.0, round(w.numel() / SAMPLE_RATE, 3))
                for ids, w in zip(greedy_ctc(logits, lengths), waveforms)]

    def logits(self, features: list[torch.Tensor],
               options: TranscribeOptions) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw CTC logits (B, 4 + T, vocab) for a batch of feature matrices, and their lengths."""
        batch, lengths = pad_features(features)
        count = len(features)
        language_rows = torch.full((count,), LANGUAGE_QUERY_ROW[options.language])
        text_norm_rows = torch.full((count,), TEXT_NORM_QUERY_ROW[options.text_norm])
        device = self.device
        with torch.inference_mode():
            return self.model(batch.to(device), lengths.to(device), language_rows.to(device),
                              text_norm_rows.to(device))
