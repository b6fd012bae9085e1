"""``stream=true`` on POST /v1/audio/transcriptions: OpenAI's server-sent events, as the
``openai`` SDK parses them (``Stream[TranscriptionStreamEvent]``).

The request asks the service for progress (SupervisorClient.transcribe's on_progress): the
VAD finds the segments, then they are decoded in time order. Until the first progress step
nothing is sent, so a refusal or bad audio is an ordinary HTTP error with OpenAI's body. Then:

- ``transcript.text.delta`` for each segment with text, as it finishes: ``delta`` is what to
  append to the text so far (a space before it unless both it and the segment before are in
  an unspaced script, as Result.text joins them), so the deltas add up to the done event's
  text. Extensions: the segment's ``start``, ``end``, ``language``, ``emotion``, ``event``,
  and ``done`` / ``total``, the segments decoded of all the VAD found.
- a ``: done/total`` comment line for a step without text (the start, a segment the model
  heard no speech in): progress, and a keep-alive, that SDKs skip.
- ``transcript.text.done`` with the whole ``text`` (the non-streamed json text), OpenAI's
  ``languages`` ([{"code"}], the dominant one first) and the extensions ``language``,
  ``emotion``, ``event``, ``duration`` and ``fingerprint``.
- a failure after the first event: an ``error`` event, ``{"error": {message, type, param,
  code}}``, on which the SDK raises APIError; the stream then ends. Never a silent end.

A client that disconnects: the next progress step raises ClientGone, which ends the wait for
the service and frees this request's place at the front door. The service has no cancel, so
the worker finishes the file and its reply is dropped.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable

import anyio
import anyio.from_thread
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from sensevoice_core.protocol import Progress, TranscribeReply
from sensevoice_core.result import Segment, join_text, seconds_by
from ui.gateway import ClientGone, RequestFailed

Step = Progress | TranscribeReply | RequestFailed
STREAM_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
                  (b"cache-control", b"no-cache"),
                  (b"x-accel-buffering", b"no")]  # proxies pass each event on at once


def delta_text(previous: Segment | None, segment: Segment) -> str:
    """What segment adds to the text of the segments before it (previous: the last of them
    with text), by Result.text's own join."""
    if previous is None:
        return segment.text
    return join_text([previous, segment])[len(previous.text):]


def sse(data: dict, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def delta_event(step: Progress, segment: Segment, delta: str) -> bytes:
    return sse({"type": "transcript.text.delta", "delta": delta,
                "start": segment.start, "end": segment.end, "language": segment.language,
                "emotion": segment.emotion, "event": segment.event,
                "done": step.done, "total": step.total})


def done_event(reply: TranscribeReply) -> bytes:
    by_time = seconds_by(reply.segments, "language")
    languages = sorted(by_time, key=lambda code: (code != reply.language, -by_time[code]))
    return sse({"type": "transcript.text.done", "text": reply.text,
                "languages": [{"code": code} for code in languages],
                "language": reply.language, "emotion": reply.emotion, "event": reply.event,
                "duration": round(reply.duration_s, 3), "fingerprint": reply.fingerprint})


def error_event(failure: RequestFailed) -> bytes:
    return sse({"error": failure.openai_error()}, event="error")


class StreamedTranscription(Response):
    """The event stream of one transcription (or, when it fails before the first event, the
    error response render_error makes). The caller has entered the front door; this leaves
    it when the transcription ends."""

    def __init__(self, transcribe: Callable[[Callable[[Progress], None]], TranscribeReply],
                 render_error: Callable[[RequestFailed], Response], leave: Callable[[], None],
                 limiter: anyio.CapacityLimiter):
        super().__init__()
        self.transcribe = transcribe  # runs on a thread; takes the on_progress callback
        self.render_error = render_error
        self.leave = leave
        self.limiter = limiter
        self.gone = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        steps_in, steps = anyio.create_memory_object_stream[Step](math.inf)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self.run, steps_in)
            try:
                first = await steps.receive()
                if isinstance(first, RequestFailed):
                    await self.render_error(first)(scope, receive, send)
                    return
                tasks.start_soon(self.watch_disconnect, receive, tasks.cancel_scope)
                await send({"type": "http.response.start", "status": 200,
                            "headers": STREAM_HEADERS})
                await self.send_events(first, steps, send)
            finally:
                # However the response ended (sent whole, the client gone, a failed send), the
                # thread stops waiting at its next step; the disconnect watch ends.
                self.gone.set()
                tasks.cancel_scope.cancel()

    async def run(self, steps: MemoryObjectSendStream[Step]) -> None:
        def on_progress(step: Progress) -> None:
            if self.gone.is_set():
                raise ClientGone()
            anyio.from_thread.run_sync(steps.send_nowait, step)

        try:
            outcome: Step = await anyio.to_thread.run_sync(self.transcribe, on_progress,
                                                           limiter=self.limiter)
        except RequestFailed as failure:
            outcome = failure
        except ClientGone:
            return
        finally:
            self.leave()
        steps.send_nowait(outcome)

    async def send_events(self, first: Step, steps: MemoryObjectReceiveStream[Step],
                          send: Send) -> None:
        previous: Segment | None = None
        step = first
        while isinstance(step, Progress):
            segment = step.segment
            if segment is not None and segment.text:
                chunk = delta_event(step, segment, delta_text(previous, segment))
                previous = segment
            else:
                chunk = f": {step.done}/{step.total}\n\n".encode()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            step = await steps.receive()
        last = done_event(step) if isinstance(step, TranscribeReply) else error_event(step)
        await send({"type": "http.response.body", "body": last, "more_body": False})

    async def watch_disconnect(self, receive: Receive, scope: anyio.CancelScope) -> None:
        """The body was read: the next message is the client leaving."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone.set()
        scope.cancel()
