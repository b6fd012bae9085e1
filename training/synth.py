"""Speech from espeak-ng (``apt-get install -y espeak-ng``), deterministic from a seed.

Train and held-out utterances differ in their random text, and the held-out split also uses
voice variants and a speaking-rate range that training never hears.
"""

from __future__ import annotations

import random
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torchaudio.functional

from sensevoice_core.audio import SAMPLE_RATE, load_audio
from training.corpus import Utterance, sample_utterance

ESPEAK_VOICES = {"en": ("en-us", "en"), "zh": ("cmn",)}
TRAIN_VARIANTS = ("", "m1", "m2", "m3", "m4", "m6", "m7", "f1", "f2", "f3", "f5", "klatt",
                  "klatt2", "klatt3", "klatt4", "croak")
HELD_OUT_VARIANTS = ("m5", "f4")
TRAIN_RATES = (120, 195)  # words per minute
HELD_OUT_RATES = (200, 215)


@dataclass(frozen=True)
class Rendering:
    voice: str  # espeak-ng voice, e.g. "en-us+m3"
    rate: int  # words per minute
    pitch: int  # 0..99
    gain_db: float
    snr_db: float | None  # None: no added noise
    lead_s: float  # silence before and after the speech
    tail_s: float
    tempo: float = 1.0  # speed perturbation (training only): resampled, so pitch moves too


@dataclass(frozen=True)
class Clip:
    utterance: Utterance
    rendering: Rendering
    waveform: torch.Tensor  # float32 mono 16 kHz


def choose_rendering(language: str, held_out: bool, rng: random.Random) -> Rendering:
    variants = HELD_OUT_VARIANTS if held_out else TRAIN_VARIANTS
    variant = rng.choice(variants)
    base = rng.choice(ESPEAK_VOICES[language])
    low, high = HELD_OUT_RATES if held_out else TRAIN_RATES
    return Rendering(
        voice=base + (f"+{variant}" if variant else ""),
        rate=rng.randint(low, high),
        pitch=rng.randint(25, 75),
        gain_db=rng.uniform(-12.0, 3.0),
        snr_db=None if rng.random() < 0.3 else rng.uniform(12.0, 40.0),
        lead_s=rng.uniform(0.05, 0.4),
        tail_s=rng.uniform(0.05, 0.4),
        tempo=1.0 if held_out or rng.random() < 0.5 else rng.uniform(0.9, 1.2),
    )


def speak(text: str, rendering: Rendering) -> torch.Tensor:
    """espeak-ng's WAV on stdout -> float32 mono 16 kHz."""
    done = subprocess.run(
        ["espeak-ng", "-v", rendering.voice, "-s", str(rendering.rate), "-p",
         str(rendering.pitch), "--stdout", text],
        capture_output=True, check=True, timeout=30,
    )
    return load_audio(done.stdout)


def augment(speech: torch.Tensor, rendering: Rendering, seed: int) -> torch.Tensor:
    generator = np.random.default_rng(seed)
    if rendering.tempo != 1.0:
        # A source rate on a 400 Hz grid keeps the resampling ratio small (at most 40:49)
        # and its sinc kernel cheap; an arbitrary rate makes the kernel enormous.
        source_rate = round(SAMPLE_RATE * rendering.tempo / 400) * 400
        speech = torchaudio.functional.resample(speech, source_rate, SAMPLE_RATE)
    lead = np.zeros(int(rendering.lead_s * SAMPLE_RATE), dtype=np.float32)
    tail = np.zeros(int(rendering.tail_s * SAMPLE_RATE), dtype=np.float32)
    samples = np.concatenate([lead, speech.numpy(), tail])
    samples *= 10 ** (rendering.gain_db / 20)
    if rendering.snr_db is not None:
        power = float(np.mean(samples**2)) or 1e-8
        noise = generator.standard_normal(samples.size).astype(np.float32)
        samples += noise * np.sqrt(power / 10 ** (rendering.snr_db / 10))
    return torch.from_numpy(np.clip(samples, -1.0, 1.0).astype(np.float32))


def make_clip(index: int, seed: int, held_out: bool) -> Clip:
    # One generator per clip, seeded from (seed, split, index): the result does not depend on
    # thread scheduling, and the two splits never share a random sequence.
    rng = random.Random(f"{seed}:{'held-out' if held_out else 'train'}:{index}")
    language = "en" if index % 2 == 0 else "zh"
    utterance = sample_utterance(language, rng)
    rendering = choose_rendering(language, held_out, rng)
    waveform = augment(speak(utterance.spoken, rendering), rendering, rng.randrange(2**32))
    return Clip(utterance, rendering, waveform)


def make_clips(count: int, seed: int, held_out: bool, workers: int = 2) -> list[Clip]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda i: make_clip(i, seed, held_out), range(count)))
