"""Augmentation of synthetic speech (numpy float32, 16 kHz), each step seeded by its caller.

The chain a training clip goes through (voices.Rendering says which steps apply): speed
perturbation, reverberation, telephone band, silence around the speech, gain, additive noise at
an SNR measured on the speech alone. ``add_noise`` is also what the held-out noisy condition
uses, in training's evaluation and in the tests.
"""

from __future__ import annotations

import numpy as np
import torch
import torchaudio.functional

from sensevoice_core.audio import SAMPLE_RATE
from training.voices import NoiseKind, Rendering


def change_tempo(samples: np.ndarray, tempo: float) -> np.ndarray:
    """Speed perturbation: played back ``tempo`` times faster (pitch moves with it). A source
    rate on a 400 Hz grid keeps the resampling ratio small and its sinc kernel cheap."""
    if tempo == 1.0:
        return samples
    source_rate = round(SAMPLE_RATE * tempo / 400) * 400
    return torchaudio.functional.resample(torch.from_numpy(samples), source_rate,
                                          SAMPLE_RATE).numpy()


def reverberate(samples: np.ndarray, rt60: float, rng: np.random.Generator) -> np.ndarray:
    """A synthetic room: exponentially decaying noise (60 dB down after rt60 seconds) after the
    direct sound, convolved; the level of the input is kept."""
    length = max(1, int(rt60 * SAMPLE_RATE))
    decay = np.exp(-6.9 * np.arange(length) / length)
    response = rng.standard_normal(length) * decay * 0.3
    response[0] = 1.0
    size = samples.size + length - 1
    wet = np.fft.irfft(np.fft.rfft(samples, size) * np.fft.rfft(response, size), size)
    level = np.sqrt(np.mean(samples**2) / max(np.mean(wet**2), 1e-12))
    return (wet * level).astype(np.float32)


def telephone(samples: np.ndarray) -> np.ndarray:
    """An 8 kHz G.711 round trip: 300 Hz high-pass, band-limited to 4 kHz, mu-law quantised."""
    audio = torchaudio.functional.highpass_biquad(torch.from_numpy(samples), SAMPLE_RATE, 300.0)
    narrow = torchaudio.functional.resample(audio, SAMPLE_RATE, 8000).clamp(-1.0, 1.0)
    narrow = torchaudio.functional.mu_law_decoding(
        torchaudio.functional.mu_law_encoding(narrow, 256), 256)
    return torchaudio.functional.resample(narrow, 8000, SAMPLE_RATE).numpy().astype(np.float32)


def colored_noise(kind: NoiseKind, size: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-power white, pink (1/f) or brown (1/f^2) noise."""
    white = rng.standard_normal(size)
    if kind != "white":
        spectrum = np.fft.rfft(white)
        frequencies = np.maximum(np.fft.rfftfreq(size), 1.0 / size)
        spectrum /= np.sqrt(frequencies) if kind == "pink" else frequencies
        white = np.fft.irfft(spectrum, size)
    return (white / max(np.sqrt(np.mean(white**2)), 1e-12)).astype(np.float32)


def babble(size: int, pool: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Unit-power babble: three to five other utterances, each looped and shifted, summed."""
    mixed = np.zeros(size, np.float32)
    for index in rng.choice(len(pool), size=min(len(pool), int(rng.integers(3, 6))),
                            replace=False):
        voice = pool[index]
        voice = voice / max(np.sqrt(np.mean(voice**2)), 1e-12)
        looped = np.resize(voice, size + voice.size)
        shift = int(rng.integers(0, voice.size))
        mixed += looped[shift:shift + size]
    return mixed / max(np.sqrt(np.mean(mixed**2)), 1e-12)


def add_noise(samples: np.ndarray, speech_power: float, kind: NoiseKind, snr_db: float,
              rng: np.random.Generator, pool: list[np.ndarray] | None = None) -> np.ndarray:
    """Noise at ``snr_db`` below ``speech_power`` (the power of the speech, not of the clip
    with its silences). Babble needs a pool of at least three other utterances; without one it
    is pink noise."""
    if kind == "babble" and pool is not None and len(pool) >= 3:
        noise = babble(samples.size, pool, rng)
    else:
        noise = colored_noise("pink" if kind == "babble" else kind, samples.size, rng)
    return samples + noise * np.float32(np.sqrt(speech_power / 10 ** (snr_db / 10)))


def speech_power(samples: np.ndarray) -> float:
    return max(float(np.mean(samples.astype(np.float64) ** 2)), 1e-10)


def render_chain(speech: np.ndarray, word_starts: list[float] | None, rendering: Rendering,
                 rng: np.random.Generator, pool: list[np.ndarray]
                 ) -> tuple[np.ndarray, list[float] | None]:
    """A synthesised utterance through the rendering's augmentation; word times follow."""
    speech = change_tempo(speech, rendering.tempo)
    if word_starts is not None:
        word_starts = [t / rendering.tempo + rendering.lead_s for t in word_starts]
    if rendering.reverb_rt60:
        speech = reverberate(speech, rendering.reverb_rt60, rng)
    if rendering.telephone:
        speech = telephone(speech)
    speech = speech * np.float32(10 ** (rendering.gain_db / 20) / max(np.abs(speech).max(), 1e-6))
    power = speech_power(speech)
    lead = np.zeros(int(rendering.lead_s * SAMPLE_RATE), np.float32)
    tail = np.zeros(int(rendering.tail_s * SAMPLE_RATE), np.float32)
    samples = np.concatenate([lead, speech, tail])
    if rendering.noise is not None:
        samples = add_noise(samples, power, rendering.noise, rendering.snr_db, rng, pool)
    return np.clip(samples, -1.0, 1.0).astype(np.float32), word_starts
