"""The messages clients, the supervisor and inference workers exchange over ZeroMQ.

A message is one or two frames: a JSON header validated into one of the models below, then,
for transcription requests only, the audio bytes. Every header carries the protocol version;
a frame that does not validate is answered with an ``ErrorReply`` and never raises out of a
receive loop.

Sockets: clients use DEALER sockets connected to the supervisor's ROUTER frontend; workers use
DEALER sockets connected to its ROUTER backend (identity = worker id). Health is ping/pong:
the supervisor pings every worker, busy or not: a worker answers pings from its I/O thread
while its compute threads transcribe, so a worker that stops answering is hung (or stopped),
whatever it was doing.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from sensevoice_core.canary import CanaryReport
from sensevoice_core.path_cache import FileIdentity
from sensevoice_core.result import Result, Segment
from sensevoice_core.stream_types import BYTES_PER_SAMPLE, G711_RATE, StreamEvent, StreamOptions

if TYPE_CHECKING:
    from sensevoice_core.settings import Settings

PROTOCOL_VERSION = 1
MiB = 1024 * 1024

HEARTBEAT_INTERVAL_S = 1.0  # the supervisor pings every worker this often
HEARTBEAT_LIVENESS = 3  # missed pongs before a worker counts as hung (3..5 is usual)
SUPERVISOR_SILENCE_S = 10.0  # an idle worker that hears nothing this long exits (orphaned)
SPAWN_TIMEOUT_S = 60.0  # a fresh worker process must say hello within this (torch import)
MAX_HEADER_BYTES = 64 * 1024  # a request's JSON header is small; anything larger is malformed
# A reply carries every segment and token id (three hours of speech: well under 2 MiB) and,
# with word timestamps, each token and word timed (about 80 bytes each): at most one token per
# 60 ms frame, so three hours hold at most 180,000 tokens, and as many words but for pieces of
# several CJK characters (a word each): about 30 MiB even for output that dense. Beyond this
# limit the worker answers that request alone with an error.
MAX_REPLY_HEADER_BYTES = 64 * MiB
STATUS_TIMEOUT_S = 5.0  # client wait for a status reply
# A worker serving a request that has run this long is given one more (on its second compute
# thread), so that one long upload does not hold up every short request behind it...
LONG_REQUEST_S = 2.0
MAX_REQUESTS_PER_WORKER = 2
# ...if that one is small: 4 MiB is two minutes of 16 kHz 16-bit wav, or about four of MP3.
BESIDE_LONG_MAX_BYTES = 4 * MiB

# What a worker is doing, as the supervisor sees it:
WorkerRole = Literal[
    "starting",  # process started, has not said hello (importing torch)
    "standby",  # the warm spare: torch imported, no model, waiting for a load
    "loading",  # loading a model to fill serving capacity (first start, a crashed worker)
    "warming",  # loading the new model of a reload (green): traffic moves when all pass
    "serving",  # takes requests
    "draining",  # replaced: finishes the requests it holds, then exits
]
# Where a model was loaded from: already in the serving workers' memory (L1: a reload of an
# unchanged model, answered without a new worker), its L2 snapshot, or its files (fresh).
CacheLevel = Literal["L1", "L2", "fresh"]
CACHE_LEVEL_WORDS: dict[str, str] = {  # for logs, UI
    "L1": "L1 (unchanged, already in memory)", "L2": "its L2 snapshot", "fresh": "a fresh load"}

ErrorCode = Literal[
    "bad_request",  # malformed frame, unknown kind, wrong protocol version, bad field
    "too_large",  # the request is over SENSEVOICE_MAX_REQUEST_MB
    "bad_audio",  # the audio could not be decoded or is empty
    "too_long",  # the audio is longer than SENSEVOICE_MAX_AUDIO_S
    "busy",  # the queue is full: retry later
    "unavailable",  # no worker is serving (starting, or every worker failed)
    "worker_lost",  # the worker died twice while serving this request
    "timeout",  # the request took longer than SENSEVOICE_REQUEST_TIMEOUT
    "reload_refused",  # the reload path is outside SENSEVOICE_MODEL_ROOTS or not a model
    "shutting_down",
    "internal",
]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    v: Literal[1] = PROTOCOL_VERSION


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


# Client -> supervisor (the transcribe request is forwarded on to a worker as it is).

class TranscribeRequest(_Message):
    kind: Literal["transcribe"] = "transcribe"
    request_id: str = Field(default_factory=new_request_id, max_length=64)
    language: str = "auto"
    use_itn: bool = False
    # "file": the bytes of a wav/flac/ogg/mp3 file; "pcm_f32le": float32 mono samples
    audio_format: Literal["file", "pcm_f32le"] = "file"
    vad_threshold: float | None = Field(None, ge=0.0, le=1.0)  # None: SENSEVOICE_VAD_THRESHOLD
    sample_rate: int = Field(16000, gt=0, le=384000)  # of pcm_f32le samples
    # the upload's file name, for error messages only (never opened); None: "the request's audio"
    filename: str | None = Field(None, max_length=255)
    word_timestamps: bool = False  # fill each segment's words and tokens
    # auto language ID restricted to these codes; None: SENSEVOICE_LANGUAGES; []: any
    languages: list[str] | None = Field(None, max_length=16)
    progress: bool = False  # send Progress messages as segments finish, before the reply


class ReloadRequest(_Message):
    kind: Literal["reload"] = "reload"
    request_id: str = Field(default_factory=new_request_id, max_length=64)
    path: str | None = None  # None: the directory being served now
    force_fresh: bool = False  # forget this model's L2/L3 entries and load from its files
    origin: Literal["api", "ui", "watch", "cli"] = "api"


class StatusRequest(_Message):
    kind: Literal["status"] = "status"
    request_id: str = Field(default_factory=new_request_id, max_length=64)


# Supervisor -> client

class TranscribeReply(_Message, Result):
    """A Result (text, tags, segments: result.py) and where and how fast it ran."""

    kind: Literal["transcription"] = "transcription"
    request_id: str
    fingerprint: str  # the model that served this request
    worker_pid: int
    inference_s: float  # decode + model time inside the worker


class ModelInfo(BaseModel):
    model_config = ConfigDict(frozen=True)
    model_dir: str
    layout: str
    fingerprint: str
    short_ids: dict[str, str]  # config / weights / code, 8 hex each
    file_sha256: dict[str, str]  # role (weights, config, tokenizer, cmvn) -> checksum
    file_paths: dict[str, str]  # role -> absolute path
    # role -> each file's identity when it was hashed to file_sha256 (from L3); {} when no L3
    # entry vouched for those checksums. The supervisor's L1 check compares stats with it.
    file_identities: dict[str, FileIdentity] = {}
    cache_level: CacheLevel
    load_s: float
    steps_s: dict[str, float]
    warmup_s: float
    warnings: list[str] = []
    compute_type: str = "float32"  # the concrete type the layers run in (never "auto")
    compute_reason: str = ""  # why that type: the setting, the CPU/GPU features, a fallback
    canary: CanaryReport | None = None  # a reload's green: the canary it passed


class ReloadOutcome(BaseModel):
    model_config = ConfigDict(frozen=True)
    ok: bool
    origin: str
    requested_path: str | None
    model_dir: str | None = None  # what is serving after the attempt
    old_fingerprint: str | None = None
    new_fingerprint: str | None = None  # None when the reload failed
    seconds: float = 0.0  # request received -> traffic on the new model
    cache_level: CacheLevel | None = None
    error: str | None = None
    coalesced: int = 1  # how many reload requests this one swap answered
    canary: CanaryReport | None = None  # the new model's canary, passed or failed


class ReloadReply(_Message):
    kind: Literal["reload_result"] = "reload_result"
    request_id: str
    outcome: ReloadOutcome


class WorkerStatus(BaseModel):
    worker_id: str
    pid: int
    role: WorkerRole
    age_s: float
    requests_served: int
    busy: bool
    fingerprint: str | None
    streams: int = 0  # live streams it holds
    threads: int = 0  # torch threads of its compute (0: not reported yet)
    batches: int = 0  # batched forward passes it ran (cross-request batching)
    batch_items: int = 0  # items (requests' segments) in those passes
    start_method: Literal["fork", "spawn"] | None = None  # forked by the fork server, or spawned
    start_s: float | None = None  # asked for -> its Hello (None: no Hello yet)
    # Cluster mode: seconds since this replica's figures were reported (a supervisor's are live)
    report_age_s: float | None = None


class ServiceStatus(BaseModel):
    supervisor_pid: int
    protocol_version: int = PROTOCOL_VERSION
    uptime_s: float
    model: ModelInfo | None  # None until a worker is serving
    workers: list[WorkerStatus]
    queued: int
    in_flight: int
    requests_served: int
    worker_restarts: int
    reloading: bool
    last_reload: ReloadOutcome | None
    reload_counts: dict[str, int] = {}  # outcome (ok, failed, refused) -> reloads since start
    reload_levels: dict[str, int] = {}  # successful reloads by cache level (L1, L2, fresh)
    watching: str | None  # the directory watched for changes, None when watching is off
    watch_counts: dict[str, int] = {}  # the watcher's decisions: unchanged, code_changed, reloads
    streams: int = 0  # live streams open now (SENSEVOICE_MAX_STREAMS at most)
    # since start: opened, refused, moved (to another worker), closed, aborted, failed
    stream_counts: dict[str, int] = {}
    stream_failures: dict[str, int] = {}  # failed streams by ErrorCode
    fork_server_pid: int | None = None  # SENSEVOICE_WORKER_START=fork: while it can fork


class StatusReply(_Message):
    kind: Literal["status_result"] = "status_result"
    request_id: str
    status: ServiceStatus


class Progress(_Message):
    """Before a TranscribeReply asked with progress=True: how many of the input's segments
    are decoded, and the segment that just finished (input time; segments finish in time
    order, so the ones so far are the transcript so far)."""

    kind: Literal["progress"] = "progress"
    request_id: str
    done: int = Field(ge=0)
    total: int = Field(ge=0)  # speech segments the VAD found (0: no speech at all)
    # None on the first message (done=0), and for a segment the model heard no speech in
    segment: Segment | None = None


class ErrorReply(_Message):
    kind: Literal["error"] = "error"
    request_id: str | None
    code: ErrorCode
    message: str


# Live streams (stream_types.py has the options and events). A client opens a stream, sends
# its audio in order (seq counts from 0) and controls it; the supervisor holds the stream on one
# worker and passes events back. One client connection (DEALER) may hold several streams, and
# only that connection may send to them. An ErrorReply about a stream message (unknown stream,
# another connection's stream, seq out of order, bad update) carries the stream id as its
# request_id and leaves the stream as it was; what ends a stream is a StreamFailed event.

class StreamOpen(_Message):
    kind: Literal["stream_open"] = "stream_open"
    request_id: str = Field(default_factory=new_request_id, max_length=64)
    stream_id: str | None = Field(None, max_length=64)  # set by the supervisor, for the worker
    options: StreamOptions = StreamOptions()


class StreamOpened(_Message):
    kind: Literal["stream_opened"] = "stream_opened"
    request_id: str
    stream_id: str
    fingerprint: str  # the model that serves the stream now


class StreamAudio(_Message):
    """One chunk of the stream's audio (the payload frame), in the stream's encoding."""

    kind: Literal["stream_audio"] = "stream_audio"
    stream_id: str = Field(max_length=64)
    seq: int = Field(ge=0)


StreamAction = Literal[
    "commit",  # end the open turn now and decode it (manual turns; with the VAD too)
    "clear",  # drop the open turn and any audio not yet committed
    "update",  # new options (from the next audio on; encoding/rate only before any audio)
    "close",  # end of audio: the open turn is decoded, then the stream ends (StreamClosed)
    "abort",  # the client is gone: drop the stream at once, no more events
]


class StreamControl(_Message):
    kind: Literal["stream_control"] = "stream_control"
    stream_id: str = Field(max_length=64)
    action: StreamAction
    seq: int = Field(ge=0)  # the next audio seq: the control applies after the audio before it
    options: StreamOptions | None = None  # for "update"


class StreamEvents(_Message):
    """What a stream produced, in order; the last events of a stream are StreamClosed or
    StreamFailed."""

    kind: Literal["stream_events"] = "stream_events"
    stream_id: str
    events: list[StreamEvent]


class StreamMoved(_Message):
    """Worker -> supervisor, while draining: the stream was between turns after audio seq - 1
    and its state (the payload frame) can go on on another worker. ``messages`` counts the
    stream's audio and control messages the worker had handled (those it was sent after a
    StreamOpen or StreamResume, in order): the supervisor sends the new worker the ones after."""

    kind: Literal["stream_moved"] = "stream_moved"
    stream_id: str
    seq: int = Field(ge=0)  # the next audio seq the stream expects
    messages: int = Field(ge=0)
    # In force after those messages (updates forwarded later apply when replayed, in order).
    options: StreamOptions


class StreamResume(_Message):
    """Supervisor -> worker: take over a moved stream from its state (the payload frame)."""

    kind: Literal["stream_resume"] = "stream_resume"
    stream_id: str
    seq: int = Field(ge=0)
    messages: int = Field(ge=0)  # the StreamMoved's: the worker counts on from there
    options: StreamOptions


def stream_audio_s(options: StreamOptions, n_bytes: int) -> float:
    """Seconds of audio in n_bytes of a stream's encoding."""
    rate = G711_RATE if options.encoding in ("pcmu", "pcma") else options.sample_rate
    return n_bytes / (BYTES_PER_SAMPLE[options.encoding] * rate)


def stream_options_problem(settings: Settings, options: StreamOptions,
                           current: StreamOptions | None = None,
                           audio_sent: bool = False) -> str | None:
    """What is wrong with a stream's options, at open (current None) or as an update of
    current after audio_sent, in words naming the field; None when they can run."""
    if options.encoding in ("pcmu", "pcma") and options.sample_rate != G711_RATE:
        return (f"encoding {options.encoding} is {G711_RATE} Hz audio: sample_rate must be "
                f"{G711_RATE}, found {options.sample_rate}")
    if current is not None and audio_sent and (options.encoding, options.sample_rate) != (
            current.encoding, current.sample_rate):
        return (f"encoding and sample_rate can change only before the stream's first audio: "
                f"they are {current.encoding} at {current.sample_rate} Hz, the update asks "
                f"{options.encoding} at {options.sample_rate} Hz")
    try:
        settings.stream_config(options)
    except ValueError as e:
        return str(e)
    return None


# Supervisor <-> worker

class Hello(_Message):
    kind: Literal["hello"] = "hello"
    worker_id: str
    pid: int


class LoadModel(_Message):
    kind: Literal["load"] = "load"
    path: str | None  # None: SENSEVOICE_MODEL_DIR or the usual places
    force_fresh: bool = False
    canary: bool = False  # a reload's green: pass SENSEVOICE_RELOAD_CANARY_DIR before Ready


class Ready(_Message):
    kind: Literal["ready"] = "ready"
    worker_id: str
    pid: int
    model: ModelInfo


class LoadFailed(_Message):
    kind: Literal["load_failed"] = "load_failed"
    worker_id: str
    error: str
    canary: CanaryReport | None = None  # set when the model loaded but failed its canary


class Ping(_Message):
    """Sent every HEARTBEAT_INTERVAL_S, and once after Ready: the check before traffic."""

    kind: Literal["ping"] = "ping"
    nonce: int  # never repeats; the supervisor knows the pong of that check by it


class Pong(_Message):
    """Any message proves a worker alive; a Pong also names the Ping it answers."""

    kind: Literal["pong"] = "pong"
    nonce: int  # the Ping's
    threads: int = 0  # the worker's counters, reported with each pong (see WorkerStatus)
    batches: int = 0
    batch_items: int = 0


class Stop(_Message):
    kind: Literal["stop"] = "stop"


ClientMessage = Annotated[Union[TranscribeRequest, ReloadRequest, StatusRequest, StreamOpen,
                                StreamAudio, StreamControl],
                          Field(discriminator="kind")]
ReplyMessage = Annotated[Union[TranscribeReply, ReloadReply, StatusReply, ErrorReply, Progress,
                               StreamOpened, StreamEvents],
                         Field(discriminator="kind")]
WorkerMessage = Annotated[Union[Hello, Ready, LoadFailed, Pong, TranscribeReply, ErrorReply,
                                Progress, StreamEvents, StreamMoved],
                          Field(discriminator="kind")]
SupervisorMessage = Annotated[Union[LoadModel, Ping, Stop, TranscribeRequest, StreamOpen,
                                    StreamAudio, StreamControl, StreamResume],
                              Field(discriminator="kind")]
# Messages followed by a payload frame (audio, or a moved stream's state).
WITH_PAYLOAD = frozenset({"transcribe", "stream_audio", "stream_moved", "stream_resume"})

_CLIENT = TypeAdapter(ClientMessage)
_REPLY = TypeAdapter(ReplyMessage)
_WORKER = TypeAdapter(WorkerMessage)
_SUPERVISOR = TypeAdapter(SupervisorMessage)


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version."""


def encode(message: BaseModel, payload: bytes | None = None) -> list[bytes]:
    header = message.model_dump_json().encode()
    return [header] if payload is None else [header, payload]


def _decode(adapter: TypeAdapter, frames: list[bytes], expect_payload: bool,
            max_header: int = MAX_HEADER_BYTES) -> tuple[object, bytes | None]:
    if not frames:
        raise ProtocolError("empty message")
    if len(frames[0]) > max_header:
        raise ProtocolError(f"header of {len(frames[0])} bytes; at most {max_header}")
    try:
        message = adapter.validate_json(frames[0])
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "header"
        raise ProtocolError(f"invalid message ({where}: {first['msg']})") from None
    wants = expect_payload and getattr(message, "kind", None) in WITH_PAYLOAD
    if len(frames) != (2 if wants else 1):
        raise ProtocolError(f"{getattr(message, 'kind', '?')} message with {len(frames)} "
                            f"frames; expected {2 if wants else 1}")
    return message, frames[1] if wants else None


def decode_client(frames: list[bytes]) -> tuple[ClientMessage, bytes | None]:
    return _decode(_CLIENT, frames, expect_payload=True)  # type: ignore[return-value]


def decode_reply(frames: list[bytes]) -> ReplyMessage:
    return _decode(_REPLY, frames, False, MAX_REPLY_HEADER_BYTES)[0]  # type: ignore[return-value]


def decode_from_worker(frames: list[bytes]) -> tuple[WorkerMessage, bytes | None]:
    return _decode(_WORKER, frames, True, MAX_REPLY_HEADER_BYTES)  # type: ignore[return-value]


def decode_for_worker(frames: list[bytes]) -> tuple[SupervisorMessage, bytes | None]:
    return _decode(_SUPERVISOR, frames, expect_payload=True)  # type: ignore[return-value]


def request_id_of(header: bytes) -> str | None:
    """Best effort: the request id of a frame that failed validation, to address the error."""
    try:
        value = TypeAdapter(dict).validate_json(header).get("request_id")
    except ValidationError:
        return None
    return value if isinstance(value, str) and len(value) <= 64 else None
