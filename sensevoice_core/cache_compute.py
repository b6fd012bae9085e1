"""The compute-type side of a cached load (cache.py): which snapshot a type is served from,
what its header records, the conversion with its accuracy gate, and pruning.

A reduced type's snapshot records, besides the type asked for (``compute_requested``) and a
gate fallback (``compute_gate``), whether the gate ran (``compute_checked``) and, for int8,
the int8 kernel parameter it was checked with (``int8_reduce_range``, which depends on the
machine). Both are part of its name too, so processes with other settings or machines with
other int8 numerics sharing one cache each get their own snapshot, checked where it is built;
a header that disagrees with this process is a miss, and the snapshot is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from sensevoice_core.compute import (
    SAFER,
    ComputeChoice,
    ConcreteComputeType,
    served_fingerprint,
)
from sensevoice_core.compute_check import check_against_float32
from sensevoice_core.convert import convert_model
from sensevoice_core.errors import SnapshotError
from sensevoice_core.int8 import Int8Linear, needs_reduce_range
from sensevoice_core.load_report import LoadReport, StepTimer, remove_file, warn
from sensevoice_core.path_cache import PathRecord
from sensevoice_core.pipeline import SenseVoice
from sensevoice_core.settings import Settings
from sensevoice_core.snapshot import read_header, snapshot_path
from sensevoice_core.snapshot_trust import forget as forget_verified


def _word(flag: bool) -> str:
    return "true" if flag else "false"


def compute_metadata(chosen: ConcreteComputeType, compute_check: bool) -> dict[str, str]:
    """The header fields a snapshot for `chosen` must carry in this process."""
    metadata = {"compute_requested": chosen}
    if chosen != "float32":
        metadata["compute_checked"] = _word(compute_check)
    if chosen.startswith("int8"):
        metadata["int8_reduce_range"] = _word(needs_reduce_range())
    return metadata


def snapshot_for(cache_dir: Path, record: PathRecord, chosen: ConcreteComputeType,
                 compute_check: bool) -> Path:
    """The snapshot a load of `record` as `chosen` uses (float32: named by the model's own
    fingerprint, as before compute types existed)."""
    name = served_fingerprint(record.fingerprint, chosen)
    if chosen != "float32":
        variant = "/".join(f"{k}={v}" for k, v in
                           sorted(compute_metadata(chosen, compute_check).items()))
        name = hashlib.sha256(f"{name}/{variant}".encode()).hexdigest()
    return snapshot_path(cache_dir, name, record.model_dir)


def check_compute(path: Path, metadata: dict[str, str], chosen: ConcreteComputeType,
                  compute_check: bool) -> None:
    """Raise SnapshotError unless the snapshot was built for this type, with this process's
    gate setting and int8 kernel parameters (older files: float32, nothing recorded)."""
    served = metadata.get("compute_type", "float32")
    built_for = metadata.get("compute_requested", served)
    if built_for != chosen:
        raise SnapshotError(path, f"it was built for compute type {built_for}, not {chosen}")
    for key, want in compute_metadata(chosen, compute_check).items():
        found = metadata.get(key, "unrecorded")
        if found != want:
            raise SnapshotError(path, f"it was built with {key}={found}, this process has "
                                      f"{key}={want}")


def convert_checked(loaded: SenseVoice, choice: ComputeChoice, settings: Settings,
                    report: LoadReport, timer: StepTimer) -> tuple[SenseVoice, str]:
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
        warn(report, f"compute type {note}; set SENSEVOICE_COMPUTE_TYPE={safer} to skip the "
                     f"check, or SENSEVOICE_COMPUTE_CHECK=false and "
                     f"SENSEVOICE_COMPUTE_TYPE={choice.chosen} to serve it unchecked")
        gate = f"{gate}; {note}" if gate else note
        compute_type = safer
    report.compute_type = compute_type
    if gate:
        report.compute_reason = f"{choice.reason}; {gate}"
    if compute_type == "float32":
        return loaded, gate
    return dataclasses.replace(loaded, model=converted), gate


def served_from_snapshot(report: LoadReport, model: SenseVoice, choice: ComputeChoice,
                         snapshot: Path) -> None:
    """An L2 hit serves the type its snapshot holds: the chosen one, or the gate's fallback
    (recorded when the snapshot was built)."""
    served = model.model.compute_type
    if served != choice.chosen:
        gate = read_header(snapshot)[1].get("compute_gate", f"{choice.chosen} -> {served}")
        report.compute_type = served
        report.compute_reason = f"{choice.reason}; {gate} (recorded in the L2 snapshot)"
        warn(report, f"compute type {gate}, when the L2 snapshot was built; rebuild it with "
                     f"force_fresh to check again")


def adopt_packed(source: SenseVoice, target: SenseVoice) -> None:
    """Give the mapped model's int8 layers the packed weights the converted copy already built
    (the gate's forward packs them): the same int8 tensors, so packing twice is waste."""
    packed = {name: layer._packed for name, layer in source.model.named_modules()
              if isinstance(layer, Int8Linear) and layer._packed is not None}
    for name, layer in target.model.named_modules():
        if isinstance(layer, Int8Linear) and name in packed:
            layer._packed = packed[name]


def prune_snapshots(directory: Path, keep_count: int, keep: Path) -> list[Path]:
    """Delete all but the newest keep_count snapshots of keep's compute type; never keep
    itself. Snapshots of other types stay: a float32 load by doctor or a benchmark must not
    evict the service's int8 snapshot."""
    def requested(path: Path) -> str | None:
        try:
            metadata = read_header(path)[1]
        except (SnapshotError, OSError):
            return None  # pruned meanwhile, or unreadable: a load judges it
        return metadata.get("compute_requested", metadata.get("compute_type", "float32"))

    kind = requested(keep)
    dated = []
    for snapshot in directory.glob("sensevoice-*.safetensors"):
        try:
            mtime = snapshot.stat().st_mtime_ns
        except FileNotFoundError:
            continue
        if snapshot != keep and requested(snapshot) == kind:
            dated.append((mtime, snapshot))
    removed = [p for _, p in sorted(dated, reverse=True)][max(keep_count - 1, 0):]
    # Lock files stay: deleting one another process holds would break its exclusion.
    for old in removed:
        remove_file(old)
        forget_verified(old)
    return removed
