"""The accuracy gate: a model converted to a reduced compute type is compared with its float32
original on a bundled 10 s clip of demo speech (gate.flac); a type that fails makes the load
fall back to the next safer type.

Two measurements, because a small model's end-to-end argmax hides a broken kernel (its logit
margins are wide: the demo model's 170 frames keep every argmax even under saturating int8):

- end to end: the share of frames whose best token differs from float32's, and finite logits;
- per layer (int8 types): each Int8Linear run on the activations float32 fed its Linear, its
  output's relative error against float32's. Correct int8 stays near 0.02; the AVX2 kernel
  saturating 8-bit activations (reduce_range off without VNNI) gives 0.05-0.25.

It runs when a reduced type is built from float32 weights; a snapshot records that it ran and
the int8 kernel parameters it ran with (cache.py), so a snapshot built with the check off or
on a machine with other int8 numerics is rebuilt and checked where it is served.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib.resources import files

import torch
from torch import Tensor, nn

from sensevoice_core.audio import load_audio
from sensevoice_core.frontend import compute_features
from sensevoice_core.int8 import Int8Linear
from sensevoice_core.model import SenseVoiceSmall
from sensevoice_core.options import TranscribeOptions
from sensevoice_core.pipeline import SenseVoice

GATE_CLIP = files("sensevoice_core") / "gate.flac"
MAX_FRAMES_DIFFER = 0.02  # share of frames whose best token may differ from float32's
# Relative error of one int8 layer's output on float32's activations. Measured on gate.flac
# (Zen 3, AVX2): correct int8 0.017 (demo model) and 0.021 (full-size random weights); the
# saturating AVX2 kernel 0.052 and 0.242.
MAX_LAYER_ERROR = 0.035


@dataclass(frozen=True)
class GateResult:
    compute_type: str
    frames: int  # frames compared (the clip's, with the 4 prompt frames)
    frames_differ: int  # frames whose best token differs from float32's
    finite: bool  # every logit finite (float16 overflow shows here)
    layer_error: float = 0.0  # worst int8 layer's relative output error (0 without int8)
    worst_layer: str = ""
    error: str = ""  # the candidate raised: the exception, in words

    @property
    def passed(self) -> bool:
        return (not self.error and self.finite and self.layer_error <= MAX_LAYER_ERROR
                and self.frames_differ <= MAX_FRAMES_DIFFER * self.frames)

    def describe(self) -> str:
        if self.error:
            return f"the converted model raised on {GATE_CLIP.name}: {self.error}"
        found = "" if self.finite else "non-finite logits; "
        layer = (f"; worst int8 layer {self.worst_layer} relative error {self.layer_error:.3f}"
                 f" (limit {MAX_LAYER_ERROR})" if self.worst_layer else "")
        return (f"{found}{self.frames_differ} of {self.frames} frames differ from float32 on "
                f"{GATE_CLIP.name} (limit {MAX_FRAMES_DIFFER:.0%}){layer}")


def _logits(model: SenseVoice, features: Tensor) -> Tensor:
    logits, lengths = model.logits([features], TranscribeOptions())
    return logits[0, : int(lengths[0])]


def _capture_linear_io(model: nn.Module) -> tuple[dict[str, tuple[Tensor, Tensor]], list]:
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def hook(name: str):
        def record(_module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            # cloned: the model's next ops may work in place (the feed-forward's ReLU does)
            seen[name] = (inputs[0].detach().clone(), output.detach().clone())
        return record

    handles = [module.register_forward_hook(hook(name))
               for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return seen, handles


def _worst_int8_layer(candidate: nn.Module,
                      seen: dict[str, tuple[Tensor, Tensor]]) -> tuple[float, str]:
    worst, worst_name = 0.0, ""
    for name, layer in candidate.named_modules():
        if isinstance(layer, Int8Linear) and name in seen:
            x, want = seen[name]
            got = layer(x.float()).float()
            error = float((got - want).norm() / want.norm().clamp_min(1e-12))
            if not error <= worst:  # NaN counts as the worst
                worst, worst_name = error, name
    return worst, worst_name


def check_against_float32(reference: SenseVoice, candidate: SenseVoiceSmall) -> GateResult:
    """Compare a converted model with its float32 original on the bundled gate clip. A
    candidate that raises fails the gate (the caller falls back), it does not fail the load."""
    compute_type = candidate.compute_type
    features = compute_features(load_audio(str(GATE_CLIP)), reference.frontend, reference.cmvn)
    seen, handles = _capture_linear_io(reference.model)
    try:
        expected = _logits(reference, features)
    finally:
        for handle in handles:
            handle.remove()
    frames = int(expected.shape[0])
    try:
        got = _logits(dataclasses.replace(reference, model=candidate), features)
        layer_error, worst_layer = _worst_int8_layer(candidate, seen)
    except Exception as e:  # noqa: BLE001 - any failure of the candidate is a failed gate
        return GateResult(compute_type, frames, frames, False, error=f"{type(e).__name__}: {e}")
    return GateResult(compute_type=compute_type, frames=frames,
                      frames_differ=int((expected.argmax(-1) != got.argmax(-1)).sum()),
                      finite=bool(torch.isfinite(got).all()),
                      layer_error=layer_error, worst_layer=worst_layer)
