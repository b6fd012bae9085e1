"""Held-out figures of a demo model, per condition: clean speech from unseen voices and rates,
the same speech at 10 dB SNR, and sounds with no speech in them.

The same measures as tests/test_demo_model.py, so a training run prints what the test asserts.
"""

from __future__ import annotations

import json
from pathlib import Path

import jiwer
import numpy as np
import soundfile
import torch

from sensevoice_core.audio import SAMPLE_RATE
from sensevoice_core.loader import load_model_dir
from sensevoice_core.options import TranscribeOptions
from sensevoice_core.pipeline import SenseVoice
from training.augment import add_noise, speech_power
from training.corpus import WORD
from training.dataset import Clip
from training.nospeech import KINDS, make_nospeech
from training.voices import NoiseKind

EVAL_CLIPS_PER_LANGUAGE = 24
NOSPEECH_CLIPS = 40
NOISY_SNR_DB = 10.0
NOISY_KINDS: tuple[NoiseKind, ...] = ("white", "pink", "babble")


def text_of(pieces: tuple[str, ...] | list[str]) -> str:
    return "".join(pieces).replace(WORD, " ").strip()


def has_digit(text: str) -> bool:
    return any(ch.isdigit() for ch in text)


def measure(model: SenseVoice, waveforms: list, languages: list[str], kinds: list[str],
            references: list[str]) -> dict:
    """CER (language auto, no ITN), language-ID accuracy, ITN switch rate on number clips,
    as a user's ``transcribe`` sees them (the VAD included)."""
    plain = model.transcribe_batch(waveforms, TranscribeOptions())
    itn = model.transcribe_batch(waveforms, TranscribeOptions(use_itn=True))
    return score(plain, itn, languages, kinds, references)


def score(plain: list, itn: list, languages: list[str], kinds: list[str],
          references: list[str]) -> dict:
    """measure's figures from results already transcribed without and with ITN."""
    figures: dict = {}
    for language in ("en", "zh"):
        picked = [i for i, lang in enumerate(languages) if lang == language]
        if not picked:
            continue
        figures[f"cer_{language}"] = round(jiwer.cer([references[i] for i in picked],
                                                     [plain[i].text for i in picked]), 4)
        figures[f"lid_{language}"] = round(
            sum(plain[i].language == language for i in picked) / len(picked), 4)
    numbers = [i for i, kind in enumerate(kinds) if kind in ("digits", "number")]
    switched = [i for i in numbers if has_digit(itn[i].text) and not has_digit(plain[i].text)]
    figures["itn_switch"] = round(len(switched) / max(1, len(numbers)), 4)
    figures["clips"] = len(plain)
    return figures


def with_noise(waveforms: list[torch.Tensor], snr_db: float = NOISY_SNR_DB) -> list[torch.Tensor]:
    """Each clip with white, pink or babble noise (in turn) at snr_db below its speech; the
    babble is made of the other clips. Seeded by position: the same list gives the same noise."""
    arrays = [w.numpy() for w in waveforms]
    noisy = []
    for index, samples in enumerate(arrays):
        loud = samples[np.abs(samples) > 0.01 * np.abs(samples).max()]
        rng = np.random.default_rng(index)
        others = arrays[:index] + arrays[index + 1:]
        mixed = add_noise(samples, speech_power(loud), NOISY_KINDS[index % len(NOISY_KINDS)],
                          snr_db, rng, others)
        noisy.append(torch.from_numpy(np.clip(mixed, -1.0, 1.0).astype(np.float32)))
    return noisy


def nospeech_clips(count: int = NOSPEECH_CLIPS) -> list[torch.Tensor]:
    """The held-out sounds without speech: every kind in turn, from seeds training never used."""
    return [torch.from_numpy(make_nospeech(f"held-out:{i}", KINDS[i % len(KINDS)]).waveform)
            for i in range(count)]


def measure_nospeech(model: SenseVoice, waveforms: list[torch.Tensor]) -> dict:
    """Share of the clips transcribed to empty text, as ``transcribe`` (VAD included) and as the
    model alone (``decode``, no VAD) hear them."""
    through_vad = model.transcribe_batch(waveforms, TranscribeOptions())
    alone = model.decode(waveforms, TranscribeOptions())
    return {"nospeech_empty": round(sum(not r.text for r in through_vad) / len(waveforms), 4),
            "nospeech_empty_no_vad": round(sum(not s.text for s in alone) / len(waveforms), 4),
            "nospeech_clips": len(waveforms)}


def _by_voice(clips: list[Clip], plain: list) -> dict:
    families: dict[str, list[int]] = {}
    for index, clip in enumerate(clips):
        synth, _, name = clip.voice.partition(":")
        family = f"{clip.language} {synth} {name.split('+')[0]}"
        families.setdefault(family, []).append(index)
    return {family: round(jiwer.cer([text_of(clips[i].woitn) for i in picked],
                                    [plain[i].text for i in picked]), 4)
            for family, picked in sorted(families.items())}


def evaluate(model: SenseVoice, clips: list[Clip], eval_dir: Path | None) -> dict:
    waveforms = [torch.from_numpy(c.waveform) for c in clips]
    languages, kinds = [c.language for c in clips], [c.kind for c in clips]
    references = [text_of(c.woitn) for c in clips]
    plain = model.transcribe_batch(waveforms, TranscribeOptions())
    itn = model.transcribe_batch(waveforms, TranscribeOptions(use_itn=True))
    figures = {"clean": score(plain, itn, languages, kinds, references),
               "noisy_10db": measure(model, with_noise(waveforms), languages, kinds, references),
               "cer_by_voice": _by_voice(clips, plain),
               **measure_nospeech(model, nospeech_clips())}
    if eval_dir is not None:
        write_eval_set(clips, eval_dir)
    return figures


def write_eval_set(clips: list[Clip], eval_dir: Path) -> None:
    """The first clips of each language as 16 kHz FLAC, with their references in refs.json."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for language in ("en", "zh"):
        chosen = [c for c in clips if c.language == language]
        for index, clip in enumerate(chosen[:EVAL_CLIPS_PER_LANGUAGE]):
            name = f"{language}_{index:02d}.flac"
            soundfile.write(eval_dir / name, clip.waveform, SAMPLE_RATE, subtype="PCM_16")
            entries.append({"file": name, "language": language, "kind": clip.kind,
                            "woitn": text_of(clip.woitn), "withitn": text_of(clip.withitn),
                            "voice": clip.voice, "rate": clip.rate})
    (eval_dir / "refs.json").write_text(json.dumps(entries, ensure_ascii=False, indent=1) + "\n",
                                        encoding="utf-8")


def silence_padding(model: SenseVoice, clips: list[Clip],
                    seconds: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)) -> dict[float, dict]:
    """CER and empty answers with ``seconds`` of silence each side of every clip: the demo
    model was trained with at most 0.6 s around speech."""
    references = [text_of(c.woitn) for c in clips]
    figures = {}
    for pad in seconds:
        silence = np.zeros(int(pad * SAMPLE_RATE), np.float32)
        padded = [torch.from_numpy(np.concatenate([silence, c.waveform, silence])) for c in clips]
        results = model.transcribe_batch(padded, TranscribeOptions())
        figures[pad] = {"cer": round(jiwer.cer(references, [r.text for r in results]), 4),
                        "empty": sum(not r.text for r in results)}
    return figures


def print_figures(summary: dict) -> None:
    print("held-out (unseen voices and accents, 130-220 wpm), language auto:")
    print("  condition    CER en  CER zh  LID en  LID zh  ITN switch")
    for name in ("clean", "noisy_10db"):
        f = summary[name]
        print(f"  {name:<11} {f['cer_en']:6.2%} {f['cer_zh']:7.2%} {f['lid_en']:7.2%} "
              f"{f['lid_zh']:7.2%} {f['itn_switch']:9.2%}   ({f['clips']} clips)")
    print(f"  no speech: empty text on {summary['nospeech_empty']:.0%} through the VAD, "
          f"{summary['nospeech_empty_no_vad']:.0%} decoded whole "
          f"({summary['nospeech_clips']} clips)")
    for family, cer in summary["cer_by_voice"].items():
        print(f"  CER {family}: {cer:.2%}")
    print(f"training: {summary['train_hours']} h of speech generated in "
          f"{summary['generation_s']} s, {summary['parameters']:,} parameters trained in "
          f"{summary['training_s']} s; model files {summary['model_bytes'] / 2**20:.1f} MiB")


def main() -> None:
    """Re-measure a model on the held-out split without training: the same table as a
    training run, and the silence-padding figures."""
    import argparse

    from training.dataset import make_clips
    from training.train import DEFAULT_CACHE, TrainConfig

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("model"))
    parser.add_argument("--clips", type=int, default=TrainConfig.held_out_clips)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    clips = make_clips(args.clips, args.seed, "held-out", args.cache)
    model = load_model_dir(args.model)
    figures = evaluate(model, clips, None)
    summary = json.loads((args.model / "training_summary.json").read_text(encoding="utf-8"))
    print_figures({**summary, **figures})
    speech = [c for c in clips if c.language != "nospeech"]
    for pad, found in silence_padding(model, speech).items():
        print(f"  {pad:.0f} s of silence each side: CER {found['cer']:.2%}, "
              f"{found['empty']} of {len(speech)} empty")


if __name__ == "__main__":
    main()
