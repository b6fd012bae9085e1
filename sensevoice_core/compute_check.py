"""The accuracy gate: a model converted to a reduced compute type must give float32's token
ids on the bundled warm-up clip, or the load falls back to the next safer type.

It runs only when a reduced type is built from fp32 weights (a fresh load), not when a
converted snapshot is mapped: the snapshot records the gate's outcome.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from importlib.resources import files

import torch

from sensevoice_core.audio import load_audio
from sensevoice_core.frontend import compute_features
from sensevoice_core.model import SenseVoiceSmall
from sensevoice_core.options import TranscribeOptions
from sensevoice_core.pipeline import SenseVoice
from sensevoice_core.vocab import CTC_BLANK_ID

WARMUP_CLIP = files("sensevoice_core") / "warmup.flac"


@dataclass(frozen=True)
class GateResult:
    compute_type: str
    frames: int  # frames compared (the clip's, with the 4 prompt frames)
    frames_differ: int  # frames whose best token differs from float32's
    tokens: int  # float32's token ids (CTC-collapsed, blanks dropped)
    tokens_differ: int  # tokens not matched in order (difflib), of the longer sequence
    finite: bool  # every logit finite (float16 overflow shows here)

    @property
    def passed(self) -> bool:
        return self.finite and self.tokens_differ == 0

    def describe(self) -> str:
        found = "" if self.finite else "non-finite logits; "
        return (f"{found}{self.tokens_differ} of {self.tokens} tokens and "
                f"{self.frames_differ} of {self.frames} frames differ from float32 on "
                f"{WARMUP_CLIP.name}")


def _token_ids(best: torch.Tensor) -> list[int]:
    return [t for t in torch.unique_consecutive(best).tolist() if t != CTC_BLANK_ID]


def _best_path(model: SenseVoice, features: torch.Tensor) -> tuple[torch.Tensor, bool]:
    logits, lengths = model.logits([features], TranscribeOptions())
    valid = logits[0, : int(lengths[0])]
    return valid.argmax(dim=-1), bool(torch.isfinite(valid).all())


def check_against_float32(reference: SenseVoice, candidate: SenseVoiceSmall) -> GateResult:
    """Compare a converted model with its float32 original on the bundled clip."""
    waveform = load_audio(str(WARMUP_CLIP))
    features = compute_features(waveform, reference.frontend, reference.cmvn)
    expected, _ = _best_path(reference, features)
    got, finite = _best_path(dataclasses.replace(reference, model=candidate), features)
    want_ids, got_ids = _token_ids(expected), _token_ids(got)
    matched = sum(block.size for block in
                  difflib.SequenceMatcher(None, want_ids, got_ids, autojunk=False)
                  .get_matching_blocks())
    differ = max(len(want_ids), len(got_ids)) - matched
    return GateResult(compute_type=getattr(candidate, "compute_type", "?"),
                      frames=int(expected.numel()),
                      frames_differ=int((expected != got).sum()),
                      tokens=len(want_ids), tokens_differ=differ, finite=finite)
