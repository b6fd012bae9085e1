"""<SENSEVOICE_CACHE_DIR>/cluster.json: where the Ray instance of a running `python -m cluster
up` is, and which process to stop for `down`.

The file leads to a cluster (and makes the CLI send this user's Ray token there) and names a
pid that `down` signals, so it is trusted only when it is this user's own, owner-only, and
well formed; a pid is signalled only while it is really a `python -m cluster up` of this user.
`up` holds an exclusive flock on the file for its whole life: a second `up` cannot take it
(nor delete it), and a file nobody holds is a stale one left by an `up` that was killed.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sensevoice_core.settings import Settings

STATE_FILE = "cluster.json"
STATE_MODE = 0o600
# A reader's probe (held) locks the file for a moment; `up` retries for this long.
CLAIM_RETRY_S = 0.5
UP_ARGV = (b"-m", b"cluster", b"up")


class ClusterState(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    pid: int = Field(gt=0)  # the `python -m cluster up` process
    address: str | None = None  # its Ray GCS, host:port (None while Ray starts)
    auth: Literal["token"] | None = None  # Ray's auth mode there


class StateError(RuntimeError):
    """cluster.json cannot be trusted or read; the message is one line naming the fix."""


def state_path(settings: Settings) -> Path:
    # Absolute, so the message names where it looked; relative to this cwd, as `up` resolved it.
    return settings.cache_dir.expanduser().resolve() / STATE_FILE


def read_state(path: Path) -> ClusterState | None:
    """The file's content, None when there is none; StateError when it is not this user's own
    owner-only file or not one `up` wrote."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror}; remove it") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if info.st_uid != os.getuid():
            raise StateError(f"{path} belongs to uid {info.st_uid}, not to you: not trusted; "
                             f"remove it, or set SENSEVOICE_CACHE_DIR to a directory of yours")
        if info.st_mode & 0o077:
            raise StateError(f"{path} is open to other users (mode {info.st_mode & 0o777:o}): "
                             f"not trusted; remove it (`up` writes it 600)")
        raw = handle.read()
    try:
        return ClusterState.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the file"
        raise StateError(f"{path} is not a cluster.json `up` wrote ({where}: {first['msg']}); "
                         f"remove it") from None


def is_up_process(pid: int) -> bool:
    """Whether pid is a live `python -m cluster up` of this user (not a process that took a
    dead `up`'s pid)."""
    proc = Path(f"/proc/{pid}")
    try:
        if proc.stat().st_uid != os.getuid():
            return False
        argv = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(tuple(argv[i:i + len(UP_ARGV)]) == UP_ARGV for i in range(len(argv)))


class StateClaim:
    """`up`'s hold on cluster.json: an exclusive flock for the life of the process."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self.fd = fd

    @classmethod
    def take(cls, path: Path) -> StateClaim | None:
        """The claim, or None while another `up` holds the file. A stale file (its `up` was
        killed) is taken over."""
        path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + CLAIM_RETRY_S
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, STATE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.05)
                continue
            # The `up` that held it may have removed the file between our open and our lock:
            # then this lock is on a file nobody can find; open the path again.
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        info = os.fstat(fd)
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            os.close(fd)
            raise StateError(f"{path} is not an owner-only file of yours: remove it")
        return cls(path, fd)

    def write(self, state: ClusterState) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, state.model_dump_json().encode(), 0)

    def release(self) -> None:
        """Remove the file (it is still ours: nobody else can hold it) and the lock."""
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(self.fd)


def held(path: Path) -> bool:
    """Whether an `up` holds the file now (False: nobody does; the file is stale)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
