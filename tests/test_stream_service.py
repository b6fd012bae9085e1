"""Live streams through the real service: supervisor routing, worker sessions, the stream client.

Audio is three demo utterances with 1.5 s of silence around each. A test sends an utterance up
to a point where its turn is open and long enough for a partial (found by running the engine
here on the same audio), waits for that partial, then sends the rest and waits for the final:
barriers, so nothing depends on how fast the service runs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zmq

from model_factory import copy_demo_model, nudge_weights
from sensevoice_core.audio import load_audio
from sensevoice_core.client import ServiceError
from sensevoice_core.live_audio import decode_pcm
from sensevoice_core import stream_client
from sensevoice_core.protocol import (
    ErrorReply,
    ModelInfo,
    StreamAudio,
    StreamControl,
    StreamMoved,
    StreamOpen,
    StreamOpened,
    decode_client,
    decode_for_worker,
    decode_reply,
    encode,
)
from sensevoice_core.settings import Settings
from sensevoice_core.stream_client import LiveStream
from sensevoice_core.streaming import LiveTranscriber
from sensevoice_core.stream_types import (
    Final,
    Partial,
    StreamClosed,
    StreamEvent,
    StreamFailed,
    StreamOptions,
)
from service import Service, start_service, stopped
from supervisor.supervisor import Supervisor
from supervisor.workers import WorkerHandle

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "ui" / "examples"
CLIPS = ("en_02", "en_03", "zh_04")
SILENCE_S = 1.5
CHUNK = 3200  # bytes: 100 ms of 16 kHz pcm_s16le


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


SILENCE = pcm16(np.zeros(int(SILENCE_S * 16000), np.float32))


@dataclass(frozen=True)
class Utterance:
    audio: bytes  # pcm_s16le at 16 kHz
    open_at: int  # bytes after which its turn is open and has had a partial
    text: str  # what the batch path hears in it


@pytest.fixture(scope="module")
def utterances(demo_model) -> list[Utterance]:
    result = []
    for name in CLIPS:
        clip = load_audio(EXAMPLES / f"{name}.flac").numpy()
        audio = pcm16(clip)
        live = LiveTranscriber(demo_model, Settings().stream_config(StreamOptions()))
        live.feed(decode_pcm(SILENCE, "pcm_s16le"))
        open_at = next(end for end in range(CHUNK, len(audio), CHUNK) if any(
            isinstance(e, Partial) for e in live.feed(decode_pcm(audio[end - CHUNK:end],
                                                                 "pcm_s16le"))))
        result.append(Utterance(audio, open_at, demo_model.transcribe(clip).text))
    return result


@pytest.fixture(scope="module")
def expected(utterances) -> list[str]:
    return [u.text for u in utterances]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The demo model, and a copy with nudged weights: another fingerprint, same words."""
    root = tmp_path_factory.mktemp("models")
    first = copy_demo_model(root / "demo")
    second = copy_demo_model(root / "nudged")
    nudge_weights(second)
    return first, second


@pytest.fixture(scope="module")
def service(model_dirs, tmp_path_factory: pytest.TempPathFactory):
    # A short drain: a turn still open 2 s after its worker was told to stop is committed there.
    running = start_service(tmp_path_factory.mktemp("service"), model_dirs[0], drain_timeout="4")
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def limited(model_dirs, tmp_path_factory: pytest.TempPathFactory):
    running = start_service(tmp_path_factory.mktemp("limited"), model_dirs[0],
                            max_streams="2", stream_idle_timeout_s="3", max_stream_s="10",
                            swap_strategy="stop_first")
    yield running
    assert running.stop() == 0


class Recorder:
    """Reads a stream's events in the background; tests wait on what they need."""

    def __init__(self, stream: LiveStream):
        self.stream = stream
        self.events: list[StreamEvent] = []
        self.times: list[float] = []
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self.read())

    async def read(self) -> None:
        try:
            async for event in self.stream.events():
                self.events.append(event)
                self.times.append(time.monotonic())
                self.changed.set()
        finally:
            self.changed.set()

    @property
    def ended(self) -> bool:
        return self.task.done()

    async def until(self, condition: Callable[[list[StreamEvent]], bool],
                    timeout: float = 30.0) -> list[StreamEvent]:
        deadline = time.monotonic() + timeout
        while not condition(self.events):
            assert not self.ended, f"stream ended first: {self.events[-3:]}"
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; events so far: {[e.type for e in self.events]}"
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except asyncio.TimeoutError:
                pass
        return self.events

    async def end(self, timeout: float = 30.0) -> StreamEvent:
        await asyncio.wait_for(self.task, timeout)
        return self.events[-1]


def of_item(kind: type, item: int) -> Callable[[list[StreamEvent]], bool]:
    return lambda events: any(isinstance(e, kind) and e.item == item for e in events)


def failed(events: list[StreamEvent]) -> bool:
    return any(isinstance(e, StreamFailed) for e in events)


async def send(stream: LiveStream, data: bytes) -> None:
    for first in range(0, len(data), CHUNK):
        await stream.send_audio(data[first:first + CHUNK])


async def begin(stream: LiveStream, recorder: Recorder, utterance: Utterance,
                item: int) -> None:
    """An utterance up to where its turn is open and has had a partial."""
    await send(stream, utterance.audio[:utterance.open_at])
    await recorder.until(of_item(Partial, item))


async def finish(stream: LiveStream, recorder: Recorder, utterance: Utterance,
                 item: int) -> None:
    """The rest of an utterance, then silence: its final."""
    await send(stream, utterance.audio[utterance.open_at:] + SILENCE)
    await recorder.until(of_item(Final, item))


async def say(stream: LiveStream, recorder: Recorder, utterance: Utterance, item: int) -> None:
    await begin(stream, recorder, utterance, item)
    await finish(stream, recorder, utterance, item)


async def open_stream(service: Service, **options) -> LiveStream:
    return await LiveStream.open(StreamOptions(**options),
                                 Settings(supervisor_address=service.address))


def turns(events: list[StreamEvent]) -> dict[int, list[StreamEvent]]:
    by_item: dict[int, list[StreamEvent]] = {}
    for event in events:
        if hasattr(event, "item"):
            by_item.setdefault(event.item, []).append(event)
    return by_item


def finals(events: list[StreamEvent]) -> list[Final]:
    return [e for e in events if isinstance(e, Final)]


def test_three_utterances_give_each_turn_its_events_in_order(service, utterances, expected):
    async def run() -> list[StreamEvent]:
        stream = await open_stream(service)
        assert stream.fingerprint == service.status().model.fingerprint
        recorder = Recorder(stream)
        await send(stream, SILENCE)
        for item, clip in enumerate(utterances, 1):
            await say(stream, recorder, clip, item)
        await stream.close()
        assert isinstance(await recorder.end(), StreamClosed)
        return recorder.events

    events = asyncio.run(run())
    by_item = turns(events)
    assert sorted(by_item) == [1, 2, 3]
    fingerprint = service.status().model.fingerprint
    for item, text in zip((1, 2, 3), expected):
        kinds = [e.type for e in by_item[item]]
        assert kinds[0] == "speech_started" and "partial" in kinds, kinds
        assert kinds.index("committed") > max(i for i, k in enumerate(kinds) if k == "partial")
        assert kinds[-1] == "final", kinds
        final = by_item[item][-1]
        assert final.segment.text == text and final.fingerprint == fingerprint
    assert [e.item for e in events if isinstance(e, Final)] == [1, 2, 3]
    assert not failed(events)
    status = service.wait_until(lambda s: s.streams == 0, 10, "the stream freed")
    assert status.stream_counts["closed"] >= 1


def test_a_reload_under_an_open_turn_finishes_it_on_the_old_model(service, model_dirs,
                                                                  utterances, expected):
    """The turn open while the model is swapped ends on the old model; the next one runs on
    the new one; the client sees no failure."""
    async def run() -> tuple[list[StreamEvent], str, str]:
        old = fingerprint_of(service)
        stream = await open_stream(service)
        recorder = Recorder(stream)
        await send(stream, SILENCE)
        await say(stream, recorder, utterances[0], 1)
        await begin(stream, recorder, utterances[1], 2)  # turn 2 is open while it reloads
        outcome = await asyncio.to_thread(service.client.hot_reload_model,
                                          other_model(service, model_dirs))
        assert outcome.ok and outcome.new_fingerprint != old, outcome
        status = service.status()
        draining = [w for w in status.workers if w.role == "draining"]
        assert [w.streams for w in draining] == [1], status.workers  # still in turn 2
        await finish(stream, recorder, utterances[1], 2)
        await say(stream, recorder, utterances[2], 3)
        await stream.close()
        assert isinstance(await recorder.end(), StreamClosed)
        return recorder.events, old, outcome.new_fingerprint

    moved_before = service.status().stream_counts.get("moved", 0)
    events, old, new = asyncio.run(run())
    assert not failed(events)
    assert [(f.item, f.fingerprint) for f in finals(events)] == [(1, old), (2, old), (3, new)]
    assert [f.segment.text for f in finals(events)] == expected
    assert service.status().stream_counts["moved"] == moved_before + 1


def fingerprint_of(service: Service) -> str:
    return service.status().model.fingerprint


def other_model(service: Service, model_dirs: tuple[Path, Path]) -> Path:
    """The model directory not being served."""
    serving = Path(service.status().model.model_dir)
    return model_dirs[1] if serving == model_dirs[0].resolve() else model_dirs[0]


def test_a_turn_open_at_the_drain_deadline_is_committed_on_the_old_model(service, model_dirs,
                                                                         utterances, expected):
    """The client holds turn 2 open (no audio) past the drain deadline: the old worker
    commits it, then the stream moves and turn 3 runs on the new model."""
    async def run() -> tuple[list[StreamEvent], str, str]:
        old = fingerprint_of(service)
        stream = await open_stream(service)
        recorder = Recorder(stream)
        await send(stream, SILENCE)
        await begin(stream, recorder, utterances[1], 1)
        outcome = await asyncio.to_thread(service.client.hot_reload_model,
                                          other_model(service, model_dirs))
        assert outcome.ok and outcome.new_fingerprint != old, outcome
        # Nothing sent: the turn stays open until the old worker commits it (2 s after Stop).
        await recorder.until(of_item(Final, 1), timeout=15)
        await service_moved(service)
        await say(stream, recorder, utterances[2], 2)
        await stream.close()
        assert isinstance(await recorder.end(), StreamClosed)
        return recorder.events, old, outcome.new_fingerprint

    events, old, new = asyncio.run(run())
    assert not failed(events)
    kinds = [e.type for e in turns(events)[1]]
    assert kinds[-2:] == ["committed", "final"], kinds
    assert [(f.item, f.fingerprint) for f in finals(events)] == [(1, old), (2, new)]
    # Turn 1 was cut where the client stopped sending: its final is its last partial's audio.
    last_partial = [e for e in turns(events)[1] if isinstance(e, Partial)][-1]
    assert finals(events)[0].segment.text == last_partial.segment.text != ""
    assert finals(events)[1].segment.text == expected[2]


async def service_moved(service: Service) -> None:
    """Wait until no draining worker holds a stream."""
    await asyncio.to_thread(service.wait_until, lambda s: not any(
        w.streams for w in s.workers if w.role == "draining"), 15, "the stream moved")


class RawClient:
    """A bare DEALER connection: sends any stream message, reads any reply."""

    def __init__(self, address: str):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)

    def send(self, message, payload: bytes | None = None) -> None:
        self.socket.send_multipart(encode(message, payload))

    def receive(self, timeout: float = 10.0):
        assert self.socket.poll(timeout * 1000), "no reply"
        return decode_reply(self.socket.recv_multipart())

    def close(self) -> None:
        self.socket.close()
        self.context.term()


def test_only_the_opening_connection_may_send_and_only_in_order(service, utterances, expected):
    owner, intruder = RawClient(service.address), RawClient(service.address)
    try:
        owner.send(StreamOpen(request_id="open-1"))
        opened = owner.receive()
        assert isinstance(opened, StreamOpened) and opened.request_id == "open-1"
        stream_id = opened.stream_id
        intruder.send(StreamAudio(stream_id=stream_id, seq=0), b"\0\0")
        refused = intruder.receive()
        assert isinstance(refused, ErrorReply) and refused.request_id == stream_id
        assert "only the connection that opened a stream may send" in refused.message
        intruder.send(StreamControl(stream_id=stream_id, action="commit", seq=0))
        assert isinstance(intruder.receive(), ErrorReply)
        intruder.send(StreamAudio(stream_id="no-such-stream", seq=0), b"\0\0")
        assert "no open stream no-such-stream" in intruder.receive().message
        owner.send(StreamAudio(stream_id=stream_id, seq=3), b"\0\0")
        wrong = owner.receive()
        assert isinstance(wrong, ErrorReply) and "seq 3 arrived where 0 was expected" in \
            wrong.message
        owner.send(StreamControl(stream_id=stream_id, action="commit", seq=2))
        assert "the next audio seq is 0" in owner.receive().message
        owner.send(StreamControl(stream_id=stream_id, action="update", seq=0,
                                 options=StreamOptions(language="xx")))
        assert "unknown language 'xx'" in owner.receive().message
        # The stream is unharmed: the owner's audio in order is transcribed.
        audio = SILENCE + utterances[0].audio + SILENCE
        chunks = [audio[i:i + CHUNK] for i in range(0, len(audio), CHUNK)]
        for seq, chunk in enumerate(chunks):
            owner.send(StreamAudio(stream_id=stream_id, seq=seq), chunk)
        owner.send(StreamControl(stream_id=stream_id, action="close", seq=len(chunks)))
        owner.send(StreamAudio(stream_id=stream_id, seq=len(chunks)), b"\0\0")
        events = []
        while not any(isinstance(e, (StreamClosed, StreamFailed)) for e in events):
            reply = owner.receive()
            if isinstance(reply, ErrorReply):
                assert "is closing" in reply.message
                continue
            events += reply.events
        assert isinstance(events[-1], StreamClosed)
        assert [f.segment.text for f in finals(events)] == expected[:1]
    finally:
        owner.close()
        intruder.close()


def test_bad_audio_fails_only_its_own_stream(service, utterances, expected):
    async def run():
        bad = await open_stream(service)
        nan = await open_stream(service, encoding="pcm_f32le")
        good = await open_stream(service)
        recorders = [Recorder(s) for s in (bad, nan, good)]
        await send(good, SILENCE)
        await bad.send_audio(b"\x01\x02\x03")  # 1.5 samples of pcm_s16le
        await nan.send_audio(np.array([0.0, np.nan], "<f4").tobytes())
        ends = [await recorders[0].end(), await recorders[1].end()]
        with pytest.raises(ServiceError) as after:
            await bad.send_audio(b"\0\0")
        await say(good, recorders[2], utterances[0], 1)
        await good.close()
        return ends, after.value, await recorders[2].end(), recorders[2].events

    ends, after, good_end, good_events = asyncio.run(run())
    assert [e.code for e in ends] == ["bad_audio", "bad_audio"]
    assert "3 bytes" in ends[0].message and "NaN" in ends[1].message
    assert after.code == "bad_audio"
    assert isinstance(good_end, StreamClosed)
    assert [f.segment.text for f in finals(good_events)] == expected[:1]


def test_the_client_refuses_what_the_service_would_and_abort_frees_the_slot(service):
    async def run():
        stream = await LiveStream.open(StreamOptions(), Settings(
            supervisor_address=service.address, max_request_mb=0.01))
        with pytest.raises(ServiceError, match="SENSEVOICE_MAX_REQUEST_MB") as large:
            await stream.send_audio(bytes(20000))
        assert large.value.code == "too_large"
        await send(stream, SILENCE)
        for options, words in ((StreamOptions(language="xx"), "unknown language 'xx'"),
                               (StreamOptions(sample_rate=24000), "only before the stream's")):
            with pytest.raises(ServiceError, match=words):
                await stream.update(options)
        assert stream.options == StreamOptions()
        await stream.update(StreamOptions(language="en", partial_ms=0))
        assert (await asyncio.to_thread(service.status)).streams == 1
        await stream.abort()
        with pytest.raises(ServiceError):
            await stream.send_audio(b"\0\0")

    aborted = service.status().stream_counts.get("aborted", 0)
    asyncio.run(run())
    status = service.wait_until(lambda s: s.streams == 0, 5, "the aborted stream freed")
    assert status.stream_counts["aborted"] == aborted + 1
    assert all(w.streams == 0 for w in status.workers)


def test_many_streams_at_once_each_get_their_own_words(service, utterances):
    async def run() -> list[list[StreamEvent]]:
        streams = await asyncio.gather(*(open_stream(service) for _ in range(6)))
        assert len({s.stream_id for s in streams}) == 6
        status = await asyncio.to_thread(service.status)
        assert status.streams == 6 and sum(w.streams for w in status.workers) == 6

        async def talk(stream: LiveStream, utterance: Utterance) -> list[StreamEvent]:
            recorder = Recorder(stream)
            await send(stream, SILENCE)
            await say(stream, recorder, utterance, 1)
            await stream.close()
            await recorder.end()
            return recorder.events

        return await asyncio.gather(*(talk(stream, utterances[i % 3])
                                      for i, stream in enumerate(streams)))

    results = asyncio.run(run())
    for i, events in enumerate(results):
        assert isinstance(events[-1], StreamClosed), events[-1]
        assert [f.segment.text for f in finals(events)] == [utterances[i % 3].text]


def test_a_stream_that_fell_behind_catches_up_in_one_step(service, utterances):
    """Chunks that queued up while the worker could not run go to the engine together: a
    partial at most per catch-up (none when the whole turn is in it), not one per 100 ms of
    audio. (That partials do come at the pace is the three-utterance test.)"""
    async def run() -> tuple[list[StreamEvent], int]:
        stream = await open_stream(service, partial_ms=100)
        recorder = Recorder(stream)
        utterance = utterances[2]
        audio = SILENCE + utterance.audio + SILENCE
        with stopped(service.serving_pid()):  # briefly: well within its heartbeats
            await send(stream, audio)
        await recorder.until(of_item(Final, 1))
        await stream.close()
        await recorder.end()
        return recorder.events, len(utterance.audio) // CHUNK

    events, chunks = asyncio.run(run())
    partials = [e for e in events if isinstance(e, Partial)]
    assert len(partials) <= 2 and chunks >= 20, (len(partials), chunks)
    assert [f.segment.text for f in finals(events)] == [utterances[2].text]


def test_audio_far_ahead_of_the_worker_fails_that_stream_alone(service, utterances):
    """More unprocessed audio than twice SENSEVOICE_MAX_SEGMENT_S waits in the worker."""
    async def run() -> tuple[StreamEvent, list[StreamEvent]]:
        flood, calm = await open_stream(service), await open_stream(service)
        recorders = Recorder(flood), Recorder(calm)
        limit_s = 2 * Settings().max_segment_s
        await flood.send_audio(bytes(int((limit_s + 1) * 32000)))
        last = await recorders[0].end()
        await send(calm, SILENCE)
        await say(calm, recorders[1], utterances[0], 1)
        await calm.close()
        await recorders[1].end()
        return last, recorders[1].events

    last, calm = asyncio.run(run())
    assert isinstance(last, StreamFailed) and last.code == "busy"
    assert "faster than the worker can transcribe" in last.message
    assert isinstance(calm[-1], StreamClosed)
    assert [f.segment.text for f in finals(calm)] == [utterances[0].text]


def test_a_worker_stopped_by_sigterm_hands_its_stream_to_its_replacement(service,
                                                                         utterances):
    async def run() -> tuple[list[StreamEvent], int, int]:
        stream = await open_stream(service)
        recorder = Recorder(stream)
        await send(stream, SILENCE)
        await say(stream, recorder, utterances[0], 1)
        pid = service.serving_pid()
        os.kill(pid, signal.SIGTERM)  # it moves the stream (between turns), then exits

        def resumed(status) -> bool:
            return any(w.streams == 1 and w.role == "serving" and w.pid != pid
                       for w in status.workers)
        status = await asyncio.to_thread(service.wait_until, resumed, 30, "the stream resumed")
        await say(stream, recorder, utterances[1], 2)
        await stream.close()
        await recorder.end()
        return recorder.events, pid, next(w.pid for w in status.workers if w.streams)

    events, old_pid, new_pid = asyncio.run(run())
    assert not failed(events) and isinstance(events[-1], StreamClosed)
    assert [f.segment.text for f in finals(events)] == [u.text for u in utterances[:2]]
    assert old_pid != new_pid
    service.wait_ready()


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_lost_worker_fails_its_streams_promptly(service, utterances, how):
    async def run() -> tuple[StreamEvent, float]:
        stream = await open_stream(service)
        recorder = Recorder(stream)
        await send(stream, SILENCE)
        await begin(stream, recorder, utterances[0], 1)
        pid = service.serving_pid()
        start = time.monotonic()
        if how == "kill":
            os.kill(pid, signal.SIGKILL)
            last = await recorder.end(timeout=10)
        else:
            with stopped(pid):  # missed pongs: killed as hung
                last = await recorder.end(timeout=15)
        return last, time.monotonic() - start

    last, seconds = asyncio.run(run())
    assert isinstance(last, StreamFailed) and last.code == "worker_lost", last
    assert "open a new stream" in last.message
    assert seconds < (2 if how == "kill" else 8), seconds
    service.wait_ready()


def test_an_update_sent_while_the_stream_moves_applies_after_the_move(service, model_dirs,
                                                                     utterances, expected):
    """The rate changes before any audio, after the old worker was told to stop (it is paused,
    so the update reaches it only after the Stop): the stream resumes with the options it had
    where it moved, and the update, replayed on the new worker, applies there."""
    async def run() -> list[StreamEvent]:
        stream = await open_stream(service, sample_rate=24000)
        recorder = Recorder(stream)
        pid = service.serving_pid()
        with stopped(pid):
            reload = asyncio.create_task(asyncio.to_thread(
                service.client.hot_reload_model, other_model(service, model_dirs)))
            await asyncio.to_thread(service.wait_until, lambda s: any(
                w.pid == pid and w.role == "draining" for w in s.workers), 15, "draining")
            await stream.update(StreamOptions(sample_rate=16000))
        assert (await reload).ok
        await send(stream, SILENCE)
        await say(stream, recorder, utterances[0], 1)
        await stream.close()
        await recorder.end()
        return recorder.events

    events = asyncio.run(run())
    assert not failed(events) and isinstance(events[-1], StreamClosed), events[-3:]
    assert [f.segment.text for f in finals(events)] == expected[:1]
    service.wait_ready()


def test_a_reader_that_gives_up_frees_the_stream_at_once(service):
    """events() cancelled (the task reading it went away) aborts the stream on the service,
    long before its idle timeout."""
    async def run() -> None:
        stream = await open_stream(service)
        recorder = Recorder(stream)
        await stream.send_audio(SILENCE[:CHUNK])
        await asyncio.sleep(0)  # the reader's first step: it now waits inside events()
        assert stream._reading
        recorder.task.cancel()
        await asyncio.gather(recorder.task, return_exceptions=True)

    aborted = service.status().stream_counts.get("aborted", 0)
    asyncio.run(run())
    status = service.wait_until(lambda s: s.streams == 0, 3, "the given-up stream freed")
    assert status.stream_counts["aborted"] == aborted + 1


def test_a_burst_while_the_supervisor_is_paused_waits_in_the_socket(service):
    """3000 chunks sent while the supervisor does not read: they wait to leave (more than
    ZeroMQ's default 1000 messages), nothing is reported gone, the stream goes on."""
    async def run() -> StreamEvent:
        stream = await open_stream(service)
        recorder = Recorder(stream)
        with stopped(service.process.pid):
            for _ in range(3000):
                await stream.send_audio(b"\0\0")
        await stream.close()
        return await recorder.end()

    last = asyncio.run(run())
    assert isinstance(last, StreamClosed), last


def test_beyond_max_streams_the_extra_one_is_refused_and_the_others_go_on(limited, utterances,
                                                                         expected):
    async def run():
        first, second = await open_stream(limited), await open_stream(limited)
        with pytest.raises(ServiceError) as refused:
            await open_stream(limited)
        recorders = [Recorder(first), Recorder(second)]

        async def talk(stream: LiveStream, recorder: Recorder) -> StreamEvent:
            await send(stream, SILENCE)
            await say(stream, recorder, utterances[0], 1)
            await stream.close()
            return await recorder.end()

        ends = await asyncio.gather(*(talk(s, r) for s, r in zip((first, second), recorders)))
        return refused.value, ends, recorders

    refused_before = limited.status().stream_counts.get("refused", 0)
    refused, ends, recorders = asyncio.run(run())
    assert refused.code == "busy" and "SENSEVOICE_MAX_STREAMS=2" in refused.message
    assert all(isinstance(end, StreamClosed) for end in ends)
    assert all([f.segment.text for f in finals(r.events)] == expected[:1] for r in recorders)
    status = limited.wait_until(lambda s: s.streams == 0, 5, "streams freed")
    assert status.stream_counts["refused"] == refused_before + 1


def test_an_idle_stream_times_out_and_a_vanished_client_frees_its_slot(limited):
    async def idle() -> tuple[StreamEvent, float]:
        stream = await open_stream(limited)
        start = time.monotonic()
        recorder = Recorder(stream)
        return await recorder.end(timeout=10), time.monotonic() - start

    timeouts = limited.status().stream_failures.get("timeout", 0)
    last, seconds = asyncio.run(idle())
    assert isinstance(last, StreamFailed) and last.code == "timeout"
    assert "nothing reached the service for this stream for 3 s" in last.message
    assert "SENSEVOICE_STREAM_IDLE_TIMEOUT_S" in last.message and 2.5 <= seconds < 5
    vanished = RawClient(limited.address)
    vanished.send(StreamOpen())
    assert isinstance(vanished.receive(), StreamOpened)
    vanished.close()  # gone without a word: its slot is freed when it has been idle
    assert limited.status().streams == 1
    status = limited.wait_until(lambda s: s.streams == 0, 6, "the vanished client's stream freed")
    assert status.stream_failures["timeout"] == timeouts + 2


def test_a_stream_open_past_max_stream_s_ends_after_its_open_turn(limited, utterances):
    async def run() -> list[StreamEvent]:
        stream = await open_stream(limited)
        recorder = Recorder(stream)
        await send(stream, SILENCE)
        await begin(stream, recorder, utterances[1], 1)
        while not recorder.ended:  # keep the turn open and the stream not idle
            await stream.send_audio(b"")
            await asyncio.sleep(0.5)
        return recorder.events

    events = asyncio.run(run())
    last_partial = [e for e in events if isinstance(e, Partial)][-1]
    assert [f.segment.text for f in finals(events)] == [last_partial.segment.text]
    assert isinstance(events[-1], StreamFailed) and events[-1].code == "too_long"
    assert "SENSEVOICE_MAX_STREAM_S" in events[-1].message
    assert [e.type for e in events[-3:-1]] == ["committed", "final"]


def test_a_stop_first_reload_holds_the_stream_until_the_new_model_serves(limited, model_dirs,
                                                                         utterances):
    """No worker serves between the old one's stop and the new one's start: the stream waits,
    its audio kept, and goes on on the new model."""
    async def run() -> tuple[list[StreamEvent], str, str]:
        old = fingerprint_of(limited)
        stream = await open_stream(limited)
        recorder = Recorder(stream)
        await send(stream, SILENCE)
        await say(stream, recorder, utterances[0], 1)
        reload = asyncio.create_task(asyncio.to_thread(
            limited.client.hot_reload_model, other_model(limited, model_dirs)))
        while not reload.done():  # silence meanwhile: kept while no worker holds the stream
            await stream.send_audio(SILENCE[:CHUNK])
            await asyncio.sleep(0.1)
        outcome = await reload
        assert outcome.ok, outcome
        await say(stream, recorder, utterances[2], 2)
        await stream.close()
        assert isinstance(await recorder.end(), StreamClosed)
        return recorder.events, old, outcome.new_fingerprint

    events, old, new = asyncio.run(run())
    assert not failed(events)
    assert [(f.item, f.fingerprint, f.segment.text) for f in finals(events)] == [
        (1, old, utterances[0].text), (2, new, utterances[2].text)]
    assert limited.status().stream_counts["moved"] == 1


def test_a_supervisor_that_stops_answering_ends_the_stream_not_a_hang(service):
    async def run() -> tuple[StreamEvent, float]:
        stream = await open_stream(service)
        recorder = Recorder(stream)
        await send(stream, SILENCE)
        with stopped(service.process.pid):
            start = time.monotonic()
            last = await recorder.end(timeout=10)
            seconds = time.monotonic() - start
        with pytest.raises(ServiceError) as after:
            await stream.send_audio(b"\0\0")
        assert after.value.code == "unavailable"
        return last, seconds

    before = service.status()
    last, seconds = asyncio.run(run())
    assert isinstance(last, StreamFailed) and last.code == "unavailable", last
    assert "went away" in last.message and seconds < 6, seconds
    # The client's abort waited in its socket and reached the supervisor once it went on
    # (this service's idle timeout is the default, far longer than the wait here).
    status = service.wait_until(lambda s: s.streams == 0, 10, "the abandoned stream freed")
    assert status.stream_counts["aborted"] == before.stream_counts.get("aborted", 0) + 1
    assert status.stream_failures == before.stream_failures


def test_stopping_the_service_transcribes_each_open_turn_then_ends_the_stream(limited,
                                                                                utterances):
    """Last in this module: it stops the service. Like a request in hand, the open turn is
    transcribed (closed on the client's behalf), then the stream ends "shutting_down"."""
    async def run() -> list[StreamEvent]:
        stream = await open_stream(limited)
        recorder = Recorder(stream)
        await send(stream, SILENCE)
        await begin(stream, recorder, utterances[1], 1)
        await asyncio.to_thread(limited.process.send_signal, signal.SIGTERM)
        await recorder.end(timeout=20)
        return recorder.events

    events = asyncio.run(run())
    last_partial = [e for e in events if isinstance(e, Partial)][-1]
    assert [f.segment.text for f in finals(events)] == [last_partial.segment.text]
    assert isinstance(events[-1], StreamFailed) and events[-1].code == "shutting_down"
    assert "open turn was transcribed" in events[-1].message
    assert limited.process.wait(30) == 0


def test_refusals_say_which_limit(tmp_path):
    """The router of a supervisor that serves nothing yet (no process: its sockets only)."""
    for limit, options, code, words in (
            (0, StreamOptions(), "unavailable", "live streams are off on this service "
                                                "(SENSEVOICE_MAX_STREAMS=0)"),
            (1, StreamOptions(language="xx"), "bad_request", "unknown language 'xx'"),
            (1, StreamOptions(), "unavailable", "no inference worker is serving")):
        supervisor = Supervisor(Settings(max_streams=limit,
                                         supervisor_address=f"ipc://{tmp_path}/s.ipc"))
        try:
            refusal = supervisor.streams.refusal(StreamOpen(options=options))
        finally:
            supervisor.close_sockets(frontend_linger=0)
        assert refusal is not None and refusal[0] == code and words in refusal[1], refusal


def test_a_new_stream_goes_to_the_serving_worker_holding_the_fewest(tmp_path):
    """The router of a supervisor with three idle serving workers (sleeping processes that
    stand in for them: nothing is sent to them here but ZeroMQ frames nobody reads)."""
    model = ModelInfo(model_dir="/m", layout="hf", fingerprint="f" * 64, short_ids={},
                      file_sha256={}, file_paths={}, cache_level="fresh", load_s=0.1,
                      steps_s={}, warmup_s=0.1)
    supervisor = Supervisor(Settings(max_streams=7,
                                     supervisor_address=f"ipc://{tmp_path}/s.ipc"))
    workers = []
    try:
        for age, role in enumerate(("serving", "draining", "serving", "serving")):
            process = subprocess.Popen(["sleep", "30"])
            worker = WorkerHandle(f"w{age}", process, age, role=role, model=model)
            supervisor.pool.workers[worker.worker_id] = worker
            workers.append(worker)
        router = supervisor.streams
        for n in range(8):
            router.from_client(b"client", StreamOpen(request_id=f"r{n}"), b"")
        held = [len(router.held_by(w)) for w in workers]
    finally:
        for worker in workers:
            worker.kill("test over")
            worker.process.wait()
        supervisor.close_sockets(frontend_linger=0)
    assert held == [3, 0, 2, 2]  # 7 (the limit) over the serving ones, oldest first on ties
    assert router.counts == {"opened": 7, "refused": 1}


def test_a_supervisor_that_does_not_keep_up_makes_a_send_fail_busy(tmp_path, monkeypatch):
    """A supervisor that answers heartbeats (its I/O thread) but reads nothing: the stream's
    socket fills, a send waits SEND_WAIT_S (shortened here), then fails "busy", not "gone"."""
    monkeypatch.setattr(stream_client, "SEND_WAIT_S", 0.5)
    address = f"ipc://{tmp_path}/slow.ipc"
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.RCVHWM, 10)
    router.bind(address)

    def answer_open() -> None:
        assert router.poll(10_000)
        client, *frames = router.recv_multipart()
        opened = StreamOpened(request_id=decode_client(frames)[0].request_id, stream_id="s1",
                              fingerprint="f" * 64)
        router.send_multipart([client, *encode(opened)])

    async def run() -> tuple[int, ServiceError, StreamEvent]:
        answering = asyncio.create_task(asyncio.to_thread(answer_open))
        stream = await LiveStream.open(settings=Settings(supervisor_address=address),
                                       address=address)
        await answering
        sent = 0
        with pytest.raises(ServiceError) as busy:
            while True:
                await stream.send_audio(SILENCE[:CHUNK])
                sent += 1
        last = [e async for e in stream.events()][-1]
        return sent, busy.value, last

    try:
        sent, busy, last = asyncio.run(run())
    finally:
        router.close()
        context.term()
    assert sent > 1000  # ZeroMQ's default high-water mark; STREAM_SNDHWM is far above
    assert busy.code == "busy" and "not keeping up" in busy.message, busy
    assert isinstance(last, StreamFailed) and last.code == "busy"


def test_a_worker_that_moved_its_stream_and_exited_is_read_before_it_is_reaped(tmp_path):
    """The StreamMoved waits in the backend socket when the worker's exit is seen: it is read
    first, so the stream moves to the serving worker instead of failing "worker_lost"."""
    model = ModelInfo(model_dir="/m", layout="hf", fingerprint="f" * 64, short_ids={},
                      file_sha256={}, file_paths={}, cache_level="fresh", load_s=0.1,
                      steps_s={}, warmup_s=0.1)
    supervisor = Supervisor(Settings(supervisor_address=f"ipc://{tmp_path}/s.ipc"))
    backend = f"{tmp_path}/workers.ipc"
    supervisor.backend.bind(f"ipc://{backend}")
    context = zmq.Context()
    old = context.socket(zmq.DEALER)
    old.setsockopt(zmq.IDENTITY, b"old")
    old.setsockopt(zmq.LINGER, 1000)
    old.connect(f"ipc://{backend}")
    old.send(b"connected")  # read here: the connection is up before the stream opens
    assert supervisor.backend.poll(10_000)
    supervisor.backend.recv_multipart()
    exited = subprocess.Popen(["true"])
    serving = subprocess.Popen(["sleep", "30"])
    try:
        router = supervisor.streams
        draining = WorkerHandle("old", exited, 0, role="serving", model=model)
        supervisor.pool.workers["old"] = draining
        router.from_client(b"client", StreamOpen(request_id="r"), b"")
        (stream,) = router.streams.values()
        assert old.poll(10_000)
        assert isinstance(decode_for_worker(old.recv_multipart())[0], StreamOpen)
        draining.role = "draining"
        router.worker_draining(draining)
        supervisor.pool.workers["new"] = WorkerHandle("new", serving, 1, role="serving",
                                                      model=model)
        old.send_multipart(encode(StreamMoved(stream_id=stream.stream_id, seq=0, messages=0,
                                              options=StreamOptions()), b"state"))
        exited.wait()
        supervisor.reap_workers()
    finally:
        serving.kill()
        serving.wait()
        old.close()
        context.term()
        supervisor.close_sockets(frontend_linger=0)
    assert "old" not in supervisor.pool.workers
    assert router.streams[stream.stream_id].worker_id == "new"
    assert router.counts == {"opened": 1, "moved": 1} and not router.failures
