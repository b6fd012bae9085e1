"""The reload canary: canary.jsonl checked line by line, the CER, the demo model passing its
canary (model/canary) and perturbed copies of it failing, in process and through the service."""

from __future__ import annotations

import os
import random
import shutil
import signal
from pathlib import Path

import jiwer
import numpy
import pytest
import sentencepiece
import soundfile
import torch
from model_factory import DEMO_MODEL
from safetensors.torch import load_file, save_file
from service import BackgroundTraffic, Service, start_service

from sensevoice_core import load_model
from sensevoice_core.canary import (
    CANARY_FILE,
    CANARY_S_PER_AUDIO_S,
    MAX_CLIP_S,
    CanaryClip,
    CanaryError,
    CanaryReport,
    character_error_rate,
    check_canary_dir,
    edit_distance,
    normalise,
    read_canary,
    run_canary,
)
from sensevoice_core.exit_codes import EXIT_USAGE
from ui.views import plain, reload_summary

CANARY = DEMO_MODEL / "canary"
CLIP = CANARY / "en_00.flac"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.model", "am.mvn")


def write_canary(directory: Path, *lines: str, clips: tuple[str, ...] = ("a.flac",)) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in clips:
        shutil.copyfile(CLIP, directory / name)
    (directory / CANARY_FILE).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return directory


# ---------------------------------------------------------------- canary.jsonl


def test_the_shipped_canary_is_balanced_and_mixes_itn():
    entries = read_canary(CANARY)
    assert len(entries) == 8
    for language in ("en", "zh"):
        mine = [entry for entry in entries if entry.language == language]
        assert len(mine) == 4 and sum(entry.use_itn for entry in mine) == 2
    assert check_canary_dir(CANARY).line().startswith("8 clips (")


@pytest.mark.parametrize("line, problem", [
    ('{"audio": "a.flac", "text": ', "line 2: not JSON"),
    ('["a.flac", "hello"]', "line 2: expected a JSON object, found list"),
    ('{"audio": "a.flac", "text": "hello", "langauge": "en"}',
     "line 2: unknown field 'langauge' (expected audio, text, language, use_itn)"),
    ('{"audio": "a.flac", "text": 5}',
     "line 2: field 'text' must be a string (what the clip says), found 5"),
    ('{"audio": "a.flac", "text": "hello", "use_itn": "yes"}',
     "field 'use_itn' must be true or false, found \"yes\""),
    ('{"audio": "a.flac", "use_itn": 1, "text": "hi"}', "field 'use_itn' must be true or false"),
    ('{"audio": "a.flac"}', "line 2: field 'text' is missing or empty"),
    ('{"text": "hello"}', "line 2: field 'audio' is missing or empty"),
    ('{"audio": "a.flac", "text": "hello", "language": "auto"}',
     "field 'language' must be one of zh, en, yue, ja, ko, found 'auto'"),
    ('{"audio": "a.flac", "text": "hello", "language": "EN"}', "found 'EN'"),
    ('{"audio": "a.flac", "text": " ?! "}', "field 'text' ' ?! ' is empty once normalised"),
    ('{"audio": "a.flac", "text": "' + "a" * 1001 + '"}', "a canary clip holds at most 1000"),
    ('{"audio": "/etc/passwd", "text": "hello"}', "field 'audio' must be a path relative to"),
    ('{"audio": "a.flac\\n", "text": "hello"}', "field 'audio' must be a path relative to"),
    ('{"audio": "../a.flac", "text": "hello"}',
     "audio '../a.flac' is outside the canary directory"),
    ('{"audio": "b.flac", "text": "hello"}', "b.flac is missing"),
    ('{"audio": ".", "text": "hello"}', "is not a file"),
])
def test_a_bad_line_is_named_with_its_field_and_what_was_found(tmp_path: Path, line: str,
                                                               problem: str):
    canary = write_canary(tmp_path / "canary", '{"audio": "a.flac", "text": "hello"}', line)
    with pytest.raises(CanaryError) as error:
        read_canary(canary)
    assert str(canary / CANARY_FILE) in str(error.value)
    assert problem in str(error.value)


def test_a_symbolic_link_out_of_the_directory_is_refused(tmp_path: Path):
    shutil.copyfile(CLIP, tmp_path / "outside.flac")
    canary = write_canary(tmp_path / "canary", '{"audio": "in.flac", "text": "hello"}',
                          clips=())
    (canary / "in.flac").symlink_to(tmp_path / "outside.flac")
    with pytest.raises(CanaryError, match="is outside the canary directory"):
        read_canary(canary)


@pytest.mark.parametrize("content, problem", [
    ("", "has no clips"), ("\n  \n", "has no clips"), (b"\xff\xfe{", "is unreadable"),
])
def test_an_empty_or_unreadable_file_is_refused(tmp_path: Path, content, problem: str):
    (tmp_path / CANARY_FILE).write_bytes(content if isinstance(content, bytes)
                                         else content.encode())
    with pytest.raises(CanaryError, match=problem):
        read_canary(tmp_path)


def test_blank_lines_a_bom_and_null_language_are_accepted(tmp_path: Path):
    canary = write_canary(tmp_path, "", '{"audio": "a.flac", "text": "hi", "language": null}', "")
    (canary / CANARY_FILE).write_text("\ufeff" + (canary / CANARY_FILE).read_text())
    [entry] = read_canary(canary)
    assert entry.language is None and entry.path == (canary / "a.flac").resolve()


def test_a_missing_directory_or_file_is_refused(tmp_path: Path):
    with pytest.raises(CanaryError, match="does not exist"):
        read_canary(tmp_path / "nowhere")
    with pytest.raises(CanaryError, match=f"{CANARY_FILE} is missing: write one JSON object"):
        read_canary(tmp_path)


def test_the_start_check_reads_every_clip(tmp_path: Path):
    canary = write_canary(tmp_path, '{"audio": "a.flac", "text": "hi", "language": "en"}',
                          '{"audio": "notes.flac", "text": "hi"}')
    (canary / "notes.flac").write_text("not audio")
    with pytest.raises(CanaryError, match="notes.flac .*not audio soundfile can read"):
        check_canary_dir(canary)


def long_clip(path: Path, seconds: float) -> Path:
    """The demo clip tiled to `seconds`."""
    audio, rate = soundfile.read(CLIP)
    soundfile.write(path, numpy.resize(audio, round(seconds * rate)), rate)
    return path


def test_a_clip_longer_than_an_utterance_is_refused_at_start_and_at_reload(demo_model,
                                                                           tmp_path: Path):
    canary = write_canary(tmp_path, '{"audio": "a.flac", "text": "close the window"}',
                          '{"audio": "long.flac", "text": "close the window"}')
    long_clip(canary / "long.flac", MAX_CLIP_S + 1)
    problem = rf"long.flac \(in canary.jsonl\) is {MAX_CLIP_S + 1:.1f} s long; a canary clip "
    with pytest.raises(CanaryError, match=problem):
        check_canary_dir(canary)
    with pytest.raises(CanaryError, match=problem):  # replaced after the start
        run_canary(demo_model, canary, 0.1)
    long_clip(canary / "long.flac", MAX_CLIP_S)  # the bound is inclusive
    assert check_canary_dir(canary).seconds == pytest.approx(
        MAX_CLIP_S + soundfile.info(CLIP).duration, abs=0.01)


def test_a_canary_long_against_the_reload_timeout_is_warned_about():
    check = check_canary_dir(CANARY)
    assert check.size() == f"8 clips, {check.seconds:.1f} s of audio"
    assert check.timeout_warning(30.0) is None  # the shipped canary: ~4 s of a 30 s budget
    budget = check.seconds * CANARY_S_PER_AUDIO_S * 2  # the canary alone: half of it
    assert check.timeout_warning(budget + 0.01) is None
    warning = check.timeout_warning(budget - 0.01)
    assert warning is not None and "SENSEVOICE_HOTRELOAD_TIMEOUT=" in warning
    assert check.size() in warning and str(check.root) in warning


def test_the_start_check_refuses_a_language_the_service_rules_out():
    assert check_canary_dir(CANARY, ["zh", "english"]).line().startswith("8 clips (")
    with pytest.raises(CanaryError, match=r"en_00.flac \(in canary.jsonl\) is expected as 'en', "
                                          r"which SENSEVOICE_LANGUAGES \(zh\) rules out"):
        check_canary_dir(CANARY, ["zh"])


# ---------------------------------------------------------------- the CER


def test_edit_distance_agrees_with_jiwer():
    rng = random.Random(0)
    # No spaces: jiwer strips and merges them before counting.
    pairs = [("".join(rng.choices("abc七", k=rng.randint(1, 12))),
              "".join(rng.choices("abc七", k=rng.randint(1, 12)))) for _ in range(200)]
    for expected, got in pairs:
        assert edit_distance(expected, got) / len(expected) == pytest.approx(
            jiwer.cer(expected, got))
    assert edit_distance("abc", "") == 3 and edit_distance("", "ab") == 2
    assert character_error_rate(pairs) == pytest.approx(
        sum(edit_distance(e, g) for e, g in pairs) / sum(len(e) for e, _ in pairs))


def test_normalisation_ignores_case_and_spacing_and_without_itn_punctuation():
    assert normalise("  Close   the Window. ", use_itn=False) == "close the window"
    assert normalise("Close the window.", use_itn=True) == "close the window."
    assert normalise("ＡＢＣ，你好。", use_itn=False) == "abc你好"
    # With ITN, lost punctuation is an error (a fine-tune that lost it must not pass).
    assert character_error_rate([(normalise("Close the window.", True),
                                  normalise("close the window", True))]) == pytest.approx(1 / 17)
    assert character_error_rate([("ab", "xxxxab")]) == 2.0  # insertions count: CER may pass 1


def test_the_summary_shows_the_worst_clips_first():
    def clip(name: str, cer: float, language: str = "en") -> CanaryClip:
        return CanaryClip(audio=name, expected="hello world", got="hollow" if cer else
                          "hello world", cer=cer, expected_language="en", language=language,
                          ok=language == "en")

    report = CanaryReport(canary_dir="/c", passed=False, cer=0.25, max_cer=0.1, seconds=0.2,
                          clips=[clip("fine.flac", 0), clip("bad.flac", 0.5),
                                 clip("worse.flac", 0.9), clip("tagged.flac", 0, "zh"),
                                 clip("also.flac", 0.1)])
    summary = report.summary()
    assert summary.startswith("canary failed (5 clips from /c, CER 0.250 > max 0.1, 1 tagged "
                              "the wrong language, 0.20 s): tagged.flac: ")
    assert summary.index("tagged.flac") < summary.index("worse.flac") < summary.index("bad.flac")
    assert 'tagged.flac: language expected en got zh, text right ("hello world")' in summary
    assert 'worse.flac: expected "hello world" got "hollow" (CER 0.90)' in summary
    assert summary.endswith("1 more clip(s) with errors") and "fine.flac" not in summary
    assert report.verdict() == "canary failed (5 clips, CER 0.250)"


# ---------------------------------------------------------------- the demo model


def text_rows(model_dir: Path) -> list[int]:
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    return [i for i in range(pieces.get_piece_size())
            if not pieces.is_control(i) and not pieces.is_unknown(i)
            and not pieces.id_to_piece(i).startswith("<|")]


def tag_row(model_dir: Path, tag: str) -> int:
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    return pieces.piece_to_id(tag)


def copy_demo(target: Path, change: str) -> Path:
    """The demo model's files with its CTC head changed: "shuffled" (the text rows permuted),
    "swapped" (the English and Mandarin tags swapped), "good" (the same tensors, other bytes)."""
    target.mkdir(parents=True)
    for name in MODEL_FILES:
        shutil.copyfile(DEMO_MODEL / name, target / name)
    tensors = load_file(target / "model.safetensors")
    if change == "shuffled":
        rows = text_rows(target)
        order = torch.tensor(rows)[torch.randperm(len(rows), generator=torch.Generator()
                                                  .manual_seed(0))]
    else:
        rows = [tag_row(target, "<|en|>"), tag_row(target, "<|zh|>")]
        order = torch.tensor(rows[::-1])
    if change != "good":
        for key in ("ctc.ctc_lo.weight", "ctc.ctc_lo.bias"):
            tensors[key][rows] = tensors[key][order].clone()
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt", "copy": change})
    return target


@pytest.fixture(scope="module")
def canary_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("canary_models")
    for change in ("good", "shuffled", "swapped"):
        copy_demo(root / change, change)
    return root


def test_the_demo_model_passes_its_canary_with_margin(demo_model):
    report = run_canary(demo_model, CANARY, 0.1)
    assert report.passed and report.cer <= 0.02, report.summary()
    assert run_canary(demo_model, CANARY, report.cer).passed  # the bound is inclusive
    assert all(clip.ok and clip.language == clip.expected_language for clip in report.clips)
    assert report.canary_dir == str(CANARY.resolve()) and report.max_cer == 0.1
    assert report.summary().startswith("canary passed (8 clips from ")
    assert report.verdict() == f"canary passed (8 clips, CER {report.cer:.3f})"


def test_a_model_with_shuffled_output_rows_fails_on_its_text(canary_models: Path):
    report = run_canary(load_model(canary_models / "shuffled"), CANARY, 0.1)
    assert not report.passed and report.cer > 0.5
    worst = max(report.clips, key=lambda clip: clip.cer)
    assert f'{worst.audio}: expected "{worst.expected}" got "{worst.got}"' in report.summary()


def test_a_model_with_swapped_language_tags_fails_on_language_id(canary_models: Path):
    report = run_canary(load_model(canary_models / "swapped"), CANARY, 0.1)
    assert not report.passed and report.cer <= 0.1  # the text is right, its tags are not
    assert {(clip.expected_language, clip.language) for clip in report.clips} == \
        {("en", "zh"), ("zh", "en")}
    assert "8 tagged the wrong language" in report.summary()
    assert "language expected en got zh" in report.summary()


def test_a_clip_that_no_longer_decodes_is_the_canary_s_fault(demo_model, tmp_path: Path):
    canary = write_canary(tmp_path, '{"audio": "a.flac", "text": "close the window"}')
    (canary / "a.flac").write_bytes(b"RIFF....WAVEfmt garbage")
    with pytest.raises(CanaryError, match=r"a\.flac \(in canary.jsonl\): not audio"):
        run_canary(demo_model, canary, 0.1)


# ---------------------------------------------------------------- through the service


@pytest.fixture(scope="module")
def service(canary_models: Path, service_canary: Path,
            tmp_path_factory: pytest.TempPathFactory):
    demo = canary_models / "demo"
    demo.mkdir()
    for name in MODEL_FILES:
        shutil.copyfile(DEMO_MODEL / name, demo / name)
    running = start_service(tmp_path_factory.mktemp("service"), demo,
                            reload_canary_dir=str(service_canary))
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def service_canary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The service's canary: a copy of the shipped one that a test may break."""
    return Path(shutil.copytree(CANARY, tmp_path_factory.mktemp("canary") / "canary"))


@pytest.mark.slow
def test_the_first_load_runs_no_canary(service: Service):
    assert service.status().model.canary is None
    assert "Reload canary: 8 clips (" in service.log() and "canary passed" not in service.log()


@pytest.mark.slow
def test_a_reload_to_a_model_that_fails_its_canary_is_refused(service: Service,
                                                               canary_models: Path):
    serving = service.status().model.fingerprint
    with BackgroundTraffic(service, CLIP) as traffic:
        traffic.wait_for_more()
        outcome = service.client.hot_reload_model(canary_models / "shuffled")
        traffic.wait_for_more()
    assert not traffic.failures, traffic.failures
    assert {reply.fingerprint for reply in traffic.replies} == {serving}
    assert not outcome.ok and outcome.new_fingerprint is None
    assert outcome.canary is not None and not outcome.canary.passed
    assert outcome.error.startswith("the new worker (pid ")
    assert outcome.canary.summary() in outcome.error
    status = service.status()
    assert status.model.fingerprint == serving and status.last_reload == outcome
    assert service.client.transcribe(CLIP).fingerprint == serving
    failure = next(line for line in service.log().splitlines()
                   if "[HOTRELOAD] Reload failed, still serving" in line)
    worst = max(outcome.canary.clips, key=lambda clip: clip.cer)
    assert "canary failed (8 clips from" in failure and worst.audio in failure
    assert plain(worst.audio) in reload_summary(outcome)  # the operator's page shows the diff
    assert "canary" not in reload_summary(outcome, full=False)  # the public one does not


@pytest.mark.slow
def test_a_reload_to_a_model_that_passes_goes_through(service: Service, canary_models: Path):
    outcome = service.client.hot_reload_model(canary_models / "good")
    assert outcome.ok and outcome.canary is not None and outcome.canary.passed, outcome
    assert outcome.old_fingerprint != outcome.new_fingerprint  # other bytes: not an L1 hit
    status = service.status()
    assert status.model.fingerprint == outcome.new_fingerprint
    assert status.model.canary == outcome.canary
    assert f"; {outcome.canary.verdict()}" in next(
        line for line in service.log().splitlines()
        if "[HOTRELOAD] Swapped model successfully" in line)
    assert reload_summary(outcome).endswith(f" · canary passed (8 clips, CER "
                                            f"{outcome.canary.cer:.3f})")


@pytest.mark.slow
def test_a_canary_broken_after_start_fails_the_reload_not_the_service(
        service: Service, service_canary: Path, canary_models: Path):
    serving = service.status().model.fingerprint
    jsonl = service_canary / CANARY_FILE
    shipped = jsonl.read_text(encoding="utf-8")
    jsonl.write_text(shipped + '{"audio": "en_00.flac"}\n', encoding="utf-8")
    try:
        outcome = service.client.hot_reload_model(canary_models / "swapped")
    finally:
        jsonl.write_text(shipped, encoding="utf-8")
    assert not outcome.ok and outcome.canary is None
    assert f"CanaryError: {jsonl} line 9: field 'text' is missing or empty" in outcome.error
    assert service.status().model.fingerprint == serving
    assert service.client.transcribe(CLIP).fingerprint == serving


@pytest.mark.slow
def test_a_crashed_worker_s_replacement_runs_no_canary(service: Service):
    """Only a reload's green runs the canary: a replacement reloads what already serves."""
    ran = service.log().count("canary passed (8 clips from")
    serving = service.status().model.fingerprint
    crashed = service.serving_pid()
    os.kill(crashed, signal.SIGKILL)
    service.wait_until(lambda status: any(w.role == "serving" and w.pid != crashed
                                          for w in status.workers), what="a replacement")
    assert service.client.transcribe(CLIP).fingerprint == serving
    assert service.log().count("canary passed (8 clips from") == ran


@pytest.mark.slow
def test_a_misconfigured_canary_stops_the_supervisor_at_start(tmp_path: Path,
                                                              canary_models: Path):
    bad = write_canary(tmp_path / "canary", '{"audio": "a.flac", "text": "hi"}',
                       '{"audio": "gone.flac", "text": "hi"}')
    started = start_service(tmp_path / "work", canary_models / "good", wait=False,
                            reload_canary_dir=str(bad))
    try:
        assert started.process.wait(30) == EXIT_USAGE
    finally:
        started.client.close()
    [line] = [line for line in started.log().splitlines() if "Cannot start" in line]
    assert f"SENSEVOICE_RELOAD_CANARY_DIR: {bad.resolve() / CANARY_FILE} line 2: audio file " \
           f"{bad.resolve() / 'gone.flac'} is missing" in line


@pytest.mark.slow
def test_a_reload_timed_out_with_a_long_canary_says_so(tmp_path: Path, canary_models: Path):
    """Ten 29 s clips against a 1 s SENSEVOICE_HOTRELOAD_TIMEOUT: the start warns, and the
    timed-out reload names the canary and its size, not only the timeout."""
    canary = write_canary(tmp_path / "canary", *(
        f'{{"audio": "c{i}.flac", "text": "close the window"}}' for i in range(10)), clips=())
    for i in range(10):
        long_clip(canary / f"c{i}.flac", 29.0)
    running = start_service(tmp_path / "work", canary_models / "good",
                            reload_canary_dir=str(canary), hotreload_timeout="1")
    try:
        assert "Reload canary: the reload canary (10 clips, 290.0 s of audio) may take" \
            in running.log()
        outcome = running.client.hot_reload_model(canary_models / "swapped")
        assert not outcome.ok
        assert outcome.error == ("not ready within 1 s (SENSEVOICE_HOTRELOAD_TIMEOUT) while "
                                 "loading the model, warming up or running the canary (10 "
                                 "clips, 290.0 s of audio); if the canary is what takes the "
                                 "time, shorten it or raise the timeout")
        assert running.status().model.model_dir == str((canary_models / "good").resolve())
    finally:
        assert running.stop() == 0
