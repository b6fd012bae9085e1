"""What every command line of this project shares: settings, and transcribing files.

``python -m sensevoice_core transcribe`` (in this process) and ``python -m supervisor
transcribe`` (through the service) take the same arguments and print the same lines for the
same audio. With ``--format json`` that is one object per file, in input order:
``{"file": ..., **Result}``, or ``{"file": ..., "error": ...}`` for a file that failed; with
``--word-timestamps`` each segment carries its words and tokens. srt and vtt ask the model for
word times themselves: cues are cut from them. A file of more than one segment shows its
progress on stderr (``ProgressLine``) when that is a terminal, unless ``--quiet``; stdout is the
same either way. No torch here: the supervisor's command line imports it.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import socket
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TextIO

from sensevoice_core.errors import SenseVoiceError, ServiceError
from sensevoice_core.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from sensevoice_core.options import TranscribeOptions
from sensevoice_core.result import Result, Segment
from sensevoice_core.segmentation import THRESHOLD_BOUNDS
from sensevoice_core.settings import Settings, SettingsError, load_settings
from sensevoice_core.subtitles import (
    LINE_LIMIT_BOUNDS,
    SubtitleOptions,
    check_line_limit,
    to_srt,
    to_vtt,
)
from sensevoice_core.vocab import language_choices_text, language_of, languages_of

if TYPE_CHECKING:  # long_audio imports torch
    from sensevoice_core.long_audio import ProgressCallback

FORMATS = ("text", "json", "srt", "vtt")
AUDIO_FILES = "audio or video files (wav, flac, mp3, ogg, opus, webm, m4a, mp4, mpeg)"
BAR_WIDTH = 24  # characters of the progress bar itself


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


def language_list(text: str) -> tuple[str, ...]:
    """--languages: "zh,en" or "Chinese,english" as codes; "" allows any language."""
    try:
        return tuple(lang.value for lang in languages_of(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def line_limit(text: str) -> int:
    """--max-line-width, --max-line-count: a whole number within the subtitles' bounds."""
    try:
        value = int(text)
        check_line_limit("limit", value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number from {LINE_LIMIT_BOUNDS.low:g} to "
            f"{LINE_LIMIT_BOUNDS.high:g}, got {text!r}") from None
    return value


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
    parser.add_argument("--word-timestamps", action="store_true",
                        help="time each word and token (json: each segment's words and "
                             "tokens; srt and vtt always do)")
    parser.add_argument("--languages", type=language_list, metavar="LANGS",
                        help="comma-separated languages auto-detection may choose from "
                             "(zh,en), codes or names in any case; '' allows any (default: "
                             "SENSEVOICE_LANGUAGES)")
    parser.add_argument("--max-line-width", type=line_limit, metavar="N",
                        help="srt, vtt: characters per line (default: "
                             "SENSEVOICE_SUBTITLE_MAX_LINE_WIDTH)")
    parser.add_argument("--max-line-count", type=line_limit, metavar="N",
                        help="srt, vtt: lines per cue (default: "
                             "SENSEVOICE_SUBTITLE_MAX_LINE_COUNT)")
    parser.add_argument("--karaoke", action="store_true",
                        help="with --format vtt: each word timed inside its cue")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bar on stderr (it is shown only on a terminal, for a "
                             "file of more than one segment)")
    # The checks that need several arguments at once (after parsing) report through it.
    parser.set_defaults(usage_error=parser.error)


def check_transcribe_arguments(args: argparse.Namespace) -> None:
    """Usage errors no single argument shows: exit 2 with the command's usage line."""
    if args.karaoke and args.format != "vtt":
        args.usage_error(f"--karaoke times words inside WebVTT cues: it needs --format vtt, "
                         f"not --format {args.format}")
    if args.languages and args.language != "auto" and args.language not in args.languages:
        args.usage_error(f"--language {args.language} is not among --languages "
                         f"{','.join(args.languages)}")


def transcribe_options_or_exit(args: argparse.Namespace, settings: Settings) -> TranscribeOptions:
    """The options the arguments ask for, with srt and vtt asking for word times; a
    contradiction with the settings (--language outside SENSEVOICE_LANGUAGES) is a line on
    stderr and EXIT_USAGE."""
    try:
        return settings.transcribe_options(
            args.language, args.itn, args.vad_threshold,
            word_timestamps=args.word_timestamps or args.format in ("srt", "vtt"),
            languages=args.languages)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def subtitle_options(args: argparse.Namespace, settings: Settings) -> SubtitleOptions:
    return settings.subtitle_options(args.max_line_width, args.max_line_count, args.karaoke)


class ProgressLine:
    """One file's progress, rewritten in place on one line of a terminal: a bar, the segments
    done of the total, and the audio time transcribed so far (the end of the last segment;
    segments finish in time order). Shown only for a file of more than one segment."""

    def __init__(self, label: str, stream: TextIO):
        self.label = label
        self.stream = stream
        self.seconds = 0.0
        self.shown = False

    def __call__(self, done: int, total: int, segment: Segment | None) -> None:
        if total <= 1:
            return
        if segment is not None:
            self.seconds = segment.end
        filled = BAR_WIDTH * done // total
        status = (f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total} segments, "
                  f"{self.seconds:.1f} s of audio")
        width = terminal_width(self.stream) - 1  # the cursor stays on this line
        room = width - len(status) - 1  # a long path loses its start, not the counts
        label = self.label if len(self.label) <= room else \
            ("…" + self.label[len(self.label) - room + 1:] if room > 1 else "")
        line = f"{label} {status}" if label else status
        self.stream.write(f"\r{line[:max(width, 1)]}\x1b[K")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def terminal_width(stream: TextIO) -> int:
    """The columns of the terminal stream writes to (stdout may be a pipe meanwhile)."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        columns = 0
    return columns or shutil.get_terminal_size().columns  # 0: a terminal that does not say


def transcribe_files(files: Sequence[str],
                     transcribe: Callable[[str, ProgressCallback | None], Result],
                     output_format: str, subtitles: SubtitleOptions | None = None,
                     show_progress: bool = False) -> int:
    """Transcribe each file in input order, printing each as it is done. A file that fails
    is reported in its place and the others still run; EXIT_FAILED if any failed.
    show_progress: a ProgressLine on stderr while each file runs, when stderr is a terminal;
    transcribe gets it (None otherwise)."""
    failed = False
    show_progress = show_progress and sys.stderr.isatty()
    for file in files:
        line = ProgressLine(file, sys.stderr) if show_progress else None
        try:
            try:
                result = transcribe(file, line)
            finally:  # before any error line, which would otherwise follow the bar
                if line is not None:
                    line.clear()
        except SenseVoiceError as e:
            failed = True
            if output_format == "json":
                print(json.dumps({"file": file, "error": error_text(e)}, ensure_ascii=False),
                      flush=True)
            else:
                print(f"error: {error_text(e)}", file=sys.stderr)
            continue
        print(render(file, result, output_format, several=len(files) > 1,
                     subtitles=subtitles or SubtitleOptions()), flush=True)
    return EXIT_FAILED if failed else EXIT_OK


def render(file: str, result: Result, output_format: str, several: bool,
           subtitles: SubtitleOptions) -> str:
    if output_format == "json":
        return json.dumps({"file": file, **result.model_dump(mode="json")}, ensure_ascii=False)
    if output_format == "text":
        return f"{file}\t{result.rich_text}" if several else result.rich_text
    write = to_srt if output_format == "srt" else to_vtt
    document = write(result.segments, subtitles)
    return f"==> {file} <==\n{document}" if several else document


def error_text(error: SenseVoiceError) -> str:
    # A ServiceError's str() leads with its code ("bad_audio: ..."); its message is the
    # sentence the library raises for the same file, so both command lines print one line.
    return error.message if isinstance(error, ServiceError) else str(error)


def bind_problem(host: str, port: int, setting: str) -> str | None:
    """Why a server could not listen on host:port (in use, not a local address, unknown), or
    None. setting: the prefix of the settings that name them (SENSEVOICE_UI: _HOST, _PORT)."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host.strip("[]"), port,
                                                         type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        return f"cannot resolve {host}: {e.strerror}; set {setting}_HOST"
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return f"{host}:{port} is in use; stop what listens there or set {setting}_PORT"
            return f"cannot listen on {host}:{port}: {e.strerror}; set {setting}_HOST"
    return None
