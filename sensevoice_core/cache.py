"""Loading a model through its caches: the L2 snapshot on disk, named by the L3 path record.

``load_sensevoice_cached`` resolves and repairs the model path, asks L3 which snapshot those
exact files made (a ``stat`` per file), maps that L2 snapshot, and otherwise loads the model
directory strictly, writing L2 and L3 for next time. A cache that cannot be read or written
degrades to a logged warning and a direct load; it never stops a model from loading.

What is trusted, and why it is enough: L3 only names a snapshot (a ``stat`` per file). The
snapshot is served only if its own checksummed header says it was built from this directory's
files with the checksums L3 holds, and its data hashes to the checksum in its header: checked
the first time a process maps that file in each boot (snapshot_trust.py records it). When no
snapshot confirms L3, the files are hashed while they are loaded, so neither the model nor its
label ever rests on ``model_path.json`` alone.

Compute types (compute.py): SENSEVOICE_COMPUTE_TYPE is resolved here, in each process, from
its own machine. The served fingerprint is the model's own for float32 and
``compute.served_fingerprint(model's, type)`` otherwise; it names the L2 snapshot, which holds
the converted tensors, so a fresh load converts once (and, with COMPUTE_CHECK, runs the
accuracy gate, compute_check.py) and an L2 load maps them, then prepacks int8 layers (step
"prepack"). After a gate fallback the snapshot holds the safer type's tensors and records why.
"""

from __future__ import annotations

import gc
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from filelock import FileLock, Timeout

from sensevoice_core.cache_compute import (
    adopt_packed,
    check_compute,
    compute_metadata,
    convert_checked,
    prune_snapshots,
    served_from_snapshot,
    snapshot_for,
)
from sensevoice_core.compute import (
    ComputeChoice,
    ComputeType,
    ConcreteComputeType,
    choose_compute_type,
    served_fingerprint,
)
from sensevoice_core.errors import ModelFileError, SnapshotError
from sensevoice_core.int8 import int8_layers, prepack_all
from sensevoice_core.layout import ModelFiles, model_files
from sensevoice_core.linux import libc
from sensevoice_core.load_report import LoadReport, StepTimer, remove_file, warn
from sensevoice_core.loader import load_model_dir
from sensevoice_core.model_path import diagnose_model_paths, find_or_fix_model_path
from sensevoice_core.path_cache import ROLES, FileIdentity, PathCache, PathRecord
from sensevoice_core.pipeline import SenseVoice
from sensevoice_core.settings import Settings
from sensevoice_core.snapshot import (
    SnapshotSource,
    check_source,
    open_snapshot,
    read_header,
    write_snapshot,
)
from sensevoice_core.snapshot_trust import VerifiedSnapshots
from sensevoice_core.snapshot_trust import forget as forget_verified

__all__ = ["LoadReport", "load_model", "load_sensevoice_cached", "prune_snapshots",
           "resolve_model_dir"]

logger = logging.getLogger("sensevoice.cache")

SNAPSHOT_LOCK_TIMEOUT_S = 300.0  # another process building the same snapshot
LOAD_ATTEMPTS = 3  # model files changing under a load (a copy in progress) are read again


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


_verified = VerifiedSnapshots()  # data hashed: by this process, or earlier this boot


def _discard(path: Path, reason: str, report: LoadReport) -> None:
    warn(report, f"L2 snapshot {path} discarded ({reason}); loading from the model directory "
                  f"and rebuilding it")
    remove_file(path)
    forget_verified(path)


def _try_load_snapshot(path: Path, record: PathRecord, settings: Settings, choice: ComputeChoice,
                       report: LoadReport, timer: StepTimer, step: str) -> SenseVoice | None:
    """The snapshot's model if it was built from exactly these files and its data is whole.

    The data is hashed (first map in this process) on other threads while the module tree is
    built; mapping and building are timed as `step`, the wait for the hash as "verify_l2".
    """
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        with timer(step):
            mapped = open_snapshot(path)
            check_source(path, mapped.metadata, record.fingerprint, SnapshotSource.of(record))
            check_compute(path, mapped.metadata, choice.chosen, settings.compute_check)
            claimed = mapped.metadata.get("data_sha256")
            trusted = _verified.trusts(path, mapped.identity, claimed)
            hashing = None if trusted else pool.submit(mapped.verify)
            model = mapped.build(settings.device)
        if hashing is not None:
            with timer("verify_l2"):
                hashing.result()
            report.bytes_read += mapped.identity.size
            _verified.add(path, mapped.identity, claimed)
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
                check_compute(path, metadata, compute["compute_requested"],
                              settings.compute_check)
            except SnapshotError:  # absent, broken or not ours: (re)write it
                write_snapshot(path, model, source, {"fingerprint": record.fingerprint,
                                                     "code_version": record.code_version,
                                                     **compute})
                _verified.add(path, FileIdentity.of(path),  # hashed as it was written
                              read_header(path)[1].get("data_sha256"))
        prune_snapshots(path.parent, settings.keep_snapshots, keep=path)
        report.snapshot = path
    except (OSError, Timeout) as e:
        warn(report, f"cannot write L2 snapshot {path} ({e}); serving from a direct load. "
                      f"Fix: make {settings.cache_dir} writable with free space, or set "
                      f"SENSEVOICE_DISABLE_CACHE=true")
        report.snapshot = None


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
    timer = StepTimer(steps)
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
        warn(report, choice.warning)

    use_l2 = not settings.disable_cache
    snapshot = _snapshot_for(settings, record, choice.chosen)
    if force_fresh and use_l2:
        remove_file(snapshot)
        forget_verified(snapshot)
    model = None
    if use_l2 and snapshot.is_file() and not force_fresh:
        model = _try_load_snapshot(snapshot, record, settings, choice, report, timer, "l2")
        if model is not None:
            report.level, report.snapshot = "L2", snapshot
            served_from_snapshot(report, model, choice, snapshot)
    if model is None and loaded is None:
        # L3 named a model that no snapshot confirmed: hash the files while loading them.
        claimed = record
        loaded, record = _hash_and_load(files, path_cache, settings, timer)
        if record.fingerprint != claimed.fingerprint:
            warn(report, _stale_entry_message(path_cache, claimed, record))
        _label(report, record)
        snapshot = _snapshot_for(settings, record, choice.chosen)
    if model is None:
        assert loaded is not None
        report.bytes_read += sum(rec.size for rec in record.files.values())
        model, gate = convert_checked(loaded, choice, settings, report, timer)
        if use_l2:
            compute = compute_metadata(choice.chosen, settings.compute_check)
            if gate:
                compute["compute_gate"] = gate
            with timer("write_l2"):
                _write_snapshot(snapshot, model, record, settings, report, compute)
            if report.snapshot is not None and settings.device == "cpu":
                # Serve from the mapped snapshot too: its pages are shared page cache, where
                # the freshly loaded copy is private memory of this process.
                mapped = _try_load_snapshot(snapshot, record, settings, choice, report, timer,
                                            "map_l2")
                if mapped is not None and mapped.model.compute_type == report.compute_type:
                    adopt_packed(model, mapped)
                    model = mapped
                elif mapped is not None:  # another process's gate decided otherwise
                    warn(report, f"L2 snapshot {snapshot} holds {mapped.model.compute_type}, "
                                 f"this load's check chose {report.compute_type}; serving "
                                 f"this load's model and leaving the snapshot")
    if loaded is not None and loaded is not model:
        del loaded  # the fresh copy, replaced by a converted model or a mapped snapshot
        _return_freed_memory_to_os()
    if int8_layers(model.model):
        with timer("prepack"):
            # One thread, as the warm-up: a reload loads beside a worker serving on all cores.
            prepack_all(model.model, threads=1)
    report.fingerprint = served_fingerprint(record.fingerprint, report.compute_type)
    if not (l3_hit and report.level == "L2"):
        with timer("write_l3"):
            _store(path_cache, record, report)
    _finish(report, path_cache)
    logger.info("Loaded model %s", report.summary())
    return model, report


def _snapshot_for(settings: Settings, record: PathRecord, chosen: ConcreteComputeType) -> Path:
    return snapshot_for(settings.cache_dir, record, chosen, settings.compute_check)


def _hash_and_load(files: ModelFiles, path_cache: PathCache, settings: Settings,
                   timer: StepTimer) -> tuple[SenseVoice, PathRecord]:
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
    lib = libc()
    if lib is not None and hasattr(lib, "malloc_trim"):  # else the allocator keeps its policy
        lib.malloc_trim(0)


def _forget(path_cache: PathCache, files: ModelFiles, settings: Settings,
            chosen: ConcreteComputeType) -> None:
    cached = path_cache.read().entries.get(str(files.directory.resolve()))
    if cached is not None:
        remove_file(_snapshot_for(settings, cached, chosen))
        forget_verified(_snapshot_for(settings, cached, chosen))
        try:
            path_cache.forget(files.directory)
        except (OSError, Timeout) as e:
            logger.warning("cannot update L3 %s (%s)", path_cache.path, e)


def _store(path_cache: PathCache, record: PathRecord, report: LoadReport) -> None:
    try:
        path_cache.store(record)
    except (OSError, Timeout) as e:
        warn(report, f"cannot write L3 {path_cache.path} ({e}); the next start re-hashes the "
                      f"model files. Fix: make the cache directory writable")
