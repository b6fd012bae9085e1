"""Clips with no speech in them, labelled ``<|nospeech|>`` with empty text, so that the demo
model learns to say nothing (and to say that it heard nothing) on silence, noise, tones, hum
and clicks. Seeded; the same generator makes the training clips and the held-out ones."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from sensevoice_core.audio import SAMPLE_RATE
from training.augment import colored_noise

KINDS = ("silence", "white", "pink", "brown", "tones", "melody", "hum", "clicks")


@dataclass(frozen=True)
class NoSpeech:
    kind: str
    event: str  # the event tag it is labelled with: "BGM" for a melody, else "Event_UNK"
    waveform: np.ndarray


def _tones(seconds: float, rng: np.random.Generator, notes: int) -> np.ndarray:
    out = np.zeros(int(seconds * SAMPLE_RATE), np.float32)
    length = out.size // notes
    for note in range(notes):
        frequency = float(rng.uniform(200.0, 3000.0))
        duration = int(length * rng.uniform(0.4, 1.0))
        t = np.arange(duration) / SAMPLE_RATE
        envelope = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)
        tone = np.sin(2 * np.pi * frequency * t) * envelope
        if rng.random() < 0.5:  # a DTMF-like pair
            tone = (tone + np.sin(2 * np.pi * frequency * 1.37 * t) * envelope) / 2
        start = note * length
        out[start:start + duration] += tone.astype(np.float32)
    return out


def _hum(seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    mains = float(rng.choice([50.0, 60.0]))
    wave = sum(np.sin(2 * np.pi * mains * k * t) / k for k in range(1, 6))
    return (wave + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def _clicks(seconds: float, rng: np.random.Generator) -> np.ndarray:
    out = 0.002 * rng.standard_normal(int(seconds * SAMPLE_RATE)).astype(np.float32)
    for _ in range(int(rng.integers(2, 30))):
        at = int(rng.integers(0, out.size - 200))
        width = int(rng.integers(5, 200))
        out[at:at + width] += (rng.standard_normal(width) * np.exp(-np.arange(width) / 20)
                               ).astype(np.float32)
    return out


def make_nospeech(seed: str, kind: str | None = None, longest_s: float = 8.0) -> NoSpeech:
    """One clip of 0.5 s to longest_s; ``kind`` picks the sound (default: drawn from the
    seed)."""
    choice = random.Random(seed)
    kind = kind or choice.choice(KINDS)
    rng = np.random.default_rng(choice.randrange(2**32))
    seconds = choice.uniform(0.5, longest_s)
    size = int(seconds * SAMPLE_RATE)
    if kind == "silence":
        wave = np.zeros(size, np.float32) if choice.random() < 0.5 else \
            colored_noise("white", size, rng) * np.float32(10 ** (-85 / 20))
    elif kind in ("white", "pink", "brown"):
        wave = colored_noise(kind, size, rng)
    elif kind in ("tones", "melody"):
        wave = _tones(seconds, rng, int(rng.integers(1, 3)) if kind == "tones"
                      else int(rng.integers(4, 12)))
    elif kind == "hum":
        wave = _hum(seconds, rng)
    else:
        wave = _clicks(seconds, rng)
    if kind != "silence":
        level_db = choice.uniform(-50.0, -6.0)
        wave = wave * np.float32(10 ** (level_db / 20) / max(np.abs(wave).max(), 1e-6))
        if choice.random() < 0.3 and kind not in ("white", "pink", "brown"):
            floor = colored_noise(choice.choice(["white", "pink"]), size, rng)
            wave = wave + floor * np.float32(10 ** (choice.uniform(-70.0, -40.0) / 20))
    return NoSpeech(kind, "BGM" if kind == "melody" else "Event_UNK",
                    np.clip(wave, -1.0, 1.0).astype(np.float32))
