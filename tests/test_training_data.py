"""The demo model's data generator: correct number words, closed vocabulary, determinism,
a held-out split that training never hears (voices, accents, random text), the augmentation
chain, the clips without speech, the on-disk cache, and the alignment the training imposes."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.augment import (
    add_noise,
    change_tempo,
    colored_noise,
    reverberate,
    speech_power,
)
from training.augment import telephone as telephone_band
from training.corpus import (
    PINYIN,
    ZH_DIGITS,
    ZH_PHRASES,
    en_number_words,
    pinyin,
    sample_utterance,
    vocabulary,
    zh_number_chars,
)
from training.dataset import load_chunk, make_clips, render_chunk, save_chunk
from training.nospeech import KINDS, make_nospeech
from training.train import ALIGN_AFTER, ALIGN_BEFORE, restrict_to_onsets
from training.voices import (
    EN_HELD_OUT_ACCENTS,
    EN_TRAIN_ACCENTS,
    FLITE_HELD_OUT,
    FLITE_TRAIN,
    HELD_OUT_RATES,
    HELD_OUT_VARIANTS,
    TRAIN_VARIANTS,
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


def test_every_mandarin_character_has_its_pinyin():
    assert set(ZH_DIGITS + "十百千" + "".join(ZH_PHRASES)) <= set(PINYIN)
    assert pinyin("四七一") == "si4 qi1 yi1"


def test_the_held_out_split_uses_unseen_voices_accents_and_rates():
    assert not set(HELD_OUT_VARIANTS) & set(TRAIN_VARIANTS)
    assert not set(EN_HELD_OUT_ACCENTS) & set(EN_TRAIN_ACCENTS)
    assert not set(FLITE_HELD_OUT) & set(FLITE_TRAIN)
    clips = render_chunk(0, "held-out", 0, 16)
    assert {c.language for c in clips} == {"en", "zh"}
    for clip in clips:
        synth, _, name = clip.voice.partition(":")
        if synth == "espeak":
            assert name.split("+")[1] in HELD_OUT_VARIANTS, clip.voice
        else:
            assert (synth, name) in {("flite", v) for v in FLITE_HELD_OUT}, clip.voice
        assert HELD_OUT_RATES[0] <= clip.rate <= HELD_OUT_RATES[1]


def test_training_uses_three_synthesisers_and_sounds_without_speech():
    clips = render_chunk(0, "train", 0, 50)
    synths = {c.voice.partition(":")[0] for c in clips}
    assert {"espeak", "flite", "festival"} <= synths
    silent = [c for c in clips if c.language == "nospeech"]
    assert silent and all(c.woitn == () and c.withitn == () for c in silent)
    assert {c.event for c in clips if c.language != "nospeech"} == {"Speech"}
    for clip in clips:
        assert clip.waveform.dtype == np.float32 and np.abs(clip.waveform).max() <= 1.0
        if clip.language != "nospeech":
            assert np.abs(clip.waveform).max() > 0.01 and clip.waveform.size > 8000


def test_generation_is_deterministic_and_splits_differ():
    first, again = render_chunk(5, "train", 0, 6), render_chunk(5, "train", 0, 6)
    assert [c.meta() for c in first] == [c.meta() for c in again]
    assert all(np.array_equal(a.waveform, b.waveform) for a, b in zip(first, again))
    held_out = render_chunk(5, "held-out", 0, 6)
    assert [c.woitn for c in first] != [c.woitn for c in held_out]


def test_espeak_word_onsets_are_where_the_words_sound():
    """The first word's onset against the first 10 ms frame above a tenth of the clip's peak
    RMS: within a few frames (a soft first consonant can stay below that for ~0.15 s). The
    0.2-0.4 s of silence put before held-out speech would show if it were not counted."""
    clips = [c for c in render_chunk(3, "held-out", 0, 16) if c.word_starts is not None]
    assert len(clips) >= 4
    errors = []
    for clip in clips:
        frames = clip.waveform[: clip.waveform.size // 160 * 160].reshape(-1, 160)
        rms = np.sqrt((frames**2).mean(axis=1))
        loud = np.flatnonzero(rms > 0.1 * rms.max())
        errors.append(abs(clip.word_starts[0] - loud[0] * 0.01))
        assert list(clip.word_starts) == sorted(clip.word_starts)
    assert np.median(errors) <= 0.08 and max(errors) <= 0.2, errors


def test_a_cached_chunk_reads_back_as_it_was_written(tmp_path):
    clips = render_chunk(0, "train", 0, 12)
    path = tmp_path / "chunk.npz"
    save_chunk(path, clips)
    back = load_chunk(path)
    assert [c.meta() for c in back] == [c.meta() for c in clips]
    for a, b in zip(clips, back):
        assert np.abs(a.waveform - b.waveform).max() <= 1 / 32767
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind


def test_make_clips_renders_only_what_the_cache_lacks(tmp_path):
    first = make_clips(60, 0, "held-out", tmp_path, workers=2)
    files = sorted(tmp_path.iterdir())
    assert len(first) == 60 and len(files) == 2  # chunks of 50
    stamps = [f.stat().st_mtime_ns for f in files]
    again = make_clips(60, 0, "held-out", tmp_path, workers=2)
    assert [f.stat().st_mtime_ns for f in sorted(tmp_path.iterdir())] == stamps
    assert [c.meta() for c in again] == [c.meta() for c in first]


@pytest.mark.parametrize("kind", ["white", "pink", "brown", "babble"])
def test_noise_is_added_at_the_asked_snr(kind):
    rng = np.random.default_rng(0)
    speech = (np.sin(np.arange(32000) / 7.0) * 0.3).astype(np.float32)
    pool = [colored_noise("white", 8000, np.random.default_rng(i)) * 0.1 for i in range(4)]
    noisy = add_noise(speech, speech_power(speech), kind, 10.0, rng, pool)
    noise_power = speech_power(noisy - speech)
    assert 10 * np.log10(speech_power(speech) / noise_power) == pytest.approx(10.0, abs=0.01)


def test_pink_and_brown_noise_put_their_power_low():
    rng = np.random.default_rng(1)
    for kind, share in (("white", 0.2), ("pink", 0.5), ("brown", 0.9)):
        spectrum = np.abs(np.fft.rfft(colored_noise(kind, 16000, rng))) ** 2
        low = spectrum[:len(spectrum) // 16].sum() / spectrum.sum()  # below 500 Hz
        assert low > share if kind != "white" else low < share, (kind, low)


def test_tempo_reverb_and_telephone_do_what_they_say():
    t = np.arange(16000) / 16000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.5 * np.sin(2 * np.pi * 6000 * t)
            ).astype(np.float32)
    assert change_tempo(tone, 1.2).size == pytest.approx(16000 / 1.2, rel=0.01)
    assert change_tempo(tone, 1.0) is tone
    wet = reverberate(tone, 0.5, np.random.default_rng(0))
    assert wet.size == 16000 + 8000 - 1 and speech_power(wet) == pytest.approx(
        speech_power(tone), rel=1e-3)
    phone = telephone_band(tone)
    spectrum = np.abs(np.fft.rfft(phone[:16000]))
    assert spectrum[6000] < 0.01 * spectrum[440]  # 6 kHz is beyond the telephone band


@pytest.mark.parametrize("kind", KINDS)
def test_sounds_without_speech_are_bounded_and_labelled(kind):
    sound = make_nospeech(f"test:{kind}", kind)
    assert sound.kind == kind and sound.waveform.dtype == np.float32
    assert 0.5 * 16000 <= sound.waveform.size <= 8 * 16000
    assert np.abs(sound.waveform).max() <= 1.0
    assert sound.event == ("BGM" if kind == "melody" else "Event_UNK")
    if kind == "silence":
        assert np.abs(sound.waveform).max() < 1e-3


def test_restricted_ctc_emits_each_token_only_around_its_onset():
    frames, vocab = 30, 8
    logits = torch.zeros(frames, 1, vocab, requires_grad=True)
    targets, onsets = [[3, 5, 3]], [[4, 12, 20]]
    log_probs = restrict_to_onsets(logits.log_softmax(-1), targets, onsets)
    allowed = torch.isfinite(log_probs[:, 0])
    for token, onset in zip(targets[0], onsets[0]):
        window = set(range(onset - ALIGN_BEFORE, onset + ALIGN_AFTER + 1))
        token_frames = {int(f) for f in torch.nonzero(allowed[:, token]).flatten()}
        assert window <= token_frames  # 3 appears twice: both windows
    assert allowed[:, 0].all() and not allowed[:, 1].any()  # blank anywhere, others nowhere
    loss = F.ctc_loss(log_probs, torch.tensor(targets[0]), torch.tensor([frames]),
                      torch.tensor([3]), reduction="sum")
    loss.backward()
    assert torch.isfinite(loss)
    # A target whose window cannot hold it is impossible: an infinite loss (zeroed in training).
    impossible = restrict_to_onsets(logits.log_softmax(-1), [[3, 5]], [[20, 4]])
    assert torch.isinf(F.ctc_loss(impossible, torch.tensor([3, 5]), torch.tensor([frames]),
                                  torch.tensor([2]), reduction="sum"))
    untouched = logits.log_softmax(-1)
    assert restrict_to_onsets(untouched, targets, [None]) is untouched


def test_a_damaged_or_foreign_cached_chunk_is_rendered_again(tmp_path, capsys):
    first = make_clips(12, 0, "held-out", tmp_path, workers=1)
    [chunk] = tmp_path.iterdir()
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])  # a truncated write
    again = make_clips(12, 0, "held-out", tmp_path, workers=1)
    printed = capsys.readouterr().out
    assert "unreadable" in printed and str(chunk) in printed
    assert [c.meta() for c in again] == [c.meta() for c in first]
    save_chunk(chunk, first[:5])  # a chunk holding the wrong clips
    assert [c.meta() for c in make_clips(12, 0, "held-out", tmp_path, workers=1)] == [
        c.meta() for c in first]
    assert "holds 5 clips, expected 12" in capsys.readouterr().out


def test_a_missing_synthesiser_is_named_with_the_package_to_install(monkeypatch):
    from training.synth import festival, flite
    from training.voices import Rendering, Voice

    def rendering(voice: Voice) -> Rendering:
        return Rendering(voice, 175, 50, 0, 1.0, 0.0, 0.1, 0.1, None, 0.0, 0.0, False)

    with pytest.raises(RuntimeError, match="festival failed .*voice_no_such_voice.*apt-get"):
        festival([("one two", rendering(Voice("festival", "voice_no_such_voice")))])
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RuntimeError, match="flite is not installed: apt-get install -y flite"):
        flite("one two", rendering(Voice("flite", "slt")))


def test_a_cache_that_cannot_be_created_is_named_with_the_fix():
    with pytest.raises(OSError, match=r"cannot create the training cache /proc/sensevoice-"
                                      r"cache .*pass --cache DIR on a writable disk"):
        make_clips(4, 0, "held-out", Path("/proc/sensevoice-cache"), workers=1)


def test_a_run_killed_mid_write_leaves_only_a_temporary_file_that_is_ignored(tmp_path):
    clips = render_chunk(0, "held-out", 0, 4)
    (tmp_path / ".v3-held-out-seed0-000000-000004.npz.123.tmp").write_bytes(b"half a chunk")
    assert [c.meta() for c in make_clips(4, 0, "held-out", tmp_path, workers=1)] == [
        c.meta() for c in clips]
