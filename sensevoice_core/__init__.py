"""SenseVoice Small inference in plain PyTorch, state-dict compatible with the FunASR release.

    import sensevoice_core
    model = sensevoice_core.load_model("path/to/SenseVoiceSmall")
    result = model.transcribe("meeting.mp3", sensevoice_core.TranscribeOptions(use_itn=True))
    result.text, result.language, [(s.start, s.end, s.text) for s in result.segments]

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
    "load_model": "sensevoice_core.cache",
    "load_sensevoice_cached": "sensevoice_core.cache",
    "AudioError": "sensevoice_core.errors",
    "SenseVoiceError": "sensevoice_core.errors",
    "TranscribeOptions": "sensevoice_core.options",
    "SenseVoice": "sensevoice_core.pipeline",
    "Result": "sensevoice_core.result",
    "Segment": "sensevoice_core.result",
    "Settings": "sensevoice_core.settings",
    "Language": "sensevoice_core.vocab",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from sensevoice_core.cache import load_model, load_sensevoice_cached
    from sensevoice_core.errors import AudioError, SenseVoiceError
    from sensevoice_core.options import TranscribeOptions
    from sensevoice_core.pipeline import SenseVoice
    from sensevoice_core.result import Result, Segment
    from sensevoice_core.settings import Settings
    from sensevoice_core.vocab import Language


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sensevoice_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
