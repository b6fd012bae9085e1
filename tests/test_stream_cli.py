"""`python -m supervisor stream FILE` against `python -m ui` and a real supervisor serving the
demo model: what it prints, on a terminal and not, and how it fails."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from model_factory import copy_demo_model
from service import REPO, start_service
from ui_process import start_ui

pytestmark = pytest.mark.slow

EXAMPLES = REPO / "ui" / "examples"
FINAL = re.compile(r"\[(\d+\.\d\d)–(\d+\.\d\d) s\] (.+)  \((en|zh) \w+ \w+\)")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    demo_dir = copy_demo_model(tmp_path_factory.mktemp("models") / "demo")
    service = start_service(tmp_path_factory.mktemp("service"), demo_dir)
    ui = start_ui(tmp_path_factory.mktemp("ui"), service.address, languages="zh,en")
    yield service, ui
    ui.stop()
    service.stop()


def url(ui) -> str:
    return ui.url.replace("http://", "ws://") + "/v1/realtime"


def stream(*args: str, stdout: int = subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor", "stream", *args], cwd=REPO,
                          check=False,
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120)


def three_utterances(target: Path) -> Path:
    """en_02, zh_04, en_03 with 1.5 s of silence after each, as 44.1 kHz stereo FLAC: the
    CLI decodes and resamples it itself."""
    gap = np.zeros(24000, np.float32)
    parts = [gap[:8000]]
    for name in ("en_02", "zh_04", "en_03"):
        parts += [soundfile.read(EXAMPLES / f"{name}.flac", dtype="float32")[0], gap]
    mono = np.concatenate(parts)
    stereo = np.repeat(np.interp(np.arange(0, len(mono), 16000 / 44100), np.arange(len(mono)),
                                 mono)[:, None], 2, axis=1)
    soundfile.write(target, stereo, 44100)
    return target


def test_a_file_plays_through_and_each_turn_prints_partials_then_its_final(stack, tmp_path):
    _, ui = stack
    clip = three_utterances(tmp_path / "three.flac")
    done = stream(str(clip), "--url", url(ui), "--speed", "5")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    finals = [FINAL.fullmatch(line) for line in lines if line.startswith("[")]
    assert len(finals) == 3 and all(finals), lines
    assert [m.group(4) for m in finals] == ["en", "zh", "en"]
    starts = [float(m.group(1)) for m in finals]
    assert starts == sorted(starts) and all(float(m.group(2)) > float(m.group(1))
                                            for m in finals)
    assert re.fullmatch(r"\d+。", finals[1].group(3))
    # Not a terminal: each partial is a line of its own, before its final.
    assert lines[0].startswith("… ") and all(line.startswith(("… ", "[")) for line in lines)
    assert "\r" not in done.stdout and "\x1b" not in done.stdout


def test_on_a_terminal_the_partial_line_is_rewritten_in_place(stack):
    _, ui = stack
    controller, terminal = pty.openpty()
    try:
        done = stream(str(EXAMPLES / "zh_04.flac"), "--url", url(ui), "--speed", "4",
                      stdout=terminal)
    finally:
        os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal's other end is closed: all read
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    assert done.returncode == 0, done.stderr
    text = output.decode()
    assert "\r\x1b[K… " in text  # a partial, over the line before it
    final = text.rsplit("\x1b[K", 1)[1]  # the final clears the partial line first
    assert FINAL.fullmatch(final.strip()), repr(text)


def test_failures_say_what_went_wrong(stack, tmp_path):
    _, ui = stack
    missing = stream(str(tmp_path / "nothing.wav"), "--url", url(ui))
    assert missing.returncode == 1 and "no such file" in missing.stderr
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all")
    not_audio = stream(str(text), "--url", url(ui))
    assert not_audio.returncode == 1 and "cannot decode audio" in not_audio.stderr
    nobody = stream(str(EXAMPLES / "en_02.flac"), "--url", "ws://127.0.0.1:9/v1/realtime")
    assert nobody.returncode == 1
    assert "cannot open ws://127.0.0.1:9/v1/realtime?intent=transcription" in nobody.stderr
    assert "is the UI running" in nobody.stderr
    for bad in ("0", "-1", "nan", "fast"):
        usage = stream(str(EXAMPLES / "en_02.flac"), "--speed", bad)
        assert usage.returncode == 2 and "--speed" in usage.stderr
    # A language the service does not allow (SENSEVOICE_LANGUAGES=zh,en): its sentence.
    refused = stream(str(EXAMPLES / "en_02.flac"), "--url", url(ui), "--language", "ja")
    assert refused.returncode == 1 and "error: " in refused.stderr
    assert "'ja'" in refused.stderr or " ja " in refused.stderr, refused.stderr
    assert not re.search(r"^\[", refused.stdout, re.MULTILINE)  # nothing transcribed
    # Faster than the server allows (tests/test_realtime.py tests the server's own limit):
    # refused before connecting, rather than cut off mid-file.
    too_fast = stream(str(EXAMPLES / "en_02.flac"), "--url", "ws://127.0.0.1:9/v1/realtime",
                      "--speed", "20.5")
    assert too_fast.returncode == 2, too_fast.stderr
    assert "--speed: at most 20 (the server refuses audio sent faster than 20x real time), " \
           "got '20.5'" in too_fast.stderr
