"""The real command line, run as a subprocess against the tiny random models of conftest.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
EN = DATA / "en.mp3"
ZH = DATA / "zh.mp3"
RESULT_KEYS = ("file", "raw", "text", "language", "emotion", "event", "token_ids")
HF_FILES = ("config.json", "model.safetensors", "tokenizer.model", "am.mvn")


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, "-m", "sensevoice_core", *map(str, args)],
        capture_output=True, text=True, encoding="utf-8", env=env, cwd=ROOT, timeout=120,
    )


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def transcribe_json(model_dir: Path, *files: object,
                    options: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return run_cli("transcribe", "--model", model_dir, "--json", *options, *files)


def assert_clean_stderr(stderr: str) -> None:
    assert "Traceback" not in stderr
    assert "Warning" not in stderr


def assert_result_line(line: dict, file: Path) -> None:
    for key in RESULT_KEYS:
        assert key in line, f"{key} missing from {sorted(line)}"
    assert line["file"] == str(file)
    assert isinstance(line["token_ids"], list) and line["token_ids"]
    assert all(isinstance(token_id, int) for token_id in line["token_ids"])
    assert isinstance(line["raw"], str) and line["raw"]
    assert "<|" not in line["text"]
    assert "error" not in line


def seconds_of(file: Path) -> float:
    samples, rate = soundfile.read(file, dtype="float32")
    return len(samples) / rate


# --- module fixtures: each CLI run the tests share is made once ---------------------------


@pytest.fixture(scope="module")
def official_run(official_dir) -> subprocess.CompletedProcess[str]:
    return transcribe_json(official_dir, EN, ZH)


@pytest.fixture(scope="module")
def hf_run(hf_dir) -> subprocess.CompletedProcess[str]:
    return transcribe_json(hf_dir, EN, ZH)


@pytest.fixture(scope="module")
def missing_audio_run(official_dir,
                      tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], Path]:
    missing = tmp_path_factory.mktemp("audio") / "missing.mp3"
    return transcribe_json(official_dir, EN, missing, ZH), missing


@pytest.fixture(scope="module")
def converted(official_dir, tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], Path]:
    target = tmp_path_factory.mktemp("convert") / "converted"
    return run_cli("convert", official_dir, target), target


# --- transcribe ---------------------------------------------------------------------------


def test_transcribe_json_prints_one_line_per_file_in_order(official_run):
    assert official_run.returncode == 0, official_run.stderr
    assert_clean_stderr(official_run.stderr)
    lines = json_lines(official_run.stdout)
    assert len(lines) == 2
    for line, file in zip(lines, (EN, ZH)):
        assert_result_line(line, file)
        assert line["duration_s"] == pytest.approx(seconds_of(file), abs=0.01)


def test_official_and_hf_layouts_hold_the_same_weights(official_run, hf_run):
    assert hf_run.returncode == 0, hf_run.stderr
    official, hf = json_lines(official_run.stdout), json_lines(hf_run.stdout)
    # Same seed, same tokenizer: identical token ids prove the two layouts hold the same model.
    assert [line["token_ids"] for line in official] == [line["token_ids"] for line in hf]
    assert official == hf
    assert official_run.stdout == hf_run.stdout


def test_plain_output_is_file_tab_rich_text(official_dir, official_run):
    plain = run_cli("transcribe", "--model", official_dir, EN, ZH)
    assert plain.returncode == 0, plain.stderr
    expected = [f"{line['file']}\t{line['rich_text']}" for line in json_lines(official_run.stdout)]
    assert plain.stdout.splitlines() == expected


def test_language_and_itn_are_accepted(official_dir, official_run):
    result = transcribe_json(official_dir, EN, options=("--language", "en", "--itn"))

    assert result.returncode == 0, result.stderr
    (line,) = json_lines(result.stdout)
    assert_result_line(line, EN)
    # The prompt reaches the model: a different language and text-norm row changes the logits.
    default = json_lines(official_run.stdout)[0]
    assert line["token_ids"] != default["token_ids"]


def test_unknown_language_is_a_usage_error(official_dir):
    result = transcribe_json(official_dir, EN, options=("--language", "xx"))
    assert result.returncode == 2
    assert result.stdout == ""
    assert "invalid choice" in result.stderr and "'xx'" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_audio_file_is_reported_and_the_others_transcribed(missing_audio_run, official_run):
    result, missing = missing_audio_run

    assert result.returncode == 1
    assert_clean_stderr(result.stderr)
    lines = json_lines(result.stdout)
    assert len(lines) == 3
    errors = [line for line in lines if "error" in line]
    assert len(errors) == 1
    assert errors[0]["file"] == str(missing)
    assert str(missing) in errors[0]["error"]
    assert "no such file" in errors[0]["error"]
    good = {line["file"]: line for line in lines if "error" not in line}
    assert good == {line["file"]: line for line in json_lines(official_run.stdout)}


def test_output_lines_follow_input_order_when_a_file_fails(missing_audio_run):
    # transcribe_files documents "Print one line per file, in order".
    result, missing = missing_audio_run
    assert [line["file"] for line in json_lines(result.stdout)] == [str(EN), str(missing), str(ZH)]


def test_missing_model_dir_is_one_error_line(tmp_path):
    missing = tmp_path / "no-such-model"

    result = transcribe_json(missing, EN)

    assert result.returncode == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    stderr_lines = result.stderr.splitlines()
    assert len(stderr_lines) == 1
    assert stderr_lines[0].startswith("error:")
    assert str(missing) in stderr_lines[0]


# --- convert ------------------------------------------------------------------------------


def test_convert_writes_the_hf_layout(converted):
    result, target = converted
    assert result.returncode == 0, result.stderr
    assert_clean_stderr(result.stderr)
    for name in HF_FILES:
        assert (target / name).is_file(), f"{name} not written"
        assert (target / name).stat().st_size > 0
    assert "wrote" in result.stdout and str(target.resolve()) in result.stdout
    # Nothing else is left behind: no staging directories beside the target.
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_converted_model_transcribes_like_the_original(converted, official_run):
    _, target = converted

    result = transcribe_json(target, EN, ZH)

    assert result.returncode == 0, result.stderr
    original, copy = json_lines(official_run.stdout), json_lines(result.stdout)
    assert [(l["file"], l["token_ids"], l["raw"]) for l in copy] == [
        (l["file"], l["token_ids"], l["raw"]) for l in original]
    assert copy == original


def test_convert_into_a_non_empty_target_fails_and_leaves_it_alone(official_dir, converted):
    _, target = converted
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    result = run_cli("convert", official_dir, target)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error:")
    assert "not empty" in result.stderr
    assert str(target) in result.stderr
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_convert_refuses_a_source_that_is_not_the_official_layout(hf_dir, tmp_path):
    target = tmp_path / "out"

    result = run_cli("convert", hf_dir, target)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error:")
    assert str(hf_dir) in result.stderr
    assert not target.exists()


# --- random-demo --------------------------------------------------------------------------


def test_random_demo_warns_and_prints_json():
    result = run_cli("random-demo", EN)

    assert result.returncode == 0, result.stderr
    assert "RANDOM" in result.stderr
    assert "Traceback" not in result.stderr
    (line,) = json_lines(result.stdout)
    assert_result_line(line, EN)


def test_a_long_file_is_segmented_and_its_json_carries_the_segments(tmp_path):
    """Over SENSEVOICE_MAX_SEGMENT_S the in-process CLI splits at pauses, as the service does."""
    examples = Path(__file__).resolve().parent.parent / "ui" / "examples"
    parts = []
    for name in ("en_02.flac", "zh_04.flac", "en_03.flac", "zh_08.flac"):
        parts += [np.zeros(24000, np.float32), soundfile.read(examples / name, dtype="float32")[0]]
    long_file = tmp_path / "long.flac"
    soundfile.write(long_file, np.concatenate(parts + [np.zeros(16000, np.float32)]), 16000)
    demo = Path(__file__).resolve().parent.parent / "model"
    done = subprocess.run([sys.executable, "-m", "sensevoice_core", "transcribe", "--model",
                           str(demo), "--itn", "--json", str(long_file),
                           str(examples / "en_02.flac")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "SENSEVOICE_MAX_SEGMENT_S": "5"})
    assert done.returncode == 0, done.stderr
    long, short = (json.loads(line) for line in done.stdout.splitlines())
    assert [s["text"] for s in long["segments"]] == ["Hello world.", "8975。", "770.", "晚安。"]
    assert set(long["segments"][0]) == {"start", "end", "text", "language", "emotion", "event"}
    assert short["text"] == "Hello world." and "segments" not in short
