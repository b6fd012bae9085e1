"""Long audio through VAD segmentation and batched inference, with the real demo model."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from model_factory import DEMO_MODEL
from sensevoice_core import load_model
from sensevoice_core.audio import load_audio
from sensevoice_core.errors import AudioError
from sensevoice_core.long_audio import LongTranscription, Segment, transcribe_long
from sensevoice_core.pipeline import TranscribeOptions
from sensevoice_core.segmentation import VadOptions
from sensevoice_core.vad import SileroVAD, speech_probabilities
from speech_truth import energy_bounds

DEMO_EVAL = Path(__file__).parent / "data" / "demo_eval"
CLIPS = [DEMO_EVAL / name for name in ("en_02.flac", "zh_04.flac", "en_03.flac", "zh_08.flac")]
ITN = TranscribeOptions.create("auto", use_itn=True)


@pytest.fixture(scope="module")
def model():
    return load_model(DEMO_MODEL)


@pytest.fixture(scope="module")
def vad() -> SileroVAD:
    return SileroVAD.from_package()


def long_recording(gaps: list[float]) -> tuple[np.ndarray, list[float]]:
    """The clips with the given silences before each (and 1 s after); returns where the speech
    of each starts."""
    parts, starts, at = [], [], 0.0
    for clip, gap in zip(CLIPS, gaps):
        samples = load_audio(clip).numpy()
        parts += [np.zeros(int(gap * 16000), np.float32), samples]
        starts.append(at + gap + energy_bounds(samples)[0])
        at += gap + len(samples) / 16000
    parts.append(np.zeros(16000, np.float32))
    return np.concatenate(parts), starts


def test_segments_come_back_in_order_with_their_texts_and_times(model, vad, tmp_path: Path):
    audio, starts = long_recording([1.0, 2.0, 1.5, 2.5])
    path = tmp_path / "meeting.flac"
    soundfile.write(path, audio, 16000)
    expected = [model.transcribe(clip, use_itn=True).text for clip in CLIPS]
    result = transcribe_long(model, vad, path, ITN, VadOptions(max_segment_s=5.0))
    assert [s.text for s in result.segments] == expected
    assert result.text == " ".join(expected)
    for segment, start in zip(result.segments, starts):
        assert segment.start == pytest.approx(start, abs=0.3)
    assert [s.language for s in result.segments] == ["en", "zh", "en", "zh"]
    assert result.duration_s == pytest.approx(len(audio) / 16000)


def test_bytes_arrays_and_files_segment_alike(model, vad, tmp_path: Path):
    audio, _ = long_recording([1.0, 2.0, 1.5, 2.5])
    path = tmp_path / "meeting.wav"
    soundfile.write(path, audio, 16000)
    options = VadOptions(max_segment_s=5.0)
    from_file = transcribe_long(model, vad, path, ITN, options)
    from_bytes = transcribe_long(model, vad, path.read_bytes(), ITN, options)
    from_array = transcribe_long(model, vad, audio, ITN, options)
    assert from_file.segments == from_bytes.segments
    assert [s.text for s in from_array.segments] == [s.text for s in from_file.segments]


def test_silence_only_gives_an_empty_result(model, vad):
    result = transcribe_long(model, vad, np.zeros(16000 * 45, np.float32), ITN)
    assert result.segments == [] and result.text == "" and result.duration_s == 45.0


def test_a_short_clip_is_one_pass_over_the_whole_clip(model, vad):
    clip = CLIPS[0]
    result = transcribe_long(model, vad, clip, ITN)
    whole = model.transcribe(clip, use_itn=True)
    [segment] = result.segments
    assert (segment.start, segment.end) == (0.0, pytest.approx(whole.duration_s, abs=1e-3))
    assert segment.token_ids == whole.token_ids


def test_the_threshold_changes_segmentation_in_the_expected_direction(model, vad):
    audio, _ = long_recording([1.0, 2.0, 1.5, 2.5])
    covered = []
    for threshold in (0.2, 0.5, 0.95):
        result = transcribe_long(model, vad, audio, ITN,
                                 VadOptions(threshold=threshold, max_segment_s=5.0))
        covered.append(sum(s.end - s.start for s in result.segments))
    assert covered[0] >= covered[1] >= covered[2] and covered[0] > covered[2]


PEAK_RSS_SCRIPT = """
import json, resource, sys
import torch
from sensevoice_core import load_model
from sensevoice_core.errors import AudioError
from sensevoice_core.long_audio import LongTranscription, Segment, transcribe_long
from sensevoice_core.pipeline import TranscribeOptions
from sensevoice_core.vad import SileroVAD
torch.set_num_threads(1)
model, vad = load_model(sys.argv[1]), SileroVAD.from_package()
model.transcribe(sys.argv[3], use_itn=True)  # allocator and kernels warmed on a short clip
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = transcribe_long(model, vad, sys.argv[2], TranscribeOptions.create("auto", True),
                         batch_s=60.0)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_mib": (after - before) / 1024, "segments": len(result.segments)}))
"""


@pytest.mark.slow
def test_twenty_minutes_stay_within_a_memory_bound(tmp_path: Path):
    """20 min is 77 MB of 16 kHz samples; unsegmented, attention over it would take gigabytes.
    Segmented, the process grows by little more than one batch's features and activations."""
    speech, _ = long_recording([1.0, 2.0, 1.5, 2.5])
    repeats = int(20 * 60 * 16000 / len(speech)) + 1
    path = tmp_path / "twenty_minutes.flac"
    with soundfile.SoundFile(path, "w", 16000, 1, format="FLAC") as out:
        for _ in range(repeats):
            out.write(speech)
    assert soundfile.info(str(path)).duration >= 20 * 60
    run = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(DEMO_MODEL), str(path),
                          str(CLIPS[0])], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"20 min of audio: peak RSS grew by {measured['growth_mib']:.1f} MiB")
    assert measured["segments"] >= 4 * repeats * 0.9
    assert measured["growth_mib"] < 150, measured


def test_unspaced_scripts_join_without_spaces_and_tags_follow_the_most_time():
    def segment(start: float, end: float, text: str, language: str) -> Segment:
        return Segment(start, end, text, text, language, "NEUTRAL", "Speech", ())

    result = LongTranscription([segment(0, 2, "你好。", "zh"), segment(2, 3, "晚安。", "zh"),
                                segment(3, 9, "Hello world.", "en"), segment(9, 10, "好。", "zh")],
                               10.0)
    assert result.text == "你好。晚安。 Hello world. 好。"
    assert result.dominant("language") == "en" and result.dominant("event") == "Speech"
    assert LongTranscription([], 3.0).dominant("language") is None


def test_a_file_that_breaks_off_mid_stream_is_a_clear_audio_error(model, vad, tmp_path: Path):
    audio, _ = long_recording([1.0, 2.0, 1.5, 2.5])
    whole = tmp_path / "whole.flac"
    soundfile.write(whole, np.tile(audio, 3), 16000)
    data = whole.read_bytes()
    broken = data[: len(data) // 2] + bytes(range(256)) * 64 + data[len(data) // 2:]
    with pytest.raises(AudioError) as error:
        transcribe_long(model, vad, broken, ITN, VadOptions(max_segment_s=5.0),
                        source_name="meeting.flac")
    assert re.match(r"meeting.flac: decoding stopped at (\d+\.\d+) s of the 46\.44 s its header "
                    r"states: the file is cut short or corrupt \(flac decoder lost sync\)$",
                    str(error.value)), str(error.value)
    assert 15 < float(re.findall(r"at (\d+\.\d+) s", str(error.value))[0]) < 30  # the middle


def test_a_file_too_short_to_frame_is_an_audio_error_not_a_crash(model, vad):
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(1, np.float32), 16000, format="WAV")
    with pytest.raises(AudioError, match="too short"):
        transcribe_long(model, vad, buffer.getvalue(), ITN)


# --- no text from silence or noise (issue 12, row 6) -------------------------------------


def white_noise(seconds: float, amplitude: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * 16000)) * amplitude).clip(-1, 1).astype(np.float32)


NO_SPEECH = {"digital silence": np.zeros(20 * 16000, np.float32),
             "quiet noise": white_noise(20, 0.01), "loud noise": white_noise(20, 0.3),
             "full-scale noise": white_noise(20, 1.0), "short silence": np.zeros(8000, np.float32)}


def test_silence_and_noise_give_no_text_where_the_model_alone_would_invent_some(model, vad):
    invented = [model.transcribe(audio).text for audio in NO_SPEECH.values()]
    assert any(invented), invented  # the demo model hears digits in silence ("555。")
    for name, audio in NO_SPEECH.items():
        result = transcribe_long(model, vad, audio, ITN)
        assert (result.segments, result.text) == ([], ""), name
        assert result.duration_s == pytest.approx(len(audio) / 16000)


def test_every_short_speech_clip_still_takes_the_one_pass_path(model, vad):
    """The VAD only decides whether there is speech: each bundled clip, transcribed whole."""
    for clip in sorted(DEMO_EVAL.glob("*.flac"))[::4] + CLIPS:
        [segment] = transcribe_long(model, vad, clip, ITN).segments
        assert segment.token_ids == model.transcribe(clip, use_itn=True).token_ids, clip.name
        assert segment.start == 0.0


def test_the_vad_costs_milliseconds_per_short_request(vad):
    """Measured per request length (1 thread); the model needs far more on the same audio."""
    speech = np.concatenate([load_audio(clip).numpy() for clip in CLIPS] * 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seconds in (5, 10, 30):
            clip = torch.from_numpy(np.resize(speech, seconds * 16000))
            speech_probabilities(vad, [clip])  # first-use costs paid
            runs = []
            for _ in range(5):
                start = time.perf_counter()
                speech_probabilities(vad, [clip])
                runs.append(time.perf_counter() - start)
            print(f"VAD on a {seconds} s request: {min(runs) * 1000:.1f} ms")
            assert min(runs) < 0.02 * seconds  # ~2 ms per second idle; 10x for a loaded CI box
    finally:
        torch.set_num_threads(threads)


def test_errors_name_the_upload_not_a_python_repr(model, vad, tmp_path: Path):
    wav = tmp_path / "meeting.wav"
    soundfile.write(wav, np.zeros(16000, np.float32), 16000)
    cases = [(b"", "empty"), (b"\x00garbage" * 50, "cannot decode audio"),
             (wav.read_bytes()[:30], "cannot decode audio"),
             (np.array([0.0, np.nan] * 800, np.float32), "NaN")]
    for audio, reason in cases:
        with pytest.raises(AudioError) as error:
            transcribe_long(model, vad, audio, ITN, source_name="standup.m4a")
        assert str(error.value).startswith("standup.m4a: ") and reason in str(error.value)
        assert "<" not in str(error.value)
        with pytest.raises(AudioError, match="^the request's audio: "):
            transcribe_long(model, vad, audio, ITN)


def test_the_cli_prints_nothing_for_silence(tmp_path: Path):
    silence, speech = tmp_path / "silence.wav", CLIPS[0]
    soundfile.write(silence, np.zeros(20 * 16000, np.float32), 16000)
    run = subprocess.run([sys.executable, "-m", "sensevoice_core", "transcribe", "--model",
                          str(DEMO_MODEL), "--json", str(silence), str(speech)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    quiet, spoken = [json.loads(line) for line in run.stdout.splitlines()]
    assert (quiet["text"], quiet["token_ids"], quiet["language"]) == ("", [], None)
    assert spoken["text"]
