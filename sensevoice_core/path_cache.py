"""L3: ``cache/model_path.json``, the resolved model path plus per-file checksums.

An entry is a hint that names the model (its fingerprint, hence its L2 snapshot) without
hashing: it is taken when every file still has the identity it had when it was hashed (a
``stat`` each: size, mtime, and the inode and ctime, which no tool can set back, so a file
changed in place with its mtime restored is hashed again) and when its fingerprint is the hash
of its checksums. The snapshot it names must then confirm it (see ``cache.py``); a file is
hashed again whenever its identity changed. The fingerprint names the model for the L2
snapshot and for logs: a hash of the weights, config, tokenizer and CMVN checksums plus the
code version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from pydantic import BaseModel, ValidationError

from sensevoice_core.atomic import write_bytes_atomic
from sensevoice_core.errors import ModelFileError
from sensevoice_core.layout import ModelFiles

logger = logging.getLogger("sensevoice.cache")

PATH_CACHE_NAME = "model_path.json"
PATH_CACHE_VERSION = 2  # 2: file identity (inode, ctime) beside size and mtime
# Bump when the snapshot's tensors or metadata change meaning; it is part of every fingerprint.
# 2: chunked data checksum, source files' checksums in the metadata, one snapshot per directory.
# Not bumped for compute types (issue 16): float32 snapshots keep their meaning; an older
# reduced-type snapshot is refused, not misread (no compute_checked / int8_reduce_range in its
# header, and bf16/f16 files store the CTC head in their own dtype, which the structure checks).
SNAPSHOT_FORMAT = 2
ROLES = ("weights", "config", "tokenizer", "cmvn")
HASH_CHUNK = 1 << 24
LOCK_TIMEOUT_S = 30.0
# Entries kept, the most recently stored last: a service reloaded to versioned directories
# (releases/v1, v2, ...) would otherwise grow the file by an entry per directory for ever.
MAX_L3_ENTRIES = 64


def code_version() -> str:
    from sensevoice_core import __version__

    return f"{__version__}+snapshot{SNAPSHOT_FORMAT}"


@dataclass(frozen=True)
class FileIdentity:
    """What a ``stat`` says about a file. ctime and inode cannot be set by ``utime`` or a copy
    that preserves times, so an equal identity means the same, unrewritten file."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity:
        stat = os.stat(path)
        return cls(stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


class FileRecord(BaseModel):
    path: str
    size: int
    mtime_ns: int
    device: int
    inode: int
    ctime_ns: int
    sha256: str

    def identity(self) -> FileIdentity:
        return FileIdentity(self.device, self.inode, self.size, self.mtime_ns, self.ctime_ns)


class PathRecord(BaseModel):
    model_dir: str
    layout: str
    files: dict[str, FileRecord]  # role -> record, roles as in ROLES
    code_version: str
    fingerprint: str

    def short_ids(self) -> dict[str, str]:
        """8-hex ids for log lines: config, weights, code."""
        return {
            "config": self.files["config"].sha256[:8],
            "weights": self.files["weights"].sha256[:8],
            "code": hashlib.sha256(self.code_version.encode()).hexdigest()[:8],
        }

    def consistent(self) -> bool:
        """Its fingerprint is the hash of its own checksums (a hand-edited entry is not)."""
        return (set(self.files) == set(ROLES)
                and self.fingerprint == fingerprint_of(self.files, self.code_version))


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
    return fingerprint_of_checksums({role: files[role].sha256 for role in ROLES}, version)


def fingerprint_of_checksums(sha256: dict[str, str], version: str) -> str:
    """role -> checksum (every role in ROLES) and the code version -> the model's fingerprint."""
    parts = [version] + [f"{role}:{sha256[role]}" for role in ROLES]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class PathCache:
    """Read, validate and atomically rewrite ``<cache_dir>/model_path.json``.

    Problems with the file are logged once per instance (one load) and kept in ``warnings``.
    """

    def __init__(self, cache_dir: Path):
        self.path = cache_dir / PATH_CACHE_NAME
        self.bytes_hashed = 0
        self.warnings: list[str] = []

    def _warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            logger.warning(message)

    def read(self) -> PathCacheFile:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return PathCacheFile()
        except OSError as e:
            self._warn(f"L3 cache {self.path} is unreadable ({e.strerror}); checksums will be "
                       f"recomputed. Fix: make it readable, or delete it")
            return PathCacheFile()
        try:
            version = json.loads(raw).get("version")
        except (ValueError, AttributeError):
            version = None
        if isinstance(version, int) and version != PATH_CACHE_VERSION:
            logger.info("L3 cache %s has format %d, this version writes %d; rebuilding it",
                        self.path, version, PATH_CACHE_VERSION)
            return PathCacheFile()
        try:
            return PathCacheFile.model_validate_json(raw)
        except ValidationError as e:
            error = e.errors()[0]
            where = ".".join(str(part) for part in error["loc"]) or "the file"
            self._warn(f"L3 cache {self.path} is corrupt ({where}: {error['msg']}); ignoring "
                       f"it, it will be rewritten")
            return PathCacheFile()

    def unchanged_record(self, files: ModelFiles) -> PathRecord | None:
        """The cached record if every file has the identity it had when hashed; else None."""
        model_dir = str(files.directory.resolve())
        cached = self.read().entries.get(model_dir)
        if cached is None or cached.code_version != code_version():
            return None
        if not cached.consistent():
            self._warn(f"L3 entry for {model_dir} in {self.path} is inconsistent: its "
                       f"fingerprint {cached.fingerprint[:16]} is not the hash of its file "
                       f"checksums (edited by hand?); ignoring it and hashing the files")
            return None
        for role in ROLES:
            path = getattr(files, role).resolve()
            old = cached.files[role]
            try:
                identity = FileIdentity.of(path)
            except OSError:
                return None  # record_for names the file
            if old.path != str(path) or old.identity() != identity:
                return None
        return cached

    def record_for(self, files: ModelFiles) -> PathRecord:
        """A record for these files, every one of them hashed now."""
        records: dict[str, FileRecord] = {}
        for role in ROLES:
            path = getattr(files, role).resolve()
            try:
                identity = FileIdentity.of(path)
                digest = sha256_file(path)
            except OSError as e:
                raise ModelFileError(path, f"cannot read {role} file: {e.strerror}") from e
            self.bytes_hashed += identity.size
            records[role] = FileRecord(path=str(path), size=identity.size,
                                       mtime_ns=identity.mtime_ns, device=identity.device,
                                       inode=identity.inode, ctime_ns=identity.ctime_ns,
                                       sha256=digest)
        version = code_version()
        return PathRecord(model_dir=str(files.directory.resolve()), layout=files.layout,
                          files=records, code_version=version,
                          fingerprint=fingerprint_of(records, version))

    def identities(self, model_dir: str, file_sha256: dict[str, str]) -> dict[str, FileIdentity]:
        """role -> the identity each file had when it was hashed to the checksum in
        file_sha256, from the L3 entry for model_dir; {} when no consistent entry of this code
        version vouches for exactly those checksums (another load rewrote it meanwhile)."""
        cached = self.read().entries.get(model_dir)
        if (cached is None or cached.code_version != code_version() or not cached.consistent()
                or {role: rec.sha256 for role, rec in cached.files.items()} != file_sha256):
            return {}
        return {role: rec.identity() for role, rec in cached.files.items()}

    def store(self, record: PathRecord) -> None:
        """Record this model as the last one resolved, and drop the entries stored longest ago
        beyond MAX_L3_ENTRIES. Raises OSError if the cache is not writable."""
        with self._locked():
            content = self.read()
            content.entries.pop(record.model_dir, None)  # re-inserted last: the newest
            content.entries[record.model_dir] = record
            for stale in list(content.entries)[:-MAX_L3_ENTRIES]:
                del content.entries[stale]
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
