"""SenseVoice Small inference in plain PyTorch, state-dict compatible with the FunASR release."""

import os

# Nothing here may reach for the network. Set before anything can import transformers or
# huggingface_hub, which read these flags once, at import; an explicit choice of the host
# application is kept (every from_pretrained here is local_files_only=True regardless).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# isort: split
from sensevoice_core.audio import load_audio
from sensevoice_core.cache import LoadReport, ModelHolder, load_sensevoice_cached
from sensevoice_core.decoding import Transcription
from sensevoice_core.errors import (
    AudioError,
    CheckpointMismatchError,
    ConfigError,
    ModelFileError,
    SenseVoiceError,
)
from sensevoice_core.loader import load_model
from sensevoice_core.model_path import diagnose_model_paths, find_or_fix_model_path
from sensevoice_core.pipeline import SenseVoice, TranscribeOptions
from sensevoice_core.settings import Settings
from sensevoice_core.vocab import Language, TextNorm

__version__ = "0.1.0"

__all__ = [
    "AudioError",
    "CheckpointMismatchError",
    "ConfigError",
    "Language",
    "LoadReport",
    "ModelHolder",
    "Settings",
    "diagnose_model_paths",
    "find_or_fix_model_path",
    "load_sensevoice_cached",
    "ModelFileError",
    "SenseVoice",
    "SenseVoiceError",
    "TextNorm",
    "TranscribeOptions",
    "Transcription",
    "load_audio",
    "load_model",
]
