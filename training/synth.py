"""The three synthesisers, each returning float32 mono 16 kHz samples.

espeak-ng runs through libespeak-ng (the library behind its CLI), which also reports where each
word begins: those times give the training its word alignment (train.py). flite runs
as a command per clip; festival, whose start-up costs half a second, runs one batch script per
group of clips. Install: ``apt-get install -y espeak-ng flite festival festvox-kallpc16k
festvox-us-slt-hts``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from sensevoice_core.audio import load_audio, resample_to_16k
from training.voices import NATURAL_WPM, Rendering


def espeak(jobs: list[tuple[str, Rendering]]) -> list[tuple[np.ndarray, list[float]]]:
    """Samples at 16 kHz and the time each word begins, from espeak-ng's own word events. All
    jobs go to one fresh process (training/espeak_batch.py): libespeak-ng carries state from
    one utterance to the next (word times drift by a fraction of a millisecond), so a clip is
    reproducible only when what was said before it in the same process is."""
    if not jobs:
        return []
    with tempfile.TemporaryDirectory() as scratch:
        request = [{"text": text, "voice": r.voice.name, "rate": r.rate, "pitch": r.pitch,
                    "word_gap": r.word_gap} for text, r in jobs]
        done = subprocess.run([sys.executable, "-m", "training.espeak_batch", scratch],
                              input=json.dumps(request), capture_output=True, text=True,
                              check=False, timeout=60 + 5 * len(jobs))
        if done.returncode != 0:
            raise RuntimeError(f"espeak-ng batch failed: {done.stderr.strip()[-500:]}")
        results = []
        for index, job in enumerate(json.loads(done.stdout)):
            samples = np.fromfile(Path(scratch) / f"{index}.raw", dtype=np.int16)
            sample_rate = job["sample_rate"]
            audio = resample_to_16k(samples.astype(np.float32) / 32768, sample_rate,
                                    f"espeak-ng {jobs[index][1].voice.name}").numpy()
            results.append((audio, [s / sample_rate for s in job["word_samples"]]))
        return results


def _run(command: list[str], package: str, timeout: float) -> None:
    """A synthesiser's command; its absence or failure named with the package to install."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              timeout=timeout)
    except FileNotFoundError:
        raise RuntimeError(f"{command[0]} is not installed: apt-get install -y {package}"
                           ) from None
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({done.returncode}): "
                           f"{' '.join(done.stderr.split())[-300:]} (needs: apt-get install -y {package})")


def flite(text: str, rendering: Rendering) -> np.ndarray:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "clip.wav"
        _run(["flite", "-voice", rendering.voice.name,
              "--setf", f"duration_stretch={NATURAL_WPM / rendering.rate:.3f}",
              "--setf", f"int_f0_target_mean={80 + rendering.pitch * 1.5:.0f}",
              "-t", text, "-o", str(out)], "flite", 60)
        return load_audio(out.read_bytes()).numpy()


def _scheme_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def festival(jobs: list[tuple[str, Rendering]]) -> list[np.ndarray]:
    """One festival run for all jobs. The HTS voice ignores Duration_Stretch: its rate comes
    from the tempo step after synthesis."""
    if not jobs:
        return []
    with tempfile.TemporaryDirectory() as scratch:
        lines = []
        for index, (text, rendering) in enumerate(jobs):
            stretch = NATURAL_WPM / rendering.rate
            lines += [f"({rendering.voice.name})",
                      f"(Parameter.set 'Duration_Stretch {stretch:.3f})",
                      (f"(utt.save.wave (utt.synth (Utterance Text {_scheme_string(text)})) "
                       f"\"{scratch}/{index}.wav\" 'riff)")]
        script = Path(scratch) / "batch.scm"
        script.write_text("\n".join(lines) + "\n", encoding="utf-8")
        _run(["festival", "-b", str(script)],
             "festival festvox-kallpc16k festvox-us-slt-hts", 60 + 10 * len(jobs))
        results = []
        for index, (text, rendering) in enumerate(jobs):
            wav = Path(scratch) / f"{index}.wav"
            if not wav.exists():  # festival -b goes on after an error, and exits 0
                raise RuntimeError(f"festival wrote nothing for {text!r} with "
                                   f"({rendering.voice.name}): is its voice installed? "
                                   f"apt-get install -y festvox-kallpc16k festvox-us-slt-hts")
            results.append(load_audio(wav.read_bytes()).numpy())
        return results
