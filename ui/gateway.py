"""The UI process's one door to the supervisor: limits, admin checks, metrics, user-facing errors.

Both the Gradio app and the HTTP endpoints go through a ``Gateway``; it never holds a model.
Every failure becomes a ``RequestFailed`` with an HTTP status and a sentence a user can act on.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from sensevoice_core.client import ServiceError
from sensevoice_core.options import TranscribeOptions
from sensevoice_core.protocol import (
    STATUS_TIMEOUT_S,
    Progress,
    ReloadOutcome,
    ReloadRequest,
    ServiceStatus,
    TranscribeReply,
)
from sensevoice_core.settings import Settings
from sensevoice_core.vocab import language_of, languages_of
from ui.metrics import ServiceMetrics

logger = logging.getLogger("sensevoice.ui")

# Supervisor error code -> HTTP status.
HTTP_STATUS = {
    "bad_request": 400,
    "bad_audio": 400,
    "too_large": 413,
    "too_long": 413,
    "busy": 429,
    "reload_refused": 403,
    "unavailable": 503,
    "shutting_down": 503,
    "worker_lost": 502,
    "timeout": 504,
    "internal": 500,
}
# What a caller who may not see internals reads instead of the service's own sentence, which
# can name paths, addresses and pids; that sentence goes to this process's log.
PUBLIC_MESSAGES = {
    "unavailable": "The transcription service is unavailable right now; retry in a few seconds",
    "shutting_down": "The transcription service is restarting; retry in a few seconds",
    "worker_lost": "the worker transcribing this audio stopped twice; the audio may be the cause",
    "timeout": "the transcription took longer than the service allows",
    "internal": "the transcription service failed on this request; its log says why",
}
RETRY_AFTER_S = 1  # what a refused (busy) or unavailable caller is told to wait


class ServiceClient(Protocol):
    """What a Gateway calls on the transcription service: the supervisor's client
    (sensevoice_core.client.SupervisorClient) or the cluster's (cluster.client.FleetClient).
    Failures are ServiceErrors with the protocol's error codes."""

    def transcribe(self, audio: Any, language: str = "auto", use_itn: bool = False,
                   sample_rate: int = 16000, timeout: float | None = None,
                   vad_threshold: float | None = None,
                   filename: str | None = None, word_timestamps: bool = False,
                   languages: Sequence[str] | None = None,
                   on_progress: Callable[[Progress], None] | None = None
                   ) -> TranscribeReply: ...

    def status(self, timeout: float = STATUS_TIMEOUT_S) -> ServiceStatus: ...

    def reload(self, request: ReloadRequest, timeout: float | None = None
               ) -> ReloadOutcome: ...


@dataclass
class RequestFailed(Exception):
    status: int  # HTTP status
    code: str  # supervisor error code, or a UI-side one (forbidden, reload_disabled, ...)
    message: str
    param: str | None = None  # the request field at fault, when there is one

    def __str__(self) -> str:
        return self.message

    def openai_error(self) -> dict[str, str | None]:
        """The body of OpenAI's error object: message, type (as OpenAI names its errors),
        param, code. The HTTP API, its event stream and the Realtime WebSocket all send it."""
        kind = ("rate_limit_error" if self.status == 429 else
                "invalid_request_error" if self.status < 500 else "server_error")
        return {"message": self.message, "type": kind, "param": self.param, "code": self.code}


class ClientGone(Exception):
    """Raised by a progress callback whose caller went away (a closed event stream, a page
    that left): it ends the wait for the service. The service has no cancel: the worker still
    finishes the request, and its reply is dropped."""


class FrontDoor:
    """The transcriptions this UI process holds at once, across the HTTP API and the page.

    The bound is what the supervisor can hold (SENSEVOICE_MAX_QUEUE waiting plus one per
    worker, SENSEVOICE_WORKERS): anything more would only wait here, unbounded, or be refused
    there later. Beyond it a caller is refused at once (429), never made to wait.
    """

    def __init__(self, capacity: int,
                 bound: str = "SENSEVOICE_MAX_QUEUE + SENSEVOICE_WORKERS"):
        self.capacity = capacity
        self.bound = bound  # what the capacity is made of, in settings' names
        self._entered = 0
        self._lock = threading.Lock()
        self._held_elsewhere: Callable[[], int] = lambda: 0

    def count_also(self, held_elsewhere: Callable[[], int]) -> None:
        """Requests held outside this object (the page's queue) that count against the bound."""
        self._held_elsewhere = held_elsewhere

    def held(self) -> int:
        return self._entered + self._held_elsewhere()

    def full(self) -> bool:
        return self.held() >= self.capacity

    def try_enter(self) -> bool:
        with self._lock:
            if self.full():
                return False
            self._entered += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._entered -= 1

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Count a request admitted earlier (the page's, at its queue join) for as long as it
        runs: Gradio may call it done (a /cancel) while its supervisor call goes on."""
        with self._lock:
            self._entered += 1
        try:
            yield
        finally:
            self.leave()

    def busy(self) -> RequestFailed:
        return RequestFailed(429, "busy", f"the service is busy: it already holds "
                                          f"{self.capacity} transcriptions ({self.bound}); "
                                          f"retry in {RETRY_AFTER_S} s")


class Gateway:
    def __init__(self, settings: Settings, client: ServiceClient, metrics: ServiceMetrics,
                 door: FrontDoor):
        self.settings = settings
        self.client = client
        self.metrics = metrics
        self.door = door
        # Their own thread slots, so slow transcriptions never starve /ready or /metrics; one
        # per request the front door admits, so an admitted request never waits for a thread.
        self.transcribe_slots = anyio.CapacityLimiter(door.capacity)
        self.status_slots = anyio.CapacityLimiter(4)

    def check_upload(self, size: int, name: str) -> None:
        """The one check of the audio's size, for the page and the HTTP API alike."""
        if size > self.settings.max_upload_bytes:
            raise RequestFailed(
                413, "too_large", f"{name} is larger than the limit of "
                                  f"{self.settings.max_upload_mb:g} MiB (SENSEVOICE_MAX_UPLOAD_MB)",
                "file")
        if size == 0:
            raise RequestFailed(400, "bad_audio", f"{name} is empty", "file")

    def transcribe(self, audio: bytes, name: str, language: str, use_itn: bool,
                   endpoint: str, vad_threshold: float | None = None,
                   word_timestamps: bool = False,
                   languages: Sequence[str] | None = None,
                   on_progress: Callable[[Progress], None] | None = None) -> TranscribeReply:
        """Transcribe through the supervisor, recording the outcome under endpoint.

        languages: what auto language ID may choose (None: the service's
        SENSEVOICE_LANGUAGES; empty: any). on_progress: each Progress before the reply
        (SupervisorClient.transcribe); raising ClientGone from it ends the wait, counted
        as the outcome client_gone."""
        start = time.perf_counter()
        try:
            language, allowed = self.check_languages(language, languages)
            self.check_upload(len(audio), name)
            try:
                reply = self.client.transcribe(audio, language, use_itn,
                                               vad_threshold=vad_threshold, filename=name,
                                               word_timestamps=word_timestamps,
                                               languages=allowed, on_progress=on_progress)
            except ServiceError as e:
                internals = self.settings.ui_is_loopback()
                if not internals and e.code in PUBLIC_MESSAGES:  # the caller is not told why
                    logger.warning("Transcription of %s failed (%s): %s", name, e.code, e.message)
                raise self.failure(e, internals, "file" if e.code in ("bad_audio", "too_long")
                                   else None) from None
        except RequestFailed as e:
            self.metrics.request_done(endpoint, e.code, time.perf_counter() - start, 0.0)
            raise
        except ClientGone:
            self.metrics.request_done(endpoint, "client_gone", time.perf_counter() - start, 0.0)
            raise
        self.metrics.request_done(endpoint, "ok", time.perf_counter() - start, reply.duration_s)
        return reply

    def check_languages(self, language: str, languages: Sequence[str] | None
                        ) -> tuple[str, list[str] | None]:
        """The worker's own checks, answered here with the field at fault: the language and
        the whitelist as codes ("english" -> "en")."""
        try:
            chosen = language_of(language or "auto")
        except ValueError as e:
            raise RequestFailed(400, "bad_request", str(e), "language") from None
        try:
            allowed = None if languages is None else \
                [lang.value for lang in languages_of(languages)]
        except ValueError as e:
            raise RequestFailed(400, "bad_request", str(e), "languages") from None
        # Without a list of its own the request gets the service's (the same settings here).
        effective = self.settings.languages if allowed is None else allowed
        try:  # the library's own check of a language against the list
            TranscribeOptions(language=chosen, languages=tuple(effective))
        except ValueError as e:
            raise RequestFailed(400, "bad_request", str(e), "language") from None
        return chosen.value, allowed

    def refused(self, endpoint: str) -> RequestFailed:
        """The front door is full: count the refusal and say so."""
        self.metrics.request_done(endpoint, "busy", 0.0, 0.0)
        return self.door.busy()

    def failure(self, error: ServiceError, internals: bool,
                param: str | None = None) -> RequestFailed:
        """The service's error for a caller; one who may not see internals gets a plain one."""
        status = HTTP_STATUS.get(error.code, 500)
        message = error.message
        if not internals and error.code in PUBLIC_MESSAGES:
            message = PUBLIC_MESSAGES[error.code]
        elif status == 503:
            message = f"The transcription service is unavailable: {message}"
        return RequestFailed(status, error.code, message, param)

    def reload(self, token: str | None, origin: str = "ui") -> ReloadOutcome:
        self.check_admin(token)
        try:
            return self.client.reload(ReloadRequest(origin=origin))  # type: ignore[arg-type]
        except ServiceError as e:
            raise self.failure(e, internals=True) from None

    def token_matches(self, token: str | None) -> bool:
        expected = self.settings.admin_token
        return (expected is not None and bool(token) and
                hmac.compare_digest(str(token).encode(), expected.get_secret_value().encode()))

    def check_admin(self, token: str | None) -> None:
        if not self.settings.reload_needs_token():
            return
        if self.settings.admin_token is None:
            raise RequestFailed(
                403, "reload_disabled",
                f"reloading from the UI is off: it listens on {self.settings.ui_host}, not "
                f"loopback; set SENSEVOICE_ADMIN_TOKEN to allow it")
        if not self.token_matches(token):
            raise RequestFailed(403, "forbidden", "reloading needs the admin token (SENSEVOICE_"
                                                  "ADMIN_TOKEN); the one given does not match")

    def shows_internals(self, token: str | None) -> bool:
        """Paths, pids and the service's own error sentences: for loopback, or the admin token."""
        return self.settings.ui_is_loopback() or self.token_matches(token)

    def status(self, internals: bool) -> ServiceStatus:
        try:
            return self.client.status()
        except ServiceError as e:
            raise self.failure(e, internals) from None
