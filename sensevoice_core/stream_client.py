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
raises ServiceError with the end's code; a send the supervisor cannot take for SEND_WAIT_S
(it is not keeping up) ends the stream: ServiceError "busy". abort() drops the stream at once
and releases the socket (``async with`` calls it); whatever else gives the stream up here
(the supervisor lost, events() ended early) also tells the supervisor to drop it.

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
LOST_LINGER_MS = 2000  # after the supervisor went away: its abort waits this long for it
SEND_WAIT_S = 5.0  # a message the socket cannot take (high-water mark) waits this long
SEND_RETRY_S = 0.02
STREAM_SNDHWM = 10_000  # messages a stream's socket holds while the supervisor is slow
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
        self._service_ended = False  # the supervisor sent the stream's end (nothing to abort)
        self._abort_sent = False
        self._sending = asyncio.Lock()  # one message at a time, in seq order
        self._reading = False  # events() is iterating (it closes the socket when it ends)

    @classmethod
    async def open(cls, options: StreamOptions | None = None, settings: Settings | None = None,
                   address: str | None = None, timeout: float = OPEN_TIMEOUT_S) -> LiveStream:
        """Open a stream; ServiceError when refused, ServiceUnavailableError when no
        supervisor answers within timeout."""
        options = options or StreamOptions()
        client = SupervisorClient(address, settings)
        connection, _ = client._checkout()  # a fresh connection: the stream's own
        connection.socket.setsockopt(zmq.SNDHWM, STREAM_SNDHWM)  # applies to its pipe too
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
        async with self._sending:
            await self._send(StreamAudio(stream_id=self.stream_id, seq=self._seq), bytes(data))
            self._seq += 1

    async def commit(self) -> None:
        """End the open turn now and decode it."""
        await self._control("commit")

    async def clear(self) -> None:
        """Drop the open turn and the audio not yet committed."""
        await self._control("clear")

    async def update(self, options: StreamOptions) -> None:
        """New options from the next audio on (encoding and rate only before any audio);
        ServiceError "bad_request" naming the problem, the stream unchanged, otherwise."""
        async with self._sending:
            problem = stream_options_problem(self._client.settings, options, self.options,
                                             audio_sent=self._seq > 0)
            if problem is not None:
                raise ServiceError("bad_request", problem)
            await self._send(StreamControl(stream_id=self.stream_id, action="update",
                                           seq=self._seq, options=options))
            self.options = options

    async def close(self) -> None:
        """End of audio: the open turn is decoded; events() ends after StreamClosed."""
        await self._control("close")

    async def abort(self) -> None:
        """Drop the stream now (no more events) and release the socket."""
        self._send_abort()
        self._aborted = True
        if self._end is None:
            self._end = StreamFailed(code="bad_request", message="the stream was aborted")
        if not self._reading:
            self._release()

    async def __aenter__(self) -> LiveStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.abort()

    async def _control(self, action: StreamAction) -> None:
        async with self._sending:
            await self._send(StreamControl(stream_id=self.stream_id, action=action,
                                           seq=self._seq))

    async def _send(self, message: StreamAudio | StreamControl, payload: bytes | None = None
                    ) -> None:
        """Under self._sending. A full socket (the supervisor is slow) is waited on for
        SEND_WAIT_S; only the heartbeat monitor says the supervisor is gone."""
        frames = encode(message, payload)
        deadline = asyncio.get_running_loop().time() + SEND_WAIT_S
        while True:
            connection = self._connection
            if self._end is not None or connection is None:
                end = self._end
                raise ServiceError(end.code if isinstance(end, StreamFailed) else "bad_request",
                                   f"stream {self.stream_id} has ended"
                                   + (f": {end.message}" if isinstance(end, StreamFailed)
                                      else ""))
            try:
                connection.socket.send_multipart(frames, zmq.NOBLOCK)
                return
            except zmq.Again:
                pass
            connection.update()
            if connection.lost:
                self._end = self._lost()
                raise ServiceUnavailableError(self._end.message)
            if asyncio.get_running_loop().time() >= deadline:
                self._end = StreamFailed(code="busy", message=(
                    f"the service is not keeping up with this stream: {STREAM_SNDHWM} "
                    f"messages waited to leave and none could for {SEND_WAIT_S:g} s; the "
                    f"stream has ended; send audio in fewer, larger chunks, no faster than "
                    f"real time"))
                raise ServiceError("busy", self._end.message)
            await asyncio.sleep(SEND_RETRY_S)

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
                            self._service_ended = True
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
        self._send_abort()
        return StreamFailed(code=code, message=message)

    def _send_abort(self) -> None:
        """Free the stream on the supervisor, unless it ended there already (once; it may
        not get out: then the supervisor frees it at its idle timeout)."""
        if self._service_ended or self._abort_sent or self._connection is None:
            return
        self._abort_sent = True
        try:
            self._connection.socket.send_multipart(encode(StreamControl(
                stream_id=self.stream_id, action="abort", seq=self._seq)), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _lost(self) -> StreamFailed:
        return StreamFailed(code="unavailable", message=(
            f"the supervisor at {self._client.address} went away (it stopped or died); the "
            f"stream has ended; open a new one when the service is back"))

    def _release(self) -> None:
        """Whatever ended it here (the supervisor lost, a failure, the reader gone), the
        supervisor is told to drop the stream, if it is still open there."""
        if self._connection is not None:
            self._send_abort()
            lost = self._connection.lost
            _close(self._connection, LOST_LINGER_MS if lost else CLOSE_LINGER_MS)
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
    _close(connection, CLOSE_LINGER_MS)


def _close(connection: _Connection, linger_ms: int) -> None:
    """Like connection.close(), but a last abort still gets out (within linger_ms)."""
    connection.socket.disable_monitor()
    connection.monitor.close(linger=0)
    connection.socket.close(linger=linger_ms)
