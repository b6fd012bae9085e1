"""The UI process's one door to the supervisor: limits, admin checks, metrics, user-facing errors.

Both the Gradio app and the HTTP endpoints go through a ``Gateway``; it never holds a model.
Every failure becomes a ``RequestFailed`` with an HTTP status and a sentence a user can act on.
"""

from __future__ import annotations

import hmac
import re
import time
from dataclasses import dataclass

import anyio

from sensevoice_core.client import ServiceError, SupervisorClient
from sensevoice_core.protocol import ReloadOutcome, ReloadRequest, ServiceStatus, TranscribeReply
from sensevoice_core.settings import Settings
from sensevoice_core.vocab import Language, language_of
from ui.metrics import ServiceMetrics

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
LANGUAGE_CHOICES = tuple(lang.value for lang in Language if lang is not Language.NOSPEECH)


@dataclass
class RequestFailed(Exception):
    status: int  # HTTP status
    code: str  # supervisor error code, or a UI-side one (forbidden, reload_disabled, ...)
    message: str
    param: str | None = None  # the request field at fault, when there is one

    def __str__(self) -> str:
        return self.message


class Gateway:
    def __init__(self, settings: Settings, client: SupervisorClient, metrics: ServiceMetrics):
        self.settings = settings
        self.client = client
        self.metrics = metrics
        # Their own thread slots, so slow transcriptions never starve /ready or /metrics.
        self.transcribe_slots = anyio.CapacityLimiter(settings.max_queue)
        self.status_slots = anyio.CapacityLimiter(4)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.settings.max_upload_mb * 1024 * 1024)

    def check_upload(self, size: int, name: str) -> None:
        if size > self.max_upload_bytes:
            raise RequestFailed(
                413, "too_large", f"{name} is larger than the limit of "
                                  f"{self.settings.max_upload_mb:g} MiB (SENSEVOICE_MAX_UPLOAD_MB)",
                "file")
        if size == 0:
            raise RequestFailed(400, "bad_audio", f"{name} is empty", "file")

    def transcribe(self, audio: bytes, name: str, language: str, use_itn: bool,
                   endpoint: str, vad_threshold: float | None = None) -> TranscribeReply:
        """Transcribe through the supervisor, recording the outcome under endpoint."""
        start = time.perf_counter()
        try:
            language = (language or "auto").strip().lower()
            try:
                language_of(language)  # the worker's own check, answered here with the field
            except ValueError as e:
                raise RequestFailed(400, "bad_request", str(e), "language") from None
            self.check_upload(len(audio), name)
            try:
                reply = self.client.transcribe(audio, language, use_itn,
                                               vad_threshold=vad_threshold)
            except ServiceError as e:
                message = re.sub(r"^<\d+ bytes of audio>", lambda _: name, e.message)
                raise RequestFailed(HTTP_STATUS.get(e.code, 500), e.code, message,
                                    "file" if e.code in ("bad_audio", "too_long") else None)
        except RequestFailed as e:
            self.metrics.request_done(endpoint, e.code, time.perf_counter() - start, 0.0)
            raise
        self.metrics.request_done(endpoint, "ok", time.perf_counter() - start, reply.duration_s)
        return reply

    def reload(self, token: str | None, origin: str = "ui") -> ReloadOutcome:
        self.check_admin(token)
        try:
            return self.client.reload(ReloadRequest(origin=origin))  # type: ignore[arg-type]
        except ServiceError as e:
            raise RequestFailed(HTTP_STATUS.get(e.code, 500), e.code, e.message) from None

    def check_admin(self, token: str | None) -> None:
        if not self.settings.reload_needs_token():
            return
        expected = self.settings.admin_token
        if expected is None:
            raise RequestFailed(
                403, "reload_disabled",
                f"reloading from the UI is off: it listens on {self.settings.ui_host}, not "
                f"loopback; set SENSEVOICE_ADMIN_TOKEN to allow it")
        if not token or not hmac.compare_digest(token.encode(), expected.get_secret_value().encode()):
            raise RequestFailed(403, "forbidden", "reloading needs the admin token "
                                                  "(SENSEVOICE_ADMIN_TOKEN); the one given does not match")

    def status(self) -> ServiceStatus:
        try:
            return self.client.status()
        except ServiceError as e:
            raise RequestFailed(HTTP_STATUS.get(e.code, 503), e.code, e.message) from None
