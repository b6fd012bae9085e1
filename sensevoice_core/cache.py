"""Loading a model through its caches: the L2 snapshot on disk, named by the L3 path record.

``load_sensevoice_cached`` resolves and repairs the model path, asks L3 which snapshot those
exact files made (a ``stat`` per file), maps that L2 snapshot, and otherwise loads the model
directory strictly, writing L2 and L3 for next time. A cache that cannot be read or written
degrades to a logged warning and a direct load; it never stops a model from loading.

What is trusted, and why it is enough: L3 only names a snapshot (a ``stat`` per file). The
snapshot is served only if its own checksummed header says it was built from this directory's
files with the checksums L3 holds, and, the first time this process maps that file, its data
hashes to the checksum in its header (reading it also pages the weights in). When no snapshot
confirms L3, the files are hashed while they are loaded, so neither the model nor its label
ever rests on ``model_path.json`` alone.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from sensevoice_core.errors import ModelFileError, SnapshotError
from sensevoice_core.layout import ModelFiles, model_files
from sensevoice_core.loader import load_model_dir
from sensevoice_core.model_path import diagnose_model_paths, find_or_fix_model_path
from sensevoice_core.path_cache import ROLES, FileIdentity, PathCache, PathRecord
from sensevoice_core.pipeline import SenseVoice
from sensevoice_core.protocol import CACHE_LEVEL_WORDS, CacheLevel
from sensevoice_core.settings import Settings
from sensevoice_core.snapshot import (
    SnapshotSource,
    check_source,
    open_snapshot,
    read_header,
    snapshot_path,
    write_snapshot,
)

logger = logging.getLogger("sensevoice.cache")

SNAPSHOT_LOCK_TIMEOUT_S = 300.0  # another process building the same snapshot
LOAD_ATTEMPTS = 3  # model files changing under a load (a copy in progress) are read again


@dataclass
class LoadReport:
    level: CacheLevel  # "L2" (the snapshot) or "fresh" (the model directory's files)
    model_dir: Path
    layout: str
    fingerprint: str
    short_ids: dict[str, str]  # config / weights / code, 8 hex each, for log lines
    snapshot: Path | None  # the L2 file used or written, None when L2 is off or failed
    steps_s: dict[str, float] = field(default_factory=dict)  # seconds per step
    bytes_read: int = 0  # bytes hashed or loaded from disk (an L2 map reads only the header)
    bytes_hashed: int = 0  # of those, bytes hashed because L3 did not know the file as it is
    warnings: list[str] = field(default_factory=list)
    file_sha256: dict[str, str] = field(default_factory=dict)  # role -> checksum of its file
    file_paths: dict[str, str] = field(default_factory=dict)  # role -> absolute path
    compute_type: str = "float32"  # the concrete compute type the model runs in
    compute_reason: str = ""  # why (see compute.ComputeChoice.reason)

    @property
    def total_s(self) -> float:
        return sum(self.steps_s.values())

    def summary(self) -> str:
        ids = ", ".join(f"{key}: {value}" for key, value in self.short_ids.items())
        return (f"{self.model_dir} ({ids}) in {self.total_s:.2f} s from "
                f"{CACHE_LEVEL_WORDS[self.level]}")


class _StepTimer:
    def __init__(self, steps: dict[str, float]):
        self.steps = steps

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.steps[name] = self.steps.get(name, 0.0) + time.perf_counter() - start


def resolve_model_dir(path: str | Path | None, settings: Settings) -> ModelFiles:
    """The hint, else SENSEVOICE_MODEL_DIR, else the usual places; paths repaired."""
    model_dir = find_or_fix_model_path(path, settings.model_dir)
    if model_dir is None:
        candidates = diagnose_model_paths(path, settings.model_dir)
        asked = path if path is not None else settings.model_dir
        rejected = "; ".join(f"{c.source} {c.path}: {c.reason}"
                             for c in candidates if not c.accepted)
        raise ModelFileError(asked or Path("model"), "no usable model directory",
                             expected="a SenseVoice model (run `python -m sensevoice_core "
                                      "doctor` for details)",
                             found=rejected)
    return model_files(model_dir)


class _VerifiedSnapshots:
    """The snapshot files whose data this process has hashed (or written): a file is hashed
    the first time a process maps it, and again only if its identity changed since."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: set[tuple[str, FileIdentity]] = set()

    def __contains__(self, key: tuple[str, FileIdentity]) -> bool:
        with self._lock:
            return key in self._files

    def add(self, key: tuple[str, FileIdentity]) -> None:
        with self._lock:
            self._files.add(key)


_verified = _VerifiedSnapshots()


def _warn(report: LoadReport, message: str) -> None:
    logger.warning(message)
    report.warnings.append(message)


def _discard(path: Path, reason: str, report: LoadReport) -> None:
    _warn(report, f"L2 snapshot {path} discarded ({reason}); loading from the model directory "
                  f"and rebuilding it")
    _remove(path)


def _remove(path: Path) -> None:
    """Delete a cache file; a read-only cache keeps it (it is never used unverified)."""
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        logger.warning("cannot delete %s (%s); leaving it", path, e.strerror)


def _try_load_snapshot(path: Path, record: PathRecord, settings: Settings,
                       report: LoadReport, timer: _StepTimer, step: str) -> SenseVoice | None:
    """The snapshot's model if it was built from exactly these files and its data is whole.

    The data is hashed (first map in this process) on other threads while the module tree is
    built; mapping and building are timed as `step`, the wait for the hash as "verify_l2".
    """
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        with timer(step):
            mapped = open_snapshot(path)
            check_source(path, mapped.metadata, record.fingerprint, SnapshotSource.of(record))
            key = (str(path), mapped.identity)
            hashing = None if key in _verified else pool.submit(mapped.verify)
            model = mapped.build(settings.device)
        if hashing is not None:
            with timer("verify_l2"):
                hashing.result()
            report.bytes_read += mapped.identity.size
            _verified.add(key)
        return model
    except SnapshotError as e:
        _discard(path, e.problem, report)
    except (ModelFileError, OSError, RuntimeError) as e:
        _discard(path, str(e), report)
    finally:
        pool.shutdown(wait=True)  # a build that failed still waits for the hash to end
    return None


def _write_snapshot(path: Path, model: SenseVoice, record: PathRecord, settings: Settings,
                    report: LoadReport) -> None:
    """Write L2 under a lock; a second process arriving meanwhile reuses the finished file
    (the data of a file this process did not write is hashed when it is mapped)."""
    source = SnapshotSource.of(record)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path.with_suffix(".lock")), timeout=SNAPSHOT_LOCK_TIMEOUT_S):
            try:
                _, metadata, _ = read_header(path)
                check_source(path, metadata, record.fingerprint, source)
            except SnapshotError:  # absent, broken or not ours: (re)write it
                write_snapshot(path, model, source, {"fingerprint": record.fingerprint,
                                                     "code_version": record.code_version})
                _verified.add((str(path), FileIdentity.of(path)))  # hashed as it was written
        prune_snapshots(path.parent, settings.keep_snapshots, keep=path)
        report.snapshot = path
    except (OSError, Timeout) as e:
        _warn(report, f"cannot write L2 snapshot {path} ({e}); serving from a direct load. "
                      f"Fix: make {settings.cache_dir} writable with free space, or set "
                      f"SENSEVOICE_DISABLE_CACHE=true")
        report.snapshot = None


def prune_snapshots(directory: Path, keep_count: int, keep: Path) -> list[Path]:
    """Delete all but the newest keep_count snapshots; never the one just used."""
    dated = []
    for snapshot in directory.glob("sensevoice-*.safetensors"):
        try:
            dated.append((snapshot.stat().st_mtime_ns, snapshot))
        except FileNotFoundError:
            continue  # pruned meanwhile by another process
    newest_first = [p for _, p in sorted(dated, reverse=True) if p != keep]
    removed = newest_first[max(keep_count - 1, 0):]
    # Lock files stay: deleting one another process holds would break its exclusion.
    for old in removed:
        _remove(old)
    return removed


def load_model(path: str | Path | None = None, *, device: str | None = None,
               settings: Settings | None = None, force_fresh: bool = False) -> SenseVoice:
    """Load a SenseVoice model for ``transcribe``, through the cache (its L2 snapshot when one
    matches the files, else the files, writing the snapshot for next time).

    Args:
        path: model directory of either layout; None: SENSEVOICE_MODEL_DIR, then ./model and
            the usual places (``python -m sensevoice_core doctor`` lists them).
        device: torch device ("cpu", "cuda"); None: the settings' (SENSEVOICE_DEVICE, cpu).
        settings: cache directory and switches; None reads SENSEVOICE_* from the environment
            (the cache is ./cache unless SENSEVOICE_CACHE_DIR says otherwise).
        force_fresh: ignore and rebuild this model's cache entries.
    """
    settings = settings or Settings()
    if device is not None:
        settings = settings.model_copy(update={"device": device})
    return load_sensevoice_cached(path, force_fresh, settings)[0]


def load_sensevoice_cached(
    path: str | Path | None = None,
    force_fresh: bool = False,
    settings: Settings | None = None,
) -> tuple[SenseVoice, LoadReport]:
    """``load_model``, plus its LoadReport: where the model came from (L2 or a fresh load) and
    how long each step took."""
    settings = settings or Settings()
    steps: dict[str, float] = {}
    timer = _StepTimer(steps)
    with timer("resolve"):
        files = resolve_model_dir(path, settings)
    path_cache = PathCache(settings.cache_dir)
    with timer("l3"):
        if force_fresh:
            _forget(path_cache, files, settings)
        record = path_cache.unchanged_record(files)  # a stat per file, no hashing
    l3_hit, loaded = record is not None, None
    if record is None:
        loaded, record = _hash_and_load(files, path_cache, settings, timer)
    report = LoadReport(level="fresh", model_dir=files.directory.resolve(), layout=files.layout,
                        fingerprint="", short_ids={}, snapshot=None, steps_s=steps)
    _label(report, record)

    use_l2 = not settings.disable_cache
    snapshot = snapshot_path(settings.cache_dir, record.fingerprint, record.model_dir)
    if force_fresh and use_l2:
        _remove(snapshot)
    model = None
    if use_l2 and snapshot.is_file() and not force_fresh:
        model = _try_load_snapshot(snapshot, record, settings, report, timer, "l2")
        if model is not None:
            report.level, report.snapshot = "L2", snapshot
    if model is None and loaded is None:
        # L3 named a model that no snapshot confirmed: hash the files while loading them.
        claimed = record
        loaded, record = _hash_and_load(files, path_cache, settings, timer)
        if record.fingerprint != claimed.fingerprint:
            _warn(report, _stale_entry_message(path_cache, claimed, record))
        _label(report, record)
        snapshot = snapshot_path(settings.cache_dir, record.fingerprint, record.model_dir)
    if model is None:
        assert loaded is not None
        report.bytes_read += sum(rec.size for rec in record.files.values())
        model = loaded
        if use_l2:
            with timer("write_l2"):
                _write_snapshot(snapshot, model, record, settings, report)
            if report.snapshot is not None and settings.device == "cpu":
                # Serve from the mapped snapshot too: its pages are shared page cache, where
                # the freshly loaded copy is private memory of this process.
                mapped = _try_load_snapshot(snapshot, record, settings, report, timer, "map_l2")
                if mapped is not None:
                    model = mapped
    if loaded is not None and loaded is not model:
        del loaded  # the fresh copy, replaced by a mapped snapshot
        _return_freed_memory_to_os()
    if not (l3_hit and report.level == "L2"):
        with timer("write_l3"):
            _store(path_cache, record, report)
    _finish(report, path_cache)
    logger.info("Loaded model %s", report.summary())
    return model, report


def _hash_and_load(files: ModelFiles, path_cache: PathCache, settings: Settings,
                   timer: _StepTimer) -> tuple[SenseVoice, PathRecord]:
    """Hash every model file while loading the model from them, on the other core: if no
    snapshot turns out to match, that load was needed anyway, and the slower of the two sets
    the time.

    The hash and the load read the files separately, so they must have read the same files:
    both go through the directory resolved once (a symlink switched meanwhile is not
    followed), and every file keeps its identity from before the hash to after the load; a
    model being copied in is loaded again, or refused, never labelled with another's checksums.
    """
    files = model_files(files.directory.resolve())
    paths = [getattr(files, role) for role in ROLES]
    with timer("hash_and_load"), ThreadPoolExecutor(max_workers=1) as pool:
        for _ in range(LOAD_ATTEMPTS):
            before = _identities(paths)
            hashing = pool.submit(path_cache.record_for, files)
            loaded = load_model_dir(files.directory, settings.device)
            record = hashing.result()
            if _identities(paths) == before == [rec.identity() for rec in
                                                (record.files[role] for role in ROLES)]:
                return loaded, record
            del loaded
    raise ModelFileError(files.directory, f"the model files changed while they were being "
                                          f"loaded, {LOAD_ATTEMPTS} times; load again once "
                                          f"they are completely written")


def _identities(paths: list[Path]) -> list[FileIdentity | None]:
    identities: list[FileIdentity | None] = []
    for path in paths:
        try:
            identities.append(FileIdentity.of(path))
        except OSError:
            identities.append(None)
    return identities


def _label(report: LoadReport, record: PathRecord) -> None:
    report.fingerprint = record.fingerprint
    report.short_ids = record.short_ids()
    report.file_sha256 = {role: rec.sha256 for role, rec in record.files.items()}
    report.file_paths = {role: rec.path for role, rec in record.files.items()}


def _stale_entry_message(path_cache: PathCache, claimed: PathRecord, hashed: PathRecord) -> str:
    wrong = [f"{role} {Path(rec.path).name} sha256 {claimed.files[role].sha256[:16]}, "
             f"now {rec.sha256[:16]}" for role, rec in hashed.files.items()
             if claimed.files[role].sha256 != rec.sha256]
    return (f"L3 entry for {hashed.model_dir} in {path_cache.path} was wrong ("
            f"{'; '.join(wrong) or 'fingerprint'}) though every file kept its identity: "
            f"was model_path.json edited? Loaded from the files and rewrote the entry")


def _finish(report: LoadReport, path_cache: PathCache) -> LoadReport:
    """Count the bytes hashed and put L3's own warnings, which came first, before the rest."""
    report.bytes_hashed = path_cache.bytes_hashed
    report.bytes_read += path_cache.bytes_hashed
    report.warnings[:0] = path_cache.warnings
    return report


def _return_freed_memory_to_os() -> None:
    """glibc keeps freed heap pages for reuse; give the dropped fresh weights back now."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the allocator keeps its own policy


def _forget(path_cache: PathCache, files: ModelFiles, settings: Settings) -> None:
    cached = path_cache.read().entries.get(str(files.directory.resolve()))
    if cached is not None:
        _remove(snapshot_path(settings.cache_dir, cached.fingerprint, cached.model_dir))
        try:
            path_cache.forget(files.directory)
        except (OSError, Timeout) as e:
            logger.warning("cannot update L3 %s (%s)", path_cache.path, e)


def _store(path_cache: PathCache, record: PathRecord, report: LoadReport) -> None:
    try:
        path_cache.store(record)
    except (OSError, Timeout) as e:
        _warn(report, f"cannot write L3 {path_cache.path} ({e}); the next start re-hashes the "
                      f"model files. Fix: make the cache directory writable")
