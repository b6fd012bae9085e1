"""Held-out figures of a demo model: CER per language, language ID, and the ITN switch.

The same measures as tests/test_demo_model.py, so a training run prints what the test asserts.
"""

from __future__ import annotations

import json
from pathlib import Path

import jiwer
import soundfile

from sensevoice_core.audio import SAMPLE_RATE
from sensevoice_core.loader import load_model_dir
from sensevoice_core.options import TranscribeOptions
from sensevoice_core.pipeline import SenseVoice
from training.corpus import WORD
from training.synth import Clip

EVAL_CLIPS_PER_LANGUAGE = 24


def text_of(pieces: tuple[str, ...]) -> str:
    return "".join(pieces).replace(WORD, " ").strip()


def has_digit(text: str) -> bool:
    return any(ch.isdigit() for ch in text)


def measure(model: SenseVoice, waveforms: list, languages: list[str], kinds: list[str],
            references: list[str]) -> dict:
    """CER (language auto, no ITN), language-ID accuracy, ITN switch rate on number clips,
    as a user's ``transcribe`` sees them (the VAD included)."""
    plain = model.transcribe_batch(waveforms, TranscribeOptions())
    itn = model.transcribe_batch(waveforms, TranscribeOptions(use_itn=True))
    figures: dict = {}
    for language in ("en", "zh"):
        picked = [i for i, lang in enumerate(languages) if lang == language]
        figures[f"cer_{language}"] = round(jiwer.cer([references[i] for i in picked],
                                                     [plain[i].text for i in picked]), 4)
        figures[f"lid_{language}"] = round(
            sum(plain[i].language == language for i in picked) / len(picked), 4)
    numbers = [i for i, kind in enumerate(kinds) if kind in ("digits", "number")]
    switched = [i for i in numbers if has_digit(itn[i].text) and not has_digit(plain[i].text)]
    figures["itn_switch"] = round(len(switched) / max(1, len(numbers)), 4)
    figures["clips"] = len(waveforms)
    return figures


def evaluate(model_dir: Path, clips: list[Clip], eval_dir: Path | None) -> dict:
    model = load_model_dir(model_dir)  # just written: nothing to cache yet
    figures = measure(model, [c.waveform for c in clips],
                      [c.utterance.language for c in clips],
                      [c.utterance.kind for c in clips],
                      [text_of(c.utterance.woitn) for c in clips])
    if eval_dir is not None:
        write_eval_set(clips, eval_dir)
    return figures


def write_eval_set(clips: list[Clip], eval_dir: Path) -> None:
    """The first clips of each language as 16 kHz FLAC, with their references in refs.json."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for language in ("en", "zh"):
        chosen = [c for c in clips if c.utterance.language == language]
        for index, clip in enumerate(chosen[:EVAL_CLIPS_PER_LANGUAGE]):
            name = f"{language}_{index:02d}.flac"
            soundfile.write(eval_dir / name, clip.waveform.numpy(), SAMPLE_RATE, subtype="PCM_16")
            entries.append({"file": name, "language": language, "kind": clip.utterance.kind,
                            "woitn": text_of(clip.utterance.woitn),
                            "withitn": text_of(clip.utterance.withitn),
                            "voice": clip.rendering.voice, "rate": clip.rendering.rate})
    (eval_dir / "refs.json").write_text(json.dumps(entries, ensure_ascii=False, indent=1) + "\n",
                                        encoding="utf-8")


def print_figures(summary: dict) -> None:
    print("held-out (unseen voices m5/f4 and 200-215 wpm), language auto:")
    for language in ("en", "zh"):
        print(f"  {language}: CER {summary[f'cer_{language}']:.2%}  "
              f"language ID {summary[f'lid_{language}']:.2%}")
    print(f"  ITN switch on number clips: {summary['itn_switch']:.2%} "
          f"({summary['clips']} clips)")
    print(f"training: {summary['train_hours']} h of speech generated in "
          f"{summary['generation_s']} s, {summary['parameters']:,} parameters trained in "
          f"{summary['training_s']} s; model files {summary['model_bytes'] / 2**20:.1f} MiB")
