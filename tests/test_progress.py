"""Progress of long transcriptions (issue 15, item 5): the library's callback, Progress messages
through the service, OpenAI's stream=true events, the page's progress and segments, and the
progress bar of both command lines."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile
import zmq
from gradio_client import Client, handle_file

from model_factory import DEMO_MODEL
from sensevoice_core import TranscribeOptions
from sensevoice_core.audio import load_audio
from sensevoice_core.long_audio import MAX_TIME_BATCH_PADDING, time_batches
from sensevoice_core.protocol import (
    Progress,
    TranscribeRequest,
    decode_reply,
    encode,
)
from sensevoice_core.result import Result
from sensevoice_core.segmentation import VadOptions
from service import REPO, Service, start_service, stopped
from ui_process import UiProcess, start_ui

EXAMPLES = REPO / "ui" / "examples"
CLIPS = ("en_02.flac", "zh_04.flac", "en_03.flac", "zh_08.flac")
TEXTS = ["Hello world.", "8975。", "325.", "晚安。"]  # the demo model's, with ITN
MAX_SEGMENT_S = 5.0  # each clip of the recordings is a segment of its own
SHORT = TranscribeOptions(use_itn=True, vad=VadOptions(max_segment_s=MAX_SEGMENT_S))
REPEATS = 12  # the long recording: the four clips 12 times, 48 segments (3 minutes)


def recording(path: Path, repeats: int = 1) -> Path:
    """The four clips, 1.5 s of silence before each, repeated, and 1 s of silence at the end."""
    clips = [load_audio(EXAMPLES / name).numpy() for name in CLIPS]
    parts = [part for _ in range(repeats) for clip in clips
             for part in (np.zeros(24000, np.float32), clip)]
    soundfile.write(path, np.concatenate([*parts, np.zeros(16000, np.float32)]), 16000)
    return path


@pytest.fixture(scope="module")
def four_clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return recording(tmp_path_factory.mktemp("audio") / "four.flac")


@pytest.fixture(scope="module")
def long_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return recording(tmp_path_factory.mktemp("audio") / "long.flac", REPEATS)


# ---------------------------------------------------------------- the library


def assert_same(result: Result, other: Result) -> None:
    """The same result but for the float noise of other batch companions (about 1e-6) in the
    model's confidences."""
    def parts(r: Result) -> tuple:
        measures = [(s.avg_logprob, s.no_speech_prob) for s in r.segments]
        bare = [s.model_copy(update={"avg_logprob": None, "no_speech_prob": None})
                for s in r.segments]
        return r.model_copy(update={"segments": tuple(bare)}), measures

    (bare, measures), (other_bare, other_measures) = parts(result), parts(other)
    assert bare == other_bare
    assert np.allclose(np.array(measures, float), np.array(other_measures, float), rtol=1e-4)


def test_progress_reports_each_segment_in_time_order(demo_model, four_clips: Path):
    calls = []
    result = demo_model.transcribe(four_clips, SHORT,
                                   progress=lambda *step: calls.append(step))
    assert [(done, total) for done, total, _ in calls] == [(i, 4) for i in range(5)]
    assert calls[0][2] is None
    assert tuple(segment for *_, segment in calls[1:]) == result.segments
    assert [s.text for s in result.segments] == TEXTS
    assert_same(result, demo_model.transcribe(four_clips, SHORT))  # in length-sorted batches


def test_time_ordered_batches_give_the_same_result(demo_model, four_clips: Path):
    """Small batches (a 3 s budget), each reported as it finishes."""
    options = TranscribeOptions(use_itn=True, vad=SHORT.vad, batch_s=3.0)
    calls = []
    result = demo_model.transcribe(four_clips, options, progress=lambda *step: calls.append(step))
    assert [done for done, *_ in calls] == list(range(5))
    assert [s.text for s in result.segments] == TEXTS
    assert tuple(segment for *_, segment in calls[1:]) == result.segments
    assert_same(result, demo_model.transcribe(four_clips, options))


def test_time_batches_are_full_runs_within_the_budget_and_the_padding_bound():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, 200).tolist() + [30] * 12 + [150, 3]  # 150: over the budget

    def fits(batch: list[int]) -> bool:
        padded = max(lengths[i] for i in batch) * len(batch)
        padding = padded - sum(lengths[i] for i in batch)
        return len(batch) == 1 or (padded <= 100 and padding <= MAX_TIME_BATCH_PADDING * padded)

    batches = time_batches(lengths, 100)
    assert [i for batch in batches for i in batch] == list(range(len(lengths)))
    assert all(fits(batch) for batch in batches)
    assert all(not fits(batch + following[:1]) for batch, following in pairwise(batches))
    assert time_batches([30] * 7, 100) == [[0, 1, 2], [3, 4, 5], [6]]  # like lengths: batched
    assert time_batches([30, 10, 30, 29], 100) == [[0], [1], [2, 3]]  # unlike: alone
    assert time_batches([], 100) == []


def test_no_speech_is_one_call_and_a_short_clip_two(demo_model):
    calls = []
    silent = demo_model.transcribe(np.zeros(3 * 16000, np.float32), SHORT,
                                   progress=lambda *step: calls.append(step))
    assert calls == [(0, 0, None)] and silent.segments == ()
    calls.clear()
    hello = demo_model.transcribe(EXAMPLES / CLIPS[0], SHORT,
                                  progress=lambda *step: calls.append(step))
    assert calls == [(0, 1, None), (1, 1, hello.segments[0])]


def test_a_callback_that_raises_aborts_the_transcription(demo_model, four_clips: Path):
    class Gone(Exception):
        pass

    calls = []

    def leave_at_two(done: int, total: int, segment: object) -> None:
        calls.append(done)
        if done == 2:
            raise Gone()

    options = TranscribeOptions(use_itn=True, vad=SHORT.vad, batch_s=1.0)  # a batch each
    with pytest.raises(Gone):
        demo_model.transcribe(four_clips, options, progress=leave_at_two)
    assert calls == [0, 1, 2]
    assert demo_model.transcribe(EXAMPLES / CLIPS[0], SHORT).text == TEXTS[0]  # goes on


# ---------------------------------------------------------------- the service


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    # batch_s 1: a batch per segment, so that each Progress step is a step of its own.
    service = start_service(tmp_path_factory.mktemp("service"), DEMO_MODEL, standby=False,
                            max_segment_s=str(MAX_SEGMENT_S), batch_s="1", threads="1")
    yield service
    service.stop(signal.SIGKILL if service.process.poll() is None else signal.SIGTERM)


@pytest.fixture(scope="module")
def ui(service: Service, tmp_path_factory: pytest.TempPathFactory):
    ui = start_ui(tmp_path_factory.mktemp("ui"), service.address)
    yield ui
    ui.stop()


@pytest.fixture(scope="module")
def sdk(ui: UiProcess):
    client = openai.OpenAI(base_url=f"{ui.url}/v1", api_key="unused", max_retries=0)
    yield client
    client.close()


@pytest.mark.slow
def test_progress_messages_come_in_order_before_the_reply(service: Service, long_file: Path):
    total = 4 * REPEATS
    steps: list[Progress] = []
    reply = service.client.transcribe(long_file, use_itn=True, on_progress=steps.append)
    assert [(s.done, s.total) for s in steps] == [(i, total) for i in range(total + 1)]
    assert tuple(s.segment for s in steps[1:]) == reply.segments
    assert reply.text == service.client.transcribe(long_file, use_itn=True).text

    # On the wire: one DEALER socket sees every Progress, then the reply, under its own id.
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(service.address)
    try:
        request = TranscribeRequest(request_id="mine", use_itn=True, progress=True)
        socket.send_multipart(encode(request, (EXAMPLES / CLIPS[0]).read_bytes()))
        kinds = []
        while not kinds or kinds[-1] == "progress":
            assert socket.poll(30_000), f"no reply after {kinds}"
            message = decode_reply(socket.recv_multipart())
            assert message.request_id == "mine"
            kinds.append(message.kind)
        assert kinds == ["progress", "progress", "transcription"]
    finally:
        socket.close()
        context.term()


@pytest.mark.slow
def test_an_on_progress_that_raises_ends_the_wait_and_the_service_goes_on(
        service: Service, long_file: Path):
    class Gone(Exception):
        pass

    def leave(step: Progress) -> None:
        if step.done == 1:
            raise Gone()

    with pytest.raises(Gone):
        service.client.transcribe(long_file, use_itn=True, on_progress=leave)
    service.wait_until(lambda status: status.in_flight == 0, what="the request to finish")
    assert service.client.transcribe(EXAMPLES / CLIPS[0], use_itn=True).text == TEXTS[0]


def openai_events(sdk: openai.OpenAI, path: Path, **fields) -> list:
    with path.open("rb") as audio:
        return list(sdk.audio.transcriptions.create(model="whisper-1", file=audio, stream=True,
                                                    **fields))


@pytest.mark.slow
def test_the_openai_sdk_streams_deltas_in_order_and_the_whole_text(
        sdk: openai.OpenAI, four_clips: Path, long_file: Path):
    *deltas, done = openai_events(sdk, four_clips)
    assert [d.type for d in deltas] == ["transcript.text.delta"] * 4
    assert [d.delta for d in deltas] == ["Hello world.", " 8975。", " 325.", " 晚安。"]
    extras = [d.model_extra for d in deltas]
    assert [e["language"] for e in extras] == ["en", "zh", "en", "zh"]
    assert [(e["done"], e["total"]) for e in extras] == [(i, 4) for i in range(1, 5)]
    assert all(a["end"] <= b["start"] for a, b in pairwise(extras))
    assert done.type == "transcript.text.done"
    with four_clips.open("rb") as audio:
        plain = sdk.audio.transcriptions.create(model="whisper-1", file=audio)
    assert done.text == "".join(d.delta for d in deltas) == plain.text
    assert {language.code for language in done.languages} == {"en", "zh"}
    assert done.model_extra["fingerprint"] and done.model_extra["duration"] > 14

    *deltas, done = openai_events(sdk, long_file, response_format="text", language="en")
    assert len(deltas) == 4 * REPEATS
    assert done.text == "".join(d.delta for d in deltas)
    with long_file.open("rb") as audio:
        assert done.text == sdk.audio.transcriptions.create(
            model="whisper-1", file=audio, language="en").text


@pytest.mark.slow
def test_concurrent_streams_each_get_their_own_events(sdk: openai.OpenAI, four_clips: Path,
                                                      long_file: Path):
    files = [four_clips, long_file, four_clips, long_file]
    with ThreadPoolExecutor(len(files)) as pool:
        streams = list(pool.map(lambda path: openai_events(sdk, path), files))
    for path, (*deltas, done) in zip(files, streams):
        assert [d.model_extra["done"] for d in deltas] == list(range(1, len(deltas) + 1))
        assert len(deltas) == (4 if path == four_clips else 4 * REPEATS)
        assert done.text == "".join(d.delta for d in deltas)
    assert streams[0] == streams[2] and streams[1][-1].text == streams[3][-1].text


@pytest.mark.slow
def test_a_stream_of_silence_is_just_done(sdk: openai.OpenAI, tmp_path: Path):
    silent = tmp_path / "silent.wav"
    soundfile.write(silent, np.zeros(3 * 16000, np.float32), 16000)
    [done] = openai_events(sdk, silent)
    assert done.type == "transcript.text.done" and done.text == "" and done.languages == []


@pytest.mark.slow
def test_streamed_requests_that_cannot_succeed_are_plain_http_errors(
        sdk: openai.OpenAI, ui: UiProcess, tmp_path: Path):
    notes = tmp_path / "notes.wav"
    notes.write_bytes(b"these are not the bytes of an audio file" * 10)
    with pytest.raises(openai.BadRequestError) as bad:
        openai_events(sdk, notes)
    assert bad.value.body["param"] == "file" and "notes.wav: cannot decode" in bad.value.message
    with pytest.raises(openai.BadRequestError) as klingon:
        openai_events(sdk, EXAMPLES / CLIPS[0], language="tlh")
    assert klingon.value.body["param"] == "language"
    with pytest.raises(openai.BadRequestError) as subtitles:
        openai_events(sdk, EXAMPLES / CLIPS[0], response_format="srt")
    assert subtitles.value.body["param"] == "response_format"
    response = httpx.post(f"{ui.url}/v1/audio/transcriptions",
                          files={"file": ("empty.wav", b"")}, data={"stream": "true"})
    assert response.status_code == 400 and response.headers["content-type"].startswith(
        "application/json")


def metric(ui: UiProcess, name: str) -> float:
    text = httpx.get(f"{ui.url}/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_frees_its_place(
        service: Service, ui: UiProcess, long_file: Path):
    gone = 'sensevoice_requests_total{endpoint="openai",outcome="client_gone"}'
    before = metric(ui, gone)
    with httpx.Client(timeout=60) as http, http.stream(
            "POST", f"{ui.url}/v1/audio/transcriptions",
            files={"file": ("long.flac", long_file.read_bytes())},
            data={"stream": "true"}) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data: "):
            pass  # the first delta
        with stopped(service.serving_pid()):  # the rest of the file waits while it leaves
            assert metric(ui, "sensevoice_front_door_requests") == 1
            response.close()
    ui.wait_until(lambda: metric(ui, gone) == before + 1, "the stream to end as client_gone")
    assert metric(ui, "sensevoice_front_door_requests") == 0
    service.wait_until(lambda status: status.in_flight == 0, what="the worker to finish")


def job_outputs(job, final: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not final():
        assert time.monotonic() < deadline, f"the job is stuck: {job.status()}"
        time.sleep(0.02)


@pytest.mark.slow
def test_the_page_shows_progress_and_segments_as_they_finish(
        service: Service, ui: UiProcess, long_file: Path):
    gradio = Client(ui.url, verbose=False)
    try:
        job = gradio.submit(handle_file(str(long_file)), "auto", True, 0.35, False, [],
                            api_name="/transcribe")
        job_outputs(job, lambda: any(output[0] for output in job.outputs()))
        with stopped(service.serving_pid()):  # for less than the 3 s that a hang takes
            assert metric(ui, "sensevoice_front_door_requests") == 1  # the generator holds it
            deadline = time.monotonic() + 1.0  # Gradio sends progress every 0.1 s or so
            while not job.status().progress_data and time.monotonic() < deadline:
                time.sleep(0.02)
            [progress] = job.status().progress_data or [None]
        assert progress is not None and (progress.unit, progress.length) == ("segments", 48)
        assert 0 < progress.index < 48
        final = job.result(timeout=60)
        outputs = job.outputs()
        assert outputs[-1] == final
        texts = [output[0] for output in outputs]
        assert len(texts) >= 3 and all(final[0].startswith(text) for text in texts)
        rows = [sum(bool(row[2]) for row in output[2]["data"]) for output in outputs]
        assert rows == sorted(rows) and rows[-1] == 48 and rows[0] < 48
        assert "of 48 segments" in outputs[1][1]
        assert final[0] == service.client.transcribe(long_file, use_itn=True).text
        assert final[3] is not None  # the SRT, at the end
        assert metric(ui, "sensevoice_front_door_requests") == 0
    finally:
        gradio.close()


# ---------------------------------------------------------------- the command lines


def run_on_a_terminal(*args: object, quiet: bool = False, tty: bool = True,
                      **env: str) -> tuple[str, str, int]:
    """python -m args... with stderr on a pseudo-terminal (or a pipe): stdout, stderr, code."""
    environment = {**os.environ, "PYTHONIOENCODING": "utf-8", "COLUMNS": "120",
                   **{f"SENSEVOICE_{key.upper()}": value for key, value in env.items()}}
    command = [sys.executable, "-m", *map(str, args), *(["--quiet"] if quiet else [])]
    if not tty:
        done = subprocess.run(command, capture_output=True, env=environment, timeout=120,
                              check=False)
        return done.stdout.decode(), done.stderr.decode(), done.returncode
    controller, terminal = pty.openpty()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=terminal,
                               stdin=subprocess.DEVNULL, env=environment)
    os.close(terminal)
    stderr = b""
    while True:
        ready, _, _ = select.select([controller], [], [], 120)
        assert ready, "the command line hung"
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closed: the process is done with it
            break
        if not chunk:
            break
        stderr += chunk
    os.close(controller)
    stdout, _ = process.communicate(timeout=60)
    return stdout.decode(), stderr.decode(), process.returncode


def assert_bar(stderr: str, file: Path, total: int) -> None:
    steps = re.findall(rf"\r{re.escape(str(file))} \[[#.]+\] (\d+)/{total} segments, "
                       rf"([\d.]+) s of audio", stderr)
    assert [int(done) for done, _ in steps] == list(range(total + 1)), stderr
    seconds = [float(s) for _, s in steps]
    assert seconds == sorted(seconds) and seconds[-1] > 13  # the end of the last segment
    assert stderr.endswith("\r\x1b[K")  # the line is cleared before the next output


@pytest.mark.slow
def test_the_library_command_line_shows_a_bar_on_a_terminal_only(four_clips: Path):
    arguments = ("sensevoice_core", "transcribe", "--model", DEMO_MODEL, "--itn",
                 four_clips, EXAMPLES / CLIPS[0])
    settings = {"max_segment_s": str(MAX_SEGMENT_S), "threads": "1"}
    shown = run_on_a_terminal(*arguments, **settings)
    quiet = run_on_a_terminal(*arguments, quiet=True, **settings)
    piped = run_on_a_terminal(*arguments, tty=False, **settings)
    expected = f"{four_clips}\t{' '.join(TEXTS)}\n{EXAMPLES / CLIPS[0]}\t{TEXTS[0]}\n"
    assert shown[0] == quiet[0] == piped[0] == expected
    assert shown[2] == quiet[2] == piped[2] == 0
    assert_bar(shown[1], four_clips, 4)
    assert str(EXAMPLES / CLIPS[0]) not in shown[1]  # one segment: no bar
    assert quiet[1] == "" and piped[1] == ""


@pytest.mark.slow
def test_the_service_command_line_shows_the_same_bar(service: Service, four_clips: Path):
    stdout, stderr, code = run_on_a_terminal("supervisor", "transcribe", "--itn", "--json",
                                             four_clips, supervisor_address=service.address)
    assert code == 0 and '"text": "Hello world. 8975。 325. 晚安。"' in stdout
    assert_bar(stderr, four_clips, 4)


# ---------------------------------------------------------------- failures mid-way


@pytest.mark.slow
def test_a_worker_killed_mid_request_is_retried_without_repeating_steps(
        service: Service, long_file: Path):
    worker = service.serving_pid()
    steps: list[Progress] = []

    def kill_at_one(step: Progress) -> None:
        steps.append(step)
        if step.done == 1:
            os.kill(worker, signal.SIGKILL)

    reply = service.client.transcribe(long_file, use_itn=True, on_progress=kill_at_one)
    assert reply.worker_pid != worker  # the retry's
    assert [s.done for s in steps] == list(range(4 * REPEATS + 1))  # none twice
    assert tuple(s.segment for s in steps[1:]) == reply.segments
    service.wait_ready(standby=False)


@pytest.mark.slow
def test_a_failure_mid_stream_is_an_error_event_the_sdk_raises(
        service: Service, sdk: openai.OpenAI, long_file: Path):
    """The last test of the module: the service is killed."""
    worker = service.serving_pid()
    received = []
    with pytest.raises(openai.APIError) as failed, long_file.open("rb") as audio:
        for event in sdk.audio.transcriptions.create(model="whisper-1", file=audio, stream=True):
            received.append(event)
            if len(received) == 1:
                os.kill(worker, signal.SIGSTOP)  # no reply can come now
                service.process.kill()
    assert len(received) == 1 and received[0].type == "transcript.text.delta"
    assert not isinstance(failed.value, openai.APIStatusError)  # an event, not a status
    assert "unavailable" in failed.value.message and failed.value.body["code"] == "unavailable"
    os.kill(worker, signal.SIGKILL)
    service.process.wait(10)
