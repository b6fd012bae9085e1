"""The model cache never serves a wrong model: damaged snapshots with size and mtime restored,
edited or stale L3 entries, snapshots of another directory. Real files, real processes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_factory import DEMO_MODEL, one_pass, write_official
from service import start_service

from sensevoice_core import Settings, load_sensevoice_cached
from sensevoice_core.errors import SnapshotError
from sensevoice_core.loader import load_model_dir
from sensevoice_core.snapshot import (
    SnapshotSource,
    check_source,
    read_header,
    snapshot_path,
    verify_data,
)

ROOT = Path(__file__).resolve().parents[1]
HELLO = ROOT / "ui" / "examples" / "en_02.flac"  # the demo model says "Hello world." with ITN
HELLO_TEXT = "Hello world."


def damage_in_place(snapshot: Path) -> None:
    """Bit rot, or a restored copy of a damaged file: bytes in the data section replaced where
    they lie (first encoder layer norm -> NaN), then size and mtime set back as they were."""
    stat = snapshot.stat()
    entries, _, data_start = read_header(snapshot)
    begin, end = entries["encoder.encoders0.0.norm1.weight"]["data_offsets"]
    snapshot.chmod(0o644)
    with open(snapshot, "r+b") as handle:
        handle.seek(data_start + begin)
        handle.write(b"\xff" * (end - begin))
    snapshot.chmod(0o444)
    os.utime(snapshot, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = snapshot.stat()
    assert (after.st_size, after.st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    with pytest.raises(SnapshotError, match="data checksum mismatch"):
        verify_data(snapshot)


def transcribe_cli(cache_dir: Path) -> subprocess.CompletedProcess[str]:
    """`python -m sensevoice_core transcribe` on the demo model: a new process each time."""
    return subprocess.run([sys.executable, "-m", "sensevoice_core", "transcribe", "--model",
                           str(DEMO_MODEL), "--itn", str(HELLO)],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "SENSEVOICE_CACHE_DIR": str(cache_dir)})


def only_snapshot(cache_dir: Path) -> Path:
    (snapshot,) = (cache_dir / "snapshots").glob("*.safetensors")
    return snapshot


def test_a_damaged_snapshot_with_size_and_mtime_kept_is_refused_by_the_next_process(tmp_path):
    cache = tmp_path / "cache"
    first = transcribe_cli(cache)
    assert first.returncode == 0 and first.stdout.strip() == HELLO_TEXT, first.stderr
    snapshot = only_snapshot(cache)
    damage_in_place(snapshot)

    second = transcribe_cli(cache)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == HELLO_TEXT  # the damaged weights were not served
    warnings = [line for line in second.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, second.stderr
    assert f"L2 snapshot {snapshot} discarded" in warnings[0]
    assert "data checksum mismatch" in warnings[0]
    verify_data(only_snapshot(cache))  # rebuilt whole

    third = transcribe_cli(cache)
    assert third.stdout.strip() == HELLO_TEXT and "WARNING" not in third.stderr


def test_the_service_refuses_a_damaged_snapshot_on_restart_and_says_so(tmp_path):
    """The tester's row 3 on the running service: restart after damage, status and replies."""
    service = start_service(tmp_path / "work", DEMO_MODEL, standby=False)
    try:
        assert service.status().model.warnings == []
    finally:
        assert service.stop() == 0
    snapshot = only_snapshot(tmp_path / "work" / "cache")
    damage_in_place(snapshot)

    service = start_service(tmp_path / "work", DEMO_MODEL, standby=False)
    try:
        model = service.status().model
        assert model.cache_level == "fresh"
        assert any(f"L2 snapshot {snapshot} discarded" in w and "data checksum mismatch" in w
                   for w in model.warnings), model.warnings
        assert service.client.transcribe(HELLO, use_itn=True).text == HELLO_TEXT
    finally:
        assert service.stop() == 0


# --- L3 entries that lie ----------------------------------------------------------------------


@pytest.fixture
def two_models(tmp_path: Path) -> tuple[Path, Path, Settings]:
    """Two different tiny models, each loaded once into one cache (L3 entries + snapshots)."""
    a, b = write_official(tmp_path / "a", seed=1), write_official(tmp_path / "b", seed=2)
    settings = Settings(compute_type="float32", cache_dir=tmp_path / "cache")
    for model_dir in (a, b):
        load_sensevoice_cached(model_dir, settings=settings)
    return a, b, settings


def edit_l3(settings: Settings, edit) -> None:
    path = settings.cache_dir / "model_path.json"
    content = json.loads(path.read_text(encoding="utf-8"))
    edit(content["entries"])
    path.write_text(json.dumps(content), encoding="utf-8")


def assert_serves(model, report, model_dir: Path) -> None:
    """The weights in the files of model_dir, and the fingerprint of those files."""
    expected = load_model_dir(model_dir)
    for key, value in expected.model.state_dict().items():
        assert torch.equal(model.model.state_dict()[key], value), key
    hashed = load_sensevoice_cached(model_dir, settings=Settings(
        compute_type="float32", cache_dir=model_dir.parent / f"clean-{model_dir.name}",
        disable_cache=True))[1]
    assert report.fingerprint == hashed.fingerprint
    assert report.file_sha256 == hashed.file_sha256


def test_an_l3_entry_carrying_another_models_fingerprint_is_not_followed(two_models, caplog):
    a, b, settings = two_models
    key_a, key_b = str(a.resolve()), str(b.resolve())

    def swap(entries: dict) -> None:
        entries[key_a]["fingerprint"], entries[key_b]["fingerprint"] = (
            entries[key_b]["fingerprint"], entries[key_a]["fingerprint"])
    edit_l3(settings, swap)

    with caplog.at_level(logging.WARNING, logger="sensevoice.cache"):
        model, report = load_sensevoice_cached(a, settings=settings)
    assert_serves(model, report, a)
    (warning,) = [m for m in caplog.messages if "inconsistent" in m]
    assert key_a in warning and "model_path.json" in warning
    assert warning in report.warnings
    _, again = load_sensevoice_cached(a, settings=settings)  # the entry was rewritten
    assert again.level == "L2" and not again.warnings


def test_an_l3_entry_carrying_another_models_checksums_is_not_followed(two_models, caplog):
    """Fingerprint and checksums both B's, A's sizes, mtimes, inodes and ctimes kept: the
    entry is self-consistent, but no snapshot of A's directory confirms it."""
    a, b, settings = two_models
    key_a, key_b = str(a.resolve()), str(b.resolve())

    def take_bs_checksums(entries: dict) -> None:
        for role, record in entries[key_a]["files"].items():
            record["sha256"] = entries[key_b]["files"][role]["sha256"]
        entries[key_a]["fingerprint"] = entries[key_b]["fingerprint"]
    edit_l3(settings, take_bs_checksums)

    with caplog.at_level(logging.WARNING, logger="sensevoice.cache"):
        model, report = load_sensevoice_cached(a, settings=settings)
    assert_serves(model, report, a)
    (warning,) = [m for m in caplog.messages if "was wrong" in m]
    assert key_a in warning and "weights model.pt" in warning and "model_path.json" in warning
    assert warning in report.warnings


def test_a_snapshot_of_another_directory_is_refused_with_both_named(two_models, caplog):
    """As above, and B's snapshot copied to the name A's entry points at."""
    a, b, settings = two_models
    key_a, key_b = str(a.resolve()), str(b.resolve())
    entries = json.loads((settings.cache_dir / "model_path.json").read_text())["entries"]
    fingerprint_b = entries[key_b]["fingerprint"]
    impostor = snapshot_path(settings.cache_dir, fingerprint_b, key_a)
    shutil.copyfile(snapshot_path(settings.cache_dir, fingerprint_b, key_b), impostor)

    def take_bs_checksums(entries: dict) -> None:
        for role, record in entries[key_a]["files"].items():
            record["sha256"] = entries[key_b]["files"][role]["sha256"]
        entries[key_a]["fingerprint"] = fingerprint_b
    edit_l3(settings, take_bs_checksums)

    with caplog.at_level(logging.WARNING, logger="sensevoice.cache"):
        model, report = load_sensevoice_cached(a, settings=settings)
    assert_serves(model, report, a)
    (warning,) = [m for m in caplog.messages if "discarded" in m]
    assert str(impostor) in warning
    assert f"built from {key_b}, not from {key_a}" in warning
    assert not impostor.exists()


def test_a_weights_file_replaced_with_size_and_mtime_set_back_is_hashed_again(two_models):
    """What the file system lets anyone fake (size, mtime) is not what L3 trusts."""
    a, b, settings = two_models
    stat = (a / "model.pt").stat()
    assert (b / "model.pt").stat().st_size == stat.st_size  # same shapes, other values
    shutil.copyfile(b / "model.pt", a / "model.pt")  # rewritten in place: same inode
    os.utime(a / "model.pt", ns=(stat.st_atime_ns, stat.st_mtime_ns))

    model, report = load_sensevoice_cached(a, settings=settings)
    assert_serves(model, report, a)  # B's weights, now in A's file, under their fingerprint
    assert report.bytes_hashed > 0


@pytest.mark.parametrize("edit", ["drop_role", "garbage_fingerprint", "wrong_path"])
def test_other_hand_edits_of_an_entry_fall_back_to_hashing(two_models, edit):
    a, _, settings = two_models
    key_a = str(a.resolve())
    _, before = load_sensevoice_cached(a, settings=settings)

    def change(entries: dict) -> None:
        entry = entries[key_a]
        if edit == "drop_role":
            del entry["files"]["cmvn"]
        elif edit == "garbage_fingerprint":
            entry["fingerprint"] = "../../../etc/passwd"
        else:
            entry["files"]["weights"]["path"] = str(a.parent / "b" / "model.pt")
    edit_l3(settings, change)

    model, report = load_sensevoice_cached(a, settings=settings)
    assert report.fingerprint == before.fingerprint and report.bytes_hashed > 0
    assert report.level == "L2"  # A's own snapshot, confirmed by the hashes
    assert_serves(model, report, a)


def test_check_source_names_the_role_both_checksums_and_the_directory(two_models):
    a, _, settings = two_models
    _, report = load_sensevoice_cached(a, settings=settings)
    _, metadata, _ = read_header(report.snapshot)
    files = {role: (sha, Path(report.file_paths[role]).stat().st_size)
             for role, sha in report.file_sha256.items()}
    check_source(report.snapshot, metadata, report.fingerprint,
                 SnapshotSource(str(a.resolve()), files))  # its own source: accepted
    files["config"] = ("f" * 64, files["config"][1])
    with pytest.raises(SnapshotError) as error:
        check_source(report.snapshot, metadata, report.fingerprint,
                     SnapshotSource(str(a.resolve()), files))
    message = str(error.value)
    assert "config file with sha256 " + report.file_sha256["config"][:16] in message
    assert "ffffffffffffffff" in message and str(a.resolve()) in message


def test_a_snapshot_damaged_after_this_process_verified_it_is_hashed_again(tmp_path, caplog):
    """Once per process is once per file identity: an in-place write moves the ctime, even
    when size and mtime are set back, so the same process hashes the file again."""
    model_dir = write_official(tmp_path / "m")
    settings = Settings(compute_type="float32", cache_dir=tmp_path / "cache")
    _, first = load_sensevoice_cached(model_dir, settings=settings)
    _, second = load_sensevoice_cached(model_dir, settings=settings)
    assert second.level == "L2" and "verify_l2" not in second.steps_s  # known to this process
    # (The models already loaded map the file: an in-place write reaches them too. Snapshots
    # are read-only and replaced by rename for that reason; only root can do this.)
    damage_in_place(first.snapshot)

    with caplog.at_level(logging.WARNING, logger="sensevoice.cache"):
        model, third = load_sensevoice_cached(model_dir, settings=settings)
    assert third.level == "fresh"
    assert any("data checksum mismatch" in m for m in third.warnings)
    assert_serves(model, third, model_dir)


def test_an_l3_path_that_is_a_directory_is_one_warning_per_problem(tmp_path, caplog):
    model_dir = write_official(tmp_path / "m")
    settings = Settings(compute_type="float32", cache_dir=tmp_path / "cache")
    (settings.cache_dir / "model_path.json").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="sensevoice.cache"):
        model, report = load_sensevoice_cached(model_dir, settings=settings)
    assert one_pass(model, HELLO)[0].token_ids
    unreadable = [m for m in caplog.messages if "is unreadable" in m]
    unwritable = [m for m in caplog.messages if "cannot write L3" in m]
    assert len(unreadable) == 1 and len(unwritable) == 1, caplog.messages
    assert unreadable[0] in report.warnings and unwritable[0] in report.warnings
    assert "model_path.json" in unreadable[0] and "Fix:" in unreadable[0]


def test_weights_replaced_during_a_fresh_load_are_never_labelled_with_the_old_checksums(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A deploy renames new weights in while a fresh load runs, between the hash and the
    parse: the load is done again on the new files, and no snapshot pairs one model's
    checksums with the other's weights (that snapshot would later pass every check)."""
    import sensevoice_core.cache as cache

    served, other = tmp_path / "served", tmp_path / "other"
    write_official(served, seed=1)
    write_official(other, seed=2)
    settings = Settings(compute_type="float32", cache_dir=tmp_path / "cache")
    real_load = cache.load_model_dir
    calls = []

    def load_after_a_deploy(directory: Path, device: str):
        if not calls:  # the race, made certain: the files were hashed, now they change
            staging = served / ".incoming"
            shutil.copyfile(other / "model.pt", staging)
            os.replace(staging, served / "model.pt")
        calls.append(directory)
        return real_load(directory, device)

    monkeypatch.setattr(cache, "load_model_dir", load_after_a_deploy)
    model, report = load_sensevoice_cached(served, settings=settings)
    monkeypatch.setattr(cache, "load_model_dir", real_load)
    expected = load_model_dir(other)
    assert len(calls) == 2, "the load was not done again after the files changed"
    assert report.fingerprint == load_sensevoice_cached(other, settings=Settings(
        compute_type="float32", cache_dir=tmp_path / "other-cache"))[1].fingerprint
    for name, tensor in expected.model.state_dict().items():
        torch.testing.assert_close(model.model.state_dict()[name], tensor, rtol=0, atol=0)
