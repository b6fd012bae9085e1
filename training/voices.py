"""Which voices say the demo model's training speech, which are kept for the held-out set, and
how each clip is rendered (speaking rate, pitch, pauses, and the augmentation applied after).

Three synthesisers from Debian's packages: espeak-ng (every English accent it has and a wide
set of its voice variants; Mandarin through ``cmn-latn-pinyin``, given pinyin, and ``cmn``,
given characters), flite (its built-in English voices) and festival (a diphone voice and an HTS
voice, the closest to natural speech here). The held-out split uses an accent, espeak-ng
variants and a flite voice that training never hears.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

Synth = Literal["espeak", "flite", "festival"]
NoiseKind = Literal["white", "pink", "brown", "babble"]
NOISE_KINDS: tuple[NoiseKind, ...] = ("white", "pink", "brown", "babble")


@dataclass(frozen=True)
class Voice:
    synth: Synth
    name: str  # espeak-ng voice ("en-us"), flite voice ("slt") or festival voice function
    pinyin: bool = False  # Mandarin given as tone-numbered pinyin instead of characters


EN_TRAIN_ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
                    "en-029", "en-us-nyc")
EN_HELD_OUT_ACCENTS = ("en-gb-x-rp",)
TRAIN_VARIANTS = ("", "m1", "m2", "m3", "m4", "m6", "m7", "f1", "f2", "f3", "f5", "klatt",
                  "klatt2", "klatt3", "klatt4", "croak", "Alex", "Andy", "Annie", "belinda",
                  "benjamin", "david", "edward", "gene", "iven", "john", "linda", "max",
                  "michel", "norbert", "paul", "rob", "robert", "steph", "travis", "victor",
                  "grandma", "grandpa")
HELD_OUT_VARIANTS = ("m5", "f4", "Andrea", "sandro")
FLITE_TRAIN = ("kal16", "awb", "slt", "kal")
FLITE_HELD_OUT = ("rms",)
FESTIVAL_TRAIN = ("voice_kal_diphone", "voice_cmu_us_slt_arctic_hts")
ZH_TRAIN_BASES = (("cmn-latn-pinyin", True), ("cmn-latn-pinyin", True), ("cmn", False))

TRAIN_RATES = (100, 250)  # words per minute (flite/festival: the equivalent duration stretch)
HELD_OUT_RATES = (130, 220)
NATURAL_WPM = 175  # flite's and festival's own rate, for the stretch a rate asks for


@dataclass(frozen=True)
class Rendering:
    voice: Voice
    rate: int  # words per minute asked for
    pitch: int  # espeak-ng 0..99; flite: mean F0 = 80 + pitch * 1.5 Hz; festival: unused
    word_gap: int  # espeak-ng: extra pause between words, in 10 ms
    tempo: float  # speed perturbation after synthesis (resampled: pitch moves too)
    gain_db: float
    lead_s: float
    tail_s: float
    noise: NoiseKind | None
    snr_db: float
    reverb_rt60: float  # 0: none
    telephone: bool  # 8 kHz round trip with a telephone band

    def describe(self) -> str:
        return f"{self.voice.synth}:{self.voice.name}"


def _espeak_voice(base: str, variant: str, pinyin: bool = False) -> Voice:
    return Voice("espeak", base + (f"+{variant}" if variant else ""), pinyin)


def choose_voice(language: str, held_out: bool, rng: random.Random) -> Voice:
    variants = HELD_OUT_VARIANTS if held_out else TRAIN_VARIANTS
    if language == "zh":
        base, pinyin = ("cmn-latn-pinyin", True) if held_out else rng.choice(ZH_TRAIN_BASES)
        return _espeak_voice(base, rng.choice(variants), pinyin)
    synth = rng.choices(("espeak", "flite", "festival"),
                        (0.5, 0.5, 0.0) if held_out else (0.5, 0.3, 0.2))[0]
    if synth == "flite":
        return Voice("flite", rng.choice(FLITE_HELD_OUT if held_out else FLITE_TRAIN))
    if synth == "festival":
        return Voice("festival", rng.choice(FESTIVAL_TRAIN))
    accents = EN_HELD_OUT_ACCENTS if held_out else EN_TRAIN_ACCENTS
    return _espeak_voice(rng.choice(accents), rng.choice(variants))


def choose_rendering(language: str, held_out: bool, rng: random.Random) -> Rendering:
    """Held-out clips are clean (noise is added per condition at evaluation); training clips
    get the whole augmentation chain, each step with its own probability."""
    voice = choose_voice(language, held_out, rng)
    low, high = HELD_OUT_RATES if held_out else TRAIN_RATES
    rate, pitch = rng.randint(low, high), rng.randint(20, 80)
    if held_out:
        return Rendering(voice, rate, pitch, 0, 1.0, rng.uniform(-6.0, 0.0),
                         rng.uniform(0.2, 0.4), rng.uniform(0.2, 0.4), None, 0.0, 0.0, False)
    noisy = rng.random() < 0.6
    return Rendering(
        voice=voice, rate=rate, pitch=pitch,
        word_gap=rng.randint(5, 40) if rng.random() < 0.25 else 0,
        tempo=rng.uniform(0.85, 1.2) if rng.random() < 0.5 else 1.0,
        gain_db=rng.uniform(-20.0, 3.0),
        lead_s=rng.uniform(0.05, 0.6), tail_s=rng.uniform(0.05, 0.6),
        noise=rng.choice(NOISE_KINDS) if noisy else None,
        snr_db=rng.uniform(5.0, 30.0) if noisy else 0.0,
        reverb_rt60=rng.uniform(0.15, 0.8) if rng.random() < 0.2 else 0.0,
        telephone=rng.random() < 0.15,
    )
