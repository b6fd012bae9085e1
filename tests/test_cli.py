"""The real command line, run as a subprocess against the tiny random models of conftest.py."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from model_factory import DEMO_MODEL, write_hf, write_official
from sensevoice_core.cli import add_transcribe_arguments, check_transcribe_arguments
from sensevoice_core.result import Result
from sensevoice_core.subtitles import SubtitleOptions, to_srt, to_vtt
from service import start_service

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
EN = DATA / "en.mp3"
ZH = DATA / "zh.mp3"
EXAMPLES = ROOT / "ui" / "examples"
LONG_CLIPS = ("en_02.flac", "zh_04.flac", "en_03.flac", "zh_08.flac")
LONG_TEXTS = ["Hello world.", "8975。", "325.", "晚安。"]  # the demo model's, with ITN
HF_FILES = ("config.json", "model.safetensors", "tokenizer.model", "am.mvn")
# The tiny random models' seed. Seed 0's answer every clip with <|nospeech|>, and a segment
# the model calls no speech is dropped: their results would be empty, and prove nothing.
SEED = 4


def run_cli(*args: object, module: str = "sensevoice_core",
            **env: str) -> subprocess.CompletedProcess[str]:
    """python -m module args..., with SENSEVOICE_* settings by their lower-case suffix."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "PYTHONIOENCODING": "utf-8",
                   **{f"SENSEVOICE_{key.upper()}": value for key, value in env.items()}}
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True, text=True, encoding="utf-8", env=environment, cwd=ROOT, timeout=300,
    )


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def transcribe_json(model_dir: Path, *files: object,
                    options: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return run_cli("transcribe", "--model", model_dir, "--json", *options, *files)


def assert_clean_stderr(stderr: str) -> None:
    assert "Traceback" not in stderr
    assert "Warning" not in stderr


def result_of(line: dict) -> Result:
    return Result.model_validate({key: value for key, value in line.items() if key != "file"})


def assert_result_line(line: dict, file: Path) -> None:
    assert set(line) == {"file", *Result.model_fields}
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
def official_dir(tmp_path_factory) -> Path:
    return write_official(tmp_path_factory.mktemp("models") / "official", SEED)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return write_hf(tmp_path_factory.mktemp("models") / "hf", SEED)


@pytest.fixture(scope="module")
def official_run(official_dir) -> subprocess.CompletedProcess[str]:
    return transcribe_json(official_dir, EN, ZH)


@pytest.fixture(scope="module")
def hf_run(hf_dir) -> subprocess.CompletedProcess[str]:
    return transcribe_json(hf_dir, EN, ZH)


@pytest.fixture(scope="module")
def words_run(official_dir) -> subprocess.CompletedProcess[str]:
    return transcribe_json(official_dir, EN, ZH, options=("--word-timestamps",))


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
    expected = [f"{line['file']}\t{result_of(line).rich_text}"
                for line in json_lines(official_run.stdout)]
    assert plain.stdout.splitlines() == expected


def test_language_and_itn_are_accepted(official_dir, official_run):
    result = transcribe_json(official_dir, EN, options=("--language", "en", "--itn"))

    assert result.returncode == 0, result.stderr
    (line,) = json_lines(result.stdout)
    assert_result_line(line, EN)
    # The prompt reaches the model: a different language and text-norm row changes the logits.
    default = json_lines(official_run.stdout)[0]
    assert line["token_ids"] != default["token_ids"]


@pytest.mark.parametrize("module", ["sensevoice_core", "supervisor"])
def test_unknown_language_is_a_usage_error_naming_codes_and_names(module):
    # Both command lines share the argument: it fails before any model or service is used.
    result = run_cli("transcribe", "--language", "xx", EN, module=module)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "argument --language: unknown language 'xx'" in result.stderr
    assert "zh, en" in result.stderr and "english" in result.stderr
    assert "Traceback" not in result.stderr


def transcribe_parser() -> argparse.ArgumentParser:
    """The arguments both command lines' transcribe commands take (cli.py holds them)."""
    parser = argparse.ArgumentParser(prog="transcribe")
    add_transcribe_arguments(parser)
    return parser


@pytest.mark.parametrize("given, code", [("english", "en"), ("ENGLISH", "en"),
                                         (" English ", "en"), ("en", "en"), ("Chinese", "zh"),
                                         ("auto", "auto")])
def test_language_codes_and_names_are_accepted_in_any_case(given, code):
    """As TranscribeOptions(language=...) and the HTTP API's form field accept them."""
    assert transcribe_parser().parse_args(["--language", given, "a.wav"]).language == code
    assert transcribe_parser().parse_args(["a.wav"]).language == "auto"


def test_language_help_lists_the_codes_and_says_names_are_accepted():
    text = " ".join(transcribe_parser().format_help().split())
    assert "auto, zh, en, yue, ja, ko" in text and "english" in text


def test_a_bad_language_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        transcribe_parser().parse_args(["--language", "klingon", "a.wav"])
    assert exit_.value.code == 2
    assert "unknown language 'klingon'; expected one of: auto, zh, en" in capsys.readouterr().err


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
    result = run_cli("random-demo", "--word-timestamps", EN)

    assert result.returncode == 0, result.stderr
    assert "RANDOM" in result.stderr
    assert "Traceback" not in result.stderr
    (line,) = json_lines(result.stdout)
    assert_result_line(line, EN)
    assert line["segments"] and all(s["words"] and s["tokens"] for s in line["segments"])
    # Its arguments are transcribe's, checked alike: json is its default format.
    karaoke = run_cli("random-demo", "--karaoke", EN)
    assert karaoke.returncode == 2 and "RANDOM" not in karaoke.stderr
    assert "it needs --format vtt, not --format json" in karaoke.stderr


def long_recording(path: Path) -> Path:
    """The four example clips with pauses between them (15 s)."""
    parts = []
    for name in LONG_CLIPS:
        parts += [np.zeros(24000, np.float32), soundfile.read(EXAMPLES / name, dtype="float32")[0]]
    soundfile.write(path, np.concatenate(parts + [np.zeros(16000, np.float32)]), 16000)
    return path


def test_a_long_file_is_segmented_and_its_json_carries_the_segments(tmp_path):
    """Over SENSEVOICE_MAX_SEGMENT_S the in-process CLI splits at pauses, as the service does."""
    long_file = long_recording(tmp_path / "long.flac")
    done = run_cli("transcribe", "--model", DEMO_MODEL, "--itn", "--json", long_file,
                   EXAMPLES / "en_02.flac", max_segment_s="5")
    assert done.returncode == 0, done.stderr
    long, short = (result_of(line) for line in json_lines(done.stdout))
    assert [s.text for s in long.segments] == LONG_TEXTS
    assert long.text == " ".join(LONG_TEXTS) and long.token_ids
    assert long.token_ids == tuple(i for s in long.segments for i in s.token_ids)
    assert short.text == "Hello world." and [s.text for s in short.segments] == ["Hello world."]


DIGITS = ("eight two six zero one eight one five nine zero eight three zero one six six one "
          "three one eight six zero nine one three nine zero nine nine six zero three zero two "
          "four six three nine four eight one nine nine three five one eight nine zero nine "
          "three seven eight six five seven nine seven five four three two one nine four "
          "eight seven five seven four nine one eight")  # 80 digits: 22 s of espeak-ng


def test_a_long_spoken_segment_becomes_readable_cues_at_its_word_times(tmp_path):
    spoken = tmp_path / "digits.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", spoken, DIGITS], check=True, timeout=60)
    srt = run_cli("transcribe", "--model", DEMO_MODEL, "--format", "srt", spoken)
    timed = run_cli("transcribe", "--model", DEMO_MODEL, "--word-timestamps", "--json", spoken)

    assert srt.returncode == timed.returncode == 0, srt.stderr + timed.stderr
    (segment,) = result_of(json_lines(timed.stdout)[0]).segments
    # 73 digits said in one breath: the demo model (trained on clips of up to ~6 s) hears 67
    # of them in this 20 s pass.
    assert segment.end - segment.start > 20 and len(segment.words) > 60
    cues = [block.split("\n") for block in srt.stdout.strip("\n").split("\n\n")]
    assert len(cues) >= 4
    options, words = SubtitleOptions(), list(segment.words)
    for number, (index, times, *lines) in enumerate(cues, start=1):
        assert index == str(number) and 1 <= len(lines) <= options.max_line_count
        assert all(len(line) <= options.max_line_width for line in lines)
        said = " ".join(lines).split()
        first, last = words[0], words[len(said) - 1]
        assert said == [w.word for w in words[:len(said)]]
        start, end = (seconds_of_stamp(stamp) for stamp in times.split(" --> "))
        assert (start, end) == (pytest.approx(first.start, abs=5e-4),
                                pytest.approx(last.end, abs=5e-4))
        assert end - start <= options.max_cue_s
        words = words[len(said):]
    assert words == []


def seconds_of_stamp(stamp: str) -> float:
    hours, minutes, secs = stamp.replace(",", ".").split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(secs)


@pytest.mark.slow
def test_in_process_and_through_the_service_print_the_same_json(tmp_path):
    """The two command lines, on the same files, print identical lines: a short clip, a long
    recording split into segments, silence, a file that is not audio and a missing one."""
    short, long_file = EXAMPLES / "en_02.flac", long_recording(tmp_path / "long.flac")
    silent, not_audio = tmp_path / "silent.wav", tmp_path / "notes.wav"
    soundfile.write(silent, np.zeros(3 * 16000, np.float32), 16000)
    not_audio.write_bytes(b"these are not the bytes of an audio file" * 10)
    files = [short, long_file, silent, not_audio, tmp_path / "missing.flac"]
    arguments = ("transcribe", "--itn", "--vad-threshold", "0.35", "--json", *files)
    # Word times and a language list reach the model both ways; subtitles are cut alike.
    timed = ("transcribe", "--itn", "--word-timestamps", "--languages", "English,zh", "--json",
             short, long_file)
    karaoke = ("transcribe", "--format", "vtt", "--karaoke", "--max-line-width", "9",
               "--max-line-count", "1", short, long_file)
    settings = {"max_segment_s": "5", "threads": "1"}
    service = start_service(tmp_path / "service", DEMO_MODEL, standby=False, **settings)
    try:
        through_service = [run_cli(*args, module="supervisor", supervisor_address=service.address,
                                   **settings) for args in (arguments, timed, karaoke)]
    finally:
        service.stop()
    in_process = [run_cli(*args, "--model", DEMO_MODEL, **settings)
                  for args in (arguments, timed, karaoke)]

    for run in through_service + in_process:
        assert run.returncode == (1 if str(files[-1]) in run.args else 0), run.stderr
        assert_clean_stderr(run.stderr)
    assert [run.stdout for run in through_service] == [run.stdout for run in in_process]
    words = [w.word for line in json_lines(in_process[1].stdout) for w in result_of(line).words]
    assert words[:2] == ["Hello", "world."] and len(words) > 2
    assert "<00:00:" in in_process[2].stdout  # words timed inside their cues
    through_service, in_process = through_service[0], in_process[0]
    lines = json_lines(in_process.stdout)
    assert [line["file"] for line in lines] == [str(file) for file in files]
    assert result_of(lines[0]).text == "Hello world."
    assert [s.text for s in result_of(lines[1]).segments] == LONG_TEXTS
    quiet = result_of(lines[2])
    assert (quiet.text, quiet.segments, quiet.token_ids, quiet.language) == ("", (), (), None)
    assert quiet.duration_s == 3.0
    assert lines[3] == {"file": str(not_audio), "error": lines[3]["error"]}
    assert lines[3]["error"].startswith(f"{not_audio}: cannot decode audio")
    assert lines[4] == {"file": str(files[4]), "error": f"{files[4]}: no such file"}


def test_the_text_srt_and_vtt_formats(official_dir, official_run, words_run):
    results = [result_of(line) for line in json_lines(official_run.stdout)]
    one = run_cli("transcribe", "--model", official_dir, "--format", "text", EN)
    assert one.stdout == results[0].rich_text + "\n"
    # Subtitles ask the model for word times themselves: their cues are cut from them.
    timed = [result_of(line) for line in json_lines(words_run.stdout)]
    srt = run_cli("transcribe", "--model", official_dir, "--format", "srt", EN, ZH)
    assert srt.returncode == 0, srt.stderr
    assert srt.stdout == "".join(f"==> {file} <==\n{to_srt(result.segments)}\n"
                                 for file, result in zip((EN, ZH), timed))
    vtt = run_cli("transcribe", "--model", official_dir, "--format", "vtt", EN)
    assert vtt.stdout == to_vtt(timed[0].segments) + "\n"


def test_subtitle_lines_come_from_the_flags_else_the_settings(official_dir, words_run):
    (timed,) = [result_of(line) for line in json_lines(words_run.stdout)][:1]
    narrow = SubtitleOptions(max_line_width=8, max_line_count=1)
    by_flags = run_cli("transcribe", "--model", official_dir, "--format", "srt",
                       "--max-line-width", "8", "--max-line-count", "1", EN)
    by_settings = run_cli("transcribe", "--model", official_dir, "--format", "srt", EN,
                          subtitle_max_line_width="8", subtitle_max_line_count="1")
    flags_win = run_cli("transcribe", "--model", official_dir, "--format", "vtt", "--karaoke",
                        "--max-line-width", "8", "--max-line-count", "1", EN,
                        subtitle_max_line_width="30", subtitle_max_line_count="3")
    for run in (by_flags, by_settings, flags_win):
        assert run.returncode == 0, run.stderr
        assert_clean_stderr(run.stderr)
    assert by_flags.stdout == by_settings.stdout == to_srt(timed.segments, narrow) + "\n"
    assert by_flags.stdout != to_srt(timed.segments) + "\n"  # the limits made a difference
    karaoke = SubtitleOptions(max_line_width=8, max_line_count=1, karaoke=True)
    assert flags_win.stdout == to_vtt(timed.segments, karaoke) + "\n"


def test_word_timestamps_put_words_and_tokens_in_the_json(official_run, words_run):
    assert words_run.returncode == 0, words_run.stderr
    assert_clean_stderr(words_run.stderr)
    plain, timed = json_lines(official_run.stdout), json_lines(words_run.stdout)
    # The same transcript, now with times: alignment reads the decoding, it does not redo it.
    assert [line["token_ids"] for line in timed] == [line["token_ids"] for line in plain]
    assert all(s["words"] == [] and s["tokens"] == [] for line in plain for s in line["segments"])
    for line in timed:
        for segment in result_of(line).segments:
            assert segment.tokens and segment.words  # the random model's noise is text too
            assert {t.id for t in segment.tokens} <= set(segment.token_ids)
            times = [(w.start, w.end) for w in segment.words]
            assert all(segment.start <= start <= end <= segment.end for start, end in times)
            assert [start for start, _ in times] == sorted(start for start, _ in times)


@pytest.mark.parametrize("module", ["sensevoice_core", "supervisor"])
@pytest.mark.parametrize(("arguments", "message"), [
    (("--languages", "en,xx"), "argument --languages: unknown language 'xx' in the language list; expected languages from: zh, en"),
    (("--karaoke", "--format", "srt"),
     "--karaoke times words inside WebVTT cues: it needs --format vtt, not --format srt"),
    (("--max-line-width", "0"), "argument --max-line-width: expected a whole number from 1 to 10000, got '0'"),
])
def test_subtitle_and_language_flags_refuse_bad_values_before_any_work(module, arguments,
                                                                        message):
    result = run_cli("transcribe", *arguments, EN, module=module)
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr and result.stderr.startswith("usage:")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("module", ["sensevoice_core", "supervisor"])
def test_a_language_outside_the_settings_list_is_one_error_line(module):
    # Before any model loads or any service is asked: SENSEVOICE_LANGUAGES=zh allows no "en".
    result = run_cli("transcribe", "--language", "en", EN, module=module, languages="zh")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "error: language 'en' is not among the allowed languages (zh)\n"


@pytest.mark.parametrize(("arguments", "message"), [
    (("--languages", "auto"), "'auto' cannot be in a language list"),
    (("--languages", "zh,,klingon"), "unknown language 'klingon'"),
    (("--karaoke",), "it needs --format vtt, not --format text"),
    (("--karaoke", "--json"), "it needs --format vtt, not --format json"),
    (("--max-line-count", "-2"), "argument --max-line-count: expected a whole number from 1 to 10000"),
    (("--max-line-width", "4.5"), "argument --max-line-width: expected a whole number from 1"),
    (("--max-line-width", ""), "argument --max-line-width: expected a whole number from 1"),
    (("--max-line-width", "10001"), "argument --max-line-width: expected a whole number from 1"),
    (("--language", "ja", "--languages", "en,Chinese"),
     "--language ja is not among --languages en,zh"),
])
def test_every_bad_combination_is_a_usage_error(capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_:
        check_transcribe_arguments(transcribe_parser().parse_args([*arguments, "a.wav"]))
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_language_lists_take_codes_and_names_in_any_case():
    parse = transcribe_parser().parse_args
    assert parse(["--languages", "Chinese, EN,zh", "a.wav"]).languages == ("zh", "en")
    assert parse(["--languages", "", "a.wav"]).languages == ()  # any, whatever the settings say
    assert parse(["a.wav"]).languages is None  # SENSEVOICE_LANGUAGES
    given = parse(["--format", "vtt", "--karaoke", "--language", "en", "--languages", "en,ja",
                   "--max-line-width", "30", "--max-line-count", "3", "a.wav"])
    check_transcribe_arguments(given)
    assert (given.karaoke, given.max_line_width, given.max_line_count) == (True, 30, 3)


def test_a_language_list_restricts_what_auto_detection_chooses():
    # The demo model hears English in en_02.flac; allowed Chinese alone, it must say zh.
    restricted = run_cli("transcribe", "--model", DEMO_MODEL, "--json", "--languages", "Chinese",
                         EXAMPLES / "en_02.flac")
    assert restricted.returncode == 0, restricted.stderr
    (line,) = json_lines(restricted.stdout)
    assert line["language"] == "zh" and line["raw"].startswith("<|zh|>")
    assert [s["language"] for s in line["segments"]] == ["zh"]


def test_a_vad_threshold_outside_0_to_1_is_a_usage_error(official_dir):
    result = run_cli("transcribe", "--model", official_dir, "--vad-threshold", "2", EN)
    assert result.returncode == 2 and result.stdout == ""
    assert "expected a number from 0 to 1, got '2'" in result.stderr


def test_bind_problem_names_the_settings_to_change():
    """The UI's and the cluster's one check before listening (sensevoice_core.cli)."""
    import socket

    from sensevoice_core.cli import bind_problem

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert bind_problem("127.0.0.1", port, "SENSEVOICE_UI") == (
            f"127.0.0.1:{port} is in use; stop what listens there or set SENSEVOICE_UI_PORT")
    assert bind_problem("127.0.0.1", port, "SENSEVOICE_CLUSTER") is None
    assert "set SENSEVOICE_CLUSTER_HOST" in bind_problem("no-such-host.invalid", port,
                                                         "SENSEVOICE_CLUSTER")
