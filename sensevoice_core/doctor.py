"""``python -m sensevoice_core doctor``: the troubleshooting list, checked in order.

Model path (or every rejected candidate and why), each model file, the L3 and L2 caches, torch
and CUDA, the offline flags and the effective settings. The first problem found decides the
exit status and is named on the last line. A cache entry found wrong (an L2 snapshot that
fails its checks, with --verify an L3 entry whose checksums the files contradict) is removed,
as the next load would remove it, so that nothing can use it meanwhile.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import Timeout

from sensevoice_core.cache_compute import check_compute, snapshot_for
from sensevoice_core.compute import (
    ConcreteComputeType,
    UnsupportedComputeType,
    choose_compute_type,
    choose_for,
    machine_features,
    served_fingerprint,
)
from sensevoice_core.errors import ModelFileError, SnapshotError
from sensevoice_core.layout import model_files
from sensevoice_core.model_path import diagnose_model_paths, find_or_fix_model_path
from sensevoice_core.path_cache import ROLES, FileIdentity, PathCache, PathRecord
from sensevoice_core.settings import Settings
from sensevoice_core.snapshot import (
    SnapshotSource,
    check_source,
    open_snapshot,
    read_header,
)

OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


def _path_checks(hint: str | Path | None, settings: Settings) -> tuple[list[Check], Path | None]:
    candidates = diagnose_model_paths(hint, settings.model_dir)
    chosen = find_or_fix_model_path(hint, settings.model_dir)
    listing = [asdict(c) | {"path": str(c.path)} for c in candidates]
    if chosen is None:
        rejected = "; ".join(f"{c.source} {c.path}: {c.reason}" for c in candidates)
        return [Check("model path", False, f"no usable model directory. Looked at: {rejected}",
                      {"candidates": listing})], None
    accepted = next(c for c in candidates if c.accepted)
    return [Check("model path", True, f"{chosen} ({accepted.reason}, from {accepted.source})",
                  {"path": str(chosen), "candidates": listing})], chosen


def _file_checks(model_dir: Path, path_cache: PathCache,
                 hashed: PathRecord | None) -> list[Check]:
    """One line per model file; with --verify (hashed) its sha256 against L3's."""
    files = model_files(model_dir)
    cached = path_cache.read().entries.get(str(model_dir.resolve()))
    checks = []
    for role in ROLES:
        path: Path = getattr(files, role).resolve()
        identity = FileIdentity.of(path)
        old = cached.files.get(role) if cached else None
        same = old is not None and old.path == str(path) and old.identity() == identity
        ok = True
        if hashed is not None:
            digest = hashed.files[role].sha256
            if old is None or digest == old.sha256:
                status = "sha256 matches L3" if old else f"sha256 {digest[:16]}"
            else:
                # Unchanged identity but other bytes: the entry, not the file, is wrong.
                ok = not same
                status = (f"sha256 {digest[:16]} differs from L3's {old.sha256[:16]}"
                          + (" although the file's identity (inode, ctime, size, mtime) is "
                             "unchanged: model_path.json was edited" if same else ""))
        else:
            status = (f"unchanged since cached (sha256 {old.sha256[:16]})" if same
                      else "not in L3 yet" if old is None else "changed since cached")
        checks.append(Check(f"file {role}", ok, f"{path.name}: {identity.size:,} bytes, {status}",
                            {"path": str(path), "size": identity.size}))
    return checks


def _cache_checks(model_dir: Path | None, settings: Settings, path_cache: PathCache,
                  hashed: PathRecord | None) -> list[Check]:
    cache_dir = settings.cache_dir.resolve()
    checks = [_writable_check(cache_dir)]
    if model_dir is None:
        return checks
    entry = path_cache.read().entries.get(str(model_dir.resolve()))
    unchanged = path_cache.unchanged_record(model_files(model_dir)) if entry else None
    if path_cache.warnings:
        checks.append(Check("L3 path cache", False,
                            "; ".join(path_cache.warnings) + ". The next load rewrites it"))
    elif entry is None:
        checks.append(Check("L3 path cache", True,
                            f"{path_cache.path}: no entry for this model yet (the next load "
                            "hashes its files once)"))
    elif unchanged and hashed and hashed.fingerprint != unchanged.fingerprint:
        checks.append(Check("L3 path cache", False,
                            f"{path_cache.path}: the entry for {model_dir.resolve()} names "
                            f"fingerprint {unchanged.fingerprint[:16]}, the files hash to "
                            f"{hashed.fingerprint[:16]}. {_forget_entry(path_cache, model_dir)}"))
    else:
        record = unchanged or hashed or path_cache.record_for(model_files(model_dir))
        checks.append(Check("L3 path cache", True,
                            f"{path_cache.path}: "
                            f"{'valid' if unchanged else 'stale, will be refreshed'}, "
                            f"model fingerprint {record.fingerprint[:16]}",
                            {"fingerprint": record.fingerprint, "valid": unchanged is not None}))
    if settings.disable_cache:
        checks.append(Check("L2 snapshot", True, "disabled (SENSEVOICE_DISABLE_CACHE=true)"))
        return checks
    chosen = _chosen_type(settings)
    if chosen is None:
        checks.append(Check("L2 snapshot", True, "not checked: SENSEVOICE_COMPUTE_TYPE cannot "
                                                 "load on this machine (see compute type)"))
        return checks
    record = hashed or unchanged or path_cache.record_for(model_files(model_dir))
    checks.append(_snapshot_check(cache_dir, record, verify=hashed is not None,
                                  chosen=chosen, compute_check=settings.compute_check))
    return checks


def _forget_entry(path_cache: PathCache, model_dir: Path) -> str:
    try:
        path_cache.forget(model_dir)
        return "Removed the entry; the next load hashes the files"
    except (OSError, Timeout) as e:
        return f"Could not remove the entry ({e}). Fix: delete {path_cache.path}"


def _chosen_type(settings: Settings) -> ConcreteComputeType | None:
    """The type a load would ask for; None when it would refuse the setting (the compute type
    check reports why)."""
    try:
        return choose_compute_type(settings.compute_type, settings.device).chosen
    except UnsupportedComputeType:
        return None


def _compute_check(settings: Settings) -> Check:
    """The machine's features, what auto picks on them and why, and the setting's outcome."""
    features = machine_features(settings.device)
    auto = choose_for("auto", settings.device, features)
    data = {"cpu_flags": sorted(features.cpu_flags), "auto": auto.chosen,
            "auto_reason": auto.reason, "setting": settings.compute_type}
    detail = f"CPU features: {features.describe()}; {auto.reason}"
    try:
        choice = choose_compute_type(settings.compute_type, settings.device)
    except UnsupportedComputeType as e:
        return Check("compute type", False, f"{detail}. {e}", data)
    if settings.compute_type != "auto":
        detail += f"; {choice.reason} -> {choice.chosen}"
    if choice.warning:
        detail += f" ({choice.warning})"
    return Check("compute type", True, detail, {**data, "chosen": choice.chosen})


def _snapshot_check(cache_dir: Path, record: PathRecord, verify: bool,
                    chosen: ConcreteComputeType = "float32", compute_check: bool = False
                    ) -> Check:
    """The snapshot for this record and compute type, checked as a load checks it (its source,
    its type, the gate setting and int8 parameters it was built with); a bad one is removed,
    as a load would remove it, so that nothing can use it meanwhile. Shows what it serves."""
    snapshot = snapshot_for(cache_dir, record, chosen, compute_check)
    if not snapshot.is_file():
        return Check("L2 snapshot", True, f"{snapshot}: not built yet (the next load builds it)")
    source = SnapshotSource.of(record)
    try:
        if verify:
            mapped = open_snapshot(snapshot)
            metadata = mapped.metadata
            check_source(snapshot, metadata, record.fingerprint, source)
            check_compute(snapshot, metadata, chosen, compute_check)
            mapped.verify()
            del mapped
        else:
            _, metadata, _ = read_header(snapshot)
            check_source(snapshot, metadata, record.fingerprint, source)
            check_compute(snapshot, metadata, chosen, compute_check)
    except SnapshotError as e:
        try:
            snapshot.unlink()
            outcome = "Removed it; the next load rebuilds it"
        except OSError as unlink_error:
            outcome = (f"Could not remove it ({unlink_error.strerror}); every load checks it "
                       f"and will refuse it. Fix: delete it")
        return Check("L2 snapshot", False, f"{e}. {outcome}", {"path": str(snapshot)})
    size = snapshot.stat().st_size
    served = metadata.get("compute_type", "float32")
    fingerprint = served_fingerprint(record.fingerprint, served)
    gate = metadata.get("compute_gate")
    serves = f"serves {served}, fingerprint {fingerprint[:16]}" + (
        f" (recorded fallback: {gate})" if gate else "")
    return Check("L2 snapshot", True,
                 f"{snapshot}: valid{' (data verified)' if verify else ''}, "
                 f"{size / 2**20:.1f} MiB, {serves}",
                 {"path": str(snapshot), "size": size, "compute_type": served,
                  "fingerprint": fingerprint, **({"compute_gate": gate} if gate else {})})


def _writable_check(cache_dir: Path) -> Check:
    """Probe with a temporary file; a missing directory is judged by its nearest parent."""
    existing = cache_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".sensevoice-doctor-"):
            pass
        state = "writable" if existing == cache_dir else "absent, will be created on first load"
        return Check("cache directory", True, f"{cache_dir}: {state}")
    except OSError as e:
        return Check("cache directory", False,
                     f"{cache_dir}: not writable ({e}); loads still work but every start is a "
                     f"fresh load. Fix: set SENSEVOICE_CACHE_DIR to a writable directory")


def _environment_checks(settings: Settings) -> list[Check]:
    flags = {name: os.environ.get(name) for name in OFFLINE_FLAGS}
    offline = all(value == "1" for value in flags.values())
    cuda = torch.cuda.is_available()
    return [
        Check("torch", True, f"{torch.__version__}, CUDA available: {cuda}",
              {"version": torch.__version__, "cuda_available": cuda}),
        _compute_check(settings),
        Check("offline flags", offline,
              ", ".join(f"{k}={v}" for k, v in flags.items())
              + ("" if offline else ": set both to 1 so nothing reaches for the network"),
              {"flags": flags}),
        Check("settings", True, ", ".join(f"{k}={v}" for k, v in settings.model_dump().items()),
              {"settings": settings.model_dump(mode="json")}),
    ]


def run_checks(hint: str | Path | None, settings: Settings, verify: bool = False) -> list[Check]:
    checks, model_dir = _path_checks(hint, settings)
    path_cache = PathCache(settings.cache_dir.resolve())  # warns once about a broken L3
    hashed = None
    if model_dir is not None:
        try:
            # --verify: every file hashed once, for its own line and for the caches' checks.
            hashed = path_cache.record_for(model_files(model_dir)) if verify else None
            checks += _file_checks(model_dir, path_cache, hashed)
        except (ModelFileError, OSError) as e:
            checks.append(Check("model files", False, str(e)))
            model_dir = None
    checks += _cache_checks(model_dir, settings, path_cache, hashed)
    checks += _environment_checks(settings)
    return checks


def first_problem(checks: list[Check]) -> Check | None:
    return next((check for check in checks if not check.ok), None)
