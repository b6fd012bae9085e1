"""L3: ``cache/model_path.json``, the resolved model path plus per-file checksums.

Validating an entry when nothing changed costs one ``stat`` per file; a file is hashed again
only when its size or mtime changed. The fingerprint names the model for the L2 snapshot and
for logs: a hash of the weights, config, tokenizer and CMVN checksums plus the code version.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock
from pydantic import BaseModel, ValidationError

from sensevoice_core.atomic import write_bytes_atomic
from sensevoice_core.errors import ModelFileError

if TYPE_CHECKING:  # the loader imports torch; the supervisor hashes files without it
    from sensevoice_core.loader import ModelFiles

logger = logging.getLogger("sensevoice.cache")

PATH_CACHE_NAME = "model_path.json"
PATH_CACHE_VERSION = 1
# Bump when the snapshot's tensors or metadata change meaning; it is part of every fingerprint.
SNAPSHOT_FORMAT = 1
ROLES = ("weights", "config", "tokenizer", "cmvn")
HASH_CHUNK = 1 << 24
LOCK_TIMEOUT_S = 30.0


def code_version() -> str:
    from sensevoice_core import __version__

    return f"{__version__}+snapshot{SNAPSHOT_FORMAT}"


class FileRecord(BaseModel):
    path: str
    size: int
    mtime_ns: int
    sha256: str


class PathRecord(BaseModel):
    model_dir: str
    layout: str
    files: dict[str, FileRecord]  # role -> record, roles as in ROLES
    code_version: str
    fingerprint: str
    snapshot: FileRecord | None = None  # the L2 file built from these files, as last seen

    def short_ids(self) -> dict[str, str]:
        """8-hex ids for log lines: config, weights, code."""
        return {
            "config": self.files["config"].sha256[:8],
            "weights": self.files["weights"].sha256[:8],
            "code": hashlib.sha256(self.code_version.encode()).hexdigest()[:8],
        }


class PathCacheFile(BaseModel):
    version: int = PATH_CACHE_VERSION
    last_model_dir: str | None = None
    entries: dict[str, PathRecord] = {}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_of(files: dict[str, FileRecord], version: str) -> str:
    parts = [version] + [f"{role}:{files[role].sha256}" for role in ROLES]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class PathCache:
    """Read, validate and atomically rewrite ``<cache_dir>/model_path.json``."""

    def __init__(self, cache_dir: Path):
        self.path = cache_dir / PATH_CACHE_NAME
        self.bytes_hashed = 0

    def read(self) -> PathCacheFile:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return PathCacheFile()
        except OSError as e:
            logger.warning("L3 cache %s is unreadable (%s); checksums will be recomputed",
                           self.path, e)
            return PathCacheFile()
        try:
            content = PathCacheFile.model_validate_json(raw)
            if content.version != PATH_CACHE_VERSION:
                raise ValueError(f"version {content.version}, expected {PATH_CACHE_VERSION}")
            return content
        except (ValidationError, ValueError) as e:
            logger.warning("L3 cache %s is corrupt (%s); ignoring it, it will be rewritten",
                           self.path, str(e).splitlines()[0])
            return PathCacheFile()

    def unchanged_record(self, files: ModelFiles) -> PathRecord | None:
        """The cached record if every file has the size and mtime it had; else None."""
        cached = self.read().entries.get(str(files.directory.resolve()))
        if cached is None or cached.code_version != code_version():
            return None
        for role in ROLES:
            path = getattr(files, role).resolve()
            old = cached.files.get(role)
            try:
                stat = path.stat()
            except OSError:
                return None  # record_for names the file
            if old is None or (old.path, old.size, old.mtime_ns) != (
                    str(path), stat.st_size, stat.st_mtime_ns):
                return None
        return cached

    def record_for(self, files: ModelFiles) -> PathRecord:
        """A current record for these files: cached checksums where size and mtime match."""
        model_dir = str(files.directory.resolve())
        cached = self.read().entries.get(model_dir)
        version = code_version()
        records: dict[str, FileRecord] = {}
        unchanged = cached is not None and cached.code_version == version
        for role in ROLES:
            path = getattr(files, role).resolve()
            try:
                stat = path.stat()
            except OSError as e:
                raise ModelFileError(path, f"cannot read {role} file: {e.strerror}") from e
            old = cached.files.get(role) if cached else None
            if (old is not None and old.path == str(path) and old.size == stat.st_size
                    and old.mtime_ns == stat.st_mtime_ns):
                records[role] = old
                continue
            unchanged = False
            self.bytes_hashed += stat.st_size
            try:
                digest = sha256_file(path)
            except OSError as e:
                raise ModelFileError(path, f"cannot read {role} file: {e.strerror}") from e
            records[role] = FileRecord(path=str(path), size=stat.st_size,
                                       mtime_ns=stat.st_mtime_ns, sha256=digest)
        if unchanged and cached is not None:
            return cached
        fingerprint = fingerprint_of(records, version)
        # Touched but identical files keep their fingerprint, and with it the known snapshot.
        snapshot = cached.snapshot if cached and cached.fingerprint == fingerprint else None
        return PathRecord(model_dir=model_dir, layout=files.layout, files=records,
                          code_version=version, fingerprint=fingerprint, snapshot=snapshot)

    def store(self, record: PathRecord) -> None:
        """Record this model as the last one resolved. Raises OSError if the cache is not writable."""
        with self._locked():
            content = self.read()
            content.entries[record.model_dir] = record
            content.last_model_dir = record.model_dir
            write_bytes_atomic(self.path, content.model_dump_json(indent=2).encode())

    def forget(self, model_dir: Path) -> None:
        with self._locked():
            content = self.read()
            if content.entries.pop(str(model_dir.resolve()), None) is not None:
                write_bytes_atomic(self.path, content.model_dump_json(indent=2).encode())

    def _locked(self) -> FileLock:
        """Read-modify-write under a lock, so processes loading other models keep their entries."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.path) + ".lock", timeout=LOCK_TIMEOUT_S)

