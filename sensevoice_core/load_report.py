"""What a cached load reports (LoadReport) and the helpers that fill it in: the step timer
and a warning that is both logged and kept for the caller."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sensevoice_core.protocol import CACHE_LEVEL_WORDS, CacheLevel

logger = logging.getLogger("sensevoice.cache")


@dataclass
class LoadReport:
    level: CacheLevel  # "L2" (the snapshot) or "fresh" (the model directory's files)
    model_dir: Path
    layout: str
    fingerprint: str
    short_ids: dict[str, str]  # config / weights / code, 8 hex each, for log lines
    snapshot: Path | None  # the L2 file used or written, None when L2 is off or failed
    steps_s: dict[str, float] = field(default_factory=dict)  # seconds per step
    bytes_read: int = 0  # bytes hashed or loaded from disk (an L2 map reads only the header)
    bytes_hashed: int = 0  # of those, bytes hashed because L3 did not know the file as it is
    warnings: list[str] = field(default_factory=list)
    file_sha256: dict[str, str] = field(default_factory=dict)  # role -> checksum of its file
    file_paths: dict[str, str] = field(default_factory=dict)  # role -> absolute path
    compute_type: str = "float32"  # the concrete compute type the model runs in
    compute_reason: str = ""  # why (see compute.ComputeChoice.reason)

    @property
    def total_s(self) -> float:
        return sum(self.steps_s.values())

    def summary(self) -> str:
        ids = ", ".join(f"{key}: {value}" for key, value in self.short_ids.items())
        return (f"{self.model_dir} ({ids}) in {self.total_s:.2f} s from "
                f"{CACHE_LEVEL_WORDS[self.level]}, {self.compute_type} ({self.compute_reason})")


class StepTimer:
    def __init__(self, steps: dict[str, float]):
        self.steps = steps

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.steps[name] = self.steps.get(name, 0.0) + time.perf_counter() - start


def warn(report: LoadReport, message: str) -> None:
    logger.warning(message)
    report.warnings.append(message)


def remove_file(path: Path) -> None:
    """Delete a cache file; a read-only cache keeps it (it is never used unverified)."""
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        logger.warning("cannot delete %s (%s); leaving it", path, e.strerror)
