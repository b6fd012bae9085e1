"""Silero VAD in plain PyTorch: equal to the package's own model, and speech regions from it."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from sensevoice_core.audio import load_audio
from speech_truth import energy_bounds
from sensevoice_core.segmentation import WINDOW, VadOptions, speech_regions
from sensevoice_core.vad import SileroVAD, speech_probabilities, weights_path

DATA = Path(__file__).parent / "data"
DEMO_CLIPS = sorted((DATA / "demo_eval").glob("en_0*.flac"))[:6]


@pytest.fixture(scope="module")
def vad() -> SileroVAD:
    return SileroVAD.from_package()


def test_same_probabilities_as_the_silero_package_on_its_own_weights():
    """Our module, given the TorchScript model's weights, computes what that model computes
    (the TorchScript file is only opened here, never by the service)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = torch.jit.load(str(weights_path().parent / "silero_vad.jit"),
                                   map_location="cpu").eval()
    audio = load_audio(DATA / "en.mp3")
    reference.reset_states()
    with torch.inference_mode():
        expected = np.array([reference(audio[i:i + WINDOW], 16000).item()
                             for i in range(0, audio.numel() - WINDOW + 1, WINDOW)])
    names = {"stft.forward_basis_buffer": "stft_conv.weight",
             "decoder.decoder.2.weight": "final_conv.weight",
             "decoder.decoder.2.bias": "final_conv.bias",
             **{f"decoder.rnn.{p}": f"lstm.{p}_l0"
                for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")},
             **{f"encoder.{i}.reparam_conv.{p}": f"conv{i + 1}.{p}"
                for i in range(4) for p in ("weight", "bias")}}
    ours = SileroVAD()
    ours.load_state_dict({names[k]: v for k, v in reference._model.state_dict().items()},
                         strict=True)
    # Fed in uneven chunks: the stream carries context and LSTM state across them.
    got = speech_probabilities(ours.eval(), audio.split([7000, 40000, audio.numel() - 47000]))
    assert len(got) == len(expected) + 1  # the padded tail window
    np.testing.assert_allclose(got[:len(expected)], expected, atol=1e-5)


def test_loading_the_vad_leaves_torch_threads_alone():
    """The silero_vad package sets torch's thread count to 1 when imported; we never import it."""
    script = ("import sys, torch; torch.set_num_threads(2); "
              "from sensevoice_core.vad import SileroVAD; SileroVAD.from_package(); "
              "print(torch.get_num_threads(), 'silero_vad' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stderr


def test_chunking_does_not_change_the_probabilities(vad: SileroVAD):
    audio = load_audio(DATA / "zh.mp3")
    whole = speech_probabilities(vad, [audio])
    pieces = speech_probabilities(vad, audio.split(12345))
    np.testing.assert_allclose(whole, pieces, atol=1e-5)


def clips_with_silences() -> tuple[torch.Tensor, list[tuple[float, float]]]:
    parts, truth, at = [], [], 0.0
    for index, clip in enumerate(DEMO_CLIPS):
        gap = 1.0 + 0.5 * index
        samples = load_audio(clip).numpy()
        parts.append(np.zeros(int(gap * 16000), np.float32))
        at += gap
        start, end = energy_bounds(samples)
        truth.append((at + start, at + end))
        parts.append(samples)
        at += len(samples) / 16000
    parts.append(np.zeros(16000, np.float32))
    return torch.from_numpy(np.concatenate(parts)), truth


def test_regions_match_known_speech_within_300_ms(vad: SileroVAD):
    audio, truth = clips_with_silences()
    regions = speech_regions(speech_probabilities(vad, audio.split(16000 * 30)),
                             VadOptions(speech_pad_s=0.0), audio.numel() / 16000)
    assert len(regions) == len(truth)
    for region, (start, end) in zip(regions, truth):
        assert region.start == pytest.approx(start, abs=0.3)
        assert region.end == pytest.approx(end, abs=0.3)


def test_silence_has_no_regions(vad: SileroVAD):
    silence = torch.zeros(16000 * 40)
    assert speech_regions(speech_probabilities(vad, [silence]), VadOptions()) == []
    quiet_noise = torch.from_numpy(np.random.default_rng(0).normal(0, 1e-3, 16000 * 10)
                                   .astype(np.float32))
    assert speech_regions(speech_probabilities(vad, [quiet_noise]), VadOptions()) == []


def test_a_higher_threshold_finds_less_speech(vad: SileroVAD):
    audio, _ = clips_with_silences()
    probabilities = speech_probabilities(vad, [audio])

    def speech_seconds(threshold: float) -> float:
        regions = speech_regions(probabilities, VadOptions(threshold=threshold, speech_pad_s=0))
        return sum(r.end - r.start for r in regions)

    amounts = [speech_seconds(t) for t in (0.1, 0.35, 0.6, 0.9)]
    assert amounts == sorted(amounts, reverse=True) and amounts[0] > amounts[-1]
    assert speech_regions(probabilities, VadOptions(threshold=1.0)) == []


def test_long_speech_is_split_at_its_quietest_point():
    probabilities = np.full(round(70 / 0.032), 0.9, dtype=np.float32)  # 70 s of speech
    dip = round(31 / 0.032)
    probabilities[dip] = 0.5  # the quietest moment, still speech
    regions = speech_regions(probabilities, VadOptions(max_segment_s=40, speech_pad_s=0))
    assert len(regions) == 2
    assert regions[0].end == pytest.approx(31, abs=0.05)
    assert all(r.end - r.start <= 40 for r in regions)
    pieces = speech_regions(probabilities, VadOptions(max_segment_s=10, speech_pad_s=0))
    assert all(r.end - r.start <= 10 for r in pieces) and len(pieces) >= 7
    assert pieces[0].start == 0 and pieces[-1].end == pytest.approx(70, abs=0.05)


def test_short_pauses_join_and_short_bursts_drop():
    windows = lambda seconds: round(seconds / 0.032)  # noqa: E731
    probabilities = np.concatenate([
        np.full(windows(2), 0.9), np.zeros(windows(0.2)), np.full(windows(2), 0.9),  # pause
        np.zeros(windows(3)), np.full(windows(0.1), 0.9),  # a click
        np.zeros(windows(2)),
    ]).astype(np.float32)
    regions = speech_regions(probabilities, VadOptions(min_silence_s=0.3, min_speech_s=0.25,
                                                       speech_pad_s=0))
    assert len(regions) == 1 and regions[0].end == pytest.approx(4.2, abs=0.05)


def test_hours_of_unbroken_speech_split_without_recursion_into_bounded_pieces():
    probabilities = np.full(round(3 * 3600 / 0.032), 0.9, dtype=np.float32)
    probabilities[::219] = 0.4  # a dip every 7 s: cuts land on them
    regions = speech_regions(probabilities, VadOptions(max_segment_s=10, speech_pad_s=0))
    assert all(5 - 0.05 <= r.end - r.start <= 10 for r in regions[:-1])
    dips = {round(i * 0.032, 3) for i in range(0, len(probabilities), 219)}
    assert all(r.end in dips for r in regions[:-1])
    assert all(a.end == b.start for a, b in zip(regions, regions[1:]))


def test_region_times_are_rounded_and_never_overlap():
    rng = np.random.default_rng(3)
    for _ in range(50):
        probabilities = rng.random(5000).astype(np.float32)
        regions = speech_regions(probabilities, VadOptions(threshold=0.3, speech_pad_s=0.11,
                                                           min_silence_s=0.05))
        assert all(round(r.start, 3) == r.start and round(r.end, 3) == r.end for r in regions)
        assert all(a.end <= b.start for a, b in zip(regions, regions[1:]))
        assert all(r.end - r.start <= 30 for r in regions)
