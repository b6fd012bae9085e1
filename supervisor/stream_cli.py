"""python -m supervisor stream FILE: play an audio file through the UI's /v1/realtime WebSocket
(OpenAI's Realtime transcription session) as if it were a microphone, and print what comes
back: the open turn's partial text (rewritten in place on a terminal, one line each
otherwise) and each final line with its times and tags.

The file is decoded here (any format the service reads: libsndfile, else FFmpeg through PyAV;
no torch) and resampled with FFmpeg's resampler to the 24 kHz 16-bit PCM a Realtime session
takes, then sent in CHUNK_S appends at real time, or --speed times it. At the end of the file
session.close has the open turn transcribed before the server closes.
Exit codes: 0 all of it transcribed, 1 the file could not be read, the UI could not be
reached, or the session failed (the reason on stderr), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO
from urllib.parse import urlsplit

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import ClientConnection, connect

from sensevoice_core.audio_stream import audio_file, open_decoder
from sensevoice_core.cli import language
from sensevoice_core.errors import AudioError
from sensevoice_core.exit_codes import EXIT_FAILED, EXIT_OK
from sensevoice_core.realtime_limits import MAX_AUDIO_SPEED
from sensevoice_core.settings import LOOPBACK_HOSTS, Settings

RATE = 24000  # OpenAI's audio/pcm
CHUNK_S = 0.1
DECODE_BLOCK_S = 1.0
CONNECT_TIMEOUT_S = 10.0
COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"


def speed(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number above 0 (1: real time), got "
                                         f"{text!r}")
    if value > MAX_AUDIO_SPEED:
        raise argparse.ArgumentTypeError(f"at most {MAX_AUDIO_SPEED:g} (the server refuses audio "
                                         f"sent faster than {MAX_AUDIO_SPEED:g}x real time), got "
                                         f"{text!r}")
    return value


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="an audio or video file (wav, flac, mp3, ogg, m4a, ...)")
    parser.add_argument("--url", help="the UI's realtime WebSocket; default: "
                                      "ws://127.0.0.1:SENSEVOICE_UI_PORT/v1/realtime")
    parser.add_argument("--speed", type=speed, default=1.0, metavar="N",
                        help=f"play N times faster than real time (default 1, at most "
                             f"{MAX_AUDIO_SPEED:g}: the server's limit)")
    parser.add_argument("--language", default="auto", type=language,
                        help="the language spoken (default auto)")


def default_url(settings: Settings) -> str:
    host = settings.ui_host.strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"ws://{host}:{settings.ui_port}/v1/realtime"


def session_url(url: str) -> str:
    """url with ?intent=transcription (added unless it has an intent)."""
    parts = urlsplit(url)
    if "intent=" in parts.query:
        return url
    return url + ("&" if parts.query else "?") + "intent=transcription"


def pcm_chunks(path: str) -> Iterator[bytes]:
    """The file as 24 kHz mono 16-bit PCM, CHUNK_S at a time; AudioError when it cannot be
    read."""
    import av  # here: `python -m supervisor serve` never needs PyAV

    step = round(CHUNK_S * RATE) * 2
    pending = b""
    with open_decoder(path, path) as decoder:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        block, first = round(DECODE_BLOCK_S * decoder.rate), 0
        while True:
            samples = decoder.read(first, block)
            first += samples.shape[0]
            frame = None
            if samples.shape[0]:
                frame = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(samples, np.float32)[None, :], format="fltp",
                    layout="mono")
                frame.sample_rate = decoder.rate
            for out in resampler.resample(frame):
                pending += out.to_ndarray().astype("<i2").tobytes()
            while len(pending) >= step:
                yield pending[:step]
                pending = pending[step:]
            if frame is None:
                break
    if pending:
        yield pending


@dataclass
class Printer:
    """Events as lines: finals for good, the partial on one line rewritten on a terminal."""

    out: TextIO
    tty: bool
    partial_shown: bool = False
    failed: str | None = None  # the first error's sentence
    closed: bool = False  # session.closed came

    def event(self, event: dict) -> None:
        kind = event.get("type")
        if kind == DELTA and event.get("partial", event.get("delta")):
            self.partial(str(event.get("partial", event.get("delta"))))
        elif kind == COMPLETED:
            self.clear_partial()
            tags = " ".join(str(event[t]) for t in ("language", "emotion", "event")
                            if event.get(t))
            line = (f"[{event.get('start', 0.0):.2f}–{event.get('end', 0.0):.2f} s] "
                    f"{event.get('transcript', '')}")
            print(line + (f"  ({tags})" if tags else ""), file=self.out, flush=True)
        elif kind == "conversation.item.input_audio_transcription.failed":
            self.clear_partial()
        elif kind == "error":
            self.clear_partial()
            message = event.get("error", {}).get("message", "unknown error")
            self.failed = self.failed or message
            print(f"error: {message}", file=sys.stderr, flush=True)
        elif kind == "session.closed":
            self.closed = True

    def partial(self, text: str) -> None:
        if not self.tty:
            print(f"… {text}", file=self.out, flush=True)
            return
        width = shutil.get_terminal_size().columns - 3
        shown = text if len(text) <= width else "…" + text[-(width - 1):]
        print(f"\r\x1b[K… {shown}", end="", file=self.out, flush=True)
        self.partial_shown = True

    def clear_partial(self) -> None:
        if self.partial_shown:
            print("\r\x1b[K", end="", file=self.out, flush=True)
            self.partial_shown = False


def receive(ws: ClientConnection, printer: Printer) -> None:
    try:
        for message in ws:
            try:
                printer.event(json.loads(message))
            except (ValueError, AttributeError):
                printer.failed = printer.failed or f"the server sent a message that is not an " \
                                                   f"event: {str(message)[:80]!r}"
    except ConnectionClosed:
        pass


def play(ws: ClientConnection, path: str, rate: float, language_code: str,
         printer: Printer) -> None:
    """Send the session's language, then the file at rate x real time, then session.close;
    an error from the server (a language it does not allow...) ends the session."""
    ws.send(json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {
        "input": {"format": {"type": "audio/pcm", "rate": RATE}, "transcription": {
            "language": None if language_code == "auto" else language_code}}}}}))
    start, sent_s = time.monotonic(), 0.0
    for chunk in pcm_chunks(path):
        if printer.failed is not None:
            ws.close()
            return
        wait = start + sent_s / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        ws.send(json.dumps({"type": "input_audio_buffer.append",
                            "audio": base64.b64encode(chunk).decode()}))
        sent_s += len(chunk) / 2 / RATE
    ws.send(json.dumps({"type": "session.close"}))


def run_stream(args: argparse.Namespace, settings: Settings) -> int:
    try:
        audio_file(args.file, args.file)  # no such file: said before connecting
    except AudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    url = session_url(args.url or default_url(settings))
    headers = {}
    if settings.admin_token is not None:  # the server's own error sentences
        headers["Authorization"] = f"Bearer {settings.admin_token.get_secret_value()}"
    try:
        ws = connect(url, open_timeout=CONNECT_TIMEOUT_S, additional_headers=headers,
                     max_size=None, legacy=True)
    except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as e:
        hint = "; is the UI running (python -m ui)?" if (urlsplit(url).hostname or "") in \
            (*LOOPBACK_HOSTS, "::1") else ""
        print(f"error: cannot open {url}: {e}{hint}", file=sys.stderr)
        return EXIT_FAILED
    printer = Printer(sys.stdout, sys.stdout.isatty())
    receiver = threading.Thread(target=receive, args=(ws, printer), daemon=True)
    receiver.start()
    try:
        play(ws, args.file, args.speed, args.language, printer)
    except AudioError as e:
        ws.close()
        receiver.join()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except ConnectionClosed:
        pass  # the server ended the session; the receiver has its reason
    except KeyboardInterrupt:
        ws.close()
        receiver.join()
        return EXIT_FAILED
    receiver.join()
    printer.clear_partial()
    if printer.failed is None and not printer.closed:
        code = ws.close_code
        printer.failed = f"the server closed the session ({code}: {ws.close_reason or 'no reason'})"
        print(f"error: {printer.failed}", file=sys.stderr)
    return EXIT_OK if printer.failed is None else EXIT_FAILED
