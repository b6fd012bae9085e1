"""POST /v1/audio/transcriptions, compatible with OpenAI's audio API (and GET /v1/models).

Multipart fields: ``file`` (required), ``model`` (accepted, any name: one model is served),
``language`` (auto, zh, en, yue, ja, ko; English names such as "english" too),
``response_format`` (json, text, verbose_json, srt, vtt), and two extensions: ``use_itn``
(default true: punctuation and numerals, as OpenAI's models return) and ``vad_threshold``
(0..1, the speech probability that splits long audio; default SENSEVOICE_VAD_THRESHOLD). ``prompt`` and ``temperature`` are
accepted and ignored (CTC decoding has neither); ``stream=true`` is refused. Errors have
OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.datastructures import UploadFile

from sensevoice_core.protocol import TranscribeReply
from sensevoice_core.segmentation import THRESHOLD_BOUNDS
from sensevoice_core.settings import MiB
from sensevoice_core.subtitles import to_srt, to_vtt
from sensevoice_core.vocab import LANGUAGE_BY_TAG
from ui.gateway import RETRY_AFTER_S, Gateway, RequestFailed

MODEL_ID = "sensevoice-small"
MODEL_CARD = {"id": MODEL_ID, "object": "model", "created": 1719792000, "owned_by": "sensevoice-serve"}
RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
MULTIPART_OVERHEAD = MiB  # form fields and boundaries on top of the file itself
MAX_FORM_FIELDS = 32  # OpenAI SDKs send list fields (include[], ...) once per item
RETRYABLE_4XX = {408, 409, 429}  # what OpenAI SDKs retry below 500
SERVER_ERRORS_NOT_WORTH_RETRYING = {"worker_lost", "timeout", "internal"}


def retry_headers(failure: RequestFailed) -> dict[str, str]:
    """Tell OpenAI SDKs (which retry 408, 409, 429 and 5xx twice) what a retry can fix."""
    if failure.status in (429, 503):
        return {"Retry-After": str(RETRY_AFTER_S)}
    if (failure.status < 500 and failure.status not in RETRYABLE_4XX) or \
            failure.code in SERVER_ERRORS_NOT_WORTH_RETRYING:
        return {"x-should-retry": "false"}
    return {}


def openai_error(failure: RequestFailed) -> JSONResponse:
    kind = "invalid_request_error" if failure.status < 500 else "server_error"
    if failure.status == 429:
        kind = "rate_limit_error"
    headers = retry_headers(failure)
    return JSONResponse({"error": {"message": failure.message, "type": kind,
                                   "param": failure.param, "code": failure.code}},
                        status_code=failure.status, headers=headers)


def parse_bool(value: str, field: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise RequestFailed(400, "bad_request", f"{field} must be true or false, got {value!r}", field)


def parse_threshold(value: object) -> float | None:
    if value in (None, ""):
        return None
    try:
        threshold = float(str(value))
        THRESHOLD_BOUNDS.check("vad_threshold", threshold)
    except ValueError:
        raise RequestFailed(400, "bad_request", f"vad_threshold must be "
                                                f"{THRESHOLD_BOUNDS.describe()}, got {value!r}",
                            "vad_threshold") from None
    return threshold


def render(reply: TranscribeReply, response_format: str) -> Response:
    headers = {"X-SenseVoice-Fingerprint": reply.fingerprint}
    if response_format == "text":
        return PlainTextResponse(reply.text + "\n", headers=headers)
    if response_format == "srt":
        return PlainTextResponse(to_srt(reply.segments), headers=headers)
    if response_format == "vtt":
        return PlainTextResponse(to_vtt(reply.segments), media_type="text/vtt", headers=headers)
    if response_format == "json":
        return JSONResponse({"text": reply.text}, headers=headers)
    # avg_logprob, compression_ratio and no_speech_prob are Whisper's; neutral values keep
    # clients that read them working (README says so).
    segments = [{"id": index, "seek": 0, "start": s.start, "end": s.end, "text": s.text,
                 "tokens": list(s.token_ids), "temperature": 0.0, "avg_logprob": 0.0,
                 "compression_ratio": 1.0,
                 "no_speech_prob": 1.0 if s.language == "nospeech" else 0.0,
                 "language": s.language, "emotion": s.emotion, "event": s.event}
                for index, s in enumerate(reply.segments)]
    body = {
        "task": "transcribe",
        "language": language_name(reply.language) or "",  # a string, as OpenAI types it
        "duration": round(reply.duration_s, 3),
        "text": reply.text,
        "segments": segments,
        # SenseVoice's own tags, beyond OpenAI's fields
        "emotion": reply.emotion,
        "event": reply.event,
        "fingerprint": reply.fingerprint,
    }
    return JSONResponse(body, headers=headers)


def language_name(tag: str | None) -> str | None:
    """OpenAI's way: the English name ("english"), not the code."""
    language = LANGUAGE_BY_TAG.get(tag or "")
    return language.name if language else tag


def build_openai_router(gateway: Gateway) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    def list_models() -> dict:
        return {"object": "list", "data": [MODEL_CARD]}

    @router.get("/v1/models/{model_id}")
    def retrieve_model(model_id: str) -> JSONResponse:
        if model_id != MODEL_ID:
            return openai_error(RequestFailed(404, "model_not_found",
                                              f"no model {model_id!r}; this server serves "
                                              f"{MODEL_ID!r}", "model"))
        return JSONResponse(MODEL_CARD)

    @router.post("/v1/audio/transcriptions")
    async def create_transcription(request: Request) -> Response:
        try:
            check_length(request, gateway)
        except RequestFailed as failure:
            gateway.metrics.request_done("openai", failure.code, 0.0, 0.0)
            return openai_error(failure)
        # Refused at once when full, before the upload is read; but an upload being read
        # holds no place, or a few clients sending slowly could keep everyone out.
        if gateway.door.full():
            return openai_error(gateway.refused("openai"))
        try:
            form = await read_form(request, gateway)
        except RequestFailed as failure:
            gateway.metrics.request_done("openai", failure.code, 0.0, 0.0)
            return openai_error(failure)
        if not gateway.door.try_enter():
            return openai_error(gateway.refused("openai"))
        try:
            reply = await anyio.to_thread.run_sync(
                gateway.transcribe, form.audio, form.name, form.language, form.use_itn,
                "openai", form.vad_threshold, limiter=gateway.transcribe_slots)
        except RequestFailed as failure:
            return openai_error(failure)
        finally:
            gateway.door.leave()
        return render(reply, form.response_format)

    return router


@dataclass(frozen=True)
class TranscriptionForm:
    audio: bytes
    name: str  # the upload's file name, for error messages
    language: str
    use_itn: bool
    response_format: str
    vad_threshold: float | None


def check_length(request: Request, gateway: Gateway) -> None:
    """What the headers alone refuse: no length, too long, not a form.

    This is not the upload limit's check (Gateway.check_upload, on the file itself): it bounds
    the whole body, form fields included, before a byte of it is read, since reading the form
    spools all of it to disk.
    """
    declared = request.headers.get("content-length")
    if not declared or not declared.isdigit():
        # Without a length the body would be spooled to disk in full before any check.
        raise RequestFailed(411, "length_required", "send a Content-Length header (chunked "
                                                    "uploads are not accepted)", "file")
    if int(declared) > gateway.settings.max_upload_bytes + MULTIPART_OVERHEAD:
        raise RequestFailed(413, "too_large",
                            f"the request is {int(declared) / MiB:.1f} MiB; the limit is "
                            f"{gateway.settings.max_upload_mb:g} MiB (SENSEVOICE_MAX_UPLOAD_MB)",
                            "file")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestFailed(400, "bad_request", "expected a multipart/form-data body with a "
                                                "'file' field", "file")


async def read_form(request: Request, gateway: Gateway) -> TranscriptionForm:
    try:
        form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS)
    except Exception as e:  # Starlette raises its own errors for malformed multipart bodies
        raise RequestFailed(400, "bad_request", f"could not read the form: {e}") from None
    try:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise RequestFailed(400, "bad_request", "the 'file' field is missing (an audio file "
                                                    "upload)", "file")
        name = file.filename or "the uploaded file"
        # One byte over is enough for Gateway.check_upload to refuse it.
        audio = await file.read(gateway.settings.max_upload_bytes + 1)
        response_format = str(form.get("response_format") or "json").strip().lower()
        if response_format not in RESPONSE_FORMATS:
            raise RequestFailed(400, "bad_request",
                                f"response_format {response_format!r} is not supported; expected "
                                f"one of: {', '.join(RESPONSE_FORMATS)}", "response_format")
        language = str(form.get("language") or "auto")
        use_itn = parse_bool(str(form.get("use_itn") or "true"), "use_itn")
        vad_threshold = parse_threshold(form.get("vad_threshold"))
        granularities = [*form.getlist("timestamp_granularities[]"),
                         *form.getlist("timestamp_granularities")]
        if "word" in granularities:
            raise RequestFailed(400, "bad_request", "word timestamps are not supported yet; "
                                                    "segments carry start and end times",
                                "timestamp_granularities")
        if parse_bool(str(form.get("stream") or "false"), "stream"):
            raise RequestFailed(400, "bad_request", "streaming transcription is not supported; "
                                                    "send stream=false", "stream")
    finally:
        await form.close()
    return TranscriptionForm(audio, name, language, use_itn, response_format, vad_threshold)
