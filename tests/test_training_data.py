"""The demo model's data generator: correct number words, closed vocabulary, determinism,
and a held-out split that training never hears (voices, speaking rates, random text)."""

import random

import pytest
import torch

from training.corpus import en_number_words, sample_utterance, vocabulary, zh_number_chars
from training.synth import (
    HELD_OUT_RATES,
    HELD_OUT_VARIANTS,
    TRAIN_RATES,
    TRAIN_VARIANTS,
    make_clip,
)


@pytest.mark.parametrize("n, words", [
    (0, "zero"), (7, "seven"), (13, "thirteen"), (40, "forty"), (42, "forty two"),
    (100, "one hundred"), (305, "three hundred five"), (999, "nine hundred ninety nine"),
])
def test_english_number_words(n, words):
    assert " ".join(en_number_words(n)) == words


@pytest.mark.parametrize("n, chars", [
    (0, "零"), (10, "十"), (12, "十二"), (20, "二十"), (105, "一百零五"), (110, "一百一十"),
    (1005, "一千零五"), (1050, "一千零五十"), (2345, "二千三百四十五"), (9999, "九千九百九十九"),
])
def test_mandarin_number_characters(n, chars):
    assert zh_number_chars(n) == chars


def test_every_transcript_piece_is_in_the_vocabulary():
    pieces = set(vocabulary())
    rng = random.Random(0)
    for i in range(3000):
        utterance = sample_utterance("en" if i % 2 else "zh", rng)
        assert set(utterance.woitn) <= pieces and set(utterance.withitn) <= pieces, utterance


def test_text_norm_styles_differ_for_numbers():
    rng = random.Random(1)
    for language in ("en", "zh"):
        for _ in range(50):
            utterance = sample_utterance(language, rng)
            if utterance.kind == "phrase":
                continue
            assert not any(ch.isdigit() for ch in "".join(utterance.woitn))
            assert any(ch.isdigit() for ch in "".join(utterance.withitn))
            assert utterance.withitn[-1] in (".", "。")


def test_the_held_out_split_uses_unseen_voices_and_rates():
    assert not set(HELD_OUT_VARIANTS) & set(TRAIN_VARIANTS)
    assert HELD_OUT_RATES[0] > TRAIN_RATES[1]
    clips = [make_clip(i, seed=0, held_out=True) for i in range(6)]
    for clip in clips:
        assert clip.rendering.voice.split("+")[-1] in HELD_OUT_VARIANTS
        assert HELD_OUT_RATES[0] <= clip.rendering.rate <= HELD_OUT_RATES[1]
        assert clip.rendering.tempo == 1.0  # no speed perturbation: the rate is as spoken


def test_generation_is_deterministic_and_splits_differ():
    first, again = make_clip(3, seed=5, held_out=False), make_clip(3, seed=5, held_out=False)
    assert first.utterance == again.utterance and first.rendering == again.rendering
    assert torch.equal(first.waveform, again.waveform)
    train = [make_clip(i, seed=5, held_out=False).utterance for i in range(20)]
    held_out = [make_clip(i, seed=5, held_out=True).utterance for i in range(20)]
    assert train != held_out
    assert first.waveform.abs().max() > 0.01 and first.waveform.numel() > 8000
