"""The supervisor's live streams: which worker holds each, what its client may send, how a
stream moves to a new model, and what ends it.

Opening. A client's StreamOpen is refused with an ErrorReply: "busy" when
SENSEVOICE_MAX_STREAMS streams are open (the limit is service-wide; a worker holds as many as
it is given, no cap of its own), "unavailable" when streaming is off (MAX_STREAMS=0) or no
worker serves, "bad_request" for options that cannot run. Otherwise the stream gets an id and
lives on the serving worker holding the fewest streams (then the fewest requests); the client
is answered StreamOpened(stream_id, fingerprint) at once.

Sending. Only the connection (ZeroMQ routing id) that opened a stream may send to it (but
abort, taken by the stream's id from any connection: see below); audio
must come in seq order and a control names the next audio seq. Anything else is answered with
an ErrorReply (request_id = the stream id) and changes nothing. Audio and controls are
forwarded as they come; the worker queues them per stream and transcribes (worker side:
inference_worker/streams.py). Its StreamEvents go to the client as they are; the last one of
a stream is StreamClosed or StreamFailed, which frees the stream's slot. "abort" frees it at
once (the worker drops it, no more events).

Limits. No audio or control from the client for SENSEVOICE_STREAM_IDLE_TIMEOUT_S: StreamFailed
"timeout". Open for SENSEVOICE_MAX_STREAM_S: the supervisor closes it on the client's behalf,
so the open turn is transcribed, and the client gets that Final, then StreamFailed "too_long"
instead of StreamClosed. Each message is bounded by SENSEVOICE_MAX_REQUEST_MB (broker.receive).

Moving (blue-green reload). When a worker drains, the supervisor keeps every message it
forwards to that worker's streams from then on. The worker, at each stream's next point
between turns (at once if it is between turns already; at the drain deadline it commits the
open turn first), sends StreamMoved(seq, messages, options) with the stream's state and
forgets it: the turn in progress finishes on the old model, later turns run on the new one.
The supervisor sends StreamResume with that state and those options (in force where it
moved) to the serving worker with the fewest streams, then the kept messages the old worker
had not handled (numbered in forwarding order, so nothing is
lost or repeated), and routes what follows there. With no serving worker (a stop_first
reload), the stream waits for one, keeping its messages, for
SENSEVOICE_HOTRELOAD_TIMEOUT + SENSEVOICE_DRAIN_TIMEOUT. The audio kept for a move is bounded
(kept_limit_s); a stream past it fails "busy". A draining worker exits once its requests and
streams are gone; one still holding streams at SENSEVOICE_DRAIN_TIMEOUT is killed, and those
streams fail "worker_lost".

Ending by failure. A worker that exits, is killed as hung (missed pongs) or for a timeout:
each of its streams gets StreamFailed "worker_lost" when it is reaped, within a tick; the
supervisor stopping: each stream is closed on its client's behalf, so its open turn is
transcribed within SENSEVOICE_DRAIN_TIMEOUT, then StreamFailed "shutting_down" (at once for
one between workers, and for those still open at the deadline). Before a worker that exited
is reaped, what it sent is read (a draining worker's StreamMoved is not lost to a race). A
client that vanishes without abort (ZeroMQ does not tell a ROUTER) holds its slot until the
idle timeout; the client library sends abort whenever it gives a stream up, and an abort is
taken from any connection (one that dropped comes back with a new routing id), by the
stream's id.

Status: ServiceStatus.streams (open now), stream_counts (opened, refused, moved, closed,
aborted, failed), stream_failures (by code); WorkerStatus.streams (held by that worker).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import BaseModel

from sensevoice_core.protocol import (
    ErrorCode,
    StreamAudio,
    StreamControl,
    StreamEvents,
    StreamMoved,
    StreamOpen,
    StreamOpened,
    StreamResume,
    encode,
    stream_audio_s,
    stream_options_problem,
)
from sensevoice_core.stream_types import StreamClosed, StreamFailed, StreamOptions
from supervisor.workers import WorkerHandle

if TYPE_CHECKING:
    from sensevoice_core.settings import Settings
    from supervisor.supervisor import Supervisor

logger = logging.getLogger("sensevoice.supervisor")

WORKER_LOST = ("the worker serving this stream {how}; the stream has ended and its open turn "
               "is lost; open a new stream to go on")


@dataclass
class Stream:
    stream_id: str
    client: bytes  # the routing id of the connection that opened it
    options: StreamOptions  # as of the last update forwarded (what the client's next checks
    # against); the worker may not have applied it yet
    worker_id: str | None  # None while moving between workers
    opened_at: float
    heard_at: float  # the client's last message
    next_seq: int = 0  # the next audio seq the client may send
    forwarded: int = 0  # audio and control messages sent towards a worker so far
    # Since its worker began draining: (index, frames) of every message forwarded, for a move.
    kept: list[tuple[int, list[bytes]]] | None = None
    kept_s: float = 0.0  # seconds of audio in kept
    state: bytes | None = None  # a moved stream's state, until a worker resumes it
    moved_at: float = 0.0
    # The StreamMoved's seq, messages and options, for the StreamResume (options: those in
    # force where it moved; later updates are among the kept messages, replayed in order).
    resume_seq: int = 0
    resume_messages: int = 0
    resume_options: StreamOptions | None = None
    # Not back to the worker it left (one stopped by a signal still counts as serving).
    moved_from: str | None = None
    closing: bool = False  # the client sent close: only abort may follow
    # Closed by the supervisor on the client's behalf (SENSEVOICE_MAX_STREAM_S, the service
    # stopping): the open turn is transcribed, then this replaces its StreamClosed.
    ending: StreamFailed | None = None


@dataclass
class StreamRouter:
    supervisor: Supervisor
    streams: dict[str, Stream] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)

    @property
    def settings(self) -> Settings:
        return self.supervisor.settings

    def held_by(self, worker: WorkerHandle) -> list[Stream]:
        return [s for s in self.streams.values() if s.worker_id == worker.worker_id]

    # ----------------------------------------------------------------- from clients

    def from_client(self, client: bytes, message: StreamOpen | StreamAudio | StreamControl,
                    payload: bytes) -> None:
        if isinstance(message, StreamOpen):
            self.open(client, message)
            return
        stream = self.streams.get(message.stream_id)
        problem = self.problem(client, stream, message)
        if problem is not None:
            self.supervisor.broker.reply_error(client, message.stream_id, "bad_request", problem)
            return
        assert stream is not None
        if isinstance(message, StreamControl) and message.action == "abort":
            self.end(stream, "aborted")
            self.send_worker(stream, message)
            return
        if stream.ending is not None:
            return  # its close is on the way; the client learns it from StreamFailed
        stream.heard_at = time.monotonic()
        if isinstance(message, StreamAudio):
            stream.next_seq += 1
            self.forward(stream, message, payload)
        else:
            if message.action == "update" and message.options is not None:
                stream.options = message.options
            stream.closing = message.action == "close"
            self.forward(stream, message, None)

    def problem(self, client: bytes, stream: Stream | None,
                message: StreamAudio | StreamControl) -> str | None:
        """Why this message may not go to its stream, or None."""
        name = f"stream {message.stream_id}"
        if (stream is not None and isinstance(message, StreamControl)
                and message.action == "abort"):
            # From any connection: a client whose connection dropped and came back has a
            # new routing id; the id (64 random bits) is known only to the stream's opener.
            return None
        if stream is None or stream.client != client:
            # Another connection's stream is named as if unknown: ids are not disclosed.
            return (f"no open {name} on this connection (it ended, was never opened, or "
                    f"belongs to another connection; only the connection that opened a stream "
                    f"may send to it)")
        if stream.ending is not None or (isinstance(message, StreamControl)
                               and message.action == "abort"):
            return None
        if stream.closing:
            return f"{name} is closing: nothing but abort may follow its close"
        if isinstance(message, StreamAudio) and message.seq != stream.next_seq:
            return (f"{name}: audio seq {message.seq} arrived where {stream.next_seq} was "
                    f"expected (audio must come in order, from 0, none missing); the chunk "
                    f"was dropped")
        if isinstance(message, StreamControl) and message.seq != stream.next_seq:
            return (f"{name}: {message.action} names audio seq {message.seq}, but the next "
                    f"audio seq is {stream.next_seq}; the control was dropped")
        if isinstance(message, StreamControl) and message.action == "update":
            if message.options is None:
                return f"{name}: update without options"
            problem = stream_options_problem(self.settings, message.options, stream.options,
                                             audio_sent=stream.next_seq > 0)
            if problem is not None:
                return f"{name}: the update was not applied: {problem}"
        return None

    def open(self, client: bytes, message: StreamOpen) -> None:
        refusal = self.refusal(message)
        if refusal is not None:
            self.counts["refused"] += 1
            self.supervisor.broker.reply_error(client, message.request_id, *refusal)
            return
        worker = self.least_loaded()
        assert worker is not None and worker.model is not None  # refusal() checked
        now = time.monotonic()
        stream = Stream(uuid.uuid4().hex[:16], client, message.options, worker.worker_id,
                        opened_at=now, heard_at=now)
        self.streams[stream.stream_id] = stream
        self.counts["opened"] += 1
        self.send_worker(stream, message.model_copy(update={"stream_id": stream.stream_id}))
        self.supervisor.broker.send_client(client, StreamOpened(
            request_id=message.request_id, stream_id=stream.stream_id,
            fingerprint=worker.model.fingerprint))
        logger.debug("Stream %s opened on worker %s (%d open)", stream.stream_id,
                     worker.worker_id, len(self.streams))

    def refusal(self, message: StreamOpen) -> tuple[ErrorCode, str] | None:
        limit = self.settings.max_streams
        if self.supervisor.shutting_down:
            return "shutting_down", "the service is stopping"
        if limit == 0:
            return "unavailable", ("live streams are off on this service "
                                   "(SENSEVOICE_MAX_STREAMS=0)")
        if len(self.streams) >= limit:
            return "busy", (f"{len(self.streams)} live streams are open, the most this service "
                            f"allows (SENSEVOICE_MAX_STREAMS={limit}); retry later")
        problem = stream_options_problem(self.settings, message.options)
        if problem is not None:
            return "bad_request", f"the stream's options: {problem}"
        if self.least_loaded() is None:
            return "unavailable", ("no inference worker is serving yet (starting, reloading "
                                   "or failed); retry shortly, or see the supervisor log")
        return None

    def least_loaded(self, exclude: str | None = None) -> WorkerHandle | None:
        serving = [w for w in self.supervisor.pool.in_roles("serving")
                   if not w.killed and w.model is not None and w.worker_id != exclude]
        held = Counter(s.worker_id for s in self.streams.values())
        return min(serving, key=lambda w: (held[w.worker_id], len(w.jobs), w.age), default=None)

    # ----------------------------------------------------------------- to workers

    def forward(self, stream: Stream, message: BaseModel, payload: bytes | None) -> None:
        """Towards the stream's worker, numbered; kept while a move may need it again."""
        frames = encode(message, payload)
        index, stream.forwarded = stream.forwarded, stream.forwarded + 1
        if stream.kept is not None:
            stream.kept.append((index, frames))
            if payload:
                stream.kept_s += stream_audio_s(stream.options, len(payload))
                if stream.kept_s > self.kept_limit_s():
                    self.fail(stream, "busy", (
                        f"the stream sent {stream.kept_s:.0f} s of audio while it moved to "
                        f"the new model, more than {self.kept_limit_s():g} s; send audio no "
                        f"faster than real time"), tell_worker=True)
                    return
        if stream.worker_id is not None:
            self.supervisor.backend.send_multipart([stream.worker_id.encode(), *frames])

    def kept_limit_s(self) -> float:
        """Audio a moving stream may gather: its turn (max_segment_s), twice over, and the
        time the move may take."""
        return (2 * self.settings.max_segment_s + self.settings.drain_timeout
                + self.settings.hotreload_timeout)

    def send_worker(self, stream: Stream, message: BaseModel, payload: bytes | None = None
                    ) -> None:
        """Outside the numbered messages: open, resume, abort."""
        if stream.worker_id is not None:
            self.supervisor.backend.send_multipart(
                [stream.worker_id.encode(), *encode(message, payload)])

    # ----------------------------------------------------------------- from workers

    def from_worker(self, worker: WorkerHandle, message: StreamEvents | StreamMoved,
                    payload: bytes | None) -> None:
        stream = self.streams.get(message.stream_id)
        if stream is None or stream.worker_id != worker.worker_id:
            return  # ended here already (aborted, timed out, failed): its last words
        if isinstance(message, StreamMoved):
            self.moved(stream, worker, message, payload or b"")
            return
        events = message.events
        last = events[-1] if events else None
        if stream.ending is not None and isinstance(last, StreamClosed):
            events = [*events[:-1], stream.ending]
            last = events[-1]
        self.supervisor.broker.send_client(stream.client, StreamEvents(
            stream_id=stream.stream_id, events=events))
        if isinstance(last, StreamClosed):
            self.end(stream, "closed")
        elif isinstance(last, StreamFailed):
            self.end(stream, "failed", last.code)

    def too_long_failure(self) -> StreamFailed:
        limit = self.settings.max_stream_s
        return StreamFailed(code="too_long", message=(
            f"the stream was open for {limit:g} s, the longest allowed "
            f"(SENSEVOICE_MAX_STREAM_S); its last turn was transcribed; open a new stream "
            f"to go on"))

    def moved(self, stream: Stream, worker: WorkerHandle, message: StreamMoved,
              state: bytes) -> None:
        if self.supervisor.shutting_down:  # its turns so far were all transcribed
            self.fail(stream, "shutting_down", "the service is stopping; the stream has ended "
                                               "(its turns so far were transcribed)")
            return
        kept = stream.kept or []
        first_kept = kept[0][0] if kept else stream.forwarded
        if message.messages < first_kept or message.messages > stream.forwarded:
            logger.error("Stream %s: worker %s moved it after message %d, but messages %d..%d "
                         "are all that can be sent again; failing it", stream.stream_id,
                         worker.worker_id, message.messages, first_kept, stream.forwarded)
            self.fail(stream, "internal", "the stream lost its place moving to the new model; "
                                          "open a new stream to go on")
            return
        stream.kept = [(i, frames) for i, frames in kept if i >= message.messages]
        stream.kept_s = 0.0
        stream.worker_id, stream.state = None, state
        stream.moved_at = time.monotonic()
        stream.resume_seq, stream.resume_messages = message.seq, message.messages
        stream.resume_options = message.options
        stream.moved_from = worker.worker_id
        self.counts["moved"] += 1
        self.place(stream)

    def place(self, stream: Stream) -> bool:
        """A moved stream to the serving worker with the fewest streams; False: none yet."""
        worker = self.least_loaded(exclude=stream.moved_from)
        if worker is None or stream.state is None:
            return False
        stream.worker_id = worker.worker_id
        self.send_worker(stream, StreamResume(
            stream_id=stream.stream_id, seq=stream.resume_seq,
            messages=stream.resume_messages, options=stream.resume_options or stream.options),
            stream.state)
        for _, frames in stream.kept or []:
            self.supervisor.backend.send_multipart([worker.worker_id.encode(), *frames])
        stream.state, stream.kept, stream.kept_s = None, None, 0.0
        logger.info("Stream %s moved to worker %s (pid %s), serving %s", stream.stream_id,
                    worker.worker_id, worker.pid,
                    worker.model.fingerprint[:8] if worker.model else "?")
        return True

    # ----------------------------------------------------------------- worker life

    def worker_draining(self, worker: WorkerHandle) -> None:
        """It was sent Stop: keep what its streams are sent from now on, for their move."""
        for stream in self.held_by(worker):
            if stream.kept is None:
                stream.kept, stream.kept_s = [], 0.0

    def worker_lost(self, worker: WorkerHandle, how: str) -> None:
        for stream in self.held_by(worker):
            logger.warning("Stream %s failed: worker %s (pid %s) %s", stream.stream_id,
                           worker.worker_id, worker.pid, how)
            self.fail(stream, "worker_lost", WORKER_LOST.format(how=how))

    # ----------------------------------------------------------------- ending

    def tick(self, now: float) -> None:
        """Idle and too-long streams; moved streams waiting for a serving worker."""
        settings = self.settings
        for stream in list(self.streams.values()):
            if stream.worker_id is None:
                if not self.place(stream) and now - stream.moved_at > (
                        settings.hotreload_timeout + settings.drain_timeout):
                    self.fail(stream, "unavailable", (
                        "no worker took the stream over after its model was replaced; open "
                        "a new stream to go on"))
            elif stream.closing or stream.ending is not None:
                continue
            elif now - stream.heard_at > settings.stream_idle_timeout_s:
                self.fail(stream, "timeout", (
                    f"nothing reached the service for this stream for "
                    f"{settings.stream_idle_timeout_s:g} s (SENSEVOICE_STREAM_IDLE_TIMEOUT_S); "
                    f"the stream was closed"),
                    tell_worker=True)
            elif now - stream.opened_at > settings.max_stream_s:
                logger.info("Stream %s reached SENSEVOICE_MAX_STREAM_S=%g; closing it",
                            stream.stream_id, settings.max_stream_s)
                self.close_for_client(stream, self.too_long_failure())

    def fail(self, stream: Stream, code: ErrorCode, message: str,
             tell_worker: bool = False) -> None:
        """Tell the client its stream ended on an error; free it (and the worker's copy)."""
        self.supervisor.broker.send_client(stream.client, StreamEvents(
            stream_id=stream.stream_id, events=[StreamFailed(code=code, message=message)]))
        self.end(stream, "failed", code)
        if tell_worker:
            self.send_worker(stream, StreamControl(stream_id=stream.stream_id, action="abort",
                                                   seq=stream.next_seq))

    def end(self, stream: Stream, how: str, code: str | None = None) -> None:
        self.streams.pop(stream.stream_id, None)
        self.counts[how] += 1
        if code is not None:
            self.failures[code] += 1

    def close_for_client(self, stream: Stream, ending: StreamFailed) -> None:
        stream.ending = ending
        self.forward(stream, StreamControl(stream_id=stream.stream_id, action="close",
                                           seq=stream.next_seq), None)

    def shutdown(self) -> None:
        """The service stops: each stream is closed on its client's behalf (before the
        workers' Stop, so they handle the close first), so its open turn is transcribed like
        a request in hand; it then ends StreamFailed "shutting_down". A stream between
        workers fails at once."""
        for stream in list(self.streams.values()):
            if stream.worker_id is None:
                self.fail(stream, "shutting_down", "the service is stopping; the stream has "
                                                   "ended (its turns so far were transcribed)")
            elif not stream.closing and stream.ending is None:
                self.close_for_client(stream, StreamFailed(code="shutting_down", message=(
                    "the service is stopping; the stream's open turn was transcribed and the "
                    "stream has ended")))

    def stopped(self) -> None:
        """The workers are gone (or past SENSEVOICE_DRAIN_TIMEOUT): what is left fails."""
        for stream in list(self.streams.values()):
            self.fail(stream, "shutting_down", (
                f"the service stopped before the stream's open turn was transcribed (within "
                f"SENSEVOICE_DRAIN_TIMEOUT={self.settings.drain_timeout:g} s); the stream has "
                f"ended"))
