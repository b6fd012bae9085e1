"""The live engine: turns as the batch VAD finds them, finals as the batch path decodes them,
whatever the chunking; its audio decoding, resampling, snapshots and bad input."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sensevoice_core.audio import load_audio, resample_to_16k
from sensevoice_core.live_audio import StreamResampler, decode_pcm
from sensevoice_core.segmentation import VadOptions, speech_regions
from sensevoice_core.settings import Settings
from sensevoice_core.stream_types import Final, StreamConfig, StreamEvent, StreamOptions
from sensevoice_core.streaming import LiveTranscriber
from sensevoice_core.vad import speech_probabilities

EXAMPLES = Path(__file__).resolve().parent.parent / "ui" / "examples"
RATE = 16000


def config(partial_ms: int = 0, vad: VadOptions | None = None,
           **options: object) -> StreamConfig:
    built = Settings().stream_config(StreamOptions(partial_ms=partial_ms, **options))
    if vad is None:
        return built
    return dataclasses.replace(built, transcribe=dataclasses.replace(built.transcribe, vad=vad))


def play(live: LiveTranscriber, audio: np.ndarray, chunk: int) -> list[StreamEvent]:
    events: list[StreamEvent] = []
    for first in range(0, len(audio), chunk):
        events += live.feed(audio[first:first + chunk])
    return events + live.finish()


def finals(events: list[StreamEvent]) -> list[tuple[int, float, float, str]]:
    return [(e.item, e.segment.start, e.segment.end, e.segment.text)
            for e in events if isinstance(e, Final)]


def kinds(events: list[StreamEvent]) -> list[str]:
    return [e.type for e in events]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here: the engine feeds the VAD window by window, where a second
    thread only adds hand-offs (tens of ms each on a loaded machine); results do not change."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stream() -> np.ndarray:
    """Three demo utterances with 1.5 s of silence around them (16 kHz)."""
    gap = np.zeros(24000, np.float32)
    clips = [load_audio(EXAMPLES / f"{name}.flac").numpy() for name in ("en_02", "zh_04", "en_03")]
    return np.concatenate([gap[:8000]] + [part for clip in clips for part in (clip, gap)])


@pytest.fixture(scope="module")
def talk() -> np.ndarray:
    """Eight demo utterances back to back: 15 s of speech with short pauses."""
    clips = [load_audio(EXAMPLES / f"{name}.flac").numpy()
             for name in ("en_02", "zh_04", "en_03", "zh_08")]
    return np.concatenate(clips + clips)


@pytest.fixture(scope="module")
def reference(demo_model, stream) -> list[StreamEvent]:
    return play(LiveTranscriber(demo_model, config()), stream, RATE)


# -- audio bytes ---------------------------------------------------------------------------

def test_decode_pcm_16_bit_and_float():
    data = np.array([0, 16384, -32768, 32767], "<i2").tobytes()
    np.testing.assert_array_equal(decode_pcm(data, "pcm_s16le"),
                                  np.array([0, 0.5, -1, 32767 / 32768], np.float32))
    floats = np.array([0.25, -1.0], "<f4")
    np.testing.assert_array_equal(decode_pcm(floats.tobytes(), "pcm_f32le"), floats)
    assert decode_pcm(b"", "pcm_s16le").shape == (0,)


def test_g711_known_codes():
    """ITU-T G.711 (the reference g711.c): mu-law 0xFF and 0x7F are 0, 0x80 / 0x00 the
    largest; A-law 0xD5 / 0x55 are +-8, 0xAA / 0x2A the largest."""
    ulaw = decode_pcm(bytes([0xFF, 0x7F, 0x80, 0x00, 0xFE, 0xEF]), "pcmu") * 32768
    np.testing.assert_array_equal(ulaw, [0, 0, 32124, -32124, 8, 132])
    alaw = decode_pcm(bytes([0xD5, 0x55, 0xAA, 0x2A, 0xD4]), "pcma") * 32768
    np.testing.assert_array_equal(alaw, [8, -8, 32256, -32256, 24])


@pytest.mark.parametrize("encoding, data, problem", [
    ("pcm_s16le", b"\x00\x01\x02", "pcm_s16le audio of 3 bytes: expected a multiple of 2"),
    ("pcm_f32le", b"\x00" * 6, "pcm_f32le audio of 6 bytes: expected a multiple of 4"),
    ("pcm_f32le", np.array([np.nan], "<f4").tobytes(), "NaN or infinite"),
])
def test_decode_pcm_refuses_bad_bytes(encoding, data, problem):
    with pytest.raises(ValueError, match=problem):
        decode_pcm(data, encoding)


@pytest.mark.parametrize("rate", [8000, 16001, 24000, 44100, 48000, 22051])
def test_resampler_output_does_not_depend_on_chunking(rate):
    audio = np.random.default_rng(0).standard_normal(rate + 77).astype(np.float32) * 0.3
    outputs = []
    for chunk in (len(audio), 333, 97, rate // 50):
        resampler = StreamResampler(rate)
        parts = [resampler.feed(audio[i:i + chunk]) for i in range(0, len(audio), chunk)]
        outputs.append(np.concatenate(parts + [resampler.flush()]))
    for output in outputs[1:]:
        np.testing.assert_array_equal(output, outputs[0])
    # and it is what the batch path computes for the whole stream
    np.testing.assert_allclose(outputs[0], resample_to_16k(audio, rate, "t").numpy(), atol=2e-5)


# -- turns and finals ----------------------------------------------------------------------

def test_turns_are_the_batch_regions_and_finals_the_batch_text(demo_model, stream, reference):
    regions = speech_regions(speech_probabilities(demo_model.vad, [torch.from_numpy(stream)]),
                             config().transcribe.vad, len(stream) / RATE)
    got = finals(reference)
    assert [(start, end) for _, start, end, _ in got] == \
        [(region.start, region.end) for region in regions]
    assert len(got) == 3 and [item for item, *_ in got] == [1, 2, 3]
    for event in reference:
        if isinstance(event, Final):
            segment = event.segment
            piece = stream[round(segment.start * RATE):round(segment.end * RATE)]
            assert segment.text and segment.text == demo_model.transcribe(piece).text
            assert segment.words
            assert all(segment.start <= w.start <= w.end <= segment.end for w in segment.words)
    assert kinds(reference) == ["speech_started", "speech_stopped", "committed", "final"] * 3


@pytest.mark.parametrize("chunk", [160, 333])
def test_any_chunking_gives_the_same_events(demo_model, stream, reference, chunk):
    assert play(LiveTranscriber(demo_model, config()), stream, chunk) == reference


def test_a_24_khz_stream_gives_the_finals_of_its_16_khz_audio(demo_model, stream, reference):
    audio24 = torchaudio_resample(stream, RATE, 24000)
    events = play(LiveTranscriber(demo_model, config(sample_rate=24000)), audio24, 480)
    assert [text for *_, text in finals(events)] == [text for *_, text in finals(reference)]
    again = play(LiveTranscriber(demo_model, config(sample_rate=24000)), audio24, 24000)
    assert again == events


def test_long_speech_is_cut_where_the_batch_path_cuts_it(demo_model, talk):
    """Regions longer than max_segment_s: cut at the same quietest windows as the batch path,
    also those cut while the region is still going on (past twice max_segment_s)."""
    vad = VadOptions(max_segment_s=2.0, min_silence_s=1.0)
    regions = speech_regions(speech_probabilities(demo_model.vad, [torch.from_numpy(talk)]),
                             vad, len(talk) / RATE)
    assert len(regions) >= 6 and max(r.end - r.start for r in regions) <= 2.0
    events = play(LiveTranscriber(demo_model, config(vad=vad)), talk, 333)
    assert [(e.start_s, e.end_s) for e in events if e.type == "committed"] == \
        [(region.start, region.end) for region in regions]
    assert all(e.segment.start >= r.start and e.segment.end <= r.end
               for e, r in zip([e for e in events if e.type == "final"], regions))


def test_overlapping_padding_makes_turns_meet_at_the_earlier_end(demo_model, talk):
    """speech_pad_s longer than the pauses: where the batch path's neighbours meet halfway,
    a turn begins where the one before it ended (so that turn's Final need not wait)."""
    vad = VadOptions(min_silence_s=0.3, speech_pad_s=0.4)
    half = len(talk) // 2  # between the two rounds of clips: a pause longer than the padding
    talk = np.concatenate([talk[:half], np.zeros(RATE, np.float32), talk[half:]])
    regions = speech_regions(speech_probabilities(demo_model.vad, [torch.from_numpy(talk)]),
                             vad, len(talk) / RATE)
    met = [a.end == b.start for a, b in itertools.pairwise(regions)]
    assert any(met) and not all(met)
    events = play(LiveTranscriber(demo_model, config(vad=vad)), talk, 333)
    assert play(LiveTranscriber(demo_model, config(vad=vad)), talk, RATE) == events
    spans = [(e.start_s, e.end_s) for e in events if e.type == "committed"]
    assert len(spans) == len(regions)
    for i, ((start, end), region) in enumerate(zip(spans, regions)):
        assert start == (spans[i - 1][1] if i and met[i - 1] else region.start)
        if i + 1 < len(regions) and met[i]:
            assert end > region.end  # all of its padding, not the batch path's halfway point
        else:
            assert end == region.end
    items = [e.item for e in events if e.type in ("speech_started", "final")]
    assert items == sorted(items)  # each turn's final before the next turn starts


def test_a_manual_turn_is_cut_at_max_segment_s(demo_model, talk):
    live = LiveTranscriber(demo_model, config(turn_detection=False,
                                              vad=VadOptions(max_segment_s=2.0)))
    events = [e for first in range(0, len(talk), 800) for e in live.feed(talk[first:first + 800])]
    events += live.commit()
    spans = [(e.start_s, e.end_s) for e in events if e.type == "committed"]
    assert len(spans) >= 7 and all(0.9 <= end - start <= 2.0 for start, end in spans[:-1])
    # one after another, from the first sample to the last, cut on window edges
    assert spans[0][0] == 0.0 and spans[-1][1] == round(len(talk) / RATE, 3)
    assert all(a[1] == b[0] and round(a[1] * RATE) % 512 == 0 for a, b in itertools.pairwise(spans))
    assert kinds(events) == ["committed", "final"] * len(spans)


def test_switching_turn_detection_keeps_the_open_turn(demo_model, stream, reference):
    first = next(e for e in reference if e.type == "speech_started")
    live = LiveTranscriber(demo_model, config())
    assert kinds(live.feed(stream[:round((first.start_s + 0.6) * RATE)])) == ["speech_started"]
    live.reconfigure(config(turn_detection=False))
    live.feed(stream[round((first.start_s + 0.6) * RATE):3 * RATE])
    committed = live.commit()
    assert kinds(committed) == ["committed", "final"] and committed[0].item == 1
    assert committed[0].start_s == first.start_s and committed[0].end_s == 3.0
    live.reconfigure(config())
    rest = play(live, stream[3 * RATE:], RATE)
    assert [e.item for e in rest if e.type == "final"] == [2, 3]
    assert [e.segment.text for e in rest if e.type == "final"] == \
        [text for *_, text in finals(reference)[1:]]


def torchaudio_resample(audio: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    import torchaudio.functional

    return torchaudio.functional.resample(torch.from_numpy(audio), rate, new_rate).numpy()


def test_partials_while_a_turn_is_open(demo_model, stream):
    events = play(LiveTranscriber(demo_model, config(partial_ms=500)), stream, 1600)
    partials = [e for e in events if e.type == "partial"]
    assert partials and all(e.item in (1, 2, 3) for e in partials)
    # each partial lies between its turn's start and its final
    for partial in partials:
        started = next(i for i, e in enumerate(events)
                       if e.type == "speech_started" and e.item == partial.item)
        final = next(i for i, e in enumerate(events) if e.type == "final" and e.item == partial.item)
        assert started < events.index(partial) < final
    # partials come while the VAD hears speech, not in a pause (when a Final may be due)
    probabilities = speech_probabilities(demo_model.vad, [torch.from_numpy(stream)])
    threshold = config().transcribe.vad.threshold
    for partial in partials:
        last_window = round(partial.segment.end * RATE) // 512 - 1
        assert probabilities[last_window] >= np.float32(threshold)
    # a feed that brings 2 s of an open turn still gives one partial, at its end
    second = next(e for e in events if e.type == "speech_started" and e.item == 2)
    live = LiveTranscriber(demo_model, config(partial_ms=500))
    live.feed(stream[:round(second.start_s * RATE)])
    burst = live.feed(stream[round(second.start_s * RATE):round((second.start_s + 2) * RATE)])
    assert sum(e.type == "partial" for e in burst) == 1 and burst[-1].type == "partial"


def test_silence_and_noise_give_nothing(demo_model):
    live = LiveTranscriber(demo_model, config(partial_ms=500))
    noise = np.random.default_rng(1).standard_normal(5 * RATE).astype(np.float32) * 1e-3
    assert live.feed(np.zeros(3 * RATE, np.float32)) == []
    assert play(live, noise, 320) == []
    assert LiveTranscriber(demo_model, config()).feed(np.zeros(0, np.float32)) == []


def test_finish_closes_the_turn_the_audio_ends_in(demo_model, stream, reference):
    """Audio that stops mid-speech: the last turn ends with it, as the batch path's region."""
    second = next(e for e in reference if e.type == "speech_started" and e.item == 2)
    audio = stream[:round((second.start_s + 1.0) * RATE) + 100]
    regions = speech_regions(speech_probabilities(demo_model.vad, [torch.from_numpy(audio)]),
                             config().transcribe.vad, len(audio) / RATE)
    for turn_detection in (True, False):
        live = LiveTranscriber(demo_model, config(turn_detection=turn_detection))
        events = play(live, audio, 800)
        last = [e for e in events if e.type == "committed"][-1]
        assert last.end_s == regions[-1].end == round(len(audio) / RATE, 3)
        if turn_detection:
            assert last.start_s == regions[-1].start
        with pytest.raises(ValueError, match="finished"):
            live.feed(audio[:10])
        with pytest.raises(ValueError, match="finished"):
            live.finish()


# -- commits, clears, manual turns ---------------------------------------------------------

def test_manual_turns_commit_what_came_since_the_last(demo_model, stream):
    live = LiveTranscriber(demo_model, config(turn_detection=False))
    assert kinds(live.commit()) == ["commit_empty"]
    first = live.feed(stream[:2 * RATE])
    assert first == []  # no turn detection: no speech events
    events = live.commit()
    assert kinds(events) == ["committed", "final"]
    assert events[1].segment.text == demo_model.transcribe(stream[:2 * RATE]).text
    assert (events[0].start_s, events[0].end_s) == (0.0, 2.0)
    live.feed(stream[2 * RATE:3 * RATE])
    assert live.clear()[0].type == "cleared"
    assert kinds(live.commit()) == ["commit_empty"]  # the cleared audio is gone


def test_commit_closes_the_open_turn_now(demo_model, stream, reference):
    first = next(e for e in reference if e.type == "speech_started")
    live = LiveTranscriber(demo_model, config())
    events = live.feed(stream[:round((first.start_s + 0.6) * RATE)])
    assert kinds(events) == ["speech_started"]
    assert not live.between_turns
    committed = live.commit()
    assert kinds(committed) == ["committed", "final"] and committed[0].item == 1
    assert live.between_turns and kinds(live.commit()) == ["commit_empty"]


@pytest.mark.parametrize("turn_detection", [True, False])
def test_every_commit_gets_an_answer(demo_model, stream, reference, turn_detection):
    """A commit with nothing to commit answers CommitEmpty (a client waiting for committed
    must not hang); one with something answers the Committed of the turn it closed."""
    live = LiveTranscriber(demo_model, config(turn_detection=turn_detection))
    empty = live.commit()
    assert kinds(empty) == ["commit_empty"] and "buffer is empty" in empty[0].reason
    assert kinds(live.commit()) == ["commit_empty"]  # twice in a row
    first = next(e for e in reference if e.type == "speech_started")
    live.feed(stream[:round((first.start_s + 0.6) * RATE)])
    answers = live.commit()
    assert kinds(answers)[-2:] == ["committed", "final"] and answers[-1].segment.text
    again = live.commit()  # the double commit: the turn is already closed
    assert kinds(again) == ["commit_empty"]
    assert live.between_turns
    live.feed(stream[round((first.start_s + 0.6) * RATE):round((first.start_s + 0.7) * RATE)])
    live.finish()


def test_a_commit_sends_a_closed_turn_waiting_for_its_padding(demo_model, stream):
    """speech_pad_s longer than min_silence_s: a closed turn waits for its padding's audio.
    A commit then sends it (and is answered by it, no CommitEmpty): the worker's own commit
    before a move, made whenever the stream is not between turns, never sends an error."""
    options = {"min_silence_s": 0.1, "speech_pad_s": 0.5}
    stopped = next(e for e in play(LiveTranscriber(demo_model, config(**options)), stream, RATE)
                   if e.type == "speech_stopped")
    live = LiveTranscriber(demo_model, config(**options))
    assert kinds(live.feed(stream[:round((stopped.end_s - 0.2) * RATE)])) == ["speech_started"]
    assert not live.between_turns
    events = live.commit()
    assert kinds(events) == ["speech_stopped", "committed", "final"] and events[2].segment.text
    assert live.between_turns


def test_silence_commits_give_no_invented_text(demo_model):
    """1 s of digital zeros. A manual commit gives an empty Final (language "nospeech")
    without a decode, whatever the model would say (the previous demo model invented text for
    it; this one says <|nospeech|>); with turn detection no turn opened, so the commit is
    empty."""
    zeros = np.zeros(RATE, np.float32)
    manual = LiveTranscriber(demo_model, config(turn_detection=False, partial_ms=500))
    assert manual.feed(zeros) == []
    events = manual.commit()
    assert kinds(events) == ["committed", "final"]
    final = events[1]
    assert (final.segment.text, final.segment.language) == ("", "nospeech")
    assert (final.segment.start, final.segment.end) == (0.0, 1.0)
    assert (events[0].start_s, events[0].end_s) == (0.0, 1.0)
    assert kinds(manual.commit()) == ["commit_empty"]
    manual.feed(np.full(160, 0.5, np.float32))  # 10 ms: not one VAD window
    short = manual.commit()
    assert kinds(short) == ["committed", "final"] and short[1].segment.language == "nospeech"
    vad = LiveTranscriber(demo_model, config(partial_ms=500))
    assert vad.feed(zeros) == []
    empty = vad.commit()
    assert kinds(empty) == ["commit_empty"] and "no turn is open" in empty[0].reason
    assert vad.finish() == []


def test_an_empty_commit_is_openai_s_error(demo_model):
    from openai.types.realtime import RealtimeErrorEvent

    from ui.realtime_events import EventTranslator, commit_empty_event

    empty = LiveTranscriber(demo_model, config()).commit()[0]
    [event] = EventTranslator().translate(empty)
    error = RealtimeErrorEvent.model_validate(event).error
    assert (error.type, error.code) == ("invalid_request_error",
                                        "input_audio_buffer_commit_empty")
    assert error.message == ("Nothing to commit: the audio buffer is empty (no audio since "
                             "the last turn, commit or clear).")
    assert error.event_id is None
    assert commit_empty_event(empty, "evt_mine")["error"]["event_id"] == "evt_mine"


def test_a_feed_that_closes_a_turn_gives_no_partial_of_it(demo_model, stream, reference):
    """The Final supersedes a partial: one feed bringing a whole turn and the silence that
    closes it decodes the turn once, as its Final."""
    stopped = next(e for e in reference if e.type == "speech_stopped")
    live = LiveTranscriber(demo_model, config(partial_ms=500))
    events = live.feed(stream[:round((stopped.end_s + 0.5) * RATE)])
    assert kinds(events) == ["speech_started", "speech_stopped", "committed", "final"]


def test_clear_drops_the_open_turn(demo_model, stream, reference):
    first = next(e for e in reference if e.type == "speech_started")
    live = LiveTranscriber(demo_model, config())
    live.feed(stream[:round((first.start_s + 0.6) * RATE)])
    assert kinds(live.clear()) == ["cleared"]
    assert live.between_turns


# -- snapshots -----------------------------------------------------------------------------

def test_restore_goes_on_as_if_never_interrupted(demo_model, stream, reference):
    chunk = 1111
    live = LiveTranscriber(demo_model, config(sample_rate=24000, partial_ms=500))
    audio24 = torchaudio_resample(stream, RATE, 24000)
    whole = play(LiveTranscriber(demo_model, config(sample_rate=24000, partial_ms=500)),
                 audio24, chunk)
    cut = chunk * 65  # 3 s: between the first and the second turn
    before = [e for first in range(0, cut, chunk) for e in live.feed(audio24[first:first + chunk])]
    assert live.between_turns and kinds(before)[-1] == "final"
    state = live.snapshot()
    json.loads(state)  # JSON, no pickle
    moved = LiveTranscriber.restore(demo_model, config(sample_rate=24000, partial_ms=500), state)
    assert before + play(moved, audio24[cut:], chunk) == whole


@pytest.mark.parametrize("state, problem", [
    (b"garbage", "not a snapshot"),
    (b'{"format": "sensevoice-live-stream", "version": 99}', "version 99"),
    (b'{"format": "sensevoice-live-stream", "version": 1, "counters": {}, "arrays": {}}',
     "is missing"),
])
def test_restore_refuses_what_is_not_a_snapshot(demo_model, state, problem):
    with pytest.raises(ValueError, match=problem):
        LiveTranscriber.restore(demo_model, config(), state)


def test_restore_refuses_a_truncated_snapshot(demo_model, stream):
    live = LiveTranscriber(demo_model, config())
    live.feed(stream[:RATE // 3])
    state = live.snapshot()
    with pytest.raises(ValueError, match="not a snapshot"):
        LiveTranscriber.restore(demo_model, config(), state[:len(state) // 2])
    with pytest.raises(ValueError, match="sample_rate"):
        LiveTranscriber.restore(demo_model, config(sample_rate=48000), state)


@pytest.mark.parametrize("path, value, problem", [
    (("counters", "samples"), 10 ** 9, "do not match"),
    (("counters", "item"), -1, "item=-1"),
    (("counters", "run_start"), "x", "counter 'run_start'"),
    (("counters", "resampler.sinc_in"), 5, "resampler's history"),
    (("counters", "resampler.rate"), 1, "sample_rate=1"),
    (("arrays", "audio", "data"), "not base64!", "array 'audio'"),
    (("arrays", "vad.context", "shape"), [32], "array 'vad.context'"),
])
def test_restore_refuses_a_tampered_snapshot(demo_model, stream, path, value, problem):
    live = LiveTranscriber(demo_model, config(sample_rate=48000))
    live.feed(torchaudio_resample(stream[:RATE // 2], RATE, 48000))
    document = json.loads(live.snapshot())
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ValueError, match=problem):
        LiveTranscriber.restore(demo_model, config(sample_rate=48000),
                                json.dumps(document).encode())


def test_snapshot_inside_a_turn_is_refused(demo_model, stream, reference):
    first = next(e for e in reference if e.type == "speech_started")
    live = LiveTranscriber(demo_model, config())
    live.feed(stream[:round((first.start_s + 0.6) * RATE)])
    with pytest.raises(ValueError, match="turn is open"):
        live.snapshot()


# -- bad input and long streams ------------------------------------------------------------

@pytest.mark.parametrize("samples, problem", [
    (np.array([0.0, np.nan], np.float32), "NaN or infinite"),
    (np.array([np.inf], np.float32), "NaN or infinite"),
    (np.zeros((2, 160), np.float32), "1-D"),
    (np.zeros(160, np.int16), "dtype int16"),
])
def test_bad_samples_are_refused(demo_model, samples, problem):
    live = LiveTranscriber(demo_model, config())
    with pytest.raises(ValueError, match=problem):
        live.feed(samples)
    assert live.feed(np.zeros(160, np.float32)) == []  # the stream goes on


def test_sample_rate_changes_only_before_audio(demo_model):
    live = LiveTranscriber(demo_model, config())
    live.reconfigure(config(sample_rate=8000))
    assert live.config.sample_rate == 8000
    live.feed(np.zeros(80, np.float32))
    with pytest.raises(ValueError, match="sample_rate=48000"):
        live.reconfigure(config(sample_rate=48000))
    live.reconfigure(dataclasses.replace(config(sample_rate=8000), partial_s=1.0))


@pytest.mark.parametrize("turn_detection", [True, False])
def test_endless_speech_holds_bounded_memory(demo_model, talk, turn_detection):
    """A minute of talk without a pause long enough to end a turn, never committed: the turns
    are cut at max_segment_s and the stream holds at most about twice that."""
    vad = VadOptions(max_segment_s=2.0, min_silence_s=2.0)
    live = LiveTranscriber(demo_model, config(vad=vad, turn_detection=turn_detection))
    most, turns = 0, 0
    for _ in range(4):
        for first in range(0, len(talk), 4000):
            turns += sum(e.type == "final" for e in live.feed(talk[first:first + 4000]))
            most = max(most, live.held_samples)
    assert turns >= 20 and most < 2 * 2.0 * RATE + 2 * RATE


def test_a_long_stream_holds_bounded_memory(demo_model):
    """Ten minutes in one feed, then minutes in small chunks: the state stays small."""
    live = LiveTranscriber(demo_model, config(partial_ms=500))
    noise = np.random.default_rng(2).standard_normal(600 * RATE).astype(np.float32) * 1e-3
    assert live.feed(noise) == []
    held = live.held_samples
    assert held < 2 * RATE
    for first in range(0, 30 * RATE, RATE // 2):
        live.feed(noise[first:first + RATE // 2])
    assert live.held_samples < 2 * RATE and live.audio_s == 630.0
