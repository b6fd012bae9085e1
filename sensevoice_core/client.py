"""Talk to a running supervisor: transcribe, status, hot reload. No torch, no model here.

    from sensevoice_core.client import transcribe, status, hot_reload_model
    reply = transcribe("clip.flac", language="en", use_itn=True)
    print(reply.text, reply.fingerprint)
    outcome = hot_reload_model()            # the same model, through L2
    outcome = hot_reload_model("/models/b") # another model, for an A/B test
    reply = SupervisorClient().transcribe("long.flac", on_progress=lambda p: print(p.done))

The address comes from SENSEVOICE_SUPERVISOR_ADDRESS (default ipc://<cache_dir>/supervisor.ipc).
Safe to share between threads: each request checks a socket out of a small pool and returns
it after the reply; a request that times out closes its socket instead (Lazy Pirate), so a late
reply can never be mistaken for the next one, and sockets never outnumber concurrent requests.
A supervisor that is not there, or dies while a request waits, is an "unavailable" error within
a few seconds, never a silent wait.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import parse_monitor_message

from sensevoice_core.audio_stream import audio_file
from sensevoice_core.curve import ClientKeys, CurveKeyError
from sensevoice_core.errors import (  # noqa: F401 - ServiceError: clients catch it from here
    REQUEST_AUDIO,
    AudioError,
    ServiceError,
    ServiceUnavailableError,
)
from sensevoice_core.protocol import (
    STATUS_TIMEOUT_S,
    ErrorReply,
    Progress,
    ProtocolError,
    ReloadOutcome,
    ReloadReply,
    ReloadRequest,
    ServiceStatus,
    StatusReply,
    StatusRequest,
    TranscribeReply,
    TranscribeRequest,
    decode_reply,
    encode,
)
from sensevoice_core.settings import (
    LOOPBACK_HOSTS,
    MiB,
    Settings,
    load_settings,
    tcp_host,
)

REPLY_MARGIN_S = 10.0  # on top of the server-side timeouts, for transfer
CONNECT_TIMEOUT_S = 3.0  # a supervisor completes the ZeroMQ handshake well within this
LOST_REPLY_GRACE_S = 0.5  # after a lost connection: how long a reply already sent may take to land
HEARTBEAT_IVL_MS = 1000  # ZMTP pings on each connection...
HEARTBEAT_TIMEOUT_MS = 3000  # ...and a connection with no answer this long is dropped
REMOTE_HEARTBEAT_TIMEOUT_MS = 30_000  # off loopback (tcp with CURVE)
MAX_IDLE_SOCKETS = 16  # sockets kept for reuse; more concurrent requests open (and close) more


class SupervisorClient:
    def __init__(self, address: str | None = None, settings: Settings | None = None):
        self.settings = settings or load_settings()
        self.address = address or self.settings.client_address()
        self._context = zmq.Context.instance()
        keys = self.settings.curve_keys(self.address)
        try:
            self._curve = keys.client() if keys is not None else None
        except CurveKeyError as e:
            raise ServiceError("bad_request", str(e)) from None
        self._idle: list[_Connection] = []
        self._generation = 0  # close() bumps it; sockets of an older one are not reused
        self._lock = threading.Lock()

    def transcribe(self, audio: Any, language: str = "auto", use_itn: bool = False,
                   sample_rate: int = 16000, timeout: float | None = None,
                   vad_threshold: float | None = None,
                   filename: str | None = None, word_timestamps: bool = False,
                   languages: Sequence[str] | None = None,
                   on_progress: Callable[[Progress], None] | None = None) -> TranscribeReply:
        """audio: a path, the bytes of an audio file, or a 1-D float array at sample_rate.

        Audio longer than SENSEVOICE_MAX_SEGMENT_S is split at pauses (VAD, vad_threshold or
        SENSEVOICE_VAD_THRESHOLD); the reply's segments carry each part's times and tags.
        filename names the audio in error messages (a path's own name by default).
        word_timestamps: each segment's words and tokens, timed. languages: what auto
        language ID may choose (None: SENSEVOICE_LANGUAGES of the service; []: any).
        on_progress: called on this thread with each Progress before the reply: (0, total)
        once the service's VAD has found the segments, then each segment as it is decoded,
        in time order. An exception it raises ends the wait and propagates; the service
        still finishes the request (there is no cancel), and its reply is never read.
        """
        request, payload = transcribe_request(
            audio, self.settings, language, use_itn, sample_rate, vad_threshold, filename,
            word_timestamps, languages, progress=on_progress is not None)
        limit = reply_limit(self.settings, timeout)
        reply = self.request(request, payload, limit, on_progress)
        assert isinstance(reply, TranscribeReply)
        return reply

    def status(self, timeout: float = STATUS_TIMEOUT_S) -> ServiceStatus:
        reply = self.request(StatusRequest(), None, timeout)
        assert isinstance(reply, StatusReply)
        return reply.status

    def hot_reload_model(self, path: str | Path | None = None, force_fresh: bool = False,
                         timeout: float | None = None) -> ReloadOutcome:
        absolute = str(Path(path).expanduser().resolve()) if path is not None else None
        return self.reload(ReloadRequest(path=absolute, force_fresh=force_fresh), timeout)

    def reload(self, request: ReloadRequest, timeout: float | None = None) -> ReloadOutcome:
        # A reload may wait for one already under way, then take its own hotreload_timeout.
        limit = timeout if timeout is not None else (
            2 * self.settings.hotreload_timeout + REPLY_MARGIN_S)
        reply = self.request(request, None, limit)
        assert isinstance(reply, ReloadReply)
        return reply.outcome

    def request(self, message: TranscribeRequest | ReloadRequest | StatusRequest,
                payload: bytes | None, timeout: float,
                on_progress: Callable[[Progress], None] | None = None):
        """Send one request and wait for its reply; ServiceError for an error reply.
        on_progress gets the request's Progress messages that come before it.

        Fails with "unavailable" within CONNECT_TIMEOUT_S when no supervisor completes the
        ZeroMQ handshake (none started, or a stale ipc file of a killed one), and as soon as
        the connection drops while waiting (the supervisor died or stopped: its requests are
        lost with it, so waiting longer could never bring their replies).
        """
        if self.address.startswith("ipc://") and not Path(self.address[6:]).exists():
            raise ServiceUnavailableError(f"no supervisor at {self.address}; start the service "
                                          f"with `python -m supervisor`")
        connection, generation = self._checkout()
        try:
            connection.socket.send_multipart(encode(message, payload), copy=False)
            reply = self._wait_for_reply(connection, message.request_id, timeout, on_progress)
            self._checkin(connection, generation)
            connection = None
        finally:
            if connection is not None:  # timed out or failed: its late reply must never be read
                connection.close()
        if isinstance(reply, ErrorReply):
            raise ServiceError(reply.code, reply.message)
        return reply

    def _wait_for_reply(self, connection: _Connection, request_id: str, timeout: float,
                        on_progress: Callable[[Progress], None] | None = None):
        poller = zmq.Poller()
        poller.register(connection.socket, zmq.POLLIN)
        poller.register(connection.monitor, zmq.POLLIN)
        start = time.monotonic()
        deadline, connect_deadline = start + timeout, start + CONNECT_TIMEOUT_S
        while (now := time.monotonic()) < deadline:
            if not connection.connected and now >= connect_deadline:
                raise ServiceUnavailableError(
                    f"no supervisor answers at {self.address} (nothing completed the connection "
                    f"within {CONNECT_TIMEOUT_S:g} s); start the service with `python -m "
                    f"supervisor`, or check SENSEVOICE_SUPERVISOR_ADDRESS and the CURVE keys")
            limit = deadline if connection.connected else min(deadline, connect_deadline)
            poller.poll(max(0.0, limit - now) * 1000)
            # The socket first: a reply that arrived just before the connection closed (a
            # supervisor that answered, then stopped) is still this request's answer.
            if (reply := self._read_reply(connection, request_id, on_progress)) is not None:
                return reply
            connection.update()
            # The monitor's disconnect event and the last reply reach this thread apart: a
            # reply the peer sent before closing may still be on its way to the socket.
            if connection.lost and connection.socket.poll(LOST_REPLY_GRACE_S * 1000):
                if (reply := self._read_reply(connection, request_id, on_progress)) is not None:
                    return reply
            if connection.lost:
                raise ServiceUnavailableError(
                    f"the supervisor at {self.address} went away or closed the connection "
                    f"before answering (it stopped or died, or the request was over its "
                    f"SENSEVOICE_MAX_REQUEST_MB); the request was not completed")
        raise ServiceUnavailableError(f"no reply from the supervisor at {self.address} within "
                                      f"{timeout:g} s")

    @staticmethod
    def _read_reply(connection: _Connection, request_id: str,
                    on_progress: Callable[[Progress], None] | None = None):
        """This request's reply if one is waiting; replies to older requests are dropped, and
        its Progress messages go to on_progress on the way."""
        while True:
            try:
                frames = connection.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return None
            try:
                reply = decode_reply(frames)
            except ProtocolError as e:
                raise ServiceError("internal", f"the supervisor's reply could not be read "
                                               f"({e})") from None
            if isinstance(reply, Progress):
                if reply.request_id == request_id and on_progress is not None:
                    on_progress(reply)
            elif reply.request_id in (request_id, None):
                return reply

    def __enter__(self) -> SupervisorClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close idle sockets; sockets in use close when their request ends."""
        with self._lock:
            self._generation += 1
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _checkout(self) -> tuple[_Connection, int]:
        with self._lock:
            generation = self._generation
            while self._idle:
                connection = self._idle.pop()
                connection.update()
                if connection.connected and not connection.lost:
                    return connection, generation
                connection.close()  # its supervisor went away while it sat in the pool
        return _Connection(self._context, self.address, self._curve), generation

    def _checkin(self, connection: _Connection, generation: int) -> None:
        with self._lock:
            if generation == self._generation and len(self._idle) < MAX_IDLE_SOCKETS:
                self._idle.append(connection)
                return
        connection.close()


class _Connection:
    """A DEALER socket, and a monitor of it that tells whether a supervisor is on the other end.

    ZeroMQ heartbeats (ZMTP PING) run on the connection, answered by the supervisor's I/O
    thread, so a supervisor that is killed or stopped shows up as a disconnect within
    HEARTBEAT_TIMEOUT_MS, even in the middle of a long request.
    """

    def __init__(self, context: zmq.Context, address: str, curve: ClientKeys | None):
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        # A heartbeat is answered only after the message before it has arrived whole: over a
        # slow network link a large reply takes longer than a local one ever does.
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS
                               if tcp_host(address) in ("", *LOOPBACK_HOSTS)
                               else REMOTE_HEARTBEAT_TIMEOUT_MS)
        if curve is not None:
            curve.apply(self.socket)
        self.monitor = self.socket.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self.connected = False  # a supervisor completed the handshake
        self.lost = False  # and the connection dropped afterwards
        self.socket.connect(address)

    def update(self) -> None:
        while True:
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
            elif event == zmq.EVENT_DISCONNECTED:
                self.lost = self.lost or self.connected
                self.connected = False

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close(linger=0)
        self.socket.close(linger=0)


def transcribe_request(audio: Any, settings: Settings, language: str = "auto",
                       use_itn: bool = False, sample_rate: int = 16000,
                       vad_threshold: float | None = None, filename: str | None = None,
                       word_timestamps: bool = False, languages: Sequence[str] | None = None,
                       progress: bool = False) -> tuple[TranscribeRequest, bytes]:
    """The request and its payload for transcribe()'s arguments (any client of the service:
    this one, the cluster's FleetClient); ServiceError("too_large") past
    SENSEVOICE_MAX_REQUEST_MB."""
    if filename is None and isinstance(audio, (str, Path)):
        filename = Path(audio).name
    audio_format, payload = _encode_audio(audio, filename)
    if len(payload) > settings.max_request_bytes:
        raise ServiceError("too_large", f"the audio is {len(payload) / MiB:.1f} MiB; at most "
                                        f"{settings.max_request_mb:g} MiB "
                                        f"(SENSEVOICE_MAX_REQUEST_MB)")
    request = TranscribeRequest(language=language, use_itn=use_itn,
                                audio_format=audio_format, sample_rate=sample_rate,
                                vad_threshold=vad_threshold,
                                filename=filename[:255] if filename else None,
                                word_timestamps=word_timestamps,
                                languages=None if languages is None else list(languages),
                                progress=progress)
    return request, payload


def reply_limit(settings: Settings, timeout: float | None) -> float:
    """How long a transcription's caller waits: the service may queue a request for
    request_timeout, run it for as long, and retry it once on another worker if the first
    one dies, so it always answers within 3x."""
    return timeout if timeout is not None else 3 * settings.request_timeout + REPLY_MARGIN_S


def _encode_audio(audio: Any, filename: str | None) -> tuple[str, bytes]:
    if isinstance(audio, (str, Path)):
        path = audio_file(audio, str(audio))  # the library's own checks and words
        try:
            return "file", path.read_bytes()
        except OSError as e:
            raise AudioError(str(audio), f"cannot read the file: {e.strerror or e}") from None
    if isinstance(audio, (bytes, bytearray, memoryview)):
        return "file", bytes(audio)
    samples = np.asarray(audio, dtype=np.float32)
    if samples.ndim != 1:
        raise AudioError(filename or REQUEST_AUDIO,
                         f"expected mono samples (a 1-D array), found {samples.ndim}-D")
    return "pcm_f32le", samples.astype("<f4", copy=False).tobytes()


@functools.lru_cache(maxsize=1)
def default_client() -> SupervisorClient:
    """One client per process, addressed by SENSEVOICE_* settings."""
    return SupervisorClient()


def transcribe(audio: Any, language: str = "auto", use_itn: bool = False,
               sample_rate: int = 16000) -> TranscribeReply:
    """Transcribe through the running service; the reply carries the serving fingerprint."""
    return default_client().transcribe(audio, language, use_itn, sample_rate)


def status() -> ServiceStatus:
    """Model path, fingerprint, cache level, load time, workers, in-flight count, last reload."""
    return default_client().status()


def hot_reload_model(path: str | Path | None = None, force_fresh: bool = False) -> ReloadOutcome:
    """Ask the running service to reload: the same model (path=None) or another directory.

    The old model keeps serving until the new one has loaded (from the L2 snapshot when
    it can) and passed its health check. force_fresh forgets that model's cache entries
    first. Returns the outcome (ok, old/new fingerprint, seconds, cache level, error);
    raises ServiceError when the request is refused (path outside SENSEVOICE_MODEL_ROOTS).
    """
    return default_client().hot_reload_model(path, force_fresh)
