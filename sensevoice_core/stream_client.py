"""A live stream through the running service, for asyncio code (the UI's WebSocket). No torch.

    stream = await LiveStream.open(StreamOptions(language="en"))
    await stream.send_audio(pcm_bytes)          # raw bytes in stream.options.encoding
    await stream.commit()                       # also clear(), update(options)
    await stream.close()                        # the open turn is decoded, then StreamClosed
    async for event in stream.events():         # stream_types.py events, in order
        ...                                     # ends after StreamClosed or StreamFailed

Refusals at open raise ServiceError(code, message): "busy" beyond SENSEVOICE_MAX_STREAMS,
"unavailable" when no worker serves or streaming is off, "bad_request" for options that cannot
run; ServiceUnavailableError when no supervisor answers (the words of client.py, whose
connection this uses: ZeroMQ heartbeats, CURVE off loopback). Once open, whatever ends the
stream arrives as its last event: StreamFailed (worker lost, idle, too long, bad audio, the
supervisor gone: "unavailable" within a few seconds) or StreamClosed. Sending after the end
raises ServiceError with the end's code. abort() drops the stream at once and releases the
socket; a task that stops reading events should call it (``async with`` does).

One connection (DEALER socket) per stream: the supervisor lets only the connection that
opened a stream send to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import zmq
import zmq.asyncio

from sensevoice_core.client import CONNECT_TIMEOUT_S, SupervisorClient, _Connection
from sensevoice_core.errors import ServiceError, ServiceUnavailableError
from sensevoice_core.protocol import (
    ErrorReply,
    ProtocolError,
    StreamAction,
    StreamAudio,
    StreamControl,
    StreamEvents,
    StreamOpen,
    StreamOpened,
    decode_reply,
    encode,
    stream_options_problem,
)
from sensevoice_core.settings import MiB, Settings
from sensevoice_core.stream_types import StreamClosed, StreamEvent, StreamFailed, StreamOptions

OPEN_TIMEOUT_S = CONNECT_TIMEOUT_S + 5.0  # the supervisor answers an open at once
READ_WAKE_S = 0.1  # events() also looks for messages this often, whatever the poller says
CLOSE_LINGER_MS = 500  # a closed stream's last message (its abort) may take this to leave
HEADER_ROOM = 1024  # bytes a StreamAudio header takes, beside the audio, in a message


class LiveStream:
    def __init__(self, client: SupervisorClient, connection: _Connection,
                 opened: StreamOpened, options: StreamOptions):
        self.stream_id = opened.stream_id
        self.fingerprint = opened.fingerprint  # the model serving the stream when it opened
        self.options = options
        self._client = client
        self._connection: _Connection | None = connection
        self._seq = 0  # the next audio seq
        self._end: StreamClosed | StreamFailed | None = None  # how it ended, once known
        self._aborted = False
        self._reading = False  # events() is iterating (it closes the socket when it ends)

    @classmethod
    async def open(cls, options: StreamOptions | None = None, settings: Settings | None = None,
                   address: str | None = None, timeout: float = OPEN_TIMEOUT_S) -> LiveStream:
        """Open a stream; ServiceError when refused, ServiceUnavailableError when no
        supervisor answers within timeout."""
        options = options or StreamOptions()
        client = SupervisorClient(address, settings)
        connection, _ = client._checkout()  # a fresh connection: the stream's own
        request = StreamOpen(options=options)
        connection.socket.send_multipart(encode(request))
        # The waiting is client.py's, on a thread; a cancelled open closes the connection
        # (aborting the stream if it did open) once that thread is done with it.
        waiting = asyncio.get_running_loop().run_in_executor(
            None, client._wait_for_reply, connection, request.request_id, timeout)
        try:
            reply = await asyncio.shield(waiting)
        except asyncio.CancelledError:
            waiting.add_done_callback(lambda done: _discard(connection, done))
            raise
        except BaseException:
            connection.close()
            raise
        if isinstance(reply, ErrorReply):
            connection.close()
            raise ServiceError(reply.code, reply.message)
        if not isinstance(reply, StreamOpened):
            connection.close()
            raise ServiceError("internal", f"the supervisor answered a stream open with "
                                           f"{reply.kind!r}")
        return cls(client, connection, reply, options)

    # ----------------------------------------------------------------- sending

    async def send_audio(self, data: bytes) -> None:
        """Raw bytes in options.encoding at options.sample_rate, any length."""
        limit = self._client.settings.max_request_bytes - HEADER_ROOM
        if len(data) > limit:
            raise ServiceError("too_large", f"an audio chunk of {len(data) / MiB:.1f} MiB; at "
                                            f"most {limit / MiB:.1f} MiB per chunk "
                                            f"(SENSEVOICE_MAX_REQUEST_MB)")
        self._send(StreamAudio(stream_id=self.stream_id, seq=self._seq), bytes(data))
        self._seq += 1

    async def commit(self) -> None:
        """End the open turn now and decode it."""
        self._control("commit")

    async def clear(self) -> None:
        """Drop the open turn and the audio not yet committed."""
        self._control("clear")

    async def update(self, options: StreamOptions) -> None:
        """New options from the next audio on (encoding and rate only before any audio);
        ServiceError "bad_request" naming the problem, the stream unchanged, otherwise."""
        problem = stream_options_problem(self._client.settings, options, self.options,
                                         audio_sent=self._seq > 0)
        if problem is not None:
            raise ServiceError("bad_request", problem)
        self._control("update", options)
        self.options = options

    async def close(self) -> None:
        """End of audio: the open turn is decoded; events() ends after StreamClosed."""
        self._control("close")

    async def abort(self) -> None:
        """Drop the stream now (no more events) and release the socket."""
        if self._end is None and self._connection is not None:
            try:
                self._connection.socket.send_multipart(encode(StreamControl(
                    stream_id=self.stream_id, action="abort", seq=self._seq)), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # not connected: the supervisor frees it when idle
        self._aborted = True
        if self._end is None:
            self._end = StreamFailed(code="bad_request", message="the stream was aborted")
        if not self._reading:
            self._release()

    async def __aenter__(self) -> LiveStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.abort()

    def _control(self, action: StreamAction, options: StreamOptions | None = None) -> None:
        self._send(StreamControl(stream_id=self.stream_id, action=action, seq=self._seq,
                                 options=options))

    def _send(self, message: StreamAudio | StreamControl, payload: bytes | None = None) -> None:
        if self._end is not None or self._connection is None:
            end = self._end
            raise ServiceError(end.code if isinstance(end, StreamFailed) else "bad_request",
                               f"stream {self.stream_id} has ended"
                               + (f": {end.message}" if isinstance(end, StreamFailed) else ""))
        try:
            self._connection.socket.send_multipart(encode(message, payload), zmq.NOBLOCK)
        except zmq.Again:
            self._end = self._lost()
            raise ServiceUnavailableError(self._end.message) from None

    # ----------------------------------------------------------------- receiving

    async def events(self) -> AsyncIterator[StreamEvent]:
        """The stream's events in order, until StreamClosed or StreamFailed (included)."""
        if self._reading:
            raise RuntimeError("events() is already being read")
        self._reading = True
        poller = zmq.asyncio.Poller()
        connection = self._connection
        if connection is not None:
            poller.register(connection.socket, zmq.POLLIN)
            poller.register(connection.monitor, zmq.POLLIN)
        try:
            while connection is not None and not self._aborted:
                if self._end is None:  # else a send found the supervisor gone
                    for event in self._read(connection):
                        if self._aborted:
                            return
                        if isinstance(event, (StreamClosed, StreamFailed)):
                            self._end = event
                            break
                        yield event
                if self._end is None:
                    connection.update()
                    if connection.lost:
                        self._end = self._lost()
                if self._end is not None:
                    yield self._end
                    return
                await poller.poll(READ_WAKE_S * 1000)
        finally:
            self._reading = False
            self._release()

    def _read(self, connection: _Connection) -> list[StreamEvent]:
        """What has arrived for this stream, without waiting."""
        events: list[StreamEvent] = []
        while True:
            try:
                frames = connection.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return events
            try:
                reply: Any = decode_reply(frames)
            except ProtocolError as e:
                return [*events, self._failed("internal", f"the supervisor's message could "
                                                          f"not be read ({e})")]
            if isinstance(reply, StreamEvents) and reply.stream_id == self.stream_id:
                events += reply.events
            elif isinstance(reply, ErrorReply) and reply.request_id in (self.stream_id, None):
                # What this client sends is checked before it is sent, so an error about it
                # means the two sides disagree on the stream: end it rather than guess.
                return [*events, self._failed(reply.code, reply.message)]

    def _failed(self, code: str, message: str) -> StreamFailed:
        if self._connection is not None:
            try:
                self._connection.socket.send_multipart(encode(StreamControl(
                    stream_id=self.stream_id, action="abort", seq=self._seq)), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        return StreamFailed(code=code, message=message)

    def _lost(self) -> StreamFailed:
        return StreamFailed(code="unavailable", message=(
            f"the supervisor at {self._client.address} went away (it stopped or died); the "
            f"stream has ended; open a new one when the service is back"))

    def _release(self) -> None:
        if self._connection is not None:
            _close(self._connection)
            self._connection = None


def _discard(connection: _Connection, done: asyncio.Future) -> None:
    """After a cancelled open: abort the stream if it opened, and close its connection."""
    reply = None if done.cancelled() or done.exception() is not None else done.result()
    if isinstance(reply, StreamOpened):
        try:
            connection.socket.send_multipart(encode(StreamControl(
                stream_id=reply.stream_id, action="abort", seq=0)), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
    _close(connection)


def _close(connection: _Connection) -> None:
    """Like connection.close(), but a last abort still gets out (within CLOSE_LINGER_MS)."""
    connection.socket.disable_monitor()
    connection.monitor.close(linger=0)
    connection.socket.close(linger=CLOSE_LINGER_MS)
