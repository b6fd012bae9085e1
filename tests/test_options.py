"""The library's options check their own values: each bound is defined once, in the module of
the option, and read by the dataclass check and by the setting's pydantic Field alike."""

from __future__ import annotations

import numpy as np
import pytest

from sensevoice_core.options import BATCH_S_BOUNDS, MAX_AUDIO_S_BOUNDS, TranscribeOptions
from sensevoice_core.segmentation import (
    DURATION_BOUNDS,
    MAX_SEGMENT_BOUNDS,
    THRESHOLD_BOUNDS,
    VadOptions,
    padding_problem,
)
from sensevoice_core.settings import Settings

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field, value, allowed", [
    ("threshold", 2, "a number from 0 to 1"),
    ("threshold", -0.1, "a number from 0 to 1"),
    ("threshold", NAN, "a number from 0 to 1"),
    ("min_speech_s", -1, "a finite number >= 0"),
    ("min_silence_s", INF, "a finite number >= 0"),
    ("speech_pad_s", -0.5, "a finite number >= 0"),
    ("max_segment_s", 0, "a number from 1 to 120"),
    ("max_segment_s", 121, "a number from 1 to 120"),
    ("max_segment_s", INF, "a number from 1 to 120"),
    ("threshold", "0.5", "a number from 0 to 1"),  # not a number at all
    ("threshold", True, "a number from 0 to 1"),
])
def test_bad_vad_options_name_the_field_the_value_and_the_range(field, value, allowed):
    with pytest.raises(ValueError) as error:
        VadOptions(**{field: value})
    assert str(error.value) == f"{field}={value!r}: expected {allowed}"


def test_the_padding_must_fit_a_quarter_of_a_segment():
    with pytest.raises(ValueError) as error:
        VadOptions(speech_pad_s=3, max_segment_s=10)
    assert str(error.value) == "speech_pad_s=3 is more than a quarter of max_segment_s=10 (at most 2.5)"
    assert VadOptions(speech_pad_s=2.5, max_segment_s=10).speech_pad_s == 2.5


@pytest.mark.parametrize("kwargs", [
    {"threshold": 0}, {"threshold": 1}, {"threshold": np.float32(0.5)},
    {"min_speech_s": 0, "min_silence_s": 0, "speech_pad_s": 0},
    {"max_segment_s": 1, "speech_pad_s": 0.25}, {"max_segment_s": 120},
])
def test_the_edges_of_each_range_are_allowed(kwargs):
    VadOptions(**kwargs)


@pytest.mark.parametrize("field, value, allowed", [
    ("batch_s", NAN, "a finite number > 0"),
    ("batch_s", 0, "a finite number > 0"),
    ("batch_s", -5.0, "a finite number > 0"),
    ("batch_s", INF, "a finite number > 0"),
    ("max_audio_s", -1, "a finite number > 0"),
    ("max_audio_s", 0, "a finite number > 0"),
    ("max_audio_s", NAN, "a finite number > 0"),
])
def test_bad_transcribe_options_name_the_field_the_value_and_the_range(field, value, allowed):
    with pytest.raises(ValueError) as error:
        TranscribeOptions(**{field: value})
    assert str(error.value) == f"{field}={value!r}: expected {allowed}"


def test_good_transcribe_options_are_kept():
    options = TranscribeOptions(language=" English ", batch_s=0.5, max_audio_s=None)
    assert (options.language.value, options.batch_s, options.max_audio_s) == ("en", 0.5, None)
    assert TranscribeOptions(max_audio_s=10.0).max_audio_s == 10.0


@pytest.mark.parametrize("setting, bounds", [
    ("vad_threshold", THRESHOLD_BOUNDS), ("vad_min_speech_s", DURATION_BOUNDS),
    ("vad_min_silence_s", DURATION_BOUNDS), ("vad_speech_pad_s", DURATION_BOUNDS),
    ("max_segment_s", MAX_SEGMENT_BOUNDS), ("batch_s", BATCH_S_BOUNDS),
    ("max_audio_s", MAX_AUDIO_S_BOUNDS),
])
def test_each_setting_reads_the_bounds_of_its_option(setting, bounds):
    """The setting's ge/gt/le are the option's constant: the numbers are written once."""
    limits = {}
    for item in Settings.model_fields[setting].metadata:
        for name in ("ge", "gt", "le", "allow_inf_nan"):
            if getattr(item, name, None) is not None:
                limits[name] = getattr(item, name)
    assert limits == bounds.field


def test_the_defaults_are_valid_and_the_settings_defaults(monkeypatch):
    for name in ("VAD_THRESHOLD", "VAD_MIN_SPEECH_S", "VAD_MIN_SILENCE_S", "VAD_SPEECH_PAD_S",
                 "MAX_SEGMENT_S", "BATCH_S"):
        monkeypatch.delenv(f"SENSEVOICE_{name}", raising=False)
    vad, settings = VadOptions(), Settings()
    assert padding_problem(vad.speech_pad_s, vad.max_segment_s) is None
    assert settings.transcribe_options().vad == vad
    assert settings.batch_s == TranscribeOptions().batch_s
