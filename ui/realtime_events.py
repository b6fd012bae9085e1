"""SenseVoice stream events (sensevoice_core.stream_types) as OpenAI Realtime server events.

Ids are OpenAI's style: ``event_``, ``item_`` and ``sess_`` and 21 random letters and digits.
Each turn the stream numbers (1, 2, ...) is one conversation item.

Deltas. SenseVoice is not a streaming model: while a turn is open its audio so far is decoded
again (a Partial), and a later partial may revise words an earlier one had. The rule:
  - a partial that extends the text already sent as deltas sends the extension as ``delta``;
  - a partial that revises it sends ``delta: ""``; either way the event's ``partial`` field
    (an extension) carries the turn's whole current hypothesis, for a client that shows it;
  - the final sends what its transcript adds to the text sent, when it extends it, so an item
    with text gets at least one delta, and where no partial was revised the deltas add up to
    the transcript;
  - ``completed.transcript`` is always the final text: where a revision made the deltas diverge,
    it is what a client should keep.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field

from sensevoice_core.stream_types import (
    Cleared,
    CommitEmpty,
    Committed,
    Final,
    Partial,
    SpeechStarted,
    SpeechStopped,
    StreamClosed,
    StreamEvent,
)
from ui.gateway import RequestFailed
from ui.openai_api import word_json

ID_ALPHABET = string.ascii_letters + string.digits
ID_LENGTH = 21
DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"
FAILED = "conversation.item.input_audio_transcription.failed"


def new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))


def server_event(kind: str, **fields: object) -> dict:
    return {"type": kind, "event_id": new_id("event_"), **fields}


def error_body(failure: RequestFailed, client_event_id: str | None = None) -> dict:
    return {**failure.openai_error(), "event_id": client_event_id}


def error_event(failure: RequestFailed, client_event_id: str | None = None) -> dict:
    return server_event("error", error=error_body(failure, client_event_id))


def commit_empty_event(event: CommitEmpty, client_event_id: str | None = None) -> dict:
    """OpenAI's answer to a commit of an empty buffer. The stream's events do not carry the
    client's event id, so the error's event_id is null unless a caller supplies it."""
    return server_event("error", error={
        "type": "invalid_request_error", "code": "input_audio_buffer_commit_empty",
        "message": f"Nothing to commit: {event.reason}.", "param": None,
        "event_id": client_event_id})


def milliseconds(seconds: float) -> int:
    return round(seconds * 1000)


@dataclass
class ItemState:
    item_id: str
    sent: str = ""  # the text sent as deltas so far
    shown: str | None = None  # the last partial's text
    committed: bool = False


@dataclass
class EventTranslator:
    """One session's items: turn numbers to item ids, and the text sent of each open one."""

    items: dict[int, ItemState] = field(default_factory=dict)  # open: no Final yet
    last_committed: str | None = None

    def item(self, number: int) -> ItemState:
        if number not in self.items:
            self.items[number] = ItemState(new_id("item_"))
        return self.items[number]

    def translate(self, event: StreamEvent) -> list[dict]:
        """The OpenAI events of one stream event (StreamFailed: see ``failed``)."""
        if isinstance(event, SpeechStarted):
            return [server_event("input_audio_buffer.speech_started",
                                 audio_start_ms=milliseconds(event.start_s),
                                 item_id=self.item(event.item).item_id)]
        if isinstance(event, SpeechStopped):
            return [server_event("input_audio_buffer.speech_stopped",
                                 audio_end_ms=milliseconds(event.end_s),
                                 item_id=self.item(event.item).item_id)]
        if isinstance(event, Committed):
            state = self.item(event.item)
            state.committed = True
            item_id = state.item_id
            previous, self.last_committed = self.last_committed, item_id
            return [server_event("input_audio_buffer.committed", item_id=item_id,
                                 previous_item_id=previous)]
        if isinstance(event, CommitEmpty):
            return [commit_empty_event(event)]
        if isinstance(event, Partial):
            return self.partial(event)
        if isinstance(event, Final):
            return self.final(event)
        if isinstance(event, Cleared):
            # The open turn is dropped; committed ones still get their Final.
            self.items = {n: s for n, s in self.items.items() if s.committed}
            return [server_event("input_audio_buffer.cleared")]
        if isinstance(event, StreamClosed):
            return [server_event("session.closed")]
        raise TypeError(f"translate() does not take {type(event).__name__}; see failed()")

    def partial(self, event: Partial) -> list[dict]:
        state = self.item(event.item)
        text = event.segment.text
        if text == state.shown:
            return []
        state.shown = text
        delta = ""
        if text.startswith(state.sent):
            delta, state.sent = text[len(state.sent):], text
        return [server_event(DELTA, item_id=state.item_id, content_index=0, delta=delta,
                             partial=text)]

    def final(self, event: Final) -> list[dict]:
        state = self.items.pop(event.item, None) or ItemState(new_id("item_"))
        segment = event.segment
        events = []
        if segment.text.startswith(state.sent) and len(segment.text) > len(state.sent):
            events.append(server_event(DELTA, item_id=state.item_id, content_index=0,
                                       delta=segment.text[len(state.sent):],
                                       partial=segment.text))
        completed = server_event(
            COMPLETED, item_id=state.item_id, content_index=0, transcript=segment.text,
            usage={"type": "duration", "seconds": round(segment.end - segment.start, 3)},
            # SenseVoice's own, beyond OpenAI's fields:
            language=segment.language, emotion=segment.emotion, event=segment.event,
            start=segment.start, end=segment.end,
            words=[word_json(word) for word in segment.words])
        if event.fingerprint is not None:
            completed["fingerprint"] = event.fingerprint
        events.append(completed)
        return events

    def failed(self, failure: RequestFailed) -> list[dict]:
        """The stream ended on an error: each open item fails, then the session's error."""
        events = [server_event(FAILED, item_id=state.item_id, content_index=0,
                               error=error_body(failure))
                  for _, state in sorted(self.items.items())]
        self.items.clear()
        return [*events, error_event(failure)]
