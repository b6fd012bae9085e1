"""``python -m sensevoice_core doctor``: the troubleshooting list, checked in order.

Model path (or every rejected candidate and why), each model file, the L3 and L2 caches, torch
and CUDA, the offline flags and the effective settings. The first problem found decides the
exit status and is named on the last line.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sensevoice_core.errors import ModelFileError
from sensevoice_core.loader import model_files
from sensevoice_core.model_path import diagnose_model_paths, find_or_fix_model_path
from sensevoice_core.path_cache import ROLES, PathCache, sha256_file
from sensevoice_core.settings import Settings
from sensevoice_core.snapshot import SnapshotError, read_header, snapshot_path, verify_data

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


def _file_checks(model_dir: Path, settings: Settings, verify: bool) -> list[Check]:
    files = model_files(model_dir)
    cached = PathCache(settings.cache_dir).read().entries.get(str(model_dir.resolve()))
    checks = []
    for role in ROLES:
        path: Path = getattr(files, role).resolve()
        stat = path.stat()
        old = cached.files.get(role) if cached else None
        same = old is not None and (old.size, old.mtime_ns) == (stat.st_size, stat.st_mtime_ns)
        if verify:
            digest = sha256_file(path)
            status = ("sha256 matches L3" if old and digest == old.sha256
                      else f"sha256 {digest[:16]}" + (" (differs from L3)" if old else ""))
        else:
            status = (f"unchanged since cached (sha256 {old.sha256[:16]})" if same
                      else "not in L3 yet" if old is None else "changed since cached")
        checks.append(Check(f"file {role}", True, f"{path.name}: {stat.st_size:,} bytes, {status}",
                            {"path": str(path), "size": stat.st_size}))
    return checks


def _cache_checks(model_dir: Path | None, settings: Settings, verify: bool) -> list[Check]:
    cache_dir = settings.cache_dir.resolve()
    checks = [_writable_check(cache_dir)]
    path_cache = PathCache(cache_dir)
    content = path_cache.read()
    entry = content.entries.get(str(model_dir.resolve())) if model_dir else None
    if model_dir is None:
        return checks
    if entry is None:
        checks.append(Check("L3 path cache", True,
                            f"{path_cache.path}: no entry for this model yet (the next load "
                            "hashes its files once)"))
        return checks
    files = model_files(model_dir)
    reused = path_cache.unchanged_record(files) is not None
    record = path_cache.record_for(files)
    checks.append(Check("L3 path cache", True,
                        f"{path_cache.path}: {'valid' if reused else 'stale, will be refreshed'}"
                        f", fingerprint {record.fingerprint[:16]}",
                        {"fingerprint": record.fingerprint, "valid": reused}))
    if settings.disable_cache:
        checks.append(Check("L2 snapshot", True, "disabled (SENSEVOICE_DISABLE_CACHE=true)"))
        return checks
    snapshot = snapshot_path(cache_dir, record.fingerprint)
    if not snapshot.is_file():
        checks.append(Check("L2 snapshot", True,
                            f"{snapshot}: not built yet (the next load builds it)"))
        return checks
    try:
        _, metadata, _ = read_header(snapshot)
        if metadata.get("fingerprint") != record.fingerprint:
            raise SnapshotError(snapshot, "fingerprint differs from the model's")
        if verify:
            verify_data(snapshot)
        size = snapshot.stat().st_size
        checks.append(Check("L2 snapshot", True,
                            f"{snapshot}: valid{' (data verified)' if verify else ''}, "
                            f"{size / 2**20:.1f} MiB", {"path": str(snapshot), "size": size}))
    except SnapshotError as e:
        checks.append(Check("L2 snapshot", False,
                            f"{e}. It will be discarded and rebuilt on the next load"))
    return checks


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
        Check("offline flags", offline,
              ", ".join(f"{k}={v}" for k, v in flags.items())
              + ("" if offline else ": set both to 1 so nothing reaches for the network"),
              {"flags": flags}),
        Check("settings", True, ", ".join(f"{k}={v}" for k, v in settings.model_dump().items()),
              {"settings": settings.model_dump(mode="json")}),
    ]


def run_checks(hint: str | Path | None, settings: Settings, verify: bool = False) -> list[Check]:
    checks, model_dir = _path_checks(hint, settings)
    if model_dir is not None:
        try:
            checks += _file_checks(model_dir, settings, verify)
        except (ModelFileError, OSError) as e:
            checks.append(Check("model files", False, str(e)))
            model_dir = None
    checks += _cache_checks(model_dir, settings, verify)
    checks += _environment_checks(settings)
    return checks


def first_problem(checks: list[Check]) -> Check | None:
    return next((check for check in checks if not check.ok), None)
