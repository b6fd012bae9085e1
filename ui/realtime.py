"""GET /v1/realtime?intent=transcription: OpenAI's Realtime transcription session, as the
`openai` SDK speaks it (``client.realtime.connect(model=..., extra_query={"intent":
"transcription"})``), over a live stream of the supervisor (``LiveStream``).

Client events: session.update (``realtime_session`` says what a session supports),
input_audio_buffer.append / commit / clear, and session.close (OpenAI's, from its translation
sessions): the open turn is transcribed, then session.closed and a normal close. Server events:
session.created on connect, session.updated, input_audio_buffer.speech_started /
speech_stopped / committed / cleared, conversation.item.input_audio_transcription.delta /
completed / failed (``realtime_events``), and error.

Who may connect: anyone who may use the HTTP API (no token); a browser only from this server's
own pages (its Origin must be this host). Internals (the service's own error sentences) only
for loopback, or with the admin token as the API key (``Authorization: Bearer``).
Limits, each an ``error`` event: a message over MAX_MESSAGE_BYTES, audio sent faster than
MAX_AUDIO_SPEED x real time (beyond a burst of AUDIO_BURST_S), or more than MAX_MESSAGES_PER_S
messages a second (beyond MESSAGE_BURST) closes the session; a bad message (not JSON, unknown
type, bad base64, a part of a sample) is refused and the session goes on. A stream the service
refuses (beyond SENSEVOICE_MAX_STREAMS, no supervisor) gets the error and a close code saying
whether to retry (1013); a stream that fails (worker lost, idle, too long) fails its open item,
then the error, then the close. A client that goes away aborts its stream at once.
Small appends are merged before they go to the stream (``realtime_flow.AppendMerger``): at
least 100 ms at once, or 50 ms after the first held byte, and always before a commit, clear,
update or close.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import anyio
from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState

from sensevoice_core.client import ServiceError
from sensevoice_core.realtime_limits import AUDIO_BURST_S, MAX_AUDIO_SPEED
from sensevoice_core.settings import MiB
from sensevoice_core.stream_client import LiveStream
from sensevoice_core.stream_types import (
    BYTES_PER_SAMPLE,
    Final,
    StreamClosed,
    StreamFailed,
    StreamOptions,
)
from ui.gateway import PUBLIC_MESSAGES, Gateway, RequestFailed
from ui.ops import bearer_token
from ui.realtime_events import (
    COMPLETED,
    EventTranslator,
    error_event,
    new_id,
    server_event,
)
from ui.realtime_flow import AppendMerger, TokenBucket, merge_bytes
from ui.realtime_session import ENCODINGS, SessionConfig, token_logprobs, updated

logger = logging.getLogger("sensevoice.ui")

PATH = "/v1/realtime"
MAX_MESSAGE_BYTES = MiB  # about 21 s of 24 kHz audio/pcm as base64
MAX_MESSAGES_PER_S = 250.0  # a browser sending every 5 ms render quantum stays under it
MESSAGE_BURST = 1000.0
REASON_BYTES = 123  # the most a WebSocket close reason may hold
NORMAL, POLICY, TOO_BIG, SERVER_ERROR, RESTARTING, TRY_AGAIN = 1000, 1008, 1009, 1011, 1012, 1013
# A failure's code -> the WebSocket close code that tells a client whether to retry.
CLOSE_CODES = {"busy": TRY_AGAIN, "unavailable": TRY_AGAIN, "shutting_down": RESTARTING,
               "bad_request": POLICY, "bad_audio": POLICY, "too_long": POLICY,
               "timeout": POLICY, "invalid_request": POLICY}
# Their sentences name the caller's stream and its limits (an idle "timeout", not a slow
# transcription): shown to anyone.
STREAM_OWN = {"timeout", "too_long", "bad_request", "bad_audio", "busy"}
NOT_FATAL = {"bad_request"}  # a stream call refused for its own values: the session goes on
UNSUPPORTED = {"response.create", "response.cancel", "conversation.item.create",
               "conversation.item.retrieve", "conversation.item.truncate",
               "conversation.item.delete", "output_audio_buffer.clear"}
CLIENT_EVENTS = ("session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
                 "input_audio_buffer.clear", "session.close")


@dataclass(frozen=True)
class SessionOver:
    """The session ends: its error (if any) was sent; close with this code and reason."""

    code: int
    reason: str


class Fatal(Exception):
    """A failure that ends the session: its error event, then the close code."""

    def __init__(self, failure: RequestFailed, close_code: int):
        self.failure, self.close_code = failure, close_code


class ClientGone(Exception):
    """Sending failed: the client has disconnected."""


def failure_of(code: str, message: str, gateway: Gateway, internals: bool) -> RequestFailed:
    """A service error as a caller may read it (as the HTTP API tells it); the sentences of
    STREAM_OWN codes are about the caller's own stream, never internals."""
    internals = internals or code in STREAM_OWN
    if not internals and code in PUBLIC_MESSAGES:
        logger.warning("A realtime session failed (%s): %s", code, message)
    return gateway.failure(ServiceError(code, message), internals)


def close_reason(failure: RequestFailed) -> str:
    reason = f"{failure.code}: {failure.message}"
    encoded = reason.encode()
    return reason if len(encoded) <= REASON_BYTES else \
        encoded[:REASON_BYTES - 3].decode(errors="ignore") + "..."


def same_origin(websocket: WebSocket) -> bool:
    """No Origin (not a browser), or a page of this host: another site's page may not use a
    visitor's local service."""
    origin = websocket.headers.get("origin")
    if origin is None:
        return True
    host = websocket.headers.get("host", "")
    return urlsplit(origin).netloc.lower() == host.lower()


def parse_event(text: str) -> dict:
    """A client event: a JSON object with a string type (NaN and Infinity refused)."""

    def no_constants(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    try:
        payload = json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:
        raise RequestFailed(400, "invalid_json", f"the message is not valid JSON: {e}") from None
    if not isinstance(payload, dict):
        raise RequestFailed(400, "invalid_json", "a client event must be a JSON object")
    if not isinstance(payload.get("type"), str):
        raise RequestFailed(400, "missing_required_parameter", "a client event needs a string "
                                                               "'type'", "type")
    return payload


def decode_audio(payload: dict, config: SessionConfig) -> bytes:
    audio = payload.get("audio")
    if not isinstance(audio, str):
        raise RequestFailed(400, "missing_required_parameter", "input_audio_buffer.append needs "
                                                               "'audio': base64 audio bytes",
                            "audio")
    try:
        data = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestFailed(400, "invalid_audio", f"audio is not valid base64: {e}",
                            "audio") from None
    if not data:
        raise RequestFailed(400, "invalid_audio", "audio is empty", "audio")
    width = BYTES_PER_SAMPLE[ENCODINGS[config.audio_format]]
    if len(data) % width:
        raise RequestFailed(400, "invalid_audio",
                            f"{config.audio_format} audio comes in whole samples of {width} bytes; "
                            f"this message has {len(data)} bytes", "audio")
    return data


class RealtimeSession:
    """One WebSocket and its stream."""

    def __init__(self, websocket: WebSocket, gateway: Gateway, stream: LiveStream,
                 internals: bool):
        self.websocket, self.gateway, self.stream = websocket, gateway, stream
        self.internals = internals
        self.session_id = new_id("sess_")
        self.config = SessionConfig()
        self.translator = EventTranslator()
        self.audio_sent = False
        self.closing = False  # session.close received
        self.ended = False  # the stream closed or failed: nothing to abort
        self.audio_budget = TokenBucket(MAX_AUDIO_SPEED, AUDIO_BURST_S)
        self.message_budget = TokenBucket(MAX_MESSAGES_PER_S, MESSAGE_BURST)
        self.sent_last = False  # the closing error went out: send nothing more
        self.send_lock = anyio.Lock()
        self.merger = AppendMerger()
        self.audio_held = anyio.Event()  # set when the merger starts holding audio
        self.stream_lock = anyio.Lock()  # what goes to the stream goes in the order it came

    async def send(self, *events: dict, last: bool = False) -> None:
        """Send events in order; last: the session's closing error, after which nothing else
        (a stream event still in flight) is sent, so it is the last event the client reads."""
        async with self.send_lock:
            if self.sent_last:
                return
            self.sent_last = last
            try:
                for event in events:
                    await self.websocket.send_text(json.dumps(event, ensure_ascii=False))
            except (WebSocketDisconnect, RuntimeError, OSError) as e:
                raise ClientGone() from e

    def session_object(self) -> dict:
        return self.config.session(self.session_id, self.gateway.settings)

    async def run(self) -> None:
        over: SessionOver | None = None
        try:
            await self.send(server_event("session.created", session=self.session_object()))
            async with anyio.create_task_group() as tasks:
                async def pump() -> None:
                    nonlocal over
                    over = await self.pump()
                    tasks.cancel_scope.cancel()

                async def flusher() -> None:
                    nonlocal over
                    over = await self.flush_held()
                    tasks.cancel_scope.cancel()

                tasks.start_soon(pump)
                tasks.start_soon(flusher)
                try:
                    over = await self.read() or over
                finally:
                    # The client left or broke a limit: free the slot at once, while the pump
                    # still reads the stream (a stream whose reading was cancelled first
                    # would close its socket without telling the supervisor).
                    if not self.ended:
                        with anyio.CancelScope(shield=True):
                            await self.abort()
                tasks.cancel_scope.cancel()
        except ClientGone:
            pass
        finally:
            if not self.ended:
                with anyio.CancelScope(shield=True):
                    await self.abort()
        if over is not None and self.websocket.client_state == WebSocketState.CONNECTED:
            try:
                await self.websocket.close(over.code, over.reason)
            except (RuntimeError, OSError):
                pass  # gone meanwhile

    async def abort(self) -> None:
        self.ended = True
        try:
            await self.stream.abort()
        except ServiceError as e:
            logger.info("Aborting live stream %s: %s", self.stream.stream_id, e)

    async def pump(self) -> SessionOver | None:
        """Stream events to the client until the stream ends; None: the client is gone."""
        try:
            async for event in self.stream.events():
                if isinstance(event, StreamFailed):
                    self.ended = True
                    failure = failure_of(event.code, event.message, self.gateway, self.internals)
                    await self.send(*self.translator.failed(failure))
                    return SessionOver(CLOSE_CODES.get(event.code, SERVER_ERROR),
                                       close_reason(failure))
                events = self.translator.translate(event)
                if isinstance(event, Final) and self.config.logprobs:
                    for completed in events:
                        if completed["type"] == COMPLETED:
                            completed["logprobs"] = token_logprobs(event.segment)
                await self.send(*events)
                if isinstance(event, StreamClosed):
                    self.ended = True
                    return SessionOver(NORMAL, "session closed")
            failure = RequestFailed(500, "internal", "the live stream ended without saying why")
            await self.send(*self.translator.failed(failure))
            return SessionOver(SERVER_ERROR, close_reason(failure))
        except ClientGone:
            return None

    async def flush_held(self) -> SessionOver | None:
        """Send held audio when it is due (the merger's timer), until a failure ends the
        session (None: the client is gone)."""
        try:
            while True:
                await self.audio_held.wait()
                self.audio_held = anyio.Event()
                while (due := self.merger.due_in()) is not None:
                    if due > 0:
                        await anyio.sleep(due)
                        continue
                    try:
                        await self.forward()
                    except Fatal as fatal:
                        await self.send(error_event(fatal.failure), last=True)
                        return SessionOver(fatal.close_code, close_reason(fatal.failure))
                    except RequestFailed as failure:
                        await self.send(error_event(failure))
        except ClientGone:
            return None

    async def forward(self, operation: Callable[[], Awaitable[None]] | None = None) -> None:
        """The held audio, then the operation (if any), to the stream, in order."""
        async with self.stream_lock:
            held = self.merger.take()
            if held:
                await self.call(self.stream.send_audio(held))
            if operation is not None:
                await self.call(operation())

    async def append(self, data: bytes) -> None:
        width = BYTES_PER_SAMPLE[ENCODINGS[self.config.audio_format]]
        full = merge_bytes(self.config.sample_rate, width)
        if len(data) >= full:  # large enough alone: sent as it came, after what is held
            await self.forward(lambda: self.stream.send_audio(data))
            return
        holding = bool(self.merger.held)
        if self.merger.add(data, full):
            await self.forward()
        elif not holding:
            self.audio_held.set()

    async def read(self) -> SessionOver | None:
        """Client events until the client leaves (None) or the session must end."""
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return None
            client_event_id = None
            try:
                payload = self.check(message)
                if isinstance(payload.get("event_id"), str):
                    client_event_id = payload["event_id"]
                await self.dispatch(payload)
            except Fatal as fatal:
                await self.send(error_event(fatal.failure, client_event_id), last=True)
                return SessionOver(fatal.close_code, close_reason(fatal.failure))
            except RequestFailed as failure:
                await self.send(error_event(failure, client_event_id))

    def check(self, message: dict) -> dict:
        """A message within the limits, as a client event."""
        text, data = message.get("text"), message.get("bytes") or b""
        size = len(data) if text is None else len(text.encode())
        if size > MAX_MESSAGE_BYTES:
            raise Fatal(RequestFailed(413, "message_too_large",
                                      f"a message may hold at most {MAX_MESSAGE_BYTES} bytes; "
                                      f"this one has {size}: send audio in smaller appends"),
                        TOO_BIG)
        if not self.message_budget.take(1):
            raise Fatal(RequestFailed(429, "rate_limit_exceeded",
                                      f"more than {MAX_MESSAGES_PER_S:g} messages a second: send "
                                      f"audio in fewer, larger appends (e.g. every 100 ms)"),
                        POLICY)
        if text is None:
            raise RequestFailed(400, "invalid_json", "binary messages are not part of the "
                                                     "protocol: send JSON text events")
        return parse_event(text)

    async def dispatch(self, payload: dict) -> None:
        kind = payload["type"]
        if self.closing:
            raise RequestFailed(400, "session_closing", f"{kind[:64]} after session.close: the "
                                                        f"session is closing", "type")
        if kind == "input_audio_buffer.append":
            data = decode_audio(payload, self.config)
            seconds = len(data) / BYTES_PER_SAMPLE[ENCODINGS[self.config.audio_format]] \
                / self.config.sample_rate
            if not self.audio_budget.take(seconds):
                raise Fatal(RequestFailed(
                    429, "rate_limit_exceeded",
                    f"audio arrives faster than {MAX_AUDIO_SPEED:g}x real time (beyond a burst of "
                    f"{AUDIO_BURST_S:g} s); send it as it is recorded, or at most that fast"),
                    POLICY)
            self.audio_sent = True
            await self.append(data)
        elif kind == "input_audio_buffer.commit":
            await self.forward(self.stream.commit)
        elif kind == "input_audio_buffer.clear":
            await self.forward(self.stream.clear)
        elif kind == "session.update":
            config = updated(self.config, payload.get("session"), self.gateway, self.audio_sent)
            options = config.stream_options()
            # Held audio is of the format in force until now: it goes first.
            await self.forward(None if options == self.config.stream_options()
                               else lambda: self.stream.update(options))
            self.config = config
            await self.send(server_event("session.updated", session=self.session_object()))
        elif kind == "session.close":
            self.closing = True
            await self.forward(self.stream.close)
        elif kind in UNSUPPORTED:
            raise RequestFailed(400, "invalid_value", f"{kind} is not supported: this is a "
                                                      f"transcription session", "type")
        else:
            raise RequestFailed(400, "invalid_value", f"unknown event type {kind[:64]!r}; "
                                                      f"supported: {', '.join(CLIENT_EVENTS)}",
                                "type")

    async def call(self, operation: Awaitable[None]) -> None:
        try:
            await operation
        except ServiceError as e:
            failure = failure_of(e.code, e.message, self.gateway, self.internals)
            if e.code in NOT_FATAL:
                raise failure from None
            raise Fatal(failure, CLOSE_CODES.get(e.code, SERVER_ERROR)) from None


async def open_live_stream(gateway: Gateway, options: StreamOptions) -> LiveStream:
    return await LiveStream.open(options, settings=gateway.settings,
                                 address=gateway.client.address)


def build_realtime_router(gateway: Gateway) -> APIRouter:
    router = APIRouter()

    @router.websocket(PATH)
    async def realtime(websocket: WebSocket) -> None:
        if not same_origin(websocket):
            await deny(websocket, 403, "a page of another site may not open this server's "
                                       "realtime sessions")
            return
        await websocket.accept()
        internals = gateway.shows_internals(bearer_token(websocket))  # type: ignore[arg-type]
        try:
            intent = websocket.query_params.get("intent")
            if intent != "transcription":
                raise RequestFailed(400, "invalid_request",
                                    f"this server offers transcription sessions only: connect "
                                    f"with ?intent=transcription (got intent={intent!r})",
                                    "intent")
            try:
                stream = await open_live_stream(gateway, SessionConfig().stream_options())
            except ServiceError as e:
                raise failure_of(e.code, e.message, gateway, internals) from None
        except RequestFailed as failure:
            await websocket.send_text(json.dumps(error_event(failure)))
            await websocket.close(CLOSE_CODES.get(failure.code, SERVER_ERROR),
                                  close_reason(failure))
            return
        try:
            await RealtimeSession(websocket, gateway, stream, internals).run()
        except WebSocketDisconnect:
            pass

    return router


async def deny(websocket: WebSocket, status: int, message: str) -> None:
    """Refuse the handshake with an HTTP answer (or a policy close where the server cannot)."""
    body = {"error": {"message": message, "type": "invalid_request_error", "code": "forbidden",
                      "param": None}}
    try:
        await websocket.send_denial_response(JSONResponse(body, status_code=status))
    except RuntimeError:
        await websocket.close(POLICY, message[:REASON_BYTES])
