"""The inference object: audio of any length in, one Result out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sensevoice_core.audio import SAMPLE_RATE, AudioInput
from sensevoice_core.batching import ForwardBatcher
from sensevoice_core.config import FrontendConfig
from sensevoice_core.decoding import decode_logits, language_answers
from sensevoice_core.frontend import CMVN, compute_features, pad_features
from sensevoice_core.long_audio import ProgressCallback, transcribe_audio
from sensevoice_core.model import SenseVoiceSmall
from sensevoice_core.options import TranscribeOptions
from sensevoice_core.result import Result, Segment
from sensevoice_core.tokenizer import Tokenizer
from sensevoice_core.vad import SileroVAD
from sensevoice_core.vocab import LANGUAGE_QUERY_ROW, TEXT_NORM_QUERY_ROW, Language


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
    # Set (by the worker): every forward pass joins the passes of concurrent callers.
    batcher: ForwardBatcher | None = field(default=None, init=False, repr=False,
                                           compare=False)

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
                   sample_rate: int = SAMPLE_RATE, source_name: str | None = None,
                   progress: ProgressCallback | None = None) -> Result:
        """Transcribe audio of any length into timed segments (none when there is no speech).

        Args:
            audio: a file path, the bytes of a file, or an array of samples at sample_rate.
            options: language, ITN, VAD, batch size and length limit; None: the defaults.
            sample_rate: the rate of an array input; files and bytes carry their own.
            source_name: how errors name the audio (an upload's file name); default: its
                path, or "the request's audio".
            progress: called with (0, total, None) once the VAD has found the speech
                segments, then (done, total, segment) as each is decoded, in time order
                (long_audio.ProgressCallback); an exception it raises aborts the call.

        The VAD runs on every call: silence or noise gives an empty Result without reaching
        the model. Audio no longer than ``options.vad.max_segment_s`` is transcribed whole,
        in one pass; longer audio is streamed, split at pauses and decoded in length-sorted
        batches of at most ``options.batch_s`` padded seconds, so memory does not grow with
        its length (in time order instead, with progress). Longer than
        ``options.max_audio_s``: AudioTooLongError.
        """
        return transcribe_audio(self, [audio], options or TranscribeOptions(), sample_rate,
                                [source_name], progress)[0]

    def transcribe_batch(self, audios: Sequence[AudioInput],
                         options: TranscribeOptions | None = None, *,
                         sample_rate: int = SAMPLE_RATE) -> list[Result]:
        """Several inputs, each as ``transcribe`` would give it, in input order; the speech of
        all of them is batched by length, so many short clips share forward passes."""
        return transcribe_audio(self, audios, options or TranscribeOptions(), sample_rate)

    def decode(self, waveforms: Sequence[torch.Tensor],
               options: TranscribeOptions) -> list[Segment]:
        """One forward pass over 16 kHz waveforms as one padded batch: no VAD, no splitting.
        Each Segment spans its whole waveform, from 0 s, and so do its words and tokens (with
        ``options.word_timestamps``); ``transcribe`` places them in time. Confidences
        (avg_logprob, no_speech_prob) are always filled; see decoding.decode_logits.

        A language whitelist (``options.languages``) rules out the other language tags on the
        language frame. In auto mode, an item whose own choice was ruled out is decoded again
        with the query of the language chosen in its place, as if the caller had fixed it
        (on held-out demo clips that auto tags as Mandarin, its English CER falls from 38.5%
        to 20.5% with this second pass; the mask alone keeps the text of the wrong query);
        its no_speech_prob stays the first pass's, the answer to the auto query.
        """
        features = [compute_features(w, self.frontend, self.cmvn) for w in waveforms]
        durations = [round(w.numel() / SAMPLE_RATE, 3) for w in waveforms]
        logits, lengths = self.logits(features, options)
        segments = self._segments(logits, lengths, durations, options)
        if options.languages and options.language is Language.AUTO:
            own = logits[:, 0].argmax(dim=-1).tolist()
            answers = language_answers(logits, self.tokenizer, options.languages).tolist()
            allowed = {lang.value: lang for lang in options.languages}
            redo = [i for i, (mine, answer) in enumerate(zip(own, answers))
                    if mine != answer and self.tokenizer.tag_names.get(answer) in allowed]
            if redo:
                chosen = [allowed[self.tokenizer.tag_names[answers[i]]] for i in redo]
                again, again_lengths = self.logits([features[i] for i in redo], options, chosen)
                for i, segment in zip(redo, self._segments(again, again_lengths,
                                                           [durations[i] for i in redo],
                                                           options)):
                    segments[i] = segment.model_copy(
                        update={"no_speech_prob": segments[i].no_speech_prob})
        return segments

    def _segments(self, logits: torch.Tensor, lengths: torch.Tensor, durations: list[float],
                  options: TranscribeOptions) -> list[Segment]:
        return decode_logits(logits, lengths, self.tokenizer, durations,
                             languages=options.languages,
                             word_timestamps=options.word_timestamps,
                             frame_s=self.frontend.feature_frame_s)

    def logits(self, features: list[torch.Tensor], options: TranscribeOptions,
               languages: Sequence[Language] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw CTC logits (B, 4 + T, vocab) for a batch of feature matrices, and their lengths;
        languages: one language query per item instead of options.language. With a batcher,
        the rows come from passes shared with other callers (sensevoice_core.batching), the
        frames past an item's length are zeros."""
        language_rows = [LANGUAGE_QUERY_ROW[options.language]] * len(features) \
            if languages is None else [LANGUAGE_QUERY_ROW[lang] for lang in languages]
        text_norm_rows = [TEXT_NORM_QUERY_ROW[options.text_norm]] * len(features)
        if self.batcher is None:
            return self.forward_rows(features, language_rows, text_norm_rows)
        rows = self.batcher.run(features, language_rows, text_norm_rows)
        lengths = torch.tensor([item.shape[0] for item in rows], dtype=torch.long,
                               device=rows[0].device)
        if len(rows) == 1:
            return rows[0].unsqueeze(0), lengths  # no copy: the batcher's rows are its own
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), lengths

    def forward_rows(self, features: list[torch.Tensor], language_rows: Sequence[int],
                     text_norm_rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One padded forward pass, each item with its own language and text-norm query rows
        (vocab.LANGUAGE_QUERY_ROW, TEXT_NORM_QUERY_ROW)."""
        batch, lengths = pad_features(features)
        device = self.device
        with torch.inference_mode():
            return self.model(batch.to(device), lengths.to(device),
                              torch.tensor(language_rows, dtype=torch.long).to(device),
                              torch.tensor(text_norm_rows, dtype=torch.long).to(device))
