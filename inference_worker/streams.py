"""The worker's live streams: one LiveTranscriber each, run by one stream thread.

The I/O thread only queues: StreamOpen and StreamResume create a session, StreamAudio and
StreamControl join its queue (abort drops it at once), so pongs are never late. The stream
thread takes the sessions with queued messages in turn (round robin) and handles all of one
session's queued messages at once: consecutive audio chunks are decoded and go to the engine
in one feed(), so a stream that fell behind catches up with one partial, not one per chunk.
One thread serves all of the worker's streams: however many there are, batch requests keep
their compute threads. With batching on, a turn's decode joins the forward passes of the
worker's requests (sensevoice_core.batching), so it waits at most about one pass for them.

A stream whose audio waits unprocessed for more than twice SENSEVOICE_MAX_SEGMENT_S (it sends
faster than this worker transcribes) fails alone ("busy"); bad audio bytes fail it alone
("bad_audio"). Finals carry the fingerprint of this worker's model.

Draining (after Stop, or SIGTERM): each stream is moved at its next point between turns, once every
message that reached the worker before the Stop is handled: StreamMoved(seq, messages,
options) with its snapshot(), then the worker forgets it (options: those in force after the
handled messages; an update queued behind them applies on the new worker, in order). The turn
in progress so finishes on this model.
A turn still open DRAIN_COMMIT_MARGIN_S before SENSEVOICE_DRAIN_TIMEOUT is committed here,
then the stream moves. The worker exits once its requests and streams are all gone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from sensevoice_core.live_audio import decode_pcm
from sensevoice_core.protocol import (
    ErrorCode,
    StreamAudio,
    StreamControl,
    StreamEvents,
    StreamMoved,
    StreamOpen,
    StreamResume,
    encode,
    stream_audio_s,
)
from sensevoice_core.stream_types import (
    Final,
    StreamClosed,
    StreamEvent,
    StreamFailed,
    StreamOptions,
)
from sensevoice_core.streaming import LiveTranscriber

if TYPE_CHECKING:
    from inference_worker.worker import InferenceWorker

logger = logging.getLogger("sensevoice.worker")

DRAIN_COMMIT_MARGIN_S = 5.0  # before the drain deadline, for the last turn's decode and move


class StreamError(Exception):
    """Ends one stream with StreamFailed(code, message)."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code: ErrorCode = code


@dataclass
class Session:
    stream_id: str
    options: StreamOptions  # as of the last queued update (encoding only changes before audio)
    applied: StreamOptions  # as of the last handled update: what a move hands on
    state: bytes | None = None  # a moved stream's, until the stream thread restores it
    live: LiveTranscriber | None = None  # made on the stream thread
    queue: deque[tuple[StreamAudio | StreamControl, bytes]] = field(default_factory=deque)
    queued_s: float = 0.0  # seconds of audio in queue
    received: int = 0  # audio and control messages queued so far (a resume counts on)
    handled: int = 0
    next_seq: int = 0  # the next audio seq, after what was handled
    drain_mark: int | None = None  # received when the Stop came
    failure: StreamFailed | None = None  # set by the I/O thread, sent by the stream thread
    busy: bool = False  # the stream thread works on it
    gone: bool = False  # aborted: what it produces now is dropped


class StreamSessions:
    def __init__(self, worker: InferenceWorker):
        self.worker = worker
        self.settings = worker.settings
        self.condition = threading.Condition()
        self.sessions: dict[str, Session] = {}
        self.order: deque[str] = deque()  # round robin
        self.commit_at: float | None = None  # set by drain(): commit open turns from then
        self.thread: threading.Thread | None = None
        self.closing = False

    # ----------------------------------------------------------------- the I/O thread

    def held(self) -> int:
        with self.condition:
            return len(self.sessions)

    def open(self, message: StreamOpen | StreamResume, state: bytes | None = None) -> None:
        stream_id = message.stream_id
        session = Session(stream_id or "", message.options, message.options, state=state)
        if isinstance(message, StreamResume):
            session.received = session.handled = message.messages
            session.next_seq = message.seq
        with self.condition:
            if stream_id is None or stream_id in self.sessions:
                logger.error("ignoring a stream open without a new stream id (%s)", stream_id)
                return
            if self.commit_at is not None:  # stopping already: it moves on at once
                session.drain_mark = session.received
            self.sessions[stream_id] = session
            self.order.append(stream_id)
            self.condition.notify()
        if self.thread is None:
            self.thread = threading.Thread(target=self.run, name="streams", daemon=True)
            self.thread.start()

    def add(self, message: StreamAudio | StreamControl, payload: bytes) -> None:
        with self.condition:
            session = self.sessions.get(message.stream_id)
            if session is None or session.failure is not None:
                return  # moved, aborted or failed: the supervisor has what it needs
            if isinstance(message, StreamControl) and message.action == "abort":
                self.forget(session)
                return
            session.queue.append((message, payload))
            session.received += 1
            if isinstance(message, StreamControl) and message.options is not None:
                session.options = message.options
            session.queued_s += stream_audio_s(session.options, len(payload))
            limit = 2 * self.settings.max_segment_s
            if session.queued_s > limit:
                session.failure = StreamFailed(code="busy", message=(
                    f"the stream sends audio faster than the worker can transcribe it: "
                    f"{session.queued_s:.0f} s of its audio wait, more than {limit:g} s "
                    f"(twice SENSEVOICE_MAX_SEGMENT_S); send audio no faster than real time"))
                session.queue.clear()
                logger.warning("stream %s failed: %.0f s of audio waiting, more than %g s",
                               session.stream_id, session.queued_s, limit)
            self.condition.notify()

    def drain(self) -> None:
        """Stop came: move every stream at its next point between turns (the first call
        counts; later ones change nothing)."""
        if self.commit_at is not None:
            return
        margin = min(DRAIN_COMMIT_MARGIN_S, self.settings.drain_timeout / 2)
        with self.condition:
            self.commit_at = time.monotonic() + self.settings.drain_timeout - margin
            for session in self.sessions.values():
                session.drain_mark = session.received
            self.condition.notify()

    def close(self) -> None:
        with self.condition:
            self.closing = True
            self.condition.notify()

    def forget(self, session: Session) -> None:
        """Under the lock."""
        session.gone = True
        self.sessions.pop(session.stream_id, None)
        if session.stream_id in self.order:
            self.order.remove(session.stream_id)

    # ----------------------------------------------------------------- the stream thread

    def run(self) -> None:
        while True:
            with self.condition:
                work = self.next_work()
                while work is None:
                    if self.closing:
                        return
                    timeout = None if self.commit_at is None else max(
                        0.05, self.commit_at - time.monotonic())
                    self.condition.wait(timeout)
                    work = self.next_work()
                session, items = work
                session.busy = True
            try:
                self.work(session, items)
            except Exception:  # noqa: BLE001 - one stream's bug must not stop the others
                logger.exception("stream %s failed", session.stream_id)
                self.end(session, [StreamFailed(code="internal", message=(
                    "the worker failed on this stream; open a new one"))])
            finally:
                with self.condition:
                    session.busy = False

    def next_work(self) -> tuple[Session, list[tuple[StreamAudio | StreamControl, bytes]]] | None:
        """Under the lock: the next session with something to do, and its queued messages."""
        for _ in range(len(self.order)):
            stream_id = self.order[0]
            self.order.rotate(-1)
            session = self.sessions[stream_id]
            if session.busy:
                continue
            if (session.failure is not None or session.live is None or session.queue
                    or self.may_move(session)):
                items = list(session.queue)
                session.queue.clear()
                session.queued_s = 0.0
                return session, items
        return None

    def may_move(self, session: Session) -> bool:
        return (session.drain_mark is not None and session.handled >= session.drain_mark
                and session.live is not None
                and (session.live.between_turns or self.commit_due()))

    def commit_due(self) -> bool:
        return self.commit_at is not None and time.monotonic() >= self.commit_at

    def work(self, session: Session, items: list[tuple[StreamAudio | StreamControl, bytes]]
             ) -> None:
        if session.failure is not None:
            self.end(session, [session.failure])
            return
        events: list[StreamEvent] = []
        try:
            if session.live is None:
                session.live = self.start(session)
            closed = self.handle(session, items, events)
        except StreamError as e:
            logger.warning("stream %s failed: %s", session.stream_id, e)
            self.end(session, [*events, StreamFailed(code=e.code, message=str(e))])
            return
        if closed:
            self.end(session, [*events, StreamClosed()])
            return
        live = session.live
        if self.may_move(session):
            if not live.between_turns:  # the drain deadline is near: finish the turn here
                events += live.commit()
            if live.between_turns:
                self.send(session, events)
                self.move(session)
                return
        self.send(session, events)

    def start(self, session: Session) -> LiveTranscriber:
        model = self.worker.model
        if model is None:
            raise StreamError("unavailable", "this worker has no model loaded")
        try:
            config = self.settings.stream_config(session.applied)
        except ValueError as e:
            raise StreamError("bad_request", f"the stream's options: {e}") from None
        if session.state is None:
            return LiveTranscriber(model, config)
        try:
            return LiveTranscriber.restore(model, config, session.state)
        except ValueError as e:
            raise StreamError("internal", f"the stream's state could not be taken over by "
                                          f"the new model ({e}); open a new stream") from None
        finally:
            session.state = None

    def handle(self, session: Session, items: list[tuple[StreamAudio | StreamControl, bytes]],
               events: list[StreamEvent]) -> bool:
        """The queued messages, in order, into events; True once the stream closed."""
        live = session.live
        assert live is not None
        chunks: list[np.ndarray] = []
        for message, payload in items:
            if isinstance(message, StreamAudio):
                try:
                    chunks.append(decode_pcm(payload, session.applied.encoding))
                except ValueError as e:
                    raise StreamError("bad_audio", f"audio chunk {message.seq}: {e}") from None
                session.next_seq = message.seq + 1
            else:
                events += self.feed(live, chunks)
                chunks = []
                if message.action == "commit":
                    events += live.commit()
                elif message.action == "clear":
                    events += live.clear()
                elif message.action == "update" and message.options is not None:
                    try:
                        live.reconfigure(self.settings.stream_config(message.options))
                    except ValueError as e:
                        raise StreamError("bad_request", f"the update: {e}") from None
                    session.applied = message.options
                elif message.action == "close":
                    events += live.finish()
                    return True
            session.handled += 1
        events += self.feed(live, chunks)
        return False

    @staticmethod
    def feed(live: LiveTranscriber, chunks: list[np.ndarray]) -> list[StreamEvent]:
        if not chunks:
            return []
        try:
            return live.feed(np.concatenate(chunks))
        except ValueError as e:
            raise StreamError("bad_audio", str(e)) from None

    def send(self, session: Session, events: list[StreamEvent]) -> None:
        if not events or session.gone:
            return
        fingerprint = self.worker.fingerprint
        stamped = [e.model_copy(update={"fingerprint": fingerprint}) if isinstance(e, Final)
                   else e for e in events]
        self.worker.push(encode(StreamEvents(stream_id=session.stream_id, events=stamped)))

    def end(self, session: Session, events: list[StreamEvent]) -> None:
        """Its last events; then it is forgotten (after the push: the worker's loop exits
        only when no session is left, and sends what was pushed first)."""
        self.send(session, events)
        with self.condition:
            self.forget(session)

    def move(self, session: Session) -> None:
        live = session.live
        assert live is not None
        if not session.gone:
            self.worker.push(encode(StreamMoved(stream_id=session.stream_id,
                                                seq=session.next_seq, messages=session.handled,
                                                options=session.applied),
                                    live.snapshot()))
        logger.info("stream %s handed back to go on on another worker, after %d audio "
                    "chunks", session.stream_id, session.next_seq)
        with self.condition:
            self.forget(session)
