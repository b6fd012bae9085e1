"""Waveform -> model features: Kaldi fbank, low-frame-rate stacking (LFR), global CMVN.

Matches FunASR's ``WavFrontend`` at inference: samples scaled to the int16 range, fbank with
``snip_edges=True`` and dither 0, LFR that left-pads (lfr_m - 1) // 2 copies of the first frame
and right-pads with copies of the last, then ``(x + shift) * scale`` from ``am.mvn``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torchaudio.compliance.kaldi as kaldi
from torch import Tensor

from sensevoice_core.config import FrontendConfig
from sensevoice_core.errors import ModelFileError

INT16_SCALE = 1 << 15  # Kaldi features are computed on int16-range samples


@dataclass(frozen=True)
class CMVN:
    shift: Tensor  # (feature_size,) added first: minus the global mean
    scale: Tensor  # (feature_size,) then multiplied: one over the global std

    @classmethod
    def from_kaldi_nnet(cls, path: Path) -> CMVN:
        """Parse the ``<AddShift>`` and ``<Rescale>`` rows of a Kaldi nnet1 ``am.mvn``."""
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ModelFileError(path, f"cannot read CMVN file: {e}") from e
        rows: dict[str, list[float]] = {}
        for index, line in enumerate(lines[:-1]):
            component = line.split()[:1]
            if component in (["<AddShift>"], ["<Rescale>"]):
                values = lines[index + 1].split()
                if values[:1] != ["<LearnRateCoef>"]:
                    break
                try:  # <LearnRateCoef> 0 [ v1 v2 ... ]
                    rows[component[0]] = [float(v) for v in values[3:-1]]
                except ValueError as e:
                    raise ModelFileError(path, f"bad number in {component[0]}: {e}") from e
        if set(rows) != {"<AddShift>", "<Rescale>"}:
            raise ModelFileError(path, "not a Kaldi nnet CMVN file",
                                 expected="<AddShift> and <Rescale> rows",
                                 found=", ".join(sorted(rows)) or "neither")
        shift, scale = rows["<AddShift>"], rows["<Rescale>"]
        if len(shift) != len(scale) or not shift:
            raise ModelFileError(path, "CMVN rows differ in length",
                                 expected=f"{len(shift)} values", found=f"{len(scale)}")
        return cls(shift=torch.tensor(shift), scale=torch.tensor(scale))

    def to_text(self) -> str:
        """Serialise back to the Kaldi nnet text form that from_kaldi_nnet reads."""
        dim = self.shift.numel()

        def row(values: Tensor) -> str:
            return "<LearnRateCoef> 0 [ " + " ".join(f"{v:.9g}" for v in values.tolist()) + " ]"

        return "\n".join([
            "<Nnet>", f"<Splice> {dim} {dim}", "[ 0 ]", f"<AddShift> {dim} {dim}",
            row(self.shift), f"<Rescale> {dim} {dim}", row(self.scale), "</Nnet>", "",
        ])


def fbank(waveform: Tensor, config: FrontendConfig) -> Tensor:
    """waveform: (samples,) float in [-1, 1] at config.sample_rate -> (frames, n_mels)."""
    duration_ms = waveform.numel() / config.sample_rate * 1000
    return kaldi.fbank(
        waveform[None, :] * INT16_SCALE,
        num_mel_bins=config.n_mels,
        # A clip shorter than one window still yields one frame, as in FunASR.
        frame_length=min(config.frame_length_ms, duration_ms),
        frame_shift=config.frame_shift_ms,
        dither=0.0,
        energy_floor=0.0,
        window_type=config.window,
        sample_frequency=config.sample_rate,
        snip_edges=True,
    )


def stack_low_frame_rate(frames: Tensor, lfr_m: int, lfr_n: int) -> Tensor:
    """(T, D) -> (ceil(T / lfr_n), lfr_m * D): each output stacks lfr_m frames, hop lfr_n."""
    count = math.ceil(frames.shape[0] / lfr_n)
    left = frames[:1].expand((lfr_m - 1) // 2, -1)
    padded = torch.cat([left, frames], dim=0)
    needed = (count - 1) * lfr_n + lfr_m
    if padded.shape[0] < needed:
        right = padded[-1:].expand(needed - padded.shape[0], -1)
        padded = torch.cat([padded, right], dim=0)
    windows = padded[:needed].unfold(0, lfr_m, lfr_n)  # (count, D, lfr_m)
    return windows.transpose(1, 2).reshape(count, -1)


def compute_features(waveform: Tensor, config: FrontendConfig, cmvn: CMVN) -> Tensor:
    """waveform: (samples,) mono float32 at config.sample_rate -> (frames, feature_size)."""
    stacked = stack_low_frame_rate(fbank(waveform, config), config.lfr_m, config.lfr_n)
    return (stacked + cmvn.shift) * cmvn.scale


def pad_features(features: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Right-pad with zeros to (B, T_max, D); returns the batch and its lengths (B,)."""
    lengths = torch.tensor([f.shape[0] for f in features], dtype=torch.long)
    batch = torch.nn.utils.rnn.pad_sequence(features, batch_first=True)
    return batch, lengths
