"""SenseVoice Small inference in plain PyTorch, state-dict compatible with the FunASR release."""

from sensevoice_core.audio import load_audio
from sensevoice_core.decoding import Transcription
from sensevoice_core.errors import (
    AudioError,
    CheckpointMismatchError,
    ConfigError,
    ModelFileError,
    SenseVoiceError,
)
from sensevoice_core.loader import load_model
from sensevoice_core.pipeline import SenseVoice, TranscribeOptions
from sensevoice_core.vocab import Language, TextNorm

__version__ = "0.1.0"

__all__ = [
    "AudioError",
    "CheckpointMismatchError",
    "ConfigError",
    "Language",
    "ModelFileError",
    "SenseVoice",
    "SenseVoiceError",
    "TextNorm",
    "TranscribeOptions",
    "Transcription",
    "load_audio",
    "load_model",
]
