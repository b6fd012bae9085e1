"""SenseVoice Small inference in plain PyTorch, state-dict compatible with the FunASR release.

The public names below are imported on first use, so that the processes that never run the
model (the supervisor, the UI, a client script) can import ``sensevoice_core.protocol`` or
``sensevoice_core.client`` in milliseconds, without torch.
"""

import importlib
import os
from typing import TYPE_CHECKING, Any

# Nothing here may reach for the network. Set before anything can import transformers or
# huggingface_hub, which read these flags once, at import; an explicit choice of the host
# application is kept (every from_pretrained here is local_files_only=True regardless).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__version__ = "0.1.0"

_EXPORTS = {
    "load_audio": "sensevoice_core.audio",
    "LoadReport": "sensevoice_core.cache",
    "ModelHolder": "sensevoice_core.cache",
    "load_sensevoice_cached": "sensevoice_core.cache",
    "Transcription": "sensevoice_core.decoding",
    "AudioError": "sensevoice_core.errors",
    "CheckpointMismatchError": "sensevoice_core.errors",
    "ConfigError": "sensevoice_core.errors",
    "ModelFileError": "sensevoice_core.errors",
    "SenseVoiceError": "sensevoice_core.errors",
    "load_model": "sensevoice_core.loader",
    "diagnose_model_paths": "sensevoice_core.model_path",
    "find_or_fix_model_path": "sensevoice_core.model_path",
    "SenseVoice": "sensevoice_core.pipeline",
    "TranscribeOptions": "sensevoice_core.pipeline",
    "Settings": "sensevoice_core.settings",
    "Language": "sensevoice_core.vocab",
    "TextNorm": "sensevoice_core.vocab",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sensevoice_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
