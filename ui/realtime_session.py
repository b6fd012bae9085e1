"""An OpenAI Realtime transcription session's configuration: ``session.update`` read into
``StreamOptions``, and the session object ``session.created`` / ``session.updated`` show.

What a SenseVoice session supports, by OpenAI's field names (session.audio.input...):
  format: audio/pcm at 24000 Hz (16-bit little-endian mono), audio/pcmu or audio/pcma (8 kHz)
  transcription: model (any name is accepted; the one served is reported), language (auto when
      null or ""), languages (what auto language ID may choose; an extension for SenseVoice of
      OpenAI's gpt-transcribe field), prompt (accepted and ignored, as the HTTP API does: CTC
      decoding takes no prompt)
  turn_detection: server_vad with threshold, prefix_padding_ms, silence_duration_ms
      (create_response, interrupt_response and idle_timeout_ms are accepted and ignored: a
      transcription session creates no responses), or null: a turn ends only when the client
      commits it
  noise_reduction: null only
  include: null, [] or ["item.input_audio_transcription.logprobs"]: each completed event then
      carries logprobs, one {token, logprob, bytes} per text token of the final
Anything else is refused with the field's name and what is supported, and the update is not
applied: a session is never left half updated.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from typing import Literal

from pydantic import ValidationError

from sensevoice_core.result import Segment
from sensevoice_core.settings import Settings
from sensevoice_core.stream_types import G711_RATE, StreamEncoding, StreamOptions
from ui.gateway import Gateway, RequestFailed
from ui.openai_api import MODEL_ID

PCM_RATE = 24000  # the one rate OpenAI's audio/pcm has
AudioFormat = Literal["audio/pcm", "audio/pcmu", "audio/pcma"]
ENCODINGS: dict[str, StreamEncoding] = {"audio/pcm": "pcm_s16le", "audio/pcmu": "pcmu",
                                        "audio/pcma": "pcma"}
# OpenAI's names for StreamOptions' fields, for error messages.
INPUT = "session.audio.input"
PARAMS = {"vad_threshold": f"{INPUT}.turn_detection.threshold",
          "min_silence_s": f"{INPUT}.turn_detection.silence_duration_ms",
          "speech_pad_s": f"{INPUT}.turn_detection.prefix_padding_ms",
          "language": f"{INPUT}.transcription.language",
          "languages": f"{INPUT}.transcription.languages"}
SERVER_VAD_FIELDS = {"type", "threshold", "prefix_padding_ms", "silence_duration_ms",
                     "create_response", "interrupt_response", "idle_timeout_ms"}
TRANSCRIPTION_FIELDS = {"model", "language", "languages", "prompt", "delay", "keywords"}
LOGPROBS = "item.input_audio_transcription.logprobs"  # the one `include` value
WORD_START = "\u2581"  # sentencepiece's mark of a piece that starts a word


def invalid(param: str, message: str) -> RequestFailed:
    return RequestFailed(400, "invalid_value", message, param)


@dataclass(frozen=True)
class TurnDetection:
    """server_vad's numbers; None: the service's SENSEVOICE_VAD_* setting."""

    threshold: float | None = None
    prefix_padding_ms: int | None = None
    silence_duration_ms: int | None = None


@dataclass(frozen=True)
class SessionConfig:
    audio_format: AudioFormat = "audio/pcm"
    language: str = "auto"  # a code, as Gateway.check_languages gives it
    languages: tuple[str, ...] | None = None  # None: SENSEVOICE_LANGUAGES
    turn_detection: TurnDetection | None = TurnDetection()  # None: manual commits
    logprobs: bool = False  # include: completed events carry the final's token logprobs

    @property
    def sample_rate(self) -> int:
        return PCM_RATE if self.audio_format == "audio/pcm" else G711_RATE

    def stream_options(self) -> StreamOptions:
        vad = self.turn_detection
        try:
            return StreamOptions(
                language=self.language, use_itn=True, word_timestamps=True,
                languages=None if self.languages is None else list(self.languages),
                encoding=ENCODINGS[self.audio_format], sample_rate=self.sample_rate,
                turn_detection=vad is not None,
                vad_threshold=vad.threshold if vad else None,
                min_silence_s=None if vad is None or vad.silence_duration_ms is None
                else vad.silence_duration_ms / 1000,
                speech_pad_s=None if vad is None or vad.prefix_padding_ms is None
                else vad.prefix_padding_ms / 1000)
        except ValidationError as e:
            error = e.errors()[0]
            field = str(error["loc"][0]) if error["loc"] else ""
            raise invalid(PARAMS.get(field, f"{INPUT}.{field}"), f"{PARAMS.get(field, field)}: "
                                                                 f"{error['msg']}") from None

    def session(self, session_id: str, settings: Settings) -> dict:
        """The session as OpenAI shows it, every value the one in force (the service's settings
        where the client set none)."""
        options = self.stream_options()
        vad = settings.stream_config(options).transcribe.vad
        audio_format: dict[str, object] = {"type": self.audio_format}
        if self.audio_format == "audio/pcm":
            audio_format["rate"] = PCM_RATE
        # null: auto language ID, as OpenAI has it
        transcription: dict[str, object] = {
            "model": MODEL_ID, "language": None if self.language == "auto" else self.language}
        languages = settings.languages if self.languages is None else self.languages
        if languages:
            transcription["languages"] = list(languages)
        turn_detection = None if self.turn_detection is None else {
            "type": "server_vad", "threshold": vad.threshold,
            "prefix_padding_ms": round(vad.speech_pad_s * 1000),
            "silence_duration_ms": round(vad.min_silence_s * 1000)}
        return {"type": "transcription", "object": "realtime.transcription_session",
                "id": session_id,
                "audio": {"input": {"format": audio_format, "noise_reduction": None,
                                    "transcription": transcription,
                                    "turn_detection": turn_detection}},
                "include": [LOGPROBS] if self.logprobs else None}


def updated(config: SessionConfig, session: object, gateway: Gateway,
            audio_sent: bool) -> SessionConfig:
    """config with a session.update's session applied; RequestFailed (param: OpenAI's field
    name) for anything unsupported, and then nothing of it applies."""
    if not isinstance(session, dict):
        raise invalid("session", "session must be an object")
    if session.get("type") != "transcription":
        raise invalid("session.type", f"session.type must be 'transcription' (this server "
                                      f"transcribes; it has no conversation sessions), got "
                                      f"{session.get('type')!r}")
    unknown(session, {"type", "audio", "include"}, "session")
    if "include" in session:
        config = replace(config, logprobs=parse_include(session["include"]))
    audio = section(session, "audio", "session")
    unknown(audio, {"input"}, "session.audio")
    given = section(audio, "input", "session.audio")
    unknown(given, {"format", "noise_reduction", "transcription", "turn_detection"}, INPUT)
    if given.get("noise_reduction") is not None:
        raise invalid(f"{INPUT}.noise_reduction", "noise reduction is not supported: send null")
    if "format" in given:
        audio_format = parse_format(given["format"])
        if audio_format != config.audio_format and audio_sent:
            raise invalid(f"{INPUT}.format", f"the input format can change only before the first "
                                             f"audio; this session has received "
                                             f"{config.audio_format} audio")
        config = replace(config, audio_format=audio_format)
    if given.get("transcription") is not None:
        config = with_transcription(config, section(given, "transcription", INPUT), gateway)
    if "turn_detection" in given:
        config = replace(config, turn_detection=parse_turn_detection(given["turn_detection"]))
    config.stream_options()  # the bounds StreamOptions checks
    try:
        gateway.settings.stream_config(config.stream_options())
    except ValueError as e:
        raise invalid(f"{INPUT}.turn_detection", str(e)) from None
    return config


def section(parent: dict, key: str, where: str) -> dict:
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(f"{where}.{key}", f"{where}.{key} must be an object, got "
                                        f"{type(value).__name__}")
    return value


def unknown(given: dict, known: set[str], where: str) -> None:
    extra = sorted(set(given) - known)
    if extra:
        raise invalid(f"{where}.{extra[0]}", f"{where}.{extra[0]} is not supported; supported "
                                             f"fields: {', '.join(sorted(known))}")


def parse_format(value: object) -> AudioFormat:
    param = f"{INPUT}.format"
    supported = "audio/pcm (rate 24000), audio/pcmu or audio/pcma"
    if not isinstance(value, dict):
        raise invalid(param, f"format must be an object such as "
                             f"{{\"type\": \"audio/pcm\", \"rate\": 24000}}; supported: "
                             f"{supported}")
    unknown(value, {"type", "rate"}, param)
    kind = value.get("type", "audio/pcm")
    if kind not in ENCODINGS:
        raise invalid(f"{param}.type", f"format {kind!r} is not supported; supported: {supported}")
    rate = value.get("rate")
    if kind == "audio/pcm" and rate not in (None, PCM_RATE):
        raise invalid(f"{param}.rate", f"audio/pcm is supported at rate {PCM_RATE} only, got "
                                       f"{rate!r}")
    if kind != "audio/pcm" and rate not in (None, G711_RATE):
        raise invalid(f"{param}.rate", f"{kind} is 8000 Hz, got rate {rate!r}")
    return kind  # type: ignore[return-value]


def with_transcription(config: SessionConfig, given: dict, gateway: Gateway) -> SessionConfig:
    where = f"{INPUT}.transcription"
    unknown(given, TRANSCRIPTION_FIELDS, where)
    for field in ("delay", "keywords"):
        if given.get(field) not in (None, []):
            raise invalid(f"{where}.{field}", f"{field} is not supported by SenseVoice: send null")
    if not isinstance(given.get("prompt"), (str, type(None))):
        raise invalid(f"{where}.prompt", f"prompt must be a string or null, got "
                                         f"{type(given['prompt']).__name__}")
    model = given.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid(f"{where}.model", f"model must be a string, got {type(model).__name__}")
    language = given.get("language", config.language)
    if not isinstance(language, (str, type(None))):
        raise invalid(f"{where}.language", "language must be a string such as \"en\" or null")
    languages = given.get("languages", config.languages)
    if languages is not None and (not isinstance(languages, (list, tuple))
                                  or not all(isinstance(v, str) for v in languages)):
        raise invalid(f"{where}.languages", "languages must be a list of language codes such as "
                                            "[\"zh\", \"en\"], or null")
    try:
        code, allowed = gateway.check_languages(language or "auto", languages)
    except RequestFailed as e:
        raise invalid(PARAMS.get(e.param or "language", where), e.message) from None
    return replace(config, language=code,
                   languages=None if allowed is None else tuple(allowed))


def parse_turn_detection(value: object) -> TurnDetection | None:
    where = f"{INPUT}.turn_detection"
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid(where, "turn_detection must be an object with type server_vad, or null "
                             "(manual commits)")
    if value.get("type", "server_vad") != "server_vad":
        raise invalid(f"{where}.type", f"turn_detection type {value.get('type')!r} is not "
                                       f"supported; supported: server_vad, or null (manual "
                                       f"commits)")
    unknown(value, SERVER_VAD_FIELDS, where)
    numbers: dict[str, float | int | None] = {}
    for field, kind in (("threshold", float), ("prefix_padding_ms", int),
                        ("silence_duration_ms", int), ("idle_timeout_ms", int)):
        number = value.get(field)
        if number is not None and (isinstance(number, bool) or not isinstance(number, (int, float))
                                   or not finite(number)
                                   or (kind is int and number != int(number))):
            raise invalid(f"{where}.{field}", f"{field} must be a "
                                              f"{'number' if kind is float else 'whole number'}, "
                                              f"got {number!r}")
        numbers[field] = None if number is None else kind(number)
    del numbers["idle_timeout_ms"]  # checked, then ignored: it would trigger responses
    return TurnDetection(**numbers)  # type: ignore[arg-type]


def finite(number: float) -> bool:
    """Neither infinite (json reads 1e999 so) nor beyond a float (an int of 400 digits)."""
    try:
        return math.isfinite(float(number))
    except OverflowError:
        return False


def parse_include(value: object) -> bool:
    """Whether `include` asks for logprobs; RequestFailed for anything else it names."""
    if value is None:
        return False
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise invalid("session.include", f"include must be a list of strings such as "
                                         f"[\"{LOGPROBS}\"], or null")
    other = sorted(set(value) - {LOGPROBS})
    if other:
        raise invalid("session.include", f"include {other[0]!r} is not supported; supported: "
                                         f"{LOGPROBS}")
    return bool(value)


def token_logprobs(segment: Segment) -> list[dict]:
    """OpenAI's logprobs of a transcript: each text token as text, ln of the model's probability
    of it, and its UTF-8 bytes."""
    entries = []
    for index, token in enumerate(segment.tokens):
        text = token.piece.replace(WORD_START, " ")
        if index == 0:
            text = text.lstrip(" ")  # the transcript starts with no space
        entries.append({"token": text,
                        "logprob": math.log(max(token.probability, sys.float_info.min)),
                        "bytes": list(text.encode())})
    return entries
