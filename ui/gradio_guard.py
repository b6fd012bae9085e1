"""What a Gradio API request may ask of this process, checked before Gradio sees it.

1. File values: every {"path": ...} in a JSON body under /gradio_api/ must be a file Gradio
   received as an upload, or an example clip (``ui.uploads``); otherwise 422 in Gradio's
   validation shape, which the page and gradio_client show as the sentence.
2. The front door: Gradio answers a call at once with an event id and queues the work without
   limit, so its bound is checked where a transcription arrives: POST /gradio_api/queue/join
   for the transcribe event, /gradio_api/call/transcribe, /gradio_api/call/v2/transcribe.
   Beyond it: 429 with Retry-After and a sentence, before anything is queued. Once queued, an
   event counts against the bound until it is done (``queued_transcriptions``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import unquote

import gradio as gr
from gradio.route_utils import API_PREFIX
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sensevoice_core.settings import MiB
from ui.gateway import RETRY_AFTER_S, Gateway
from ui.uploads import REFUSED, allowed_file

TRANSCRIBE_API = "transcribe"
TRANSCRIBE_GROUP = "transcribe"  # the transcribe event's Gradio concurrency_id
MAX_JSON_BODY = MiB  # Gradio's JSON bodies carry file references, never file contents
JOIN_PATH = f"{API_PREFIX}/queue/join"
CALL_PATHS = {f"{API_PREFIX}/call/{TRANSCRIBE_API}", f"{API_PREFIX}/call/v2/{TRANSCRIBE_API}"}


def queued_transcriptions(page: gr.Blocks) -> Callable[[], int]:
    """Transcribe events waiting in the page's queue; once one runs, its handler holds a place
    itself (``FrontDoor.hold``) until its supervisor call ends, whatever Gradio's queue says."""

    def count() -> int:
        # Gradio offers no public count per event; its queue keeps one list per concurrency group.
        group = page._queue.event_queue_per_concurrency_id.get(TRANSCRIBE_GROUP)
        return 0 if group is None else len(group.queue)

    return count


class GradioGuard:
    """ASGI middleware in front of the mounted Gradio app."""

    def __init__(self, app: ASGIApp, gateway: Gateway, transcribe_fn_index: int):
        self.app = app
        self.gateway = gateway
        self.transcribe_fn_index = transcribe_fn_index

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "").rstrip("/") if scope["type"] == "http" else ""
        if scope.get("method") in ("GET", "HEAD") and fetches_a_url(path):
            await respond(send, 403, {"detail": "this server does not fetch URLs"})
            return
        # The first one, as Starlette reads it.
        content_type = next((value for key, value in scope.get("headers", [])
                             if key == b"content-type"), b"")
        if (scope.get("method") != "POST" or not path.startswith(f"{API_PREFIX}/")
                or content_type.lower().startswith(b"multipart/")):  # uploads: new files only
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:
            await respond(send, 413, {"detail": f"the request body is over {MAX_JSON_BODY} bytes"})
            return
        receive = replay(body, receive)
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            payload = None  # Gradio refuses it too; it names no file to open
        if not all_files_allowed(payload):
            await respond(send, 422, {"detail": [{"__type__": "validate", "is_valid": False,
                                                  "parameter_name": "audio",
                                                  "message": REFUSED}]})
            return
        if path not in CALL_PATHS and not (path == JOIN_PATH and self.joins_transcribe(payload)):
            await self.app(scope, receive, send)
            return
        # Held while Gradio queues the event; from then on the queue's count holds it.
        if not self.gateway.door.try_enter():
            await respond(send, 429, {"detail": str(self.gateway.refused("ui"))})
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.gateway.door.leave()

    def joins_transcribe(self, payload: object) -> bool:
        """Whether a queue join is for the transcribe event; anything unclear counts as one."""
        index = payload.get("fn_index") if isinstance(payload, dict) else None
        return not (type(index) is int and index != self.transcribe_fn_index)


def fetches_a_url(path: str) -> bool:
    """Gradio's file= and proxy= routes fetch http(s) URLs for anyone: nothing here may reach
    for the network, and the UI must not be an open proxy."""
    for route in (f"{API_PREFIX}/file=", f"{API_PREFIX}/proxy=", "/file=", "/proxy="):
        if path.startswith(route):
            target = path[len(route):]
            for _ in range(3):  # percent-encoding, possibly twice
                target = unquote(target)
            return "://" in target or target.lower().startswith(("http:", "https:", "//"))
    return False


def all_files_allowed(payload: object) -> bool:
    """Every object with a string "path" anywhere in payload names an allowed file."""
    pending = [payload]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            path = item.get("path")
            if isinstance(path, str) and allowed_file(path) is None:
                return False
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return True


async def read_body(receive: Receive) -> bytes | None:
    """The request's body, or None when it is over MAX_JSON_BODY."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_JSON_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields body once, then defers to the client's (a disconnect, say)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


async def respond(send: Send, status: int, content: object) -> None:
    body = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 429:
        headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
