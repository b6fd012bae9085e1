"""What every command line of this project shares: settings, and transcribing files.

``python -m sensevoice_core transcribe`` (in this process) and ``python -m supervisor
transcribe`` (through the service) take the same arguments and print the same lines for the
same audio. With ``--format json`` that is one object per file, in input order:
``{"file": ..., **Result}``, or ``{"file": ..., "error": ...}`` for a file that failed.
No torch here: the supervisor's command line imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from sensevoice_core.errors import SenseVoiceError, ServiceError
from sensevoice_core.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from sensevoice_core.result import Result
from sensevoice_core.segmentation import THRESHOLD_BOUNDS
from sensevoice_core.settings import Settings, SettingsError, load_settings
from sensevoice_core.subtitles import to_srt, to_vtt
from sensevoice_core.vocab import language_choices_text, language_of

FORMATS = ("text", "json", "srt", "vtt")
AUDIO_FILES = "audio or video files (wav, flac, mp3, ogg, opus, webm, m4a, mp4, mpeg)"


def settings_or_exit(exit_code: int = EXIT_USAGE,
                     check: Callable[[Settings], object] | None = None) -> Settings:
    """This process's settings; an invalid one is a line on stderr and exit_code.

    check: a further look at them that may raise SettingsError (the UI's supervisor address).
    """
    try:
        settings = load_settings()
        if check is not None:
            check(settings)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(exit_code) from None
    return settings


def probability(text: str) -> float:
    """--vad-threshold: a number within the VAD threshold's bounds."""
    try:
        value = float(text)
        THRESHOLD_BOUNDS.check("threshold", value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {THRESHOLD_BOUNDS.describe()}, got {text!r}") from None
    return value


def language(text: str) -> str:
    """--language: a code or a name in any case ("en", "English"), as its code ("en")."""
    try:
        return language_of(text).value
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_transcribe_arguments(parser: argparse.ArgumentParser,
                             default_format: str = "text") -> None:
    parser.add_argument("files", nargs="+", help=AUDIO_FILES)
    parser.add_argument("--language", default="auto", type=language,
                        metavar="LANG",
                        help=f"the language spoken: {language_choices_text()}, in any case "
                             f"(default: %(default)s, the model decides)")
    parser.add_argument("--itn", action="store_true",
                        help="inverse text normalisation: numerals and punctuation")
    parser.add_argument("--vad-threshold", type=probability, metavar="P",
                        help=f"speech probability that splits long audio "
                             f"({THRESHOLD_BOUNDS.low:g}..{THRESHOLD_BOUNDS.high:g}; default "
                             f"SENSEVOICE_VAD_THRESHOLD)")
    parser.add_argument("--format", choices=FORMATS, default=default_format,
                        help="text: the transcript, after the file's name and a tab when "
                             "there are several files; json: one object per file with tags, "
                             "token ids and timed segments; srt, vtt: subtitles (default: "
                             "%(default)s)")
    parser.add_argument("--json", action="store_const", dest="format", const="json",
                        help="the same as --format json")


def transcribe_files(files: Sequence[str], transcribe: Callable[[str], Result],
                     output_format: str) -> int:
    """Transcribe each file in input order, printing each as it is done. A file that fails
    is reported in its place and the others still run; EXIT_FAILED if any failed."""
    failed = False
    for file in files:
        try:
            result = transcribe(file)
        except SenseVoiceError as e:
            failed = True
            if output_format == "json":
                print(json.dumps({"file": file, "error": error_text(e)}, ensure_ascii=False),
                      flush=True)
            else:
                print(f"error: {error_text(e)}", file=sys.stderr)
            continue
        print(render(file, result, output_format, several=len(files) > 1), flush=True)
    return EXIT_FAILED if failed else EXIT_OK


def render(file: str, result: Result, output_format: str, several: bool) -> str:
    if output_format == "json":
        return json.dumps({"file": file, **result.model_dump(mode="json")}, ensure_ascii=False)
    if output_format == "text":
        return f"{file}\t{result.rich_text}" if several else result.rich_text
    document = to_srt(result.segments) if output_format == "srt" else to_vtt(result.segments)
    return f"==> {file} <==\n{document}" if several else document


def error_text(error: SenseVoiceError) -> str:
    # A ServiceError's str() leads with its code ("bad_audio: ..."); its message is the
    # sentence the library raises for the same file, so both command lines print one line.
    return error.message if isinstance(error, ServiceError) else str(error)
