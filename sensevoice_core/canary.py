"""The reload canary: clips with their expected text and language that a reload's new model
must transcribe (within SENSEVOICE_RELOAD_CANARY_MAX_CER) before traffic moves to it.

Torch-free at import: the supervisor and the protocol use its types; only ``run_canary`` needs
a loaded model (passed in).

Format: ``<SENSEVOICE_RELOAD_CANARY_DIR>/canary.jsonl``, one JSON object per line:
``{"audio": "en_00.flac", "text": "close the window", "language": "en"}`` plus optional
``"use_itn": true`` (the expected text is then the ITN form). Audio paths are relative to the
directory and must stay inside it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

CANARY_FILE = "canary.jsonl"


class CanaryClip(BaseModel):
    model_config = ConfigDict(frozen=True)
    audio: str  # the file name, relative to the canary directory
    expected: str
    got: str
    cer: float  # this clip's character error rate
    expected_language: str | None = None
    language: str | None = None  # what the model tagged
    ok: bool  # its language matched (when one is expected); its text is judged in the total


class CanaryReport(BaseModel):
    model_config = ConfigDict(frozen=True)
    canary_dir: str
    passed: bool
    cer: float  # character errors over all clips / expected characters over all clips
    max_cer: float
    seconds: float
    clips: list[CanaryClip]

    def summary(self) -> str:
        """One line for logs and the reload outcome: the verdict and the worst clips' diffs."""
        raise NotImplementedError  # canary helper
