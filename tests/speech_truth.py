"""Where speech is in a clean synthetic clip, found without any VAD: the ground truth."""

from __future__ import annotations

import numpy as np


def energy_bounds(samples: np.ndarray) -> tuple[float, float]:
    """Seconds where speech starts and ends: 10 ms frames above 10% of the peak RSS level."""
    frames = samples[: len(samples) // 160 * 160].reshape(-1, 160)
    rms = np.sqrt((frames ** 2).mean(axis=1))
    loud = np.flatnonzero(rms > 0.1 * rms.max())
    return loud[0] * 0.01, (loud[-1] + 1) * 0.01
