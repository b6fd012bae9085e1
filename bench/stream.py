"""Live transcription engine: latency of a final, partial cadence, CPU per second of audio,
and how many real-time streams one process sustains (the LiveTranscriber, no service).

Run on the demo model and the full-size random fixture (not in CI):
    python ../shared/tools/make_full_fixture.py /tmp/full
    python bench/stream.py --model model /tmp/full

The audio is real demo speech for every model (the VAD is Silero, whatever the model; the
full fixture's random weights only change what a decode costs): a 5 s utterance, from three
demo clips joined at their speech, fed in 20 ms chunks paced at real time.

1. End of speech -> Final: the VAD's wait (min_silence_s of silence, in audio time, to the
   chunk that closes the turn), the processing of that chunk's feed() (the closing decode),
   and the wall time from the moment the last speech sample "arrived" to the Final.
2. Partials: how many per second of turn, and what one decode costs against turn length.
3. CPU time (all threads) per second of audio: silence (resampling + VAD only), and speech
   with partials every 500 ms.
4. Concurrent streams: N engines fed round-robin in real time by one thread (chunks that fell
   due while others were decoded are fed together, as the worker coalesces them); the largest
   N whose finals all come within 1 s of their turn's end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

from sensevoice_core import load_model
from sensevoice_core.audio import load_audio
from sensevoice_core.pipeline import SenseVoice
from sensevoice_core.segmentation import WINDOW_S
from sensevoice_core.settings import Settings
from sensevoice_core.stream_types import StreamConfig, StreamOptions
from sensevoice_core.streaming import LiveTranscriber

EXAMPLES = Path(__file__).resolve().parent.parent / "ui" / "examples"
RATE = 16000
CHUNK = 320  # 20 ms
# Where each clip's speech is (its VAD region), joined into one 5 s turn.
SPEECH = (("zh_04", 0.22, 2.66), ("en_03", 0.156, 1.732), ("en_02", 0.348, 1.188),
          ("zh_08", 0.0, 0.2))


def utterance() -> np.ndarray:
    parts = [load_audio(EXAMPLES / f"{name}.flac").numpy()[round(a * RATE):round(b * RATE)]
             for name, a, b in SPEECH]
    return np.concatenate(parts)


def stream_config(partial_ms: int) -> StreamConfig:
    return Settings().stream_config(StreamOptions(partial_ms=partial_ms))


def paced(live: LiveTranscriber, audio: np.ndarray) -> list[tuple[float, float, float, list]]:
    """Feeds audio at real time in 20 ms chunks (late chunks together): for each feed, its
    wall start, duration, the stream time it reached, and its events."""
    start = time.perf_counter()
    fed, log = 0, []
    while fed < len(audio):
        now = time.perf_counter()
        due = min(len(audio), int((now - start) * RATE) // CHUNK * CHUNK)
        if due <= fed:
            time.sleep(max(0.0, start + (fed + CHUNK) / RATE - now))
            continue
        began = time.perf_counter()
        events = live.feed(audio[fed:due])
        log.append((began - start, time.perf_counter() - began, due / RATE, events))
        fed = due
    return log


def final_latency(model: SenseVoice, speech: np.ndarray, repeats: int) -> None:
    config = stream_config(500)
    pad, silence = config.transcribe.vad.speech_pad_s, config.transcribe.vad.min_silence_s
    audio = np.concatenate([np.zeros(RATE, np.float32), speech, np.zeros(2 * RATE, np.float32)])
    # The turn closes once the window that completes min_silence_s of silence has arrived.
    wait = round(silence / WINDOW_S) * WINDOW_S
    waits, processing, closing_feeds, walls, partial_rates = [], [], [], [], []
    for _ in range(repeats):
        log = paced(LiveTranscriber(model, config), audio)
        closing = next(entry for entry in log if any(e.type == "final" for e in entry[3]))
        committed = next(e for e in closing[3] if e.type == "committed")
        speech_end = committed.end_s - pad  # where the VAD last heard speech
        wall = closing[0] + closing[1] - speech_end
        waits.append(wait)
        closing_feeds.append(closing[1])
        processing.append(wall - wait)
        walls.append(wall)
        partials = sum(e.type == "partial" for entry in log for e in entry[3])
        partial_rates.append(partials / (committed.end_s - committed.start_s))
    print(f"  1. end of speech -> final, 5 s utterance ({len(speech) / RATE:.1f} s), 20 ms "
          f"chunks at real time, median of {repeats}:")
    print(f"     VAD wait {wait:.3f} s (min_silence_s={silence:g} in 32 ms windows) + "
          f"processing {statistics.median(processing):.3f} s = "
          f"{statistics.median(walls):.3f} s from the last speech sample to the final (worst "
          f"{max(walls):.3f} s); of the processing, the feed() that closed the turn and "
          f"decoded it took {statistics.median(closing_feeds):.3f} s, the rest was waiting "
          f"for earlier feeds (a partial's decode) to end")
    print(f"  2. partials (partial_s=0.5): {statistics.median(partial_rates):.2f} per second "
          f"of turn")


def partial_cost(model: SenseVoice, speech: np.ndarray) -> None:
    options = stream_config(500).transcribe
    costs = []
    for seconds in (1, 2, 5, 10, 20, 30):
        piece = torch.from_numpy(np.tile(speech, seconds // 5 + 1)[:seconds * RATE].copy())
        model.decode([piece], options)  # warm-up
        times = []
        for _ in range(3):
            began = time.perf_counter()
            model.decode([piece], options)
            times.append(time.perf_counter() - began)
        costs.append(f"{seconds} s: {statistics.median(times) * 1000:.0f} ms")
    print(f"     decode of a partial (word times on) by turn length: {', '.join(costs)}")


def cpu_per_second(model: SenseVoice, speech: np.ndarray) -> None:
    gap = np.zeros(RATE, np.float32)
    talk = np.concatenate([gap, speech, gap] * 4)
    silence = np.zeros(20 * RATE, np.float32)
    rows = []
    for name, audio, partial_ms in (("silence", silence, 500), ("speech, no partials", talk, 0),
                                    ("speech, partials 500 ms", talk, 500)):
        live = LiveTranscriber(model, stream_config(partial_ms))
        began = time.process_time()
        for first in range(0, len(audio), CHUNK):
            live.feed(audio[first:first + CHUNK])
        live.finish()
        rows.append(f"{name} {(time.process_time() - began) / (len(audio) / RATE) * 1000:.1f} ms")
    print(f"  3. CPU time per second of audio (20 ms chunks, all threads): {', '.join(rows)}")


def streams_sustained(model: SenseVoice, speech: np.ndarray, seconds: float,
                      most: int) -> None:
    cycle = np.concatenate([speech, np.zeros(RATE, np.float32)])
    audio = np.tile(cycle, int(seconds / (len(cycle) / RATE)) + 1)[:round(seconds * RATE)]
    tried: dict[int, float] = {}

    def worst_delay(count: int) -> float:
        """The latest final of count streams, each offset by a fraction of a cycle."""
        if count not in tried:
            tried[count] = round_robin(model, audio, count, len(cycle) / RATE)
        return tried[count]

    count, good = 1, 0
    while count <= most and worst_delay(count) <= 1.0:
        good, count = count, count * 2
    low, high = good, min(count, most + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if worst_delay(middle) <= 1.0 else (low, middle)
    detail = ", ".join(f"{n}: {delay:.2f} s" for n, delay in sorted(tried.items()))
    print(f"  4. concurrent real-time streams (partials every 500 ms, {seconds:.0f} s each): "
          f"{low} sustained (worst final delay after its turn's end by N: {detail})")


def round_robin(model: SenseVoice, audio: np.ndarray, count: int, cycle_s: float) -> float:
    config = stream_config(500)
    engines = [LiveTranscriber(model, config) for _ in range(count)]
    offsets = [i * cycle_s / count for i in range(count)]
    fed = [0] * count
    worst = 0.0
    start = time.perf_counter()
    while any(f < len(audio) for f in fed):
        busy = False
        for i, live in enumerate(engines):
            elapsed = time.perf_counter() - start - offsets[i]
            due = min(len(audio), max(0, int(elapsed * RATE) // CHUNK * CHUNK))
            if due <= fed[i]:
                continue
            busy = True
            events = live.feed(audio[fed[i]:due])
            fed[i] = due
            arrived = time.perf_counter() - start - offsets[i]
            for event in events:
                if event.type == "committed":
                    worst = max(worst, arrived - event.end_s)
        if not busy:
            time.sleep(0.002)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, nargs="+", default=[Path("model")])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stream-s", type=float, default=15.0,
                        help="seconds each concurrent stream plays")
    parser.add_argument("--most-streams", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"threads: {torch.get_num_threads()}, torch {torch.__version__}, CPU capability: "
          f"{torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs, load average "
          f"{load:.1f} at start, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset (OpenMP threads spin while waiting)')}")
    speech = utterance()
    for model_dir in args.model:
        began = time.perf_counter()
        model = load_model(model_dir)
        model.vad  # noqa: B018 - loaded before timing
        print(f"{model_dir} (loaded in {time.perf_counter() - began:.1f} s)")
        final_latency(model, speech, args.repeats)
        partial_cost(model, speech)
        cpu_per_second(model, speech)
        streams_sustained(model, speech, args.stream_s, args.most_streams)


if __name__ == "__main__":
    main()
