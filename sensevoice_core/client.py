"""Talk to a running supervisor: transcribe, status, hot reload. No torch, no model here.

    from sensevoice_core.client import transcribe, status, hot_reload_model
    reply = transcribe("clip.flac", language="en", use_itn=True)
    print(reply.text, reply.fingerprint)
    outcome = hot_reload_model()            # the same model, through L2
    outcome = hot_reload_model("/models/b") # another model, for an A/B test

The address comes from SENSEVOICE_SUPERVISOR_ADDRESS (default ipc://<cache_dir>/supervisor.ipc).
Each thread gets its own socket; a request that times out drops its socket (Lazy Pirate), so
a late reply can never be mistaken for the next one.
"""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from sensevoice_core.errors import AudioError, SenseVoiceError
from sensevoice_core.protocol import (
    STATUS_TIMEOUT_S,
    ErrorReply,
    ReloadOutcome,
    ReloadReply,
    ReloadRequest,
    ServiceStatus,
    StatusReply,
    StatusRequest,
    TranscribeReply,
    TranscribeRequest,
    ProtocolError,
    decode_reply,
    encode,
)
from sensevoice_core.settings import Settings, load_settings

REPLY_MARGIN_S = 10.0  # on top of the server-side timeouts, for queueing and transfer


class ServiceError(SenseVoiceError):
    """The supervisor answered with an error (code as in protocol.ErrorCode)."""

    def __init__(self, code: str, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


class ServiceUnavailableError(ServiceError):
    """No supervisor answered at the address."""

    def __init__(self, message: str):
        super().__init__("unavailable", message)


class SupervisorClient:
    def __init__(self, address: str | None = None, settings: Settings | None = None):
        self.settings = settings or load_settings()
        self.address = address or self.settings.client_address()
        self._context = zmq.Context.instance()
        self._local = threading.local()
        self._sockets: list[zmq.Socket] = []
        self._lock = threading.Lock()

    def transcribe(self, audio: Any, language: str = "auto", use_itn: bool = False,
                   sample_rate: int = 16000, timeout: float | None = None) -> TranscribeReply:
        """audio: a path, the bytes of an audio file, or a 1-D float array at sample_rate."""
        audio_format, payload = _encode_audio(audio)
        request = TranscribeRequest(language=language, use_itn=use_itn,
                                    audio_format=audio_format, sample_rate=sample_rate)
        limit = timeout if timeout is not None else self.settings.request_timeout + REPLY_MARGIN_S
        reply = self.request(request, payload, limit)
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
                payload: bytes | None, timeout: float):
        """Send one request and wait for its reply; ServiceError for an error reply."""
        if self.address.startswith("ipc://") and not Path(self.address[6:]).exists():
            raise ServiceUnavailableError(f"no supervisor at {self.address}; start the service "
                                          f"with `python -m supervisor`")
        socket = self._socket()
        socket.send_multipart(encode(message, payload), copy=False)
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if not socket.poll(remaining * 1000):
                break
            try:
                reply = decode_reply(socket.recv_multipart())
            except ProtocolError:
                continue
            if reply.request_id not in (message.request_id, None):
                continue  # a late reply to an earlier request on this socket
            if isinstance(reply, ErrorReply):
                raise ServiceError(reply.code, reply.message)
            return reply
        self._drop_socket()
        raise ServiceUnavailableError(f"no reply from the supervisor at {self.address} within "
                                      f"{timeout:g} s")

    def close(self) -> None:
        with self._lock:
            for socket in self._sockets:
                socket.close(linger=0)
            self._sockets.clear()
        self._local = threading.local()

    def _socket(self) -> zmq.Socket:
        socket = getattr(self._local, "socket", None)
        if socket is None:
            socket = self._context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(self.address)
            self._local.socket = socket
            with self._lock:
                self._sockets.append(socket)
        return socket

    def _drop_socket(self) -> None:
        socket = getattr(self._local, "socket", None)
        if socket is not None:
            socket.close(linger=0)
            with self._lock:
                self._sockets.remove(socket)
            self._local.socket = None


def _encode_audio(audio: Any) -> tuple[str, bytes]:
    if isinstance(audio, (str, Path)):
        path = Path(audio).expanduser()
        try:
            return "file", path.read_bytes()
        except OSError as e:
            raise AudioError(str(audio), f"cannot read file: {e.strerror}") from None
    if isinstance(audio, (bytes, bytearray, memoryview)):
        return "file", bytes(audio)
    samples = np.asarray(audio, dtype=np.float32)
    if samples.ndim != 1:
        raise AudioError(f"<array of shape {samples.shape}>",
                         "expected mono samples (a 1-D array)")
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
