"""python -m supervisor [serve | status | transcribe FILE... | stream FILE | reload [PATH]
                      [--force-fresh] | keygen DIR]

serve (the default) runs the service: the supervisor and its inference workers, on the model
in SENSEVOICE_MODEL_DIR (or ./model). status, transcribe and reload talk to a running one;
transcribe prints what `python -m sensevoice_core transcribe` prints (sensevoice_core.cli).
stream plays a file through the UI's /v1/realtime WebSocket (supervisor.stream_cli).
Exit codes (sensevoice_core.exit_codes): 0 stopped cleanly, 1 could not start, 2 invalid
settings, 4 the model did not load.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sensevoice_core.cli import (
    add_transcribe_arguments,
    check_transcribe_arguments,
    settings_or_exit,
    subtitle_options,
    transcribe_files,
    transcribe_options_or_exit,
)
from sensevoice_core.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from sensevoice_core.logs import configure_logging
from sensevoice_core.result import Result
from sensevoice_core.settings import SettingsError
from supervisor.stream_cli import add_stream_arguments, run_stream

if TYPE_CHECKING:  # long_audio imports torch, which the supervisor never does
    from sensevoice_core.long_audio import ProgressCallback


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m supervisor")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the service (default)")
    status = commands.add_parser("status", help="print the running service's status as JSON")
    status.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to SECONDS for a model to be serving")
    add_transcribe_arguments(commands.add_parser("transcribe",
                                                 help="transcribe files through the service"))
    reload = commands.add_parser("reload", help="hot-reload the running service's model")
    reload.add_argument("path", nargs="?", help="model directory; default: the one serving")
    reload.add_argument("--force-fresh", action="store_true",
                        help="forget this model's cache entries and load from its files")
    keygen = commands.add_parser("keygen", help="write CURVE keys for a supervisor that listens "
                                                "off loopback (SENSEVOICE_CURVE_DIR)")
    keygen.add_argument("directory", type=Path)
    keygen.add_argument("--force", action="store_true",
                        help="replace existing keys (every client needs the new ones)")
    add_stream_arguments(commands.add_parser(
        "stream", help="play an audio file through the UI's realtime WebSocket as if live, "
                       "printing partial and final transcripts"))
    args = parser.parse_args(argv)
    if args.command == "transcribe":
        check_transcribe_arguments(args)
    if args.command == "keygen":
        from sensevoice_core.curve import CurveKeyError, generate_keys

        try:
            written = generate_keys(args.directory, args.force)
        except (CurveKeyError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_FAILED
        for path in written:
            print(path)
        return EXIT_OK
    settings = settings_or_exit()
    if args.command == "stream":
        return run_stream(args, settings)
    if args.command in ("status", "reload", "transcribe"):
        return run_client_command(args, settings)
    configure_logging("supervisor", settings.log_level)
    canary = None
    if settings.reload_canary_dir is not None:  # now, not at the first reload
        from sensevoice_core.canary import CanaryError, check_canary_dir

        log = logging.getLogger("sensevoice.supervisor")
        try:
            canary = check_canary_dir(settings.reload_canary_dir, settings.languages)
            log.info("Reload canary: %s, max CER %g", canary.line(),
                     settings.reload_canary_max_cer)
            if warning := canary.timeout_warning(settings.hotreload_timeout):
                log.warning("Reload canary: %s", warning)
        except CanaryError as e:
            log.error("Cannot start: SENSEVOICE_RELOAD_CANARY_DIR: %s", e)
            return EXIT_USAGE
    from supervisor.supervisor import StartupError, Supervisor

    try:
        return Supervisor(settings, canary).run()
    except (StartupError, SettingsError) as e:
        logging.getLogger("sensevoice.supervisor").error("Cannot start: %s", e)
        return EXIT_FAILED


def run_client_command(args: argparse.Namespace, settings) -> int:
    from sensevoice_core.client import ServiceError, SupervisorClient

    try:
        client = SupervisorClient(settings=settings)
    except ServiceError as e:  # e.g. unreadable CURVE keys
        print(f"error: {e.message}", file=sys.stderr)
        return EXIT_FAILED
    try:
        if args.command == "status":
            print(wait_for_model(client, args.wait).model_dump_json(indent=2))
            return EXIT_OK
        if args.command == "transcribe":
            options = transcribe_options_or_exit(args, settings)

            def through_service(file: str, progress: ProgressCallback | None) -> Result:
                # Named as given, so that errors read as the in-process command line's do.
                # languages: None leaves the service's own SENSEVOICE_LANGUAGES in force.
                return client.transcribe(
                    file, args.language, args.itn, vad_threshold=args.vad_threshold,
                    filename=file, word_timestamps=options.word_timestamps,
                    languages=args.languages,
                    on_progress=None if progress is None else
                    lambda step: progress(step.done, step.total, step.segment)).result()

            return transcribe_files(args.files, through_service, args.format,
                                    subtitle_options(args, settings),
                                    show_progress=not args.quiet)
        outcome = client.hot_reload_model(args.path, args.force_fresh)
        print(json.dumps(outcome.model_dump(), indent=2))
        return EXIT_OK if outcome.ok else EXIT_FAILED
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        client.close()


def wait_for_model(client, seconds: float):
    from sensevoice_core.client import ServiceError

    deadline = time.monotonic() + seconds
    while True:
        try:
            status = client.status()
            if status.model is not None or time.monotonic() >= deadline:
                return status
        except ServiceError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
