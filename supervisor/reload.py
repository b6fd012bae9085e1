"""Blue-green reload bookkeeping: who asked, what to load, which workers are green, when to give up."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sensevoice_core.protocol import ModelInfo, ReloadOutcome, ReloadRequest


class ReloadRefused(ValueError):
    """A reload request that is not attempted at all (bad path); the old model keeps serving."""


@dataclass(frozen=True)
class Waiter:
    """Who waits for a reload's outcome: a client (None for triggers that are not clients),
    and an event set when it is over (the file watcher's thread waits on it)."""

    client: bytes | None
    request_id: str
    done: threading.Event | None = None

    def notify(self) -> None:
        if self.done is not None:
            self.done.set()


@dataclass
class ReloadJob:
    path: str | None
    force_fresh: bool
    origin: str
    waiters: list[Waiter]
    received_at: float = field(default_factory=time.monotonic)
    deadline: float = 0.0
    green: set[str] = field(default_factory=set)  # worker ids loading the new model
    old_model: ModelInfo | None = None
    started: bool = False

    def merge(self, request: ReloadRequest, path: str | None, waiter: Waiter) -> list[Waiter]:
        """A trigger arriving while this job waits its turn: the latest path wins.

        Returns the waiters that asked for another path: they are answered "superseded", so
        nobody is told their model loaded when another one did.
        """
        superseded = [] if path == self.path else self.waiters
        if superseded:
            self.waiters, self.force_fresh = [], False
        self.path = path
        self.force_fresh = self.force_fresh or request.force_fresh
        self.origin = request.origin
        self.waiters.append(waiter)
        return superseded

    def outcome(self, new_model: ModelInfo | None, serving: ModelInfo | None,
                error: str | None = None) -> ReloadOutcome:
        old = self.old_model
        return ReloadOutcome(
            ok=error is None, origin=self.origin, requested_path=self.path,
            model_dir=serving.model_dir if serving else None,
            old_fingerprint=old.fingerprint if old else None,
            new_fingerprint=new_model.fingerprint if new_model and error is None else None,
            seconds=round(time.monotonic() - self.received_at, 4),
            cache_level=new_model.cache_level if new_model else None,
            error=error, coalesced=len(self.waiters))


def check_reload_path(path: str | None, served: ModelInfo | None, roots: list[Path]) -> str | None:
    """The absolute directory to load, or None for the default; ReloadRefused when not allowed.

    Allowed roots: SENSEVOICE_MODEL_ROOTS, or by default the served model directory's parent.
    """
    if path is None:
        return served.model_dir if served else None
    try:
        candidate = Path(path).expanduser()
        if not candidate.is_absolute():
            raise ReloadRefused(f"reload path {path!r} is relative; send an absolute path")
        resolved = candidate.resolve()
        allowed = [root.expanduser().resolve() for root in roots]
        if not allowed and served is not None:
            allowed = [Path(served.model_dir).parent]
        if allowed and not any(resolved.is_relative_to(root) for root in allowed):
            listed = ", ".join(str(root) for root in allowed)
            raise ReloadRefused(f"reload path {resolved} is outside the allowed model roots "
                                f"({listed}); add its parent to SENSEVOICE_MODEL_ROOTS")
        if not resolved.is_dir():
            raise ReloadRefused(f"reload path {resolved} is not a directory")
    except ReloadRefused:
        raise
    except (OSError, ValueError, RuntimeError) as e:  # too long, NUL byte, ~nosuchuser, EACCES
        raise ReloadRefused(f"reload path {path[:200]!r} is not usable: {e}") from None
    return str(resolved)


def describe_model(model: ModelInfo) -> str:
    ids = ", ".join(f"{key}: {value}" for key, value in model.short_ids.items())
    return f"{model.model_dir} ({ids})"


def success_line(model: ModelInfo, seconds: float) -> str:
    level = {"L1": "L1", "L2": "L2", "fresh": "a fresh load"}.get(model.cache_level,
                                                                 model.cache_level)
    return (f"[HOTRELOAD] Swapped model successfully: reloaded from {describe_model(model)} "
            f"in {seconds:.2f} s via {level}")


def failure_line(serving: ModelInfo | None, cause: str, verb: str = "failed") -> str:
    still = describe_model(serving) if serving else "nothing (no model was serving)"
    return f"[HOTRELOAD] Reload {verb}, still serving {still}: {cause}"
