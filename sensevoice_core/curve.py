"""ZeroMQ CURVE keys for a supervisor that listens off loopback (SENSEVOICE_CURVE_DIR).

Layout of the directory (``python -m supervisor keygen DIR`` writes it, owner-only):
``server.key`` / ``server.key_secret`` (the supervisor's pair; clients need ``server.key``),
``client.key`` / ``client.key_secret`` (this machine's client identity) and ``clients/*.key``,
the public keys of the clients the supervisor accepts. A client whose key is not in
``clients/`` never completes the handshake, so it sees "no supervisor answers".
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from sensevoice_core.errors import CurveKeyError  # noqa: F401 - callers import it from here

AUTHORIZED_DIR = "clients"


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise CurveKeyError(f"{path}: cannot read the CURVE key ({e}); create the keys with "
                            f"`python -m supervisor keygen {path.parent}`") from None
    if secret and secret_key is None:
        raise CurveKeyError(f"{path}: holds no secret key")
    return public, secret_key


@dataclass(frozen=True)
class CurveKeys:
    directory: Path

    def secure_server(self, socket: zmq.Socket) -> object:
        """Make socket a CURVE server accepting only clients/*.key; returns the authenticator
        thread, which must be stopped with the socket (``.stop()``)."""
        from zmq.auth.thread import ThreadAuthenticator

        public, secret = _load(self.directory / "server.key_secret", secret=True)
        authorized = self.directory / AUTHORIZED_DIR
        if not authorized.is_dir():
            raise CurveKeyError(f"{authorized}: no such directory of authorized client keys")
        authenticator = ThreadAuthenticator(socket.context)
        authenticator.start()
        authenticator.configure_curve(domain="*", location=str(authorized))
        socket.curve_secretkey = secret
        socket.curve_publickey = public
        socket.curve_server = True
        return authenticator

    def client(self) -> ClientKeys:
        """This machine's client identity and the server's public key, read once."""
        server_public, _ = _load(self.directory / "server.key", secret=False)
        public, secret = _load(self.directory / "client.key_secret", secret=True)
        assert secret is not None
        return ClientKeys(server_public, public, secret)


@dataclass(frozen=True)
class ClientKeys:
    server_public: bytes
    public: bytes
    secret: bytes

    def apply(self, socket: zmq.Socket) -> None:
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret


def generate_keys(directory: Path, force: bool = False) -> list[Path]:
    """Write a server pair, a client pair and authorize that client; owner-only files.
    Existing keys are kept unless force: replacing the server's pair cuts off every client."""
    existing = [p for p in (directory / "server.key_secret", directory / "client.key_secret")
                if p.exists()]
    if existing and not force:
        raise CurveKeyError(f"{existing[0]} already exists; replacing it would cut off every "
                            f"client that has the old keys (use --force to replace them)")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    authorized = directory / AUTHORIZED_DIR
    authorized.mkdir(mode=0o700, exist_ok=True)
    old_umask = os.umask(0o077)
    try:
        written = []
        for name in ("server", "client"):
            public, secret = zmq.auth.create_certificates(str(directory), name)
            written += [Path(public), Path(secret)]
        shutil.copyfile(directory / "client.key", authorized / "client.key")
        written.append(authorized / "client.key")
    finally:
        os.umask(old_umask)
    return written
