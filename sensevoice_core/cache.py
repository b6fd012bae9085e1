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

Compute types (compute.py): SENSEVOICE_COMPUTE_TYPE is resolved here, in each process, from
its own machine. The served fingerprint is the model's own for float32 and
``compute.served_fingerprint(model's, type)`` otherwise; it names the L2 snapshot, which holds
the converted tensors, so a fresh load converts once (and, with COMPUTE_CHECK, runs the
accuracy gate, compute_check.py) and an L2 load maps them, then prepacks int8 layers (step
"prepack"). After a gate fallback the snapshot holds the safer type's tensors and records why.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from sensevoice_core.compute import (
    SAFER,
    ComputeChoice,
    ComputeType,
    ConcreteComputeType,
    choose_compute_type,
    served_fingerprint,
)
from sensevoice_core.compute_check import check_against_float32
from sensevoice_core.convert import convert_model
from sensevoice_core.errors import ModelFileError, SnapshotError
from sensevoice_core.int8 import int8_layers, prepack_all
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
                f"{CACHE_LEVEL_WORDS[self.level]}, {self.compute_type} ({self.compute_reason})")


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


def _check_compute(path: Path, metadata: dict[str, str], chosen: ConcreteComputeType) -> None:
    """The snapshot was built for this compute type (older files: float32)."""
    served = metadata.get("compute_type", "float32")
    built_for = metadata.get("compute_requested", served)
    if built_for != chosen:
        raise SnapshotError(path, f"it was built for compute type {built_for}, not {chosen}")


def _try_load_snapshot(path: Path, record: PathRecord, settings: Settings, choice: ComputeChoice,
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
            _check_compute(path, mapped.metadata, choice.chosen)
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
                    report: LoadReport, compute: dict[str, str]) -> None:
    """Write L2 under a lock; a second process arriving meanwhile reuses the finished file
    (the data of a file this process did not write is hashed when it is mapped)."""
    source = SnapshotSource.of(record)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path.with_suffix(".lock")), timeout=SNAPSHOT_LOCK_TIMEOUT_S):
            try:
                _, metadata, _ = read_header(path)
                check_source(path, metadata, record.fingerprint, source)
                _check_compute(path, metadata, compute["compute_requested"])
            except SnapshotError:  # absent, broken or not ours: (re)write it
                write_snapshot(path, model, source, {"fingerprint": record.fingerprint,
                                                     "code_version": record.code_version,
                                                     **compute})
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
               compute_type: ComputeType | None = None, settings: Settings | None = None,
               force_fresh: bool = False) -> SenseVoice:
    """Load a SenseVoice model for ``transcribe``, through the cache (its L2 snapshot when one
    matches the files, else the files, writing the snapshot for next time).

    Args:
        path: model directory of either layout; None: SENSEVOICE_MODEL_DIR, then ./model and
            the usual places (``python -m sensevoice_core doctor`` lists them).
        device: torch device ("cpu", "cuda"); None: the settings' (SENSEVOICE_DEVICE, cpu).
        compute_type: auto, float32, bfloat16, float16, int8 or int8_bfloat16 (compute.py);
            None: the settings' (SENSEVOICE_COMPUTE_TYPE, auto).
        settings: cache directory and switches; None reads SENSEVOICE_* from the environment
            (the cache is ./cache unless SENSEVOICE_CACHE_DIR says otherwise).
        force_fresh: ignore and rebuild this model's cache entries.
    """
    settings = settings or Settings()
    if device is not None:
        settings = settings.model_copy(update={"device": device})
    if compute_type is not None:
        settings = settings.model_copy(update={"compute_type": compute_type})
    return load_sensevoice_cached(path, force_fresh, settings)[0]


def load_sensevoice_cached(
    path: str | Path | None = None,
    force_fresh: bool = False,
    settings: Settings | None = None,
) -> tuple[SenseVoice, LoadReport]:
    """``load_model``, plus its LoadReport: where the model came from (L2 or a fresh load) and
    how long each step took."""
    settings = settings or Settings()
    choice = choose_compute_type(settings.compute_type, settings.device)
    steps: dict[str, float] = {}
    timer = _StepTimer(steps)
    with timer("resolve"):
        files = resolve_model_dir(path, settings)
    path_cache = PathCache(settings.cache_dir)
    with timer("l3"):
        if force_fresh:
            _forget(path_cache, files, settings, choice.chosen)
        record = path_cache.unchanged_record(files)  # a stat per file, no hashing
    l3_hit, loaded = record is not None, None
    if record is None:
        loaded, record = _hash_and_load(files, path_cache, settings, timer)
    report = LoadReport(level="fresh", model_dir=files.directory.resolve(), layout=files.layout,
                        fingerprint="", short_ids={}, snapshot=None, steps_s=steps,
                        compute_type=choice.chosen, compute_reason=choice.reason)
    _label(report, record)
    if choice.warning:
        _warn(report, choice.warning)

    use_l2 = not settings.disable_cache
    snapshot = _snapshot_for(settings, record, choice.chosen)
    if force_fresh and use_l2:
        _remove(snapshot)
    model = None
    if use_l2 and snapshot.is_file() and not force_fresh:
        model = _try_load_snapshot(snapshot, record, settings, choice, report, timer, "l2")
        if model is not None:
            report.level, report.snapshot = "L2", snapshot
            _served_from_snapshot(report, model, choice, snapshot)
    if model is None and loaded is None:
        # L3 named a model that no snapshot confirmed: hash the files while loading them.
        claimed = record
        loaded, record = _hash_and_load(files, path_cache, settings, timer)
        if record.fingerprint != claimed.fingerprint:
            _warn(report, _stale_entry_message(path_cache, claimed, record))
        _label(report, record)
        snapshot = _snapshot_for(settings, record, choice.chosen)
    if model is None:
        assert loaded is not None
        report.bytes_read += sum(rec.size for rec in record.files.values())
        model, gate = _convert(loaded, choice, settings, report, timer)
        if use_l2:
            compute = {"compute_requested": choice.chosen}
            if gate:
                compute["compute_gate"] = gate
            with timer("write_l2"):
                _write_snapshot(snapshot, model, record, settings, report, compute)
            if report.snapshot is not None and settings.device == "cpu":
                # Serve from the mapped snapshot too: its pages are shared page cache, where
                # the freshly loaded copy is private memory of this process.
                mapped = _try_load_snapshot(snapshot, record, settings, choice, report, timer,
                                            "map_l2")
                if mapped is not None:
                    model = mapped
    if loaded is not None and loaded is not model:
        del loaded  # the fresh copy, replaced by a converted model or a mapped snapshot
        _return_freed_memory_to_os()
    if int8_layers(model.model):
        with timer("prepack"):
            prepack_all(model.model, torch.get_num_threads())
    report.fingerprint = served_fingerprint(record.fingerprint, report.compute_type)
    if not (l3_hit and report.level == "L2"):
        with timer("write_l3"):
            _store(path_cache, record, report)
    _finish(report, path_cache)
    logger.info("Loaded model %s", report.summary())
    return model, report


def _snapshot_for(settings: Settings, record: PathRecord, chosen: ConcreteComputeType) -> Path:
    return snapshot_path(settings.cache_dir, served_fingerprint(record.fingerprint, chosen),
                         record.model_dir)


def _convert(loaded: SenseVoice, choice: ComputeChoice, settings: Settings, report: LoadReport,
             timer: _StepTimer) -> tuple[SenseVoice, str]:
    """The fresh float32 model converted to the chosen type; with COMPUTE_CHECK, a type that
    fails the accuracy gate falls back to the next safer one. Returns the model and, after a
    fallback, what the gate found (recorded in the snapshot and the reason)."""
    compute_type: ConcreteComputeType = choice.chosen
    gate = ""
    while compute_type != "float32":
        with timer("convert"):
            converted = convert_model(loaded.model, compute_type)
        if not settings.compute_check:
            break
        with timer("compute_check"):
            result = check_against_float32(loaded, converted)
        if result.passed:
            break
        safer = SAFER[compute_type]
        note = f"{compute_type} failed the accuracy check ({result.describe()}) -> {safer}"
        _warn(report, f"compute type {note}; set SENSEVOICE_COMPUTE_TYPE={safer} to skip the "
                      f"check, or SENSEVOICE_COMPUTE_CHECK=false to keep {compute_type}")
        gate = f"{gate}; {note}" if gate else note
        compute_type = safer
    report.compute_type = compute_type
    if gate:
        report.compute_reason = f"{choice.reason}; {gate}"
    if compute_type == "float32":
        return loaded, gate
    return dataclasses.replace(loaded, model=converted), gate


def _served_from_snapshot(report: LoadReport, model: SenseVoice, choice: ComputeChoice,
                          snapshot: Path) -> None:
    """An L2 hit serves the type its snapshot holds: the chosen one, or the gate's fallback
    (recorded when the snapshot was built)."""
    served = getattr(model.model, "compute_type", "float32")
    if served != choice.chosen:
        gate = read_header(snapshot)[1].get("compute_gate", f"{choice.chosen} -> {served}")
        report.compute_type = served
        report.compute_reason = f"{choice.reason}; {gate} (recorded in the L2 snapshot)"
        _warn(report, f"compute type {gate}, when the L2 snapshot was built; rebuild it with "
                      f"force_fresh to check again")


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


def _forget(path_cache: PathCache, files: ModelFiles, settings: Settings,
            chosen: ConcreteComputeType) -> None:
    cached = path_cache.read().entries.get(str(files.directory.resolve()))
    if cached is not None:
        _remove(_snapshot_for(settings, cached, chosen))
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
