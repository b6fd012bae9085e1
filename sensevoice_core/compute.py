"""Compute types: which numeric type a model's layers run in, chosen per machine.

faster-whisper's names where they fit. ``auto`` is resolved where the model is loaded (each
worker, each node), from what that machine has; the other values are taken as asked, with a
warning when the machine has no fast path for them, and refused when it cannot run them.

What auto picks, and why:
- CPU with AMX or AVX-512 BF16: bfloat16 (weights cast once; measured 2.6-3.9x FunASR fp32).
- CPU with VNNI or AVX2 (no bf16 hardware): int8 (dynamic int8 Linear layers; bf16 there is
  emulated and ~7x slower than fp32).
- Anything older: float32.
- CUDA: bfloat16 when the GPU supports it, else float32. float16 is never picked by auto: the
  SANM encoder is reported to overflow in fp16 (FunASR #1889); asked for explicitly it runs,
  and the load-time accuracy gate (COMPUTE_CHECK) falls back to float32 when its tokens (or
  non-finite logits) differ from fp32's on the bundled clip.

int8_bfloat16 (int8 Linear layers, bf16 everything else) needs bf16 hardware; without it the
bf16 half is emulated and slower than both int8 and float32, so it is refused there.

This module imports no torch at import time: settings.py uses the Literal.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from sensevoice_core.errors import SettingsError

ComputeType = Literal["auto", "float32", "bfloat16", "float16", "int8", "int8_bfloat16"]
ConcreteComputeType = Literal["float32", "bfloat16", "float16", "int8", "int8_bfloat16"]
CONCRETE_TYPES: tuple[ConcreteComputeType, ...] = get_args(ConcreteComputeType)

# The accuracy gate's fallback: each reduced type's next safer type.
SAFER: dict[ConcreteComputeType, ConcreteComputeType] = {
    "int8_bfloat16": "int8", "int8": "float32", "bfloat16": "float32", "float16": "float32",
}

X86_FLAGS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx2")
FBGEMM_VNNI_FLAGS = frozenset({"amx_int8", "avx512_vnni"})  # torch's own reduce_range rule



@dataclass(frozen=True)
class MachineFeatures:
    """What the machine that loads the model can run fast. cpu_flags: the x86 flags of
    X86_FLAGS it has (from /proc/cpuinfo, or torch's CPU capability where that is absent)."""

    cpu_flags: frozenset[str]
    cuda_bf16: bool = False  # the CUDA device supports bfloat16

    @property
    def cpu_bf16(self) -> bool:
        return bool(self.cpu_flags & {"amx_bf16", "avx512_bf16"})

    @property
    def cpu_int8(self) -> bool:
        return bool(self.cpu_flags & {"amx_int8", "avx512_vnni", "avx_vnni", "avx2"})

    @property
    def vnni(self) -> bool:
        """fbgemm has a VNNI kernel (no 16-bit saturation) for these; AVX-VNNI alone runs its
        AVX2 kernel. Only the reason text uses this: int8.needs_reduce_range measures it."""
        return bool(self.cpu_flags & FBGEMM_VNNI_FLAGS)

    def describe(self) -> str:
        shown = [flag for flag in X86_FLAGS if flag in self.cpu_flags]
        return " ".join(shown) if shown else "none of " + "/".join(X86_FLAGS)


@dataclass(frozen=True)
class ComputeChoice:
    requested: ComputeType
    chosen: ConcreteComputeType
    reason: str  # a short phrase a user reads: "auto: AVX2 without AVX-512 BF16/AMX -> int8"
    warning: str | None = None  # honoured, but the machine has no fast path for it


class UnsupportedComputeType(SettingsError):
    """An explicit compute type this machine cannot run; the message names the setting."""


def read_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The X86_FLAGS this CPU has; torch's CPU capability when /proc/cpuinfo has no flags."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                present = set(line.partition(":")[2].split())
                return frozenset(flag for flag in X86_FLAGS if flag in present)
    except OSError:
        pass
    import torch

    capability = torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512", "DEFAULT", ...
    return frozenset({"avx2"}) if capability in ("AVX2", "AVX512") else frozenset()


def machine_features(device: str) -> MachineFeatures:
    cuda_bf16 = False
    if device.startswith("cuda"):
        import torch

        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return MachineFeatures(cpu_flags=read_cpu_flags(), cuda_bf16=cuda_bf16)


def choose_for(requested: ComputeType, device: str,
               features: MachineFeatures) -> ComputeChoice:
    """The concrete type for a request on a machine with these features (a pure function).

    Raises UnsupportedComputeType for an explicit type this machine cannot run.
    """
    cuda = device.startswith("cuda")
    if requested == "auto":
        if cuda:
            if features.cuda_bf16:
                return ComputeChoice(requested, "bfloat16", "auto: CUDA with bf16 -> bfloat16")
            return ComputeChoice(requested, "float32", "auto: CUDA without bf16 -> float32 "
                                 "(float16 overflows in the SANM encoder, FunASR #1889)")
        if features.cpu_bf16:
            has = "AMX" if "amx_bf16" in features.cpu_flags else "AVX-512 BF16"
            return ComputeChoice(requested, "bfloat16", f"auto: {has} -> bfloat16")
        if features.cpu_int8:
            has = "VNNI" if features.vnni else "AVX2"
            return ComputeChoice(requested, "int8",
                                 f"auto: {has} without AVX-512 BF16/AMX -> int8")
        return ComputeChoice(requested, "float32", "auto: no AVX2 -> float32")

    chosen: ConcreteComputeType = requested
    reason = f"SENSEVOICE_COMPUTE_TYPE={requested}"
    if chosen == "float32":
        return ComputeChoice(requested, chosen, reason)
    if cuda:
        if chosen in ("int8", "int8_bfloat16"):
            raise UnsupportedComputeType(
                f"SENSEVOICE_COMPUTE_TYPE={requested} runs on the CPU only (torch's int8 Linear "
                f"kernels are CPU kernels); on {device} use auto, bfloat16, float16 or float32")
        if chosen == "bfloat16" and not features.cuda_bf16:
            raise UnsupportedComputeType(
                f"SENSEVOICE_COMPUTE_TYPE=bfloat16: {device} does not support bfloat16; use "
                f"auto, float16 or float32")
        warning = ("float16 may overflow in the SANM encoder (FunASR #1889); the accuracy "
                   "gate checks it against float32" if chosen == "float16" else None)
        return ComputeChoice(requested, chosen, reason, warning)
    if chosen == "int8_bfloat16" and not features.cpu_bf16:
        raise UnsupportedComputeType(
            f"SENSEVOICE_COMPUTE_TYPE=int8_bfloat16 needs bf16 hardware (AMX or AVX-512 BF16); "
            f"this CPU has {features.describe()}, where the bf16 half is emulated and slower "
            f"than both int8 and float32. Use auto or int8")
    warning = None
    if chosen in ("bfloat16", "float16") and not features.cpu_bf16:
        warning = (f"SENSEVOICE_COMPUTE_TYPE={requested} honoured, but this CPU "
                   f"({features.describe()}) has no {requested} hardware: it runs several "
                   f"times slower than float32; auto would pick "
                   f"{choose_for('auto', device, features).chosen}")
    elif chosen == "int8" and not features.cpu_int8:
        warning = ("SENSEVOICE_COMPUTE_TYPE=int8 honoured, but this CPU has no AVX2/VNNI: "
                   "int8 may be slower than float32")
    return ComputeChoice(requested, chosen, reason, warning)


def choose_compute_type(requested: ComputeType, device: str = "cpu") -> ComputeChoice:
    """choose_for on this machine's features."""
    if requested not in get_args(ComputeType):
        raise UnsupportedComputeType(
            f"SENSEVOICE_COMPUTE_TYPE={requested!r} is not one of "
            f"{', '.join(get_args(ComputeType))}")
    return choose_for(requested, device, machine_features(device))


def served_fingerprint(model_fingerprint: str, compute_type: ConcreteComputeType) -> str:
    """The fingerprint of a model served in a compute type: the model's own for float32 (so
    float32 caches, labels and tests are unchanged), else sha256 of "<model's>/<type>". It
    names the L2 snapshot and tells replicas running different types apart."""
    if compute_type == "float32":
        return model_fingerprint
    return hashlib.sha256(f"{model_fingerprint}/{compute_type}".encode()).hexdigest()
