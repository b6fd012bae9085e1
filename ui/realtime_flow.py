"""A realtime session's flow control: how fast a client may send (TokenBucket), and its
appends merged into fewer, larger stream messages (AppendMerger).

Why merge: each input_audio_buffer.append forwarded alone is one ZeroMQ message through the
single-threaded supervisor and one chunk the worker's VAD runs on; a browser or SDK sending a
few milliseconds at a time would cost those processes far more than the audio is worth (the
engine spends ~350 ms CPU per second of audio in 20 ms chunks, ~100 ms in 200 ms chunks).
Merged audio goes on once MERGE_S of it is held or FLUSH_AFTER_S after its first byte, so a
turn's end is heard at most that much later.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

MERGE_S = 0.1  # audio held before it goes on at once
FLUSH_AFTER_S = 0.05  # the longest the first held byte waits


@dataclass
class TokenBucket:
    """At most `rate` a second on average, and `capacity` at once."""

    rate: float
    capacity: float
    level: float = field(init=False)
    updated: float = field(init=False, default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.capacity

    def take(self, amount: float) -> bool:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now
        if amount > self.level:
            return False
        self.level -= amount
        return True


def merge_bytes(sample_rate: int, sample_width: int) -> int:
    """MERGE_S of audio in bytes: a whole number of samples."""
    return max(1, round(sample_rate * MERGE_S)) * sample_width


@dataclass
class AppendMerger:
    """Appended audio held until it goes on. Each append is whole samples, so what is taken is
    too."""

    held: bytearray = field(default_factory=bytearray)
    first_at: float | None = None  # time.monotonic() of the oldest held byte

    def add(self, data: bytes, full: int) -> bool:
        """Hold data; True when `full` bytes or more are held: take() them now."""
        if not self.held:
            self.first_at = time.monotonic()
        self.held += data
        return len(self.held) >= full

    def take(self) -> bytes:
        """All held audio (b"" if none); nothing is held after."""
        data = bytes(self.held)
        self.held.clear()
        self.first_at = None
        return data

    def due_in(self) -> float | None:
        """Seconds until the held audio must go on (<= 0: now); None when nothing is held."""
        if self.first_at is None:
            return None
        return self.first_at + FLUSH_AFTER_S - time.monotonic()
