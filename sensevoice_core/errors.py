"""Every error this package raises on purpose. Each names the file or input at fault and what
was expected. No torch here: every process imports it."""

from __future__ import annotations

from pathlib import Path

REQUEST_AUDIO = "the request's audio"  # how errors name audio that came without a file name


class SenseVoiceError(Exception):
    """Base class for every error this package raises on purpose."""


class ModelFileError(SenseVoiceError):
    """A model directory or one of its files is missing or not what was expected."""

    def __init__(self, path: Path | str, problem: str, expected: str = "", found: str = ""):
        self.path = Path(path)
        self.problem = problem
        self.expected = expected
        self.found = found
        message = f"{self.path}: {problem}"
        details = [f"expected {expected}"] if expected else []
        details += [f"found {found}"] if found else []
        if details:
            message += f" ({', '.join(details)})"
        super().__init__(message)


class ConfigError(ModelFileError):
    """A config file holds an unknown key or a value this implementation cannot honour."""


class CheckpointMismatchError(ModelFileError):
    """A checkpoint's tensors do not match the model built from its config."""

    def __init__(
        self,
        path: Path | str,
        missing: list[str],
        unexpected: list[str],
        shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ):
        self.missing = missing
        self.unexpected = unexpected
        self.shape_mismatches = shape_mismatches
        lines = [f"missing key: {key}" for key in missing]
        lines += [f"unexpected key: {key}" for key in unexpected]
        lines += [
            f"{key}: expected {tuple(expected)} found {tuple(found)}"
            for key, expected, found in shape_mismatches
        ]
        problem = "checkpoint does not match the model config:\n  " + "\n  ".join(lines)
        super().__init__(path, problem)


class SnapshotError(SenseVoiceError):
    """An L2 snapshot file is unreadable, truncated, altered or for another model."""

    def __init__(self, path: Path, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class SettingsError(SenseVoiceError):
    """A SENSEVOICE_* variable holds a value that is not allowed."""


class AudioError(SenseVoiceError):
    """Audio could not be decoded, is empty, or holds non-finite samples. source names it: a
    path, an upload's file name, or "the request's audio"; never a Python repr."""

    def __init__(self, source: str, problem: str):
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem}")


class AudioTooLongError(AudioError):
    """Audio longer than the caller allows (SENSEVOICE_MAX_AUDIO_S in the service)."""

    def __init__(self, source: str, seconds: float, limit: float, at_least: bool = False):
        self.seconds = seconds
        self.limit = limit
        length = f"at least {seconds:.1f} s" if at_least else f"{seconds:.1f} s"
        super().__init__(source, f"the audio is {length} long; the limit is {limit:g} s")


class CurveKeyError(SenseVoiceError):
    """A key file under SENSEVOICE_CURVE_DIR is missing or unreadable."""


class ServiceError(SenseVoiceError):
    """The supervisor answered with an error (code as in protocol.ErrorCode)."""

    def __init__(self, code: str, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


class ServiceUnavailableError(ServiceError):
    """No supervisor answered at the address."""

    def __init__(self, message: str):
        super().__init__("unavailable", message)
