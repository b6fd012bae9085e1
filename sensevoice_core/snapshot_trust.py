"""Which L2 snapshot files have had their data hashed: once per file identity per boot.

The first process of a boot to map a snapshot hashes its data (or wrote it, hashing as it
wrote) and records that beside it, in ``<snapshot>.verified``: the boot id, the file's identity
(device, inode, size, mtime, ctime: an in-place write moves the ctime, which nothing can set
back) and the data checksum its header claims. A later process of the same boot trusts that
record while the file keeps that identity and header checksum, so a new worker maps the
weights without reading all of them again (0.3-1 s for the full-size model on 2 cores, most
of a reload's load). A reboot, a rewrite, a rename over it or a record that does not match
makes the next process hash it again. Whoever can write the record can write the snapshot
beside it: the cache directory is the trust boundary either way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from pathlib import Path

from sensevoice_core.atomic import write_bytes_atomic
from sensevoice_core.path_cache import FileIdentity

logger = logging.getLogger("sensevoice.cache")

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
RECORD_SUFFIX = ".verified"
MAX_RECORD_BYTES = 4096


def record_path(snapshot: Path) -> Path:
    return snapshot.with_name(snapshot.name + RECORD_SUFFIX)


def boot_id() -> str | None:
    """This boot's id (Linux); None elsewhere: then only this process's own hashes count."""
    try:
        return BOOT_ID.read_text(encoding="ascii").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


class VerifiedSnapshots:
    """The snapshot files whose data this process has hashed or written, plus the records of
    the ones another process of this boot hashed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: set[tuple[str, FileIdentity]] = set()

    def trusts(self, path: Path, identity: FileIdentity, data_sha256: str | None) -> bool:
        key = (str(path), identity)
        with self._lock:
            if key in self._files:
                return True
        if data_sha256 is None or not self._recorded(path, identity, data_sha256):
            return False
        with self._lock:
            self._files.add(key)
        return True

    def add(self, path: Path, identity: FileIdentity, data_sha256: str | None) -> None:
        """This process hashed (or wrote) the file: remember it, and record it for the boot."""
        with self._lock:
            self._files.add((str(path), identity))
        boot = boot_id()
        if boot is None or data_sha256 is None:
            return
        record = {"boot_id": boot, "identity": dataclasses.asdict(identity),
                  "data_sha256": data_sha256}
        try:
            write_bytes_atomic(record_path(path), json.dumps(record).encode())
        except OSError as e:  # a read-only cache: the next process hashes it again
            logger.debug("cannot record that %s was verified (%s)", path, e)

    @staticmethod
    def _recorded(path: Path, identity: FileIdentity, data_sha256: str) -> bool:
        boot = boot_id()
        if boot is None:
            return False
        try:
            with open(record_path(path), "rb") as handle:
                raw = handle.read(MAX_RECORD_BYTES + 1)
            record = json.loads(raw) if len(raw) <= MAX_RECORD_BYTES else None
            return (isinstance(record, dict) and record.get("boot_id") == boot
                    and record.get("data_sha256") == data_sha256
                    and record.get("identity") == dataclasses.asdict(identity))
        except (OSError, ValueError):
            return False


def forget(snapshot: Path) -> None:
    """The snapshot is being deleted: its record goes with it."""
    try:
        record_path(snapshot).unlink(missing_ok=True)
    except OSError:
        pass
