"""The supervisor's view of one worker process, and how one is started and stopped."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

from sensevoice_core.exit_codes import EXIT_BOOT_ERROR, EXIT_MODEL_LOAD_ERROR
from sensevoice_core.protocol import (
    ModelInfo,
)

logger = logging.getLogger("sensevoice.supervisor")

Role = Literal["starting", "standby", "loading", "serving", "draining"]
Purpose = Literal["serve", "reload"]  # why a worker is loading: fill capacity, or a reload


@dataclass(frozen=True)
class Assignment:
    """What a worker should load once it has said hello."""

    path: str | None
    force_fresh: bool
    purpose: Purpose


@dataclass
class Backoff:
    """After a failure wait 1 s, doubling per failure up to max_s; a success resets it."""

    max_s: float
    delay_s: float = 0.0
    until: float = 0.0  # monotonic time before which nothing is retried

    def fail(self) -> None:
        self.delay_s = min(max(self.delay_s * 2, 1.0), self.max_s)
        self.until = time.monotonic() + self.delay_s

    def reset(self) -> None:
        self.delay_s = 0.0


@dataclass
class WorkerHandle:
    worker_id: str
    process: subprocess.Popen
    age: int  # spawn order; older workers have smaller ages
    role: Role = "starting"
    assignment: Assignment | None = None
    spawned_at: float = field(default_factory=time.monotonic)
    deadline: float = 0.0  # for starting / loading / draining; 0 when none applies
    last_heard: float = field(default_factory=time.monotonic)
    last_ping: float = 0.0
    unanswered_pings: int = 0  # pings sent since the worker was last heard from
    idle_since: float = field(default_factory=time.monotonic)
    jobs: list[str] = field(default_factory=list)  # ids of the requests it is serving
    model: ModelInfo | None = None
    requests_served: int = 0
    health_checked: bool = False  # answered a ping after Ready
    load_error: str | None = None  # what the worker said when its load failed
    kill_reason: str | None = None  # why the supervisor killed it (set: awaiting reaping)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def busy(self) -> bool:
        return bool(self.jobs)

    @property
    def killed(self) -> bool:
        return self.kill_reason is not None

    def kill(self, reason: str) -> None:
        if self.kill_reason is None:
            self.kill_reason = reason
        if self.process.poll() is None:
            self.process.kill()


def spawn_worker_process(worker_id: str, backend: str, standby: bool) -> subprocess.Popen:
    """Start ``python -m inference_worker``; it inherits the environment and stderr."""
    command = [sys.executable, "-m", "inference_worker", "--backend", backend,
               "--worker-id", worker_id, "--parent-pid", str(os.getpid())]
    if standby:
        command.append("--standby")
    return subprocess.Popen(command, stdin=subprocess.DEVNULL)


def describe_exit(code: int) -> str:
    """Why a worker exited, in words a user can act on."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:  # a real-time signal has no name
            name = f"signal {-code}"
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    if code == EXIT_MODEL_LOAD_ERROR:
        return "could not load its model (exit code 4)"
    if code == EXIT_BOOT_ERROR:
        return "could not start (exit code 3): check the settings and the installation"
    return f"exited with code {code}"
