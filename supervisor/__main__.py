"""python -m supervisor [serve | status | transcribe FILE... | reload [PATH] [--force-fresh] | keygen DIR]

serve (the default) runs the service: the supervisor and its inference workers, on the model
in SENSEVOICE_MODEL_DIR (or ./model). status and reload talk to a running one.
Exit codes: 0 stopped cleanly, 1 could not start, 2 invalid settings, 4 the model did not load.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from sensevoice_core.logs import configure_logging
from sensevoice_core.settings import SettingsError, load_settings

EXIT_CANNOT_START = 1
EXIT_SETTINGS = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m supervisor")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the service (default)")
    status = commands.add_parser("status", help="print the running service's status as JSON")
    status.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to SECONDS for a model to be serving")
    transcribe = commands.add_parser("transcribe", help="transcribe files through the service")
    transcribe.add_argument("files", nargs="+", type=Path)
    transcribe.add_argument("--language", default="auto")
    transcribe.add_argument("--itn", action="store_true", help="numerals and punctuation")
    transcribe.add_argument("--format", choices=("text", "json", "srt", "vtt"), default="text",
                            help="json: one object per file with text and timed segments")
    transcribe.add_argument("--json", action="store_const", dest="format", const="json",
                            help="the same as --format json")
    transcribe.add_argument("--vad-threshold", type=float, metavar="P",
                            help="speech probability that splits long audio (0..1; default "
                                 "SENSEVOICE_VAD_THRESHOLD)")
    reload = commands.add_parser("reload", help="hot-reload the running service's model")
    reload.add_argument("path", nargs="?", help="model directory; default: the one serving")
    reload.add_argument("--force-fresh", action="store_true",
                        help="forget this model's cache entries and load from its files")
    keygen = commands.add_parser("keygen", help="write CURVE keys for a supervisor that listens "
                                                "off loopback (SENSEVOICE_CURVE_DIR)")
    keygen.add_argument("directory", type=Path)
    keygen.add_argument("--force", action="store_true",
                        help="replace existing keys (every client needs the new ones)")
    args = parser.parse_args(argv)
    if args.command == "keygen":
        from sensevoice_core.curve import CurveKeyError, generate_keys

        try:
            written = generate_keys(args.directory, args.force)
        except (CurveKeyError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        for path in written:
            print(path)
        return 0
    try:
        settings = load_settings()
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_SETTINGS
    if args.command in ("status", "reload", "transcribe"):
        return run_client_command(args, settings)
    configure_logging("supervisor", settings.log_level)
    from supervisor.supervisor import StartupError, Supervisor

    try:
        return Supervisor(settings).run()
    except (StartupError, SettingsError) as e:
        logging.getLogger("sensevoice.supervisor").error("Cannot start: %s", e)
        return EXIT_CANNOT_START


def run_client_command(args: argparse.Namespace, settings) -> int:
    from sensevoice_core.client import ServiceError, SupervisorClient

    try:
        client = SupervisorClient(settings=settings)
    except ServiceError as e:  # e.g. unreadable CURVE keys
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    try:
        if args.command == "status":
            print(wait_for_model(client, args.wait).model_dump_json(indent=2))
            return 0
        if args.command == "transcribe":
            return transcribe_files(client, args)
        outcome = client.hot_reload_model(args.path, args.force_fresh)
        print(json.dumps(outcome.model_dump(), indent=2))
        return 0 if outcome.ok else 1
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
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


def transcribe_files(client, args: argparse.Namespace) -> int:
    from sensevoice_core.client import ServiceError
    from sensevoice_core.errors import AudioError

    from sensevoice_core.subtitles import to_srt, to_vtt

    failed = 0
    for path in args.files:
        try:
            reply = client.transcribe(path, args.language, args.itn,
                                      vad_threshold=args.vad_threshold)
        except (AudioError, ServiceError) as e:
            failed += 1
            if args.format == "json":
                print(json.dumps({"file": str(path), "error": str(e)}))
            else:
                print(f"{path}: error: {e}", file=sys.stderr if args.format != "text" else None)
            continue
        if args.format == "json":
            print(json.dumps({"file": str(path), **reply.model_dump(exclude={"v", "kind"})},
                             ensure_ascii=False))
        elif args.format in ("srt", "vtt"):
            if len(args.files) > 1:
                print(f"==> {path} <==")
            print(to_srt(reply.segments) if args.format == "srt" else to_vtt(reply.segments))
        else:
            tags = " ".join(t for t in (reply.language, reply.emotion, reply.event) if t)
            print(f"{path}: {reply.text}  [{tags}; model {reply.fingerprint[:8]}]")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
