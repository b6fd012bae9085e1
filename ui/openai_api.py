"""POST /v1/audio/transcriptions, compatible with OpenAI's audio API (and GET /v1/models).

Multipart fields: ``file`` (required), ``model`` (accepted, any name: one model is served),
``language`` (auto, zh, en, yue, ja, ko; English names such as "english" too),
``response_format`` (json, text, verbose_json, srt, vtt) and ``timestamp_granularities[]``
(segment, word or both, as OpenAI defines them: word is for verbose_json only and adds
top-level ``words``; word alone leaves the segments out). Extensions: ``use_itn`` (default
true: punctuation and numerals, as OpenAI's models return), ``vad_threshold`` (0..1, the speech
probability that splits long audio; default SENSEVOICE_VAD_THRESHOLD), ``languages`` (what auto
language ID may choose: comma-separated or repeated ``languages[]``; default
SENSEVOICE_LANGUAGES, empty: any), and for srt/vtt ``max_line_width``, ``max_line_count``
(default SENSEVOICE_SUBTITLE_MAX_LINE_WIDTH / _COUNT) and, for vtt, ``karaoke`` (each word timed
inside its cue). ``prompt`` and ``temperature`` are accepted and ignored (CTC decoding has
neither). ``stream=true`` (with response_format json or text, as OpenAI allows) answers with
server-sent events as segments finish (``ui.openai_stream``). Errors have OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.datastructures import FormData, UploadFile

from sensevoice_core.protocol import TranscribeReply
from sensevoice_core.result import Segment, Word
from sensevoice_core.segmentation import THRESHOLD_BOUNDS
from sensevoice_core.settings import MiB
from sensevoice_core.subtitles import LINE_LIMIT_BOUNDS, SubtitleOptions, to_srt, to_vtt
from sensevoice_core.vocab import LANGUAGE_BY_TAG
from ui.gateway import RETRY_AFTER_S, Gateway, RequestFailed
from ui.openai_stream import StreamedTranscription

MODEL_ID = "sensevoice-small"
MODEL_CARD = {"id": MODEL_ID, "object": "model", "created": 1719792000, "owned_by": "sensevoice-serve"}
RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
STREAMED_FORMATS = ("json", "text")  # OpenAI streams only these (as events either way)
SUBTITLE_FORMATS = ("srt", "vtt")
# Extension fields of subtitle responses -> the formats they apply to.
SUBTITLE_FIELDS = {"max_line_width": SUBTITLE_FORMATS, "max_line_count": SUBTITLE_FORMATS,
                   "karaoke": ("vtt",)}
GRANULARITIES = ("segment", "word")  # OpenAI's timestamp_granularities[]
MAX_SUBTITLE_LIMIT = int(LINE_LIMIT_BOUNDS.high)
WHISPER_FRAMES_PER_S = 100  # the unit of Whisper's "seek": 10 ms mel frames
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
    return JSONResponse({"error": failure.openai_error()}, status_code=failure.status,
                        headers=retry_headers(failure))


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


def render(reply: TranscribeReply, form: TranscriptionForm) -> Response:
    headers = {"X-SenseVoice-Fingerprint": reply.fingerprint}
    if form.response_format == "text":
        return PlainTextResponse(reply.text + "\n", headers=headers)
    if form.response_format == "srt":
        return PlainTextResponse(to_srt(reply.segments, form.subtitles), headers=headers)
    if form.response_format == "vtt":
        return PlainTextResponse(to_vtt(reply.segments, form.subtitles), media_type="text/vtt",
                                 headers=headers)
    if form.response_format == "json":
        return JSONResponse({"text": reply.text}, headers=headers)
    return JSONResponse(verbose_json(reply, form.granularities), headers=headers)


def verbose_json(reply: TranscribeReply, granularities: frozenset[str]) -> dict:
    """OpenAI's verbose_json: segments unless only words were asked for, words when they were."""
    body: dict[str, object] = {
        "task": "transcribe",
        "language": language_name(reply.language) or "",  # a string, as OpenAI types it
        "duration": round(reply.duration_s, 3),
        "text": reply.text,
    }
    if "segment" in granularities:
        body["segments"] = [segment_json(index, s) for index, s in enumerate(reply.segments)]
    if "word" in granularities:
        body["words"] = [word_json(word) for word in reply.words]
    # SenseVoice's own tags, beyond OpenAI's fields
    body.update(emotion=reply.emotion, event=reply.event, fingerprint=reply.fingerprint)
    return body


def segment_json(index: int, segment: Segment) -> dict:
    """One verbose_json segment. Whisper's confidences are the model's own measures of this
    segment (result.py); one the model could not measure is left out, never made up."""
    confidences = {"avg_logprob": segment.avg_logprob,
                   "compression_ratio": segment.compression_ratio,
                   "no_speech_prob": segment.no_speech_prob}
    return {"id": index,
            # Whisper's seek: the segment's offset into the audio, in its 10 ms frames.
            "seek": round(segment.start * WHISPER_FRAMES_PER_S),
            "start": segment.start, "end": segment.end, "text": segment.text,
            "tokens": list(segment.token_ids),
            "temperature": 0.0,  # greedy CTC decoding: the argmax, as at temperature 0
            **{name: value for name, value in confidences.items() if value is not None},
            "language": segment.language, "emotion": segment.emotion, "event": segment.event}


def word_json(word: Word) -> dict:
    """OpenAI's word (word, start, end), and the model's probability of it (an extension)."""
    return {"word": word.word, "start": word.start, "end": word.end,
            "probability": round(word.probability, 4)}


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
        if form.stream:
            return StreamedTranscription(
                lambda on_progress: gateway.transcribe(
                    form.audio, form.name, form.language, form.use_itn, "openai",
                    form.vad_threshold, form.word_timestamps, form.languages, on_progress),
                openai_error, gateway.door.leave, gateway.transcribe_slots)
        try:
            reply = await anyio.to_thread.run_sync(
                gateway.transcribe, form.audio, form.name, form.language, form.use_itn,
                "openai", form.vad_threshold, form.word_timestamps, form.languages,
                limiter=gateway.transcribe_slots)
        except RequestFailed as failure:
            return openai_error(failure)
        finally:
            gateway.door.leave()
        return render(reply, form)

    return router


@dataclass(frozen=True)
class TranscriptionForm:
    audio: bytes
    name: str  # the upload's file name, for error messages
    language: str
    use_itn: bool
    response_format: str
    vad_threshold: float | None
    granularities: frozenset[str]  # of GRANULARITIES
    languages: list[str] | None  # as given (the gateway checks them); None: not given
    subtitles: SubtitleOptions | None  # srt and vtt only
    stream: bool  # server-sent events as segments finish

    @property
    def word_timestamps(self) -> bool:
        """Words are asked for, or subtitle cues are cut from them."""
        return "word" in self.granularities or self.subtitles is not None


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
        granularities = parse_granularities(
            [*form.getlist("timestamp_granularities[]"),
             *form.getlist("timestamp_granularities")], response_format)
        languages = parse_languages([*form.getlist("languages[]"), *form.getlist("languages")])
        subtitles = parse_subtitle_options(form, response_format, gateway)
        stream = parse_bool(str(form.get("stream") or "false"), "stream")
        if stream and response_format not in STREAMED_FORMATS:
            raise RequestFailed(400, "bad_request",
                                f"response_format {response_format!r} cannot be streamed; with "
                                f"stream=true use {' or '.join(STREAMED_FORMATS)}",
                                "response_format")
    finally:
        await form.close()
    return TranscriptionForm(audio, name, language, use_itn, response_format, vad_threshold,
                             granularities, languages, subtitles, stream)


def parse_granularities(values: list[object], response_format: str) -> frozenset[str]:
    """OpenAI's rules: segment (the default), word or both; word needs verbose_json."""
    found = {str(value).strip().lower() for value in values}
    unknown = sorted(found - set(GRANULARITIES))
    if unknown:
        raise RequestFailed(400, "bad_request",
                            f"timestamp_granularities {unknown[0]!r} is not supported; expected "
                            f"{' or '.join(GRANULARITIES)}", "timestamp_granularities")
    if "word" in found and response_format != "verbose_json":
        raise RequestFailed(400, "bad_request",
                            f"timestamp_granularities word needs response_format verbose_json, "
                            f"got {response_format!r}", "timestamp_granularities")
    return frozenset(found or {"segment"})


def parse_languages(values: list[object]) -> list[str] | None:
    """"zh,en" or repeated fields, as one list (checked by the gateway); None: not given."""
    if not values:
        return None
    return [part for value in values for part in str(value).split(",") if part.strip()]


def parse_subtitle_options(form: FormData, response_format: str,
                           gateway: Gateway) -> SubtitleOptions | None:
    """The line limits (and karaoke, for vtt) of srt/vtt cues; None for other formats."""
    given = {field: str(form.get(field)) for field in SUBTITLE_FIELDS
             if form.get(field) not in (None, "")}
    for field in given:
        if response_format not in SUBTITLE_FIELDS[field]:
            raise RequestFailed(400, "bad_request",
                                f"{field} applies to response_format "
                                f"{' or '.join(SUBTITLE_FIELDS[field])} only, got "
                                f"{response_format!r}", field)
    if response_format not in SUBTITLE_FORMATS:
        return None
    return gateway.settings.subtitle_options(
        parse_positive_int(given.get("max_line_width"), "max_line_width"),
        parse_positive_int(given.get("max_line_count"), "max_line_count"),
        parse_bool(given.get("karaoke", "false"), "karaoke"))


def parse_positive_int(value: str | None, field: str) -> int | None:
    if value is None:
        return None
    text = value.strip()
    # isascii: isdigit alone lets "²" through to int().
    if not (text.isascii() and text.isdigit() and len(text) <= len(str(MAX_SUBTITLE_LIMIT))
            and 1 <= int(text) <= MAX_SUBTITLE_LIMIT):
        raise RequestFailed(400, "bad_request",
                            f"{field} must be a whole number from 1 to {MAX_SUBTITLE_LIMIT}, got "
                            f"{text[:40]!r}", field)
    return int(text)
