"""Long audio: segmented (VAD + batches) against unsegmented, on the full-size fixture (not a test).

    python ../shared/tools/make_full_fixture.py /tmp/sensevoice-full
    python bench/long_audio.py --model /tmp/sensevoice-full [--minutes 10]

Builds a recording from the five real example clips (tests/data/*.mp3) with 0.5-2 s pauses,
repeated to --minutes, then runs each configuration in a fresh process and prints its wall
time, real-time factor and peak RSS:
- segmented, with several batch budgets (padded seconds of audio per batch);
- unsegmented (one pass over the whole audio, as before VAD existed), on growing prefixes,
  only up to --max-unsegmented-s: attention grows with the square of the length.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile

from sensevoice_core.audio import load_audio

REPO = Path(__file__).resolve().parent.parent

RUN_ONE = """
import json, resource, sys, time
import torch
from sensevoice_core.cache import load_sensevoice_cached
from sensevoice_core.audio import load_audio
from sensevoice_core.options import TranscribeOptions
from sensevoice_core.settings import Settings
model_dir, cache_dir, audio_path, mode, batch_s, seconds, threads = sys.argv[1:8]
torch.set_num_threads(int(threads))
model, _ = load_sensevoice_cached(model_dir, settings=Settings(cache_dir=cache_dir))
options = TranscribeOptions(use_itn=True, batch_s=float(batch_s) or TranscribeOptions.batch_s)
model.transcribe(load_audio(audio_path)[:16000 * 2])  # kernels, allocator and VAD warmed
start = time.perf_counter()
if mode == "segmented":
    result = model.transcribe(audio_path, options)
    detail = len(result.segments)
else:
    waveform = load_audio(audio_path)[: int(16000 * float(seconds))]
    detail = len(model.decode([waveform], options)[0].text)
wall = time.perf_counter() - start
peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"wall_s": wall, "peak_mib": peak_mib, "detail": detail}))
"""


def build_recording(minutes: float, path: Path) -> float:
    rng = np.random.default_rng(0)
    clips = [load_audio(clip).numpy() for clip in sorted((REPO / "tests" / "data").glob("*.mp3"))]
    parts, total, index = [], 0.0, 0
    while total < minutes * 60:
        pause = np.zeros(int(rng.uniform(0.5, 2.0) * 16000), np.float32)
        clip = clips[index % len(clips)]
        parts += [pause, clip]
        total += (len(pause) + len(clip)) / 16000
        index += 1
    soundfile.write(path, np.concatenate(parts), 16000, format="FLAC")
    return total


def run(model: Path, cache: Path, audio: Path, mode: str, batch_s: float, seconds: float,
        threads: int) -> dict:
    done = subprocess.run([sys.executable, "-c", RUN_ONE, str(model), str(cache), str(audio),
                           mode, str(batch_s), str(seconds), str(threads)],
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-s", type=float, nargs="+", default=[30.0, 60.0, 120.0, 240.0])
    parser.add_argument("--unsegmented-s", type=float, nargs="+", default=[30.0, 120.0, 300.0])
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="long-audio-bench-"))
    audio = work / "recording.flac"
    total = build_recording(args.minutes, audio)
    cache = work / "cache"
    run(args.model, cache, audio, "unsegmented", 0, 1, args.threads)  # writes the L2 snapshot
    print(f"{total / 60:.1f} min recording of the 5 example clips with pauses; "
          f"{args.threads} threads; full-size model {args.model}")
    print(f"  {'mode':<13} {'audio':>8} {'batch':>7} {'wall':>8} {'RTF':>7} {'peak RSS':>9}")
    for batch_s in args.batch_s:
        result = run(args.model, cache, audio, "segmented", batch_s, total, args.threads)
        report("segmented", total, f"{batch_s:g} s", result, f"{result.get('detail')} segments")
    for seconds in args.unsegmented_s:
        seconds = min(seconds, total)
        result = run(args.model, cache, audio, "unsegmented", 0, seconds, args.threads)
        report("unsegmented", seconds, "-", result, "")


def report(mode: str, seconds: float, batch: str, result: dict, note: str) -> None:
    if "error" in result:
        print(f"  {mode:<13} {seconds:7.0f}s {batch:>7}  failed: {result['error']}")
        return
    print(f"  {mode:<13} {seconds:7.0f}s {batch:>7} {result['wall_s']:7.1f}s "
          f"{result['wall_s'] / seconds:7.3f} {result['peak_mib'] / 1024:8.2f}G  {note}")


if __name__ == "__main__":
    main()
