"""Settings from SENSEVOICE_* environment variables (and a .env file in the working directory).

Construct once per process, in its ``main()``, and pass it down. ``load_settings`` turns an
invalid value into one line naming the variable, the value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sensevoice_core.compute import ComputeType
from sensevoice_core.curve import CurveKeys
from sensevoice_core.errors import SettingsError
from sensevoice_core.options import (
    BATCH_S_BOUNDS,
    MAX_AUDIO_S_BOUNDS,
    TranscribeOptions,
)
from sensevoice_core.protocol import MiB
from sensevoice_core.segmentation import (
    DURATION_BOUNDS,
    MAX_SEGMENT_BOUNDS,
    THRESHOLD_BOUNDS,
    VadOptions,
    padding_problem,
)
from sensevoice_core.stream_types import PARTIAL_MS_BOUNDS, StreamConfig, StreamOptions
from sensevoice_core.subtitles import CUE_S_BOUNDS, LINE_LIMIT_BOUNDS, SubtitleOptions
from sensevoice_core.vocab import languages_of

ENV_PREFIX = "SENSEVOICE_"
IPC_PATH_MAX = 100  # sockaddr_un holds 108 bytes; ZeroMQ refuses longer ipc:// paths
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
# The defaults and bounds of the VAD and batch settings are the library's own.
_VAD = VadOptions()
_TRANSCRIBE = TranscribeOptions()
_SUBTITLES = SubtitleOptions()
_LINE_LIMIT = {"ge": int(LINE_LIMIT_BOUNDS.low), "le": int(LINE_LIMIT_BOUNDS.high)}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore",
                                      protected_namespaces=())

    # Model and cache
    model_dir: Path | None = Field(
        None, description="model directory; unset: search ./model and the usual places")
    cache_dir: Path = Field(Path("cache"), description="where L2 snapshots and L3 live")
    disable_cache: bool = Field(False, description="bypass the L2 snapshot entirely")
    keep_snapshots: int = Field(2, ge=1, description="L2 snapshots kept; older ones are deleted")
    device: str = Field("cpu", description="torch device for inference")
    threads: int = Field(
        0, ge=0, description="torch CPU threads per worker; 0: auto (the cores divided among "
                             "the serving workers, at least 1)")
    compute_type: ComputeType = Field(
        "auto", description="numeric type of the model's layers: auto (from what the machine "
                            "has), float32, bfloat16, float16, int8, int8_bfloat16")
    compute_check: bool = Field(
        True, description="check a reduced compute type against float32 on the bundled clip "
                          "when its snapshot is built (too many frames or an int8 layer's "
                          "error over the limits in compute_check.py: fall back to a safer "
                          "type); false: trust it (benchmarks on random weights)")

    # Supervisor and workers
    supervisor_address: str = Field(
        "", description="where the supervisor listens for clients: ipc://PATH or "
                        "tcp://127.0.0.1:PORT; empty: ipc://<cache_dir>/supervisor.ipc")
    supervisor_allow_remote: bool = Field(
        False, description="allow a tcp:// supervisor address off loopback; it then requires "
                           "ZeroMQ CURVE keys (SENSEVOICE_CURVE_DIR)")
    curve_dir: Path | None = Field(
        None, description="CURVE keys for tcp:// supervisor addresses (python -m supervisor "
                          "keygen DIR writes them); unset: no encryption, loopback only")
    workers: int = Field(1, ge=1, le=64, description="inference worker processes serving")
    warm_standby: bool = Field(
        True, description="keep one spare worker with torch imported, so a reload or a "
                          "crashed worker's replacement skips the import cost")
    worker_start: Literal["fork", "spawn"] = Field(
        "fork", description="fork: workers are forked from one fork server that imported "
                            "torch once (a spare costs milliseconds and shares its pages); "
                            "spawn: each worker is a new python -m inference_worker (the "
                            "fallback, also used where fork is unavailable)")
    reload_canary_dir: Path | None = Field(
        None, description="a directory with canary.jsonl (audio files with their expected "
                          "text and language): a reload's new model must transcribe them "
                          "within SENSEVOICE_RELOAD_CANARY_MAX_CER before traffic moves")
    reload_canary_max_cer: float = Field(
        0.1, ge=0.0, le=1.0, description="highest character error rate over the canary "
                                         "clips that a reload may pass with")
    swap_strategy: Literal["blue_green", "stop_first"] = Field(
        "blue_green", description="blue_green: the new model warms beside the old one, no "
                                  "downtime; stop_first: stop the old worker first (one model "
                                  "in memory; requests wait for the new one to load)")
    hotreload_timeout: float = Field(
        30.0, gt=0, description="seconds a reload may take before it is abandoned")
    request_timeout: float = Field(
        120.0, gt=0, description="seconds one transcription may take before its worker is "
                                 "declared hung and replaced")
    drain_timeout: float = Field(
        30.0, ge=0, description="seconds an old worker may spend finishing its requests")
    max_queue: int = Field(
        64, ge=1, description="requests waiting for a worker; beyond that clients get 'busy'")
    max_request_mb: float = Field(256.0, gt=0, description="largest request accepted, in MiB")
    max_audio_s: float = Field(
        3 * 3600.0, **MAX_AUDIO_S_BOUNDS.field,
        description="longest audio a request may hold, in seconds")
    model_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="directories a reload may load from (comma-separated); empty: the "
                    "served model directory's parent")

    # File watching
    enable_file_watch: bool = Field(False, description="reload when model files change")
    watch_quiet_s: float = Field(
        1.0, gt=0, description="seconds changed model files must stay unchanged before a reload")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="log level of the supervisor and workers")

    # UI and HTTP API (python -m ui)
    ui_host: str = Field("127.0.0.1", description="address the UI and HTTP API listen on")
    ui_port: int = Field(7860, ge=1, le=65535, description="port of the UI and HTTP API")
    admin_token: SecretStr | None = Field(
        None, description="required to reload from the UI/HTTP API when set, and always when "
                          "SENSEVOICE_UI_HOST is not loopback (without it reloading is off)")
    max_upload_mb: float = Field(
        256.0, gt=0, description="largest upload the UI and HTTP API accept, in MiB")

    # Cluster mode (python -m cluster, Ray Serve)
    cluster_host: str = Field(
        "127.0.0.1", description="address the cluster's HTTP ingress listens on (every node)")
    cluster_port: int = Field(
        8000, ge=1, le=65535, description="port of the cluster's HTTP ingress (Ray Serve's)")
    cluster_replicas: int = Field(
        1, ge=1, le=1024, description="model replicas `python -m cluster up` deploys")
    cluster_address: str | None = Field(
        None, description="the Ray cluster `python -m cluster reload/status/down` talk to "
                          "(host:port of its GCS); unset: the one `up` started")

    # Long audio
    vad_threshold: float = Field(_VAD.threshold, **THRESHOLD_BOUNDS.field,
                                 description="speech probability above which audio is speech")
    vad_min_speech_s: float = Field(_VAD.min_speech_s, **DURATION_BOUNDS.field,
                                    description="shorter bursts of speech are dropped")
    vad_min_silence_s: float = Field(_VAD.min_silence_s, **DURATION_BOUNDS.field,
                                     description="shorter pauses do not split speech")
    vad_speech_pad_s: float = Field(_VAD.speech_pad_s, **DURATION_BOUNDS.field,
                                    description="audio kept on each side of speech")
    max_segment_s: float = Field(
        _VAD.max_segment_s, **MAX_SEGMENT_BOUNDS.field,
        description="longest segment; longer speech is split at its quietest point, and "
                    "shorter audio is not segmented")
    batch_s: float = Field(
        _TRANSCRIBE.batch_s, **BATCH_S_BOUNDS.field,
        description="padded seconds of audio transcribed per batch: bounds memory")

    # Cross-request batching in a worker
    batch_wait_ms: float = Field(
        5.0, ge=0, le=1000, description="requests arriving within this many ms are decoded "
                                        "together in one forward pass; 0: no batching")
    # Its own default, not batch_s: a short request waits for the pass running when it
    # arrives, so the pass bounds its latency (30 s padded: ~2-3 s on 2 Zen 3 cores, where
    # 120 s took 7-12 s). 30 s also holds one longest VAD segment, and batching's gain is
    # mostly there by 4-6 clips of 5 s.
    max_batch_s: float = Field(
        30.0, **BATCH_S_BOUNDS.field,
        description="padded seconds of audio in one batched forward pass (all requests): a "
                    "short request waits for at most about one such pass")
    max_batch_requests: int = Field(
        16, ge=1, le=256, description="requests one worker holds at once when batching is on "
                                      "(the supervisor sends it up to this many)")

    # Language ID and subtitles
    languages: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="languages auto-detection may choose from, comma-separated (zh,en); "
                    "empty: any. A request's own list replaces it")
    subtitle_max_line_width: int = Field(
        _SUBTITLES.max_line_width, **_LINE_LIMIT, description="characters per subtitle line")
    subtitle_max_line_count: int = Field(
        _SUBTITLES.max_line_count, **_LINE_LIMIT, description="lines per subtitle cue")
    subtitle_max_cue_s: float = Field(
        _SUBTITLES.max_cue_s, **CUE_S_BOUNDS.field,
        description="seconds one subtitle cue may stay on screen")

    # Live streams
    stream_partial_ms: int = Field(
        500, **PARTIAL_MS_BOUNDS.field,
        description="a live stream's open turn is decoded again after this many ms of new "
                    "audio (a partial result); 0: finals only")
    max_streams: int = Field(
        16, ge=0, le=1024, description="live streams open at once, over all workers; beyond "
                                       "it a new stream is refused (0: streaming off)")
    stream_idle_timeout_s: float = Field(
        30.0, gt=0, description="a live stream that receives nothing this long is closed")
    max_stream_s: float = Field(
        4 * 3600.0, gt=0, description="longest a live stream may stay open, in seconds")

    @field_validator("languages", mode="before")
    @classmethod
    def _language_list(cls, value: object) -> object:
        """"zh, English" -> ["zh", "en"]; an unknown language names the choices."""
        if isinstance(value, (str, list, tuple)):
            return [lang.value for lang in languages_of(value)]
        return value

    @field_validator("model_dir", "curve_dir", mode="before")
    @classmethod
    def _empty_means_unset(cls, value: object) -> object:
        """SENSEVOICE_MODEL_DIR= (empty) is unset, not the current directory."""
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _padding_fits_a_segment(self) -> Settings:
        problem = padding_problem(self.vad_speech_pad_s, self.max_segment_s,
                                  f"{ENV_PREFIX}VAD_SPEECH_PAD_S", f"{ENV_PREFIX}MAX_SEGMENT_S")
        if problem:
            raise ValueError(problem)
        return self

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_token_means_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("model_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("supervisor_address")
    @classmethod
    def _address_form(cls, value: str) -> str:
        if not value:
            return value
        if value.startswith("ipc://"):
            if len(value) - len("ipc://") > IPC_PATH_MAX:
                raise ValueError(f"ipc path longer than {IPC_PATH_MAX} characters")
            return value
        if value.startswith("tcp://") and ":" in value[len("tcp://"):]:
            return value
        raise ValueError("expected ipc://PATH or tcp://HOST:PORT")

    @model_validator(mode="after")
    def _remote_needs_keys(self) -> Settings:
        address = self.supervisor_address
        host = tcp_host(address)
        if host and host not in LOOPBACK_HOSTS and not self.supervisor_allow_remote:
            raise ValueError(f"SENSEVOICE_SUPERVISOR_ADDRESS={address!r}: host {host!r} is not "
                             f"loopback; set SENSEVOICE_SUPERVISOR_ALLOW_REMOTE=true and "
                             f"SENSEVOICE_CURVE_DIR to listen there with encryption and "
                             f"client keys")
        if self.supervisor_allow_remote and self.curve_dir is None:
            raise ValueError("SENSEVOICE_SUPERVISOR_ALLOW_REMOTE=true needs SENSEVOICE_CURVE_DIR "
                             "(create the keys with `python -m supervisor keygen DIR`)")
        return self

    def curve_keys(self, address: str) -> CurveKeys | None:
        """The CURVE keys for a supervisor frontend address: tcp:// addresses only."""
        if self.curve_dir is None or not address.startswith("tcp://"):
            return None
        return CurveKeys(self.curve_dir.expanduser())

    def vad_options(self, threshold: float | None = None) -> VadOptions:
        """Segmentation settings, with a per-request threshold if one is given."""
        return VadOptions(threshold=self.vad_threshold if threshold is None else threshold,
                          min_speech_s=self.vad_min_speech_s,
                          min_silence_s=self.vad_min_silence_s,
                          speech_pad_s=self.vad_speech_pad_s, max_segment_s=self.max_segment_s)

    def transcribe_options(self, language: str = "auto", use_itn: bool = False,
                           vad_threshold: float | None = None, word_timestamps: bool = False,
                           languages: Sequence[str] | None = None) -> TranscribeOptions:
        """The options of one request: its language, ITN, threshold, word timestamps and
        language list (None: SENSEVOICE_LANGUAGES), the rest from here."""
        return TranscribeOptions(language=language, use_itn=use_itn,
                                 vad=self.vad_options(vad_threshold), batch_s=self.batch_s,
                                 max_audio_s=self.max_audio_s, word_timestamps=word_timestamps,
                                 languages=tuple(self.languages if languages is None
                                                 else languages))

    def stream_config(self, options: StreamOptions) -> StreamConfig:
        """How the engine runs a stream: the client's options, the rest from here (the VAD's
        min_speech_s and max_segment_s, the batch and length limits, the partial cadence)."""
        vad = VadOptions(
            threshold=self.vad_threshold if options.vad_threshold is None
            else options.vad_threshold,
            min_speech_s=self.vad_min_speech_s,
            min_silence_s=self.vad_min_silence_s if options.min_silence_s is None
            else options.min_silence_s,
            speech_pad_s=self.vad_speech_pad_s if options.speech_pad_s is None
            else options.speech_pad_s,
            max_segment_s=self.max_segment_s)
        transcribe = TranscribeOptions(
            language=options.language, use_itn=options.use_itn, vad=vad, batch_s=self.batch_s,
            max_audio_s=self.max_audio_s, word_timestamps=options.word_timestamps,
            languages=tuple(self.languages if options.languages is None else options.languages))
        partial_ms = self.stream_partial_ms if options.partial_ms is None else options.partial_ms
        return StreamConfig(transcribe=transcribe, sample_rate=options.sample_rate,
                            turn_detection=options.turn_detection, partial_s=partial_ms / 1000)

    def subtitle_options(self, max_line_width: int | None = None,
                         max_line_count: int | None = None,
                         karaoke: bool = False) -> SubtitleOptions:
        """How subtitles are cut: these settings, with a request's own line limits if given."""
        return SubtitleOptions(
            max_line_width=max_line_width or self.subtitle_max_line_width,
            max_line_count=max_line_count or self.subtitle_max_line_count,
            max_cue_s=self.subtitle_max_cue_s, karaoke=karaoke)

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * MiB)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MiB)

    def ui_is_loopback(self) -> bool:
        return self.ui_host in LOOPBACK_HOSTS or self.ui_host == "::1"

    def reload_needs_token(self) -> bool:
        return self.admin_token is not None or not self.ui_is_loopback()

    def client_address(self) -> str:
        """The supervisor's frontend address, with the default filled in."""
        if self.supervisor_address:
            return self.supervisor_address
        path = (self.cache_dir.expanduser().resolve() / "supervisor.ipc")
        if len(str(path)) > IPC_PATH_MAX:
            raise SettingsError(
                f"the default socket {path} is longer than {IPC_PATH_MAX} characters; set "
                f"{ENV_PREFIX}SUPERVISOR_ADDRESS=ipc:///tmp/sensevoice.ipc or a tcp://127.0.0.1 "
                f"port")
        return f"ipc://{path}"


def tcp_host(address: str) -> str:
    """The host of a tcp:// address; empty for ipc:// (always local)."""
    return address[len("tcp://"):].rsplit(":", 1)[0] if address.startswith("tcp://") else ""


def describe_validation_error(error: ValidationError) -> str:
    """One line: SENSEVOICE_NAME='value': what is wrong (for every invalid field)."""
    problems = []
    for item in error.errors():
        if not item["loc"]:  # a rule across settings; its message names them
            problems.append(item["msg"].removeprefix("Value error, "))
            continue
        name = ENV_PREFIX + "_".join(str(part) for part in item["loc"][:1]).upper()
        problems.append(f"{name}={item.get('input')!r}: {item['msg']}")
    return "invalid setting: " + "; ".join(problems)


def load_settings() -> Settings:
    """Settings from the environment, or SettingsError with a one-line message."""
    try:
        return Settings()
    except ValidationError as e:
        raise SettingsError(describe_validation_error(e)) from None
