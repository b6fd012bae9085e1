"""Where the supervisor listens: the clients' socket (ipc or tcp, CURVE off loopback), the
workers' private ipc socket in a runtime folder, and the clean-up after a killed supervisor."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import zmq

from sensevoice_core.curve import CurveKeyError
from sensevoice_core.processes import pid_alive
from sensevoice_core.protocol import MiB, StatusRequest, encode
from sensevoice_core.settings import Settings

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator

logger = logging.getLogger("sensevoice.supervisor")

RUNTIME_PREFIX = "sensevoice-"  # /tmp/sensevoice-<supervisor pid>-*: the workers' socket
RUNTIME_NAME = re.compile(r"sensevoice-(\d+)-[a-z0-9_]{8}")  # as tempfile.mkdtemp names it


class StartupError(RuntimeError):
    """The supervisor cannot start (address in use, first model does not load)."""


def make_runtime_dir() -> Path:
    """A fresh private folder for the workers' socket, after removing those of killed supervisors."""
    remove_stale_runtime_dirs()
    return Path(tempfile.mkdtemp(prefix=f"{RUNTIME_PREFIX}{os.getpid()}-"))


def bind_frontend(socket: zmq.Socket, context: zmq.Context,
                  settings: Settings) -> ThreadAuthenticator | None:
    """Bind the clients' socket; returns CURVE's ZAP handler on tcp:// with SENSEVOICE_CURVE_DIR."""
    address = settings.client_address()
    socket.setsockopt(zmq.LINGER, 500)
    max_bytes = settings.max_request_bytes
    # A hard cap well above the limit: larger frames are dropped by ZeroMQ before they can
    # fill memory; those between the limit and the cap get a "too_large" reply.
    socket.setsockopt(zmq.MAXMSGSIZE, 2 * max_bytes + MiB)
    authenticator = None
    keys = settings.curve_keys(address)
    if keys is not None:
        try:
            authenticator = keys.secure_server(socket)
        except CurveKeyError as e:
            raise StartupError(str(e)) from None
    cannot = f"cannot listen on {address}: {{}}; set SENSEVOICE_SUPERVISOR_ADDRESS to a free address"
    if not address.startswith("ipc://"):
        try:
            socket.bind(address)
        except zmq.ZMQError as e:
            raise StartupError(cannot.format(e)) from None
        return authenticator
    path = Path(address[len("ipc://"):])
    if path.exists():
        if supervisor_answers(context, address):
            raise StartupError(f"another supervisor is already serving at {address}; "
                               f"stop it or set SENSEVOICE_SUPERVISOR_ADDRESS")
        path.unlink()  # left by a supervisor that was killed
    try:
        bind_owner_only(socket, path)
    except (zmq.ZMQError, OSError) as e:
        raise StartupError(cannot.format(e)) from None
    return authenticator


def bind_owner_only(socket: zmq.Socket, path: Path) -> None:
    """Bind an ipc socket that only this user can connect to, whatever the umask: its directory
    is created 0700 when missing, the socket file is created and kept 0600."""
    missing = [d for d in [path.parent, *path.parent.parents] if not d.exists()]
    for directory in reversed(missing):  # each level we create is ours alone
        directory.mkdir(mode=0o700)
        os.chmod(directory, 0o700)
    shared = path.parent.stat().st_mode & 0o022
    if shared:
        logger.warning("The socket directory %s is writable by other users (mode %o); anyone "
                       "who can write there can replace the socket. Fix: chmod go-w %s, or set "
                       "SENSEVOICE_SUPERVISOR_ADDRESS to a private directory", path.parent,
                       path.parent.stat().st_mode & 0o777, path.parent)
    old_umask = os.umask(0o077)
    try:
        socket.bind(f"ipc://{path}")
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)


def remove_stale_runtime_dirs() -> list[Path]:
    """Delete runtime directories of supervisors that were killed: ours, named exactly as
    mkdtemp names them, holding nothing but the workers' socket, their supervisor gone."""
    removed = []
    for directory in Path(tempfile.gettempdir()).glob(f"{RUNTIME_PREFIX}*"):
        match = RUNTIME_NAME.fullmatch(directory.name)
        try:
            if (match is None or directory.is_symlink() or directory.stat().st_uid != os.getuid()
                    or pid_alive(int(match[1]))
                    or {p.name for p in directory.iterdir()} - {"workers.ipc"}):
                continue
            shutil.rmtree(directory)
        except OSError:
            continue
        removed.append(directory)
    return removed


def supervisor_answers(context: zmq.Context, address: str, timeout_s: float = 0.5) -> bool:
    """True when a live supervisor replies to a status request at this address."""
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(address)
        socket.send_multipart(encode(StatusRequest()))
        return bool(socket.poll(timeout_s * 1000))
    finally:
        socket.close()
