"""Command line: ``python -m sensevoice_core {transcribe,doctor,convert,random-demo} ...``.

transcribe runs the model in this process, on the same path as the service's workers, and
prints what ``python -m supervisor transcribe`` prints (sensevoice_core.cli).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from sensevoice_core.cache import load_model
from sensevoice_core.cli import (
    add_transcribe_arguments,
    check_transcribe_arguments,
    settings_or_exit,
    subtitle_options,
    transcribe_files,
    transcribe_options_or_exit,
)
from sensevoice_core.doctor import first_problem, run_checks
from sensevoice_core.errors import SenseVoiceError
from sensevoice_core.exit_codes import EXIT_FAILED, EXIT_OK
from sensevoice_core.loader import load_model_dir
from sensevoice_core.options import TranscribeOptions
from sensevoice_core.pipeline import SenseVoice
from sensevoice_core.settings import Settings


def transcribe_with(model: SenseVoice, options: TranscribeOptions, args: argparse.Namespace,
                    settings: Settings) -> int:
    return transcribe_files(
        args.files,
        lambda file, progress: model.transcribe(file, options, source_name=file,
                                                progress=progress),
        args.format, subtitle_options(args, settings), show_progress=not args.quiet)


def command_transcribe(args: argparse.Namespace, settings: Settings) -> int:
    options = transcribe_options_or_exit(args, settings)  # before the model loads
    model = load_model(args.model, device=args.device, settings=settings)
    return transcribe_with(model, options, args, settings)


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
    from sensevoice_core.hf import (
        convert_official_to_hf,  # transformers is slow to import
    )

    target = convert_official_to_hf(args.source, args.target)
    print(f"wrote {target.resolve()} (config.json, model.safetensors, tokenizer.model, am.mvn)")
    return EXIT_OK


def command_random_demo(args: argparse.Namespace, settings: Settings) -> int:
    from sensevoice_core.random_model import write_random_model

    options = transcribe_options_or_exit(args, settings)
    print("NOTE: this model has RANDOM weights; it shows the pipeline runs end to end, "
          "and its output is noise.", file=sys.stderr)
    with tempfile.TemporaryDirectory() as scratch:
        # A throwaway model: nothing about it is worth keeping in the cache. Its seed is one
        # whose noise is not the <|nospeech|> tag, which would leave every result empty.
        model = load_model_dir(write_random_model(Path(scratch) / "random-model", seed=4))
        return transcribe_with(model, options, args, settings)


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
    transcribe.add_argument("--device", help="torch device (default: SENSEVOICE_DEVICE or cpu)")
    add_transcribe_arguments(transcribe)
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
    add_transcribe_arguments(demo, default_format="json")
    demo.set_defaults(handler=command_random_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("transcribe", "random-demo"):
        check_transcribe_arguments(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = settings_or_exit()
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
