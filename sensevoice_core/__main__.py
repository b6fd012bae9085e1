"""Command line: ``python -m sensevoice_core {transcribe,convert,random-demo} ...``."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from sensevoice_core.audio import SAMPLE_RATE, load_audio
from sensevoice_core.audio_stream import open_decoder
from sensevoice_core.cache import load_sensevoice_cached
from sensevoice_core.decoding import Transcription
from sensevoice_core.doctor import first_problem, run_checks
from sensevoice_core.errors import SenseVoiceError
from sensevoice_core.loader import load_model
from sensevoice_core.long_audio import has_speech, transcribe_long
from sensevoice_core.pipeline import SenseVoice, TranscribeOptions
from sensevoice_core.settings import Settings, SettingsError, load_settings
from sensevoice_core.vad import SileroVAD
from sensevoice_core.vocab import Language

logger = logging.getLogger("sensevoice.cli")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
LANGUAGE_CHOICES = [lang.value for lang in Language if lang is not Language.NOSPEECH]


def transcribe_files(model: SenseVoice, files: list[str], options: TranscribeOptions,
                     as_json: bool, settings: Settings) -> int:
    """Print one line per file, in input order; a file that cannot be read is reported in its
    place (exit status 1) and the others are still transcribed. Short files are batched through
    the model, except those where the VAD finds no speech (an empty result); files longer than
    SENSEVOICE_MAX_SEGMENT_S, or of unknown length, are split at pauses and carry segments."""
    vad = SileroVAD.from_package()
    waveforms, long_files, errors = {}, {}, {}
    results: dict[int, dict] = {}
    for index, name in enumerate(files):
        try:
            if _seconds(name) > settings.max_segment_s:
                long_files[index] = name
                continue
            waveform = load_audio(name)
            if has_speech(vad, waveform, settings.vad_options()):
                waveforms[index] = waveform
            else:
                results[index] = Transcription("", "", None, None, None, None, (),
                                               waveform.numel() / SAMPLE_RATE).to_dict()
        except SenseVoiceError as e:
            errors[index] = str(e)
    for index, result in zip(waveforms, model.transcribe_waveforms(list(waveforms.values()),
                                                                    options)):
        results[index] = result.to_dict()
    for index, name in long_files.items():
        try:
            long = transcribe_long(model, vad, name, options, settings.vad_options(),
                                   batch_s=settings.batch_s)
        except SenseVoiceError as e:
            errors[index] = str(e)
            continue
        results[index] = {"text": long.text, "rich_text": long.text,
                          "raw": "".join(segment.raw for segment in long.segments),
                          "language": long.dominant("language"),
                          "emotion": long.dominant("emotion"), "event": long.dominant("event"),
                          "token_ids": [i for segment in long.segments for i in segment.token_ids],
                          "duration_s": long.duration_s,
                          "segments": [{key: value for key, value in asdict(segment).items()
                                        if key not in ("raw", "token_ids")}
                                       for segment in long.segments]}
    for index, name in enumerate(files):
        if index in errors:
            print(json.dumps({"file": name, "error": errors[index]}) if as_json
                  else f"error: {errors[index]}", file=sys.stdout if as_json else sys.stderr)
        elif as_json:
            print(json.dumps({"file": name, **results[index]}, ensure_ascii=False))
        else:
            text = results[index]["rich_text"]
            print(f"{name}\t{text}" if len(files) > 1 else text)
    return EXIT_FAILED if errors else EXIT_OK


def _seconds(name: str) -> float:
    """The length the file's header states; infinite when it states none (a browser's WebM), so
    the file is streamed; 0 when it cannot be opened (load_audio then says why)."""
    try:
        with open_decoder(name, name) as decoder:
            return decoder.declared.seconds if decoder.declared else math.inf
    except SenseVoiceError:
        return 0.0


def command_transcribe(args: argparse.Namespace, settings: Settings) -> int:
    if args.device:
        settings = settings.model_copy(update={"device": args.device})
    model, report = load_sensevoice_cached(args.model, settings=settings)
    logger.info("Loaded model %s", report.summary())
    options = TranscribeOptions.create(args.language, args.itn)
    return transcribe_files(model, args.files, options, args.json, settings)


def command_doctor(args: argparse.Namespace, settings: Settings) -> int:
    checks = run_checks(args.model, settings, verify=args.verify)
    problem = first_problem(checks)
    if args.json:
        print(json.dumps({"healthy": problem is None,
                          "first_problem": problem.name if problem else None,
                          "checks": [asdict(check) for check in checks]}, indent=2))
    else:
        for check in checks:
            print(f"[{'ok' if check.ok else 'PROBLEM'}] {check.name}: {check.detail}")
        print("healthy" if problem is None else f"first problem: {problem.name}: {problem.detail}")
    return EXIT_OK if problem is None else EXIT_FAILED


def command_convert(args: argparse.Namespace, settings: Settings) -> int:
    from sensevoice_core.hf import convert_official_to_hf  # transformers is slow to import

    target = convert_official_to_hf(args.source, args.target)
    print(f"wrote {target.resolve()} (config.json, model.safetensors, tokenizer.model, am.mvn)")
    return EXIT_OK


def command_random_demo(args: argparse.Namespace, settings: Settings) -> int:
    from sensevoice_core.random_model import write_random_model

    print("NOTE: this model has RANDOM weights; it shows the pipeline runs end to end, "
          "and its output is noise.", file=sys.stderr)
    with tempfile.TemporaryDirectory() as scratch:
        model = load_model(write_random_model(Path(scratch) / "random-model"))
        options = TranscribeOptions.create(args.language, args.itn)
        return transcribe_files(model, args.files, options, as_json=True, settings=settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sensevoice_core",
                                     description="SenseVoice Small speech recognition.")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (default: SENSEVOICE_THREADS, else torch's)")
    commands = parser.add_subparsers(dest="command", required=True)

    model_help = ("model directory, FunASR release or converted (hf) layout; default: "
                  "SENSEVOICE_MODEL_DIR, then ./model and the usual places")
    transcribe = commands.add_parser("transcribe", help="transcribe audio files")
    transcribe.add_argument("--model", type=Path, help=model_help)
    transcribe.add_argument("files", nargs="+",
                            help="audio or video files (wav, flac, mp3, ogg, opus, webm, m4a, "
                                 "mp4, mpeg)")
    transcribe.add_argument("--device", help="torch device (default: SENSEVOICE_DEVICE or cpu)")
    transcribe.set_defaults(handler=command_transcribe)

    doctor = commands.add_parser("doctor", help="check model path, files, caches and settings")
    doctor.add_argument("--model", type=Path, help=model_help)
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument("--verify", action="store_true",
                        help="also hash every model file and the L2 snapshot (reads them all)")
    doctor.set_defaults(handler=command_doctor)

    convert = commands.add_parser("convert",
                                  help="convert a FunASR release directory to the hf layout")
    convert.add_argument("source", type=Path, help="directory with model.pt + config.yaml")
    convert.add_argument("target", type=Path, help="new directory to write")
    convert.set_defaults(handler=command_convert)

    demo = commands.add_parser("random-demo",
                               help="run the pipeline on a freshly generated RANDOM model")
    demo.add_argument("files", nargs="+")
    demo.set_defaults(handler=command_random_demo)

    for sub in (transcribe, demo):
        sub.add_argument("--language", default="auto", choices=LANGUAGE_CHOICES)
        sub.add_argument("--itn", action="store_true",
                         help="inverse text normalisation: numerals and punctuation")
    transcribe.add_argument("--json", action="store_true",
                            help="one JSON object per file (raw, text, language, emotion, ...)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings()
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    threads = args.threads or settings.threads
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        return args.handler(args, settings)
    except SenseVoiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
